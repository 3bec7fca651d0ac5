"""Predicts event probability maps and detections for your movies.

  python -m smlm_jax.events.predict --workdir=runs/events_real --input=movies/ \
      --output=detections.csv [--threshold=0.8] [--radius_px=8] [--channel=0] \
      [--max_per_frame=1] [--tta] [--temporal=1] [--edge_px=6] [--no_probability_tiffs]

Inputs: TIFF / OME-TIFF movies [T, H, W] (or [T, C, H, W] with --channel) of at least
the run's window of n frames (``data.num_frames``, 3 by default) and at least
max(8, 2 x 2^depth) px per side (16 px for the default U-Net), files or folders
(searched recursively); a shell glob works too. Any frame size: the U-Net is fully convolutional. Every frame t gets a
prediction from the window of frames t-n+1 .. t (n = the run's data.num_frames; the
first frame is repeated before the start), normalized as in training
(:func:`smlm_jax.events.data.normalize`), so camera offset and gain need no flags.

Outputs, per movie, next to the CSV: ``<name>_prob.tif``, float32 [T, H, W] event
probabilities (ImageJ TIFF with the movie's pixel size and frame interval). The CSV
(``#`` comment lines first; ``pandas.read_csv(path, comment="#")``) has one row per
detection: local maxima of the probability >= the threshold, none within
``--radius_px`` of a higher one (non-maximum suppression); with ``--max_per_frame=k``
only the k most probable of each frame (k = 1: the per-frame-maximum rule of
``experiments/events_study.py``, whose thresholds on real crops are floors); with
``--temporal=K`` each frame's map is first averaged with the maps of the K frames
before and after it (fewer at the ends; a division persists over frames, a spurious
maximum need not), and the probability TIFF holds the averaged maps; with
``--edge_px=E`` nothing is detected within E px of the frame border (training never
places an event there; the maps are 0 there; default -1: the run's ``sim.margin_px``,
6 px; 0: off):

  file, frame, y_px, x_px, score, flag

frame counts from 0; y_px / x_px are pixel indices (row, column); score is the
probability; flag is ``ok``, or ``error:<reason>`` on a row (other columns empty) for an
input that could not be used (error:not_found, error:unreadable, error:rgb,
error:bad_shape, error:bad_channel, error:single_frame, error:too_few_frames,
error:too_small, error:constant_input, error:truncated, error:empty_folder, ...).
--output is checked before anything is read: a folder that cannot be written is an
error (exit 2) and nothing is left behind.
The threshold is the run's (``threshold.json``: maximum event-level F-beta on its
validation set) unless ``--threshold`` is given; the header says which, and lists every
movie with its number of frames and detections. A movie whose pixel size differs by
more than 20% from the training pixel size is warned about (the model has learned
structures of a given size in pixels). Bad inputs never stop the run: one ``error:``
line each on stderr; exit code 1 when any input failed, 0 otherwise.
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

import os
import sys
import time

from absl import app, flags
import numpy as np

from smlm_jax.core import cli
from smlm_jax.core import tiff_io
from smlm_jax.core.tiff_io import MovieError
from smlm_jax.events import annotate

COLUMNS = ("file", "frame", "y_px", "x_px", "score", "flag")
MIN_SIDE_PX = 8
PIXEL_SIZE_TOLERANCE = 0.2
PIXELS_PER_BATCH = 1 << 22        # windows x frames x pixels fed to the device at once


class Predictor:
  """A trained run ready to turn movies into probability maps."""

  def __init__(self, workdir: str, batch_size: int | None = None, tta: bool = False):
    from smlm_jax.core import trainer
    from smlm_jax.events import task as task_lib
    self.mesh = trainer.make_mesh()
    self.config, self.params, self.batch_stats = trainer.load_variables(workdir)
    self.n = int(self.config.data.num_frames)
    self.model = task_lib.build_model(self.config.model)
    self.batch_size = batch_size
    self._fn = task_lib.make_predict_fn(self.model, self.mesh, tta=tta)

  def probabilities(self, frames: np.ndarray):
    """Yields the [H, W] probability map of every frame of a movie [T, H, W]."""
    from smlm_jax.core import trainer
    from smlm_jax.events import data as data_lib
    t, h, w = frames.shape
    bs = self.batch_size or max(1, PIXELS_PER_BATCH // (self.n * h * w))
    bs = trainer.divisible_batch(bs, self.mesh)
    for start in range(0, t, bs):
      win = data_lib.windows(frames, self.n, range(start, min(t, start + bs)))
      probs = trainer.batched(lambda c: self._fn(self.params, self.batch_stats, c),
                              win.astype(np.float32), bs, self.mesh, pad="edge")
      yield from probs


def min_side_px(model_config) -> int:
  """Smallest frame side the U-Net is run on: its deepest level at least 2 x 2 px."""
  return max(MIN_SIDE_PX, 2 * 2 ** int(model_config.depth))


def _read(channel, min_frames=1, min_side=MIN_SIDE_PX):
  def read(path):
    frames, info = annotate.read_frames(path, channel)
    if frames.shape[0] == 1 < min_frames:
      raise MovieError(f"{path}: a single 2D frame {frames.shape[1:]}; expected a movie "
                       f"of at least {min_frames} frames (the model's window)",
                       "single_frame")
    if frames.shape[0] < min_frames:
      raise MovieError(f"{path}: only {frames.shape[0]} frame(s); the model needs at least "
                       f"{min_frames} (its window)", "too_few_frames")
    if min(frames.shape[1:]) < min_side:
      raise MovieError(f"{path}: frames of {frames.shape[1]}x{frames.shape[2]} px; need at "
                       f"least {min_side} px per side", "too_small")
    tiff_io.check_plausible(frames, path)
    return frames.astype(np.float32), info
  return read


def probability_path(output: str, movie: str, used: set) -> str:
  """<csv folder>/<movie name>_prob.tif, made unique among this run's outputs."""
  name = os.path.basename(movie)
  for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
    if name.lower().endswith(suffix):
      name = name[:-len(suffix)]
      break
  folder = os.path.dirname(os.path.abspath(output))
  path, i = os.path.join(folder, f"{name}_prob.tif"), 1
  while path in used:
    i += 1
    path = os.path.join(folder, f"{name}_{i}_prob.tif")
  used.add(path)
  return path


