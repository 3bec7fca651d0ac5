"""Ground truth -> events (peaks linked over frames) -> crop folders with metadata.

  python -m smlm_jax.events.crops --movie=movie.ome.tif --ground_truth=ground_truth.tif \
      --output_dir=event_data/ [--csv=labels.csv instead of --ground_truth] \
      [--channel=0] [--crop_px=256] [--pre_frames=1] [--post_frames=0] \
      [--max_gap_frames=2] [--link_radius_px=10] [--negatives=N] [--negative_frames=5] \
      [--metadata=db.yaml] [--seed=0]

Events: in every frame the local maxima of the ground truth above 0.5 (sub-pixel by a
log-parabola fit, exact for a Gaussian) are linked to the nearest open event whose last
site is within ``--link_radius_px`` and at most ``--max_gap_frames`` frames back
(missing annotations in between are tolerated); otherwise they start a new event.
This is deep-events' ``event_extraction.basic_scan`` with a distance instead of a crop
size as the link criterion, so two divisions in one field stay two events.

Crops: ``crop_px`` square (default 256, deep-events' size) centred on the event's mean
site, shifted inside the movie at its edges; frames from ``pre_frames`` before the first
annotated frame ("just before": the model's input window needs the frame before) to
``post_frames`` after the last. Negative crops (default as many as events): random
boxes and frame windows of ``--negative_frames`` frames in which the ground truth is 0.

Each crop is a folder ``event_<id>/`` (or ``negative_<id>/``) holding ``images.tif``
(the movie's dtype, ImageJ TIFF with pixel size and frame interval), ``ground_truth.tif``
(uint8, 254 = peak, as in :mod:`.annotate`) and ``event_db.yaml``: _id, type
(event | negative), source_file, original_file, channel, crop_box [x0, y0, x1, y1] (px
of the source movie, deep-events' order), source_frames [first, stop) (source-movie
frame range), num_frames, event_frames (crop frames with ground truth), site_yx_px (mean
site in crop px), pixel_size_nm, frame_interval_s, sigma_px, and every key of the user
YAML (``--metadata``, default ``db.yaml`` next to the movie, deep-events' per-folder
record; e.g. cell_line, microscope, stain, event_content, date). The id is a hash of
source path, channel, kind, frames and box: re-running gives the same ids, so adding the
folders to a database again updates rather than duplicates them. A PNG
``crops_overview.png`` shows the maximum projection with event (red) and negative
(cyan) boxes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import sys

import numpy as np

from smlm_jax.core import cli
from smlm_jax.core import tiff_io
from smlm_jax.core.tiff_io import MovieError
from smlm_jax.events import annotate

PEAK_THRESHOLD = 0.5
RESERVED_KEYS = ("_id", "type", "source_file", "original_file", "channel", "crop_box",
                 "source_frames", "num_frames", "event_frames", "site_yx_px",
                 "pixel_size_nm", "frame_interval_s", "sigma_px")


@dataclasses.dataclass
class Event:
  """An event: its sites (frame, y px, x px) in the source movie, in frame order."""
  frames: list
  ys: list
  xs: list

  @property
  def first(self) -> int:
    return self.frames[0]

  @property
  def last(self) -> int:
    return self.frames[-1]

  @property
  def centre(self):
    return float(np.mean(self.ys)), float(np.mean(self.xs))


def find_peaks(frame: np.ndarray, threshold: float = PEAK_THRESHOLD, min_distance_px: int = 3):
  """Sub-pixel local maxima (y, x) of a ground-truth frame above ``threshold``.

  Maxima are pixels equal to the maximum of their (2 d + 1)^2 neighbourhood; plateaus
  (ties) give one peak at their first pixel. Each is refined by a log-parabola through
  the peak and its two neighbours along y and along x (exact for a sampled Gaussian).
  """
  from scipy import ndimage
  frame = np.asarray(frame, np.float32)
  if frame.size == 0 or frame.max() <= threshold:
    return []
  size = 2 * min_distance_px + 1
  is_max = (frame == ndimage.maximum_filter(frame, size=size, mode="constant")) & (
      frame > threshold)
  labels, n = ndimage.label(is_max)
  peaks = []
  for sl in ndimage.find_objects(labels):
    y, x = sl[0].start, sl[1].start
    peaks.append((y + _vertex(frame[y - 1:y + 2, x] if 0 < y < frame.shape[0] - 1 else None),
                  x + _vertex(frame[y, x - 1:x + 2] if 0 < x < frame.shape[1] - 1 else None)))
  return peaks


def _vertex(v):
  """Offset of the vertex of the parabola through log(v[0..2]) from v[1] (0 if unsure)."""
  if v is None or np.any(v <= 0):
    return 0.0
  l = np.log(v.astype(np.float64))
  den = l[0] - 2 * l[1] + l[2]
  if den >= 0:
    return 0.0
  return float(np.clip(0.5 * (l[0] - l[2]) / den, -0.5, 0.5))


def link_events(gt: np.ndarray, max_gap_frames: int = 2, link_radius_px: float = 10.0,
                threshold: float = PEAK_THRESHOLD) -> list[Event]:
  """Events of a [T, H, W] ground truth: peaks linked over frames (module docstring).

  Within a frame, peaks are assigned greedily by distance (closest pair first), each
  open event taking at most one peak per frame.
  """
  events: list[Event] = []
  for t in range(gt.shape[0]):
    peaks = find_peaks(gt[t], threshold)
    open_ = [e for e in events if t - e.last - 1 <= max_gap_frames]
    pairs = sorted((math.hypot(py - e.ys[-1], px - e.xs[-1]), i, j)
                   for i, (py, px) in enumerate(peaks) for j, e in enumerate(open_))
    used_p, used_e = set(), set()
    for d, i, j in pairs:
      if d > link_radius_px or i in used_p or j in used_e:
        continue
      used_p.add(i)
      used_e.add(j)
      open_[j].frames.append(t)
      open_[j].ys.append(peaks[i][0])
      open_[j].xs.append(peaks[i][1])
    for i, (py, px) in enumerate(peaks):
      if i not in used_p:
        events.append(Event([t], [py], [px]))
  return sorted(events, key=lambda e: (e.first, e.ys[0], e.xs[0]))


def crop_origin(cy: float, cx: float, size: int, height: int, width: int):
  """Top-left (y0, x0) of a size x size box centred near (cy, cx), inside the image."""
  sy, sx = min(size, height), min(size, width)
  y0 = int(np.clip(round(cy - sy / 2), 0, height - sy))
  x0 = int(np.clip(round(cx - sx / 2), 0, width - sx))
  return y0, x0, sy, sx


def event_id(source: str, channel: int, kind: str, t0: int, t1: int, y0: int, x0: int,
             sy: int, sx: int) -> str:
  """24 hex digits (the length of deep-events' MongoDB ids), a hash of the crop."""
  key = f"{os.path.abspath(source)}|{channel}|{kind}|{t0}|{t1}|{y0}|{x0}|{sy}|{sx}"
  return hashlib.sha1(key.encode()).hexdigest()[:24]


def negative_windows(gt: np.ndarray, count: int, size: int, num_frames: int, rng,
                     attempts: int = 200):
  """Up to ``count`` (t0, y0, x0) of boxes x frame windows where the ground truth is 0."""
  t, h, w = gt.shape
  sy, sx, nt = min(size, h), min(size, w), min(num_frames, t)
  found = []
  for _ in range(attempts):
    if len(found) >= count:
      break
    t0 = int(rng.integers(0, t - nt + 1))
    y0 = int(rng.integers(0, h - sy + 1))
    x0 = int(rng.integers(0, w - sx + 1))
    if gt[t0:t0 + nt, y0:y0 + sy, x0:x0 + sx].max() > 0:
      continue
    if any(abs(t0 - a) < nt and abs(y0 - b) < sy and abs(x0 - c) < sx for a, b, c in found):
      continue      # overlapping an earlier negative: not an independent example
    found.append((t0, y0, x0))
  return found, (nt, sy, sx)


def read_user_metadata(path: str | None) -> dict:
  """The user's YAML record (a mapping), {} when path is None."""
  if not path:
    return {}
  from smlm_jax.events.db import read_yaml_mapping
  return read_yaml_mapping(path)


def _plain(value):
  """numpy scalars/arrays -> Python types for YAML."""
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def write_crop(folder: str, images: np.ndarray, gt: np.ndarray, record: dict,
               pixel_size_nm=None, frame_interval_s=None) -> None:
  """images.tif, ground_truth.tif and event_db.yaml of one crop (YAML written last, so
  a folder with a YAML is complete)."""
  import yaml
  os.makedirs(folder, exist_ok=True)
  if images.dtype not in (np.uint8, np.uint16, np.float32):
    images = images.astype(np.float32)
  tiff_io.write_image(os.path.join(folder, "images.tif"), images, "TYX",
                      pixel_size_nm=pixel_size_nm, frame_interval_s=frame_interval_s)
  annotate.write_ground_truth(os.path.join(folder, "ground_truth.tif"), gt, gt.shape,
                              pixel_size_nm, frame_interval_s)
  cli.atomic_write_text(os.path.join(folder, "event_db.yaml"),
                        yaml.safe_dump(_plain(record), sort_keys=False))


def make_crops(movie_path: str, gt: np.ndarray, output_dir: str, channel: int = 0,
               crop_px: int = 256, pre_frames: int = 1, post_frames: int = 0,
               max_gap_frames: int = 2, link_radius_px: float = 10.0,
               negatives: int | None = None, negative_frames: int = 5, user: dict | None = None,
               sigma_px: float | None = None, seed: int = 0, frames=None, info=None,
               log=print):
  """Cuts event and negative crops of one movie; returns the list of records written."""
  if frames is None:
    frames, info = annotate.read_frames(movie_path, channel)
  t, h, w = frames.shape
  if gt.shape != frames.shape:
    raise MovieError(f"ground truth {gt.shape} and movie {frames.shape} differ in shape",
                     "wrong_size")
  user = dict(user or {})
  clash = sorted(k for k in user if k in RESERVED_KEYS)
  if clash:
    log(f"note: user metadata keys {clash} are set by the crops and ignored",
        file=sys.stderr)
  base = {k: v for k, v in user.items() if k not in RESERVED_KEYS}
  common = {"source_file": os.path.abspath(movie_path),
            "original_file": os.path.basename(movie_path), "channel": int(channel),
            "pixel_size_nm": info.pixel_size_nm, "frame_interval_s": info.frame_interval_s,
            "sigma_px": sigma_px}
  events = link_events(gt, max_gap_frames, link_radius_px)
  records = []
  for ev in events:
    cy, cx = ev.centre
    y0, x0, sy, sx = crop_origin(cy, cx, crop_px, h, w)
    t0, t1 = max(0, ev.first - pre_frames), min(t, ev.last + 1 + post_frames)
    eid = event_id(movie_path, channel, "event", t0, t1, y0, x0, sy, sx)
    sub_gt = gt[t0:t1, y0:y0 + sy, x0:x0 + sx]
    record = {"_id": eid, "type": "event", **common,
              "crop_box": [x0, y0, x0 + sx, y0 + sy], "source_frames": [t0, t1],
              "num_frames": t1 - t0,
              "event_frames": [int(i) for i in np.flatnonzero(sub_gt.max(axis=(1, 2)) > 0)],
              "site_yx_px": [round(cy - y0, 2), round(cx - x0, 2)], **base}
    write_crop(os.path.join(output_dir, f"event_{eid}"), frames[t0:t1, y0:y0 + sy, x0:x0 + sx],
               sub_gt, record, info.pixel_size_nm, info.frame_interval_s)
    records.append(record)
  count = len(events) if negatives is None else negatives
  rng = np.random.default_rng(seed)
  found, (nt, sy, sx) = negative_windows(gt, count, crop_px, negative_frames, rng)
  if len(found) < count:
    log(f"note: found {len(found)} of {count} negative crop(s) without any event",
        file=sys.stderr)
  for t0, y0, x0 in found:
    eid = event_id(movie_path, channel, "negative", t0, t0 + nt, y0, x0, sy, sx)
    record = {"_id": eid, "type": "negative", **common,
              "crop_box": [x0, y0, x0 + sx, y0 + sy], "source_frames": [t0, t0 + nt],
              "num_frames": nt, "event_frames": [], "site_yx_px": None, **base}
    write_crop(os.path.join(output_dir, f"negative_{eid}"),
               frames[t0:t0 + nt, y0:y0 + sy, x0:x0 + sx],
               np.zeros((nt, sy, sx), np.float32), record, info.pixel_size_nm,
               info.frame_interval_s)
    records.append(record)
  return records


def plot_overview(frames: np.ndarray, records, path: str, title: str = "") -> str:
  """Maximum projection with event (red) and negative (cyan) crop boxes."""
  from smlm_jax.core import plotting
  fig = plotting.image_grid([frames.max(axis=0)], [title], ncols=1, panel_size=6.0)
  ax = fig.axes[0]
  plt = plotting.pyplot()
  for r in records:
    x0, y0, x1, y1 = r["crop_box"]
    color = "red" if r["type"] == "event" else "cyan"
    ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                               color=color, lw=1))
    if r["site_yx_px"]:
      ax.plot(x0 + r["site_yx_px"][1], y0 + r["site_yx_px"][0], "+", color=color, ms=6)
  return plotting.save(fig, path)