def write_probabilities(path: str, probs, shape, pixel_size_nm, frame_interval_s):
  """Streams [H, W] float32 maps into an ImageJ TIFF, atomically."""
  tiff_io.write_frames(path, probs, shape, np.float32, pixel_size_nm, frame_interval_s)


def run(workdir, inputs, output, threshold=None, radius_px=None, channel=0,
        batch_size=None, probability_tiffs=True, max_per_frame=0, tta=False,
        temporal=0, edge_px=-1.0) -> int:
  """The whole command; returns the exit code (1 when any input failed)."""
  from smlm_jax.events import metrics as metrics_lib
  from smlm_jax.events import task as task_lib
  t0 = time.time()
  predictor = Predictor(workdir, batch_size, tta)
  cfg = predictor.config
  if threshold is None:
    chosen = task_lib.read_threshold(workdir)
    threshold = float(chosen["threshold"])
    source = (f"threshold {threshold:.2f} from {task_lib.THRESHOLD_FILE} (max event-level "
              f"F{chosen['beta']:g} on {chosen['selected_on']}, step {chosen['step']})")
  else:
    source = f"threshold {threshold:.2f} (--threshold)"
  radius = float(radius_px or cfg.eval.radius_px)
  train_px = float(cfg.sim.pixel_size_nm)
  if tta:
    source += "; maps averaged over the 8 rotations / reflections (--tta)"
  if temporal:
    source += (f"; each map averaged with {temporal} frame(s) before and after it "
               "(--temporal)")
  if max_per_frame:
    source += f"; at most {max_per_frame} detection(s) per frame (--max_per_frame)"
  edge = float(cfg.sim.margin_px) if edge_px < 0 else float(edge_px)
  if edge > 0:
    source += (f"; nothing detected within {edge:g} px of the frame border (--edge_px; "
               "the maps are 0 there)")
  print(f"model from {workdir}: {predictor.n}-frame windows; {source}; NMS radius "
        f"{radius:g} px", file=sys.stderr)
  rows, notes, used = [], [], set()
  errors = 0
  read = _read(channel, predictor.n, min_side_px(cfg.model))
  for path, result, error in tiff_io.scan_files(inputs, read, "predict"):
    if error:
      rows.append([path, "", "", "", "", f"error:{error[1]}"])
      errors += 1
      continue
    frames, info = result
    prob_path = probability_path(output, path, used) if probability_tiffs else None
    found = []

    def tracked(maps):
      for t, p in enumerate(maps):
        peaks = metrics_lib.detect(p, threshold, radius)       # highest first
        peaks = peaks[:max_per_frame] if max_per_frame else peaks
        found.extend((t, y, x, s) for y, x, s in peaks)
        yield p

    maps = tracked(metrics_lib.temporal_mean(
        (metrics_lib.clear_edge(p, edge) for p in predictor.probabilities(frames)), temporal))
    if prob_path:
      write_probabilities(prob_path, maps, frames.shape, info.pixel_size_nm,
                          info.frame_interval_s)
    else:
      for _ in maps:
        pass
    rows += [[path, t, y, x, f"{s:.4f}", "ok"] for t, y, x, s in found]
    note = (f"{path}: {frames.shape[0]} frame(s) of {frames.shape[1]}x{frames.shape[2]} px, "
            f"{len(found)} detection(s)" + (f", probabilities {prob_path}" if prob_path else ""))
    px = info.pixel_size_nm
    if px and abs(px / train_px - 1.0) > PIXEL_SIZE_TOLERANCE:
      warning = (f"WARNING: {path}: pixel size {px:.4g} nm, the model was trained at "
                 f"{train_px:.4g} nm; resample the movie or retrain (structures differ "
                 "in size in pixels)")
      print(warning, file=sys.stderr)
      note += f"; {warning}"
    notes.append(note)
  header = [f"smlm_jax.events.predict workdir={os.path.abspath(workdir)}", source,
            f"NMS radius {radius:g} px; frame windows of {predictor.n}; training pixel size "
            f"{train_px:g} nm"] + notes
  cli.atomic_write_text(output, cli.csv_text(COLUMNS, rows, header))
  detections = sum(1 for r in rows if r[-1] == "ok")
  print(f"{len(notes)} movie(s), {detections} detection(s), {errors} input(s) failed; wrote "
        f"{output} in {time.time() - t0:.1f} s", file=sys.stderr)
  return 1 if errors else 0


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training run folder (its latest checkpoint).")
  flags.DEFINE_multi_string("input", [], "TIFF file or folder; repeat for several.")
  flags.DEFINE_string("output", None, "CSV file to write (probability TIFFs go next to it).")
  flags.DEFINE_float("threshold", None, "Detection threshold (default: the run's).")
  flags.DEFINE_float("radius_px", None, "NMS radius (default: the run's eval.radius_px).")
  flags.DEFINE_integer("channel", 0, "Channel of multi-channel movies.")
  flags.DEFINE_integer("batch_size", None, "Frames per device call (default: by size).")
  flags.DEFINE_bool("probability_tiffs", True, "Write <movie>_prob.tif next to the CSV.")
  flags.DEFINE_integer("max_per_frame", 0, "Keep only the k most probable detections of "
                       "each frame (0: all above the threshold).")
  flags.DEFINE_bool("tta", False, "Average the probability maps over the 8 rotations / "
                    "reflections of the frames (8x the compute).")
  flags.DEFINE_integer("temporal", 0, "Average each frame's map with the maps of this "
                       "many frames before and after it (0: off).")
  flags.DEFINE_float("edge_px", -1.0, "Take no detection within this distance (px) of the "
                     "frame border, where training never placed an event (the maps are "
                     "set to 0 there; negative, the default: the run's sim.margin_px, 6 px "
                     "by default; 0: off).")


def main(argv):
  cli.quiet_logs()
  f = flags.FLAGS
  inputs = cli.workdir_inputs_and_output(f, argv)
  if f.threshold is not None and not 0.0 < f.threshold < 1.0:
    cli.fail("--threshold must be in (0, 1)")
  cli.require_positive(f, ("radius_px", "batch_size"))
  cli.require_nonnegative(f, ("channel",))
  if f.max_per_frame < 0:
    cli.fail("--max_per_frame must be >= 0 (0: no limit)")
  if f.temporal < 0:
    cli.fail("--temporal must be >= 0 (0: off)")
  cli.run_or_fail(run, f.workdir, inputs, f.output, f.threshold, f.radius_px, f.channel,
                  f.batch_size, f.probability_tiffs, f.max_per_frame, f.tta, f.temporal,
                  f.edge_px)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