# ----------------------------------------------------------------------------- CLI
def _define_flags():
  from absl import flags
  flags.DEFINE_string("movie", None, "The movie (TIFF/OME-TIFF).")
  flags.DEFINE_string("ground_truth", None, "Its ground truth (from annotate).")
  flags.DEFINE_string("csv", None, "Or: napari points CSV (ground truth made on the fly).")
  flags.DEFINE_string("output_dir", None, "Folder for the crop folders.")
  flags.DEFINE_integer("channel", 0, "Channel of a multi-channel movie.")
  flags.DEFINE_integer("crop_px", 256, "Crop size (px).")
  flags.DEFINE_integer("pre_frames", 1, "Frames before the first annotated one.")
  flags.DEFINE_integer("post_frames", 0, "Frames after the last annotated one.")
  flags.DEFINE_integer("max_gap_frames", 2, "Frames without annotation inside an event.")
  flags.DEFINE_float("link_radius_px", 10.0, "Largest site displacement between frames.")
  flags.DEFINE_integer("negatives", None, "Negative crops (default: as many as events).")
  flags.DEFINE_integer("negative_frames", 5, "Frames of a negative crop.")
  flags.DEFINE_string("metadata", None, "User YAML (default: db.yaml next to the movie).")
  flags.DEFINE_float("sigma_px", annotate.DEFAULT_SIGMA_PX, "Gaussian sigma with --csv.")
  flags.DEFINE_enum("units", "px", ["px", "um"], "Units of the CSV's y and x (--csv).")
  flags.DEFINE_integer("seed", 0, "Seed of the negative crops.")
  flags.DEFINE_string("plot", None, "Overview PNG (default: "
                      "OUTPUT_DIR/crops_overview.png; 'none' to skip).")


def main(argv):
  from absl import flags
  cli.quiet_logs()
  f = flags.FLAGS
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not f.movie or not f.output_dir:
    cli.fail("--movie and --output_dir are required")
  if bool(f.ground_truth) == bool(f.csv):
    cli.fail("give exactly one of --ground_truth=TIFF or --csv=napari.csv")
  for name in ("crop_px", "negative_frames"):
    if f[name].value < 1:
      cli.fail(f"--{name} must be >= 1")
  cli.require_nonnegative(f, ("pre_frames", "post_frames", "max_gap_frames", "channel",
                              "negatives"))
  cli.check_writable(f.output_dir, "output_dir", folder=True)
  if f.plot and f.plot.lower() != "none":
    cli.check_writable(f.plot, "plot")
  metadata = f.metadata
  if metadata is None:
    guess = os.path.join(os.path.dirname(os.path.abspath(f.movie)), "db.yaml")
    metadata = guess if os.path.isfile(guess) else None
  try:
    user = read_user_metadata(metadata)
    frames, info = annotate.read_frames(f.movie, f.channel)
    sigma = None
    if f.csv:
      points = annotate.read_points(f.csv, f.units, info.pixel_size_nm)
      full = annotate.movie_info(f.movie)
      annotate.check_points(points, full)
      gt = np.stack(list(annotate.ground_truth_frames(points, frames.shape, f.sigma_px)))
      sigma = f.sigma_px
    else:
      gt = annotate.read_ground_truth(f.ground_truth)
    records = make_crops(f.movie, gt, f.output_dir, f.channel, f.crop_px, f.pre_frames,
                         f.post_frames, f.max_gap_frames, f.link_radius_px, f.negatives,
                         f.negative_frames, user, sigma, f.seed, frames, info)
  except MovieError as e:
    cli.fail(str(e))
  except OSError as e:
    cli.fail(f"cannot write crops: {e}")
  events = [r for r in records if r["type"] == "event"]
  print(f"{len(events)} event crop(s), {len(records) - len(events)} negative crop(s) -> "
        f"{f.output_dir}" + (f" (metadata from {metadata})" if metadata else ""),
        file=sys.stderr)
  for r in events:
    print(f"  event_{r['_id']}: frames {r['source_frames'][0]}-{r['source_frames'][1] - 1}, "
          f"box x {r['crop_box'][0]}-{r['crop_box'][2]}, y {r['crop_box'][1]}-"
          f"{r['crop_box'][3]}", file=sys.stderr)
  if (f.plot or "").lower() != "none":
    path = f.plot or os.path.join(f.output_dir, "crops_overview.png")
    plot_overview(frames, records, path, os.path.basename(f.movie))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
