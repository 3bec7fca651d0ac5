"""Diffusion from whole movies: detect, link, window, and D per molecule with its interval.

  python -m smlm_jax.diffusion.analyze --workdir=runs/default --input=movie.tif \
      [--input=more/] --output=OUT_DIR [--camera_offset_adu=100 --camera_gain_adu_per_e=2 |
      --calibration=cal.json] [--pixel_size_nm=100 --frame_interval_s=0.01]

For full-frame TIFF / OME-TIFF movies of any size and length (streamed frame by frame,
memory bounded by the frame size and the windows in flight, never the movie length):

1. Detection on photons (camera as in ``predict``: flags > calibration file > training
   camera) with a DoG whose threshold gives ``--false_positives_per_frame`` noise
   detections per frame (:mod:`smlm_jax.diffusion.detect`); each spot is localized by
   MLE (:func:`smlm_jax.diffusion.baselines.localize`) in a 9x9 px box.
2. Linking with trackpy with gap closing (``--memory`` missed frames; search range
   3.5 sd of a one-frame step at ``--max_D_um2_per_s``), tracks of >= ``--min_track_frames``.
3. Windows of the model's size (T frames of H x W px, from the run's config) along each
   track every ``--stride`` frames, flagged second_molecule / at_image_edge /
   short_track (:mod:`smlm_jax.diffusion.tracks`); D per window from the model.
4. D per molecule: the windows' posteriors of ln D combined by generalized least squares
   that accounts for overlapping windows, with the 68% interval; windows flagged
   second_molecule, at_image_edge, no_spot or spot_at_edge are left out when the track
   has clean ones; a window whose ln D is > 3.5 sd from the windows' median is
   dropped (flag inconsistent_windows: a linking error or an unseen second molecule).
   Classical per-track CVE (blur-corrected) and MSD on the same tracks.

Outputs in OUT_DIR (CSV files start with ``#`` lines; ``pandas.read_csv(p, comment="#")``):
  tracks.csv   file, track_id, t_start, t_end, n_frames, n_windows, x_px, y_px,
               D_um2_per_s, D_low_um2_per_s, D_high_um2_per_s, photons,
               background_photons, flag, D_cve_um2_per_s, D_msd_um2_per_s,
               localization_sd_nm   (x/y: mean position, pixel i spans [i, i+1);
               photons/background: medians of the used windows; flag: ok or
               ';'-joined reasons as in predict plus short_track, second_molecule,
               at_image_edge, inconsistent_windows; error:<code> rows for unusable files)
  windows.csv  as ``predict`` writes it, plus track_id (first_frame = window start)
  <movie>_D_map.png  tracks on the movie's max projection, coloured by D
  D_histogram.png    D per molecule
Bad inputs never stop the run (one ``error:`` line each, an error row, exit code 1).
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

import dataclasses
import math
import os
import sys
import time

from absl import app, flags
import numpy as np

from smlm_jax.core import cli, tiff_io
from smlm_jax.core.tiff_io import MovieError
from smlm_jax.diffusion import camera_setup, detect, predict, tracks as tracks_lib

TRACK_COLUMNS = ("file", "track_id", "t_start", "t_end", "n_frames", "n_windows", "x_px",
                 "y_px", "D_um2_per_s", "D_low_um2_per_s", "D_high_um2_per_s", "photons",
                 "background_photons", "flag", "D_cve_um2_per_s", "D_msd_um2_per_s",
                 "localization_sd_nm")
WINDOW_COLUMNS = ("file", "track_id") + predict.COLUMNS[1:]
LOCALIZE_BOX_PX = 9
LOCALIZE_BATCH = 2048
LOCALIZE_ITERATIONS = 10     # from the centroid start: positions within 0.01 px of 30


@dataclasses.dataclass
class Options:
  stride: int | None = None                 # default: T (the last window ends at the track's end)
  false_positives_per_frame: float = 0.1
  max_D_um2_per_s: float | None = None      # default: the model's trained upper bound
  memory: int = 2
  min_track_frames: int = 5
  pixel_size_nm: float | None = None
  frame_interval_s: float | None = None
  channel: int | None = None                # of multi-channel movies (required for them)


@dataclasses.dataclass
class TrackRow(predict.Estimate):
  """One molecule: its track and D combined from all its windows."""
  file: str
  track_id: int | str = ""
  t_start: int | str = ""
  t_end: int | str = ""
  n_frames: int | str = ""
  n_windows: int | str = ""
  x_px: float = float("nan")
  y_px: float = float("nan")
  D_cve: float = float("nan")
  D_msd: float = float("nan")
  localization_sd_nm: float = float("nan")
  xy_track: np.ndarray | None = None        # [t_end - t_start + 1, 2] (gaps interpolated)

  def flag(self) -> str:      # a flag once, however many windows raised it
    return super().flag() if self.error else ";".join(dict.fromkeys(self.flags)) or "ok"

  def cells(self):
    num = cli.number
    return [self.file, self.track_id, self.t_start, self.t_end, self.n_frames,
            self.n_windows, num(self.x_px, ".2f"), num(self.y_px, ".2f"), num(self.D, ".5g"),
            num(self.D_low, ".5g"), num(self.D_high, ".5g"), num(self.photons, ".1f"),
            num(self.background_photons, ".3f"), self.flag(), num(self.D_cve, ".5g"),
            num(self.D_msd, ".5g"), num(self.localization_sd_nm, ".1f")]


def _crop(image, y, x, size):
  h, w = image.shape
  y0 = int(np.clip(int(math.floor(y)) - size // 2, 0, h - size))
  x0 = int(np.clip(int(math.floor(x)) - size // 2, 0, w - size))
  return image[y0:y0 + size, x0:x0 + size], y0, x0


def detect_and_localize(stack, camera, detector, sigma_px, desc="detect"):
  """Pass 1 over the frames: (detections DataFrame with frame, x, y, score, ok, photons,
  background; max projection in photons). Spots are localized in batches of
  LOCALIZE_BATCH as they come, so memory holds the table, not the crops."""
  import pandas as pd
  from smlm_jax.core import noise
  from smlm_jax.diffusion import baselines
  cols = {k: [] for k in ("frame", "x", "y", "score", "ok", "photons", "background")}
  crops, pend = [], []            # pending crops and their (frame, x, y, score, x0, y0)
  maxproj = None

  def flush(n):                   # the first n pending spots (full batches: one compile)
    if not crops:
      return
    theta, _, ok = baselines.localize_frames(np.stack(crops[:n]), sigma_px, camera.qe,
                                             camera.read_noise_e, LOCALIZE_ITERATIONS)
    theta, ok = np.array(theta, np.float64), np.array(ok, bool)
    p = np.asarray(pend[:n], np.float64)
    fx, fy = theta[:, 0] + p[:, 4], theta[:, 1] + p[:, 5]
    ok &= np.hypot(fx - p[:, 1], fy - p[:, 2]) < 2
    cols["frame"].append(p[:, 0].astype(np.int32))
    cols["x"].append(np.where(ok, fx, p[:, 1]))
    cols["y"].append(np.where(ok, fy, p[:, 2]))
    cols["score"].append(p[:, 3].astype(np.float32))
    cols["ok"].append(ok)
    cols["photons"].append(np.where(ok, theta[:, 2], np.nan).astype(np.float32))
    cols["background"].append(np.where(ok, theta[:, 3], np.nan).astype(np.float32))
    del crops[:n], pend[:n]

  for i in cli.progress(range(len(stack)), desc=desc, unit="frame"):
    photons = np.asarray(noise.adu_to_photons(stack[i], camera), np.float32)
    maxproj = photons if maxproj is None else np.maximum(maxproj, photons)
    x, y, s = detector(photons)
    for xi, yi, si in zip(x, y, s):
      crop, y0, x0 = _crop(photons, yi, xi, LOCALIZE_BOX_PX)
      crops.append(crop)
      pend.append((i, xi, yi, si, x0, y0))
    while len(crops) >= LOCALIZE_BATCH:
      flush(LOCALIZE_BATCH)
  flush(len(crops))
  return pd.DataFrame({k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
                      ), maxproj


def _cut(frame, y0, x0, h, w):
  """[h, w] crop at (y0, x0), NaN where it lies outside the frame."""
  H, W = frame.shape
  out = np.full((h, w), np.nan, np.float32)
  ya, yb, xa, xb = max(y0, 0), min(y0 + h, H), max(x0, 0), min(x0 + w, W)
  if ya < yb and xa < xb:
    out[ya - y0:yb - y0, xa - x0:xb - x0] = frame[ya:yb, xa:xb]
  return out


def predict_windows(stack, windows, predictor, file, file_flags, mask_radius_px, desc="D"):
  """Pass 2: cut every window from the streamed frames and run the model on full
  batches. Returns [(window, predict.Row, mean ln D, log variance)]."""
  t, h, w = predictor.window_shape
  sim = predictor.config.sim
  if not windows:
    return []
  starting = {}
  for win in windows:
    starting.setdefault(win.first_frame, []).append(win)
  first = min(starting)
  last = max(starting) + t
  active, pending, results = [], [], []

  def flush():
    if not pending:
      return
    out = predictor(np.stack([buf for _, buf in pending]))
    rows = [predict.Row(file=file, first_frame=win.first_frame,
                        flags=list(win.flags) + list(file_flags)) for win, _ in pending]
    predict.fill_rows(rows, out, sim)
    for i, ((win, _), row) in enumerate(zip(pending, rows)):
      results.append((win, row, float(out["mean"][i]), float(out["log_var"][i])))
    pending.clear()

  for i in cli.progress(range(first, last), desc=desc, unit="frame"):
    frame = stack[i]
    for win in starting.get(i, []):
      active.append([win, np.empty((t, h, w), np.float32)])
    done = []
    still = []
    for win, buf in active:
      buf[i - win.first_frame] = _cut(frame, win.y0, win.x0, h, w)
      (done if i - win.first_frame == t - 1 else still).append((win, buf))
    active = [list(a) for a in still]
    for win, buf in done:
      seed = win.track_id * 1_000_003 + win.first_frame
      pending.append((win, tracks_lib.fill_background(buf, win.masks, mask_radius_px,
                                                      predictor.camera, seed)))
    if len(pending) >= predictor.batch_size:
      flush()
  flush()
  return results


def track_rows(file, tracks, results, classical, num_frames, sim, file_flags):
  """One TrackRow per track from its windows' results (see module docstring)."""
  by_track = {}
  for win, row, m, lv in results:
    by_track.setdefault(win.track_id, []).append((win, row, m, lv))
  rows = []
  for tr in tracks:
    got = by_track.get(tr.track_id, [])
    clean = [g for g in got
             if not set(g[1].flags) & set(tracks_lib.WINDOW_FLAGS_EXCLUDED)]
    used = clean or got
    row = TrackRow(file=file, track_id=tr.track_id, t_start=tr.t_start, t_end=tr.t_end,
                   n_frames=int(tr.valid.sum()), n_windows=len(used),
                   xy_track=tr.xy_px, flags=list(file_flags))
    row.x_px, row.y_px = (float(v) for v in np.mean(tr.xy_px[tr.valid] if tr.valid.any()
                                                    else tr.xy_px, axis=0))
    row.photons = float(np.nanmedian(tr.photons)) if np.isfinite(tr.photons).any() else math.nan
    row.background_photons = (float(np.nanmedian(tr.background))
                              if np.isfinite(tr.background).any() else math.nan)
    if used:
      keep = tracks_lib.consistent_windows([g[2] for g in used], [g[3] for g in used],
                                           [g[0].first_frame for g in used], num_frames)
      if len(keep) < len(used):
        row.flags.append("inconsistent_windows")
        used = [used[i] for i in keep]
        row.n_windows = len(used)
      mean, sd = tracks_lib.combine([g[2] for g in used], [g[3] for g in used],
                                    [g[0].first_frame for g in used], num_frames)
      row.D, row.D_low, row.D_high = math.exp(mean), math.exp(mean - sd), math.exp(mean + sd)
      row.photons = float(np.median([g[1].photons for g in used]))
      row.background_photons = float(np.median([g[1].background_photons for g in used]))
      for g in used:
        row.flags += [f for f in g[1].flags if not f.startswith("D_")]
      row.flags += predict.D_range_flags(row.D, sim)
    else:
      row.flags.append("no_window")
    c = classical.get(tr.track_id, {})
    row.D_cve = c.get("D_cve_um2_per_s", math.nan)
    row.D_msd = c.get("D_msd_um2_per_s", math.nan)
    row.localization_sd_nm = c.get("localization_sd_nm", math.nan)
    rows.append(row)
  return rows


def analyze_movie(path, predictor, options: Options, warnings: dict, assumed: dict):
  """(track rows, window rows [(track_id, predict.Row)], max projection) of one movie;
  raises MovieError for unusable files."""
  from smlm_jax.core.tiff_stream import FrameStack
  cfg = predictor.config
  sim = cfg.sim
  t, h, w = predictor.window_shape
  camera = predictor.camera
  with FrameStack(path, options.channel) as stack:
    n, H, W = stack.shape
    if n < t:
      raise MovieError(f"{path}: only {n} frames; the model needs windows of {t}",
                       "too_few_frames")
    if H < h or W < w:
      raise MovieError(f"{path}: frames are {H}x{W} px, smaller than the model's "
                       f"{h}x{w} px windows; use predict on crops", "too_small")
    px, dt, missing = tiff_io.resolve_geometry(stack, options.pixel_size_nm,
                                               options.frame_interval_s, sim.pixel_size_nm,
                                               sim.frame_interval_s)
    for name in missing:
      assumed[name] += 1
    file_flags = predict.geometry_flags(px, dt, sim, warnings)
    fwhm_nm = float(np.mean(sim.psf_fwhm_nm))
    detector = detect.make_detector(fwhm_nm, px, (H, W), options.false_positives_per_frame,
                                    camera.qe, camera.read_noise_e)
    name = os.path.basename(path)
    dets, maxproj = detect_and_localize(stack, camera, detector,
                                        fwhm_nm / 2.3548 / px, f"detect {name}")
    d_max = options.max_D_um2_per_s or float(sim.D_um2_per_s[1])
    search_px = max(2.0, 3.5 * math.sqrt(2 * d_max * 1e6 * dt) / px)
    tracks = tracks_lib.link(dets, search_px, options.memory, options.min_track_frames)
    stride = options.stride or t
    blur_px = math.sqrt(2 * d_max * 1e6 * float(sim.exposure_s) / 3) / px
    mask_px = 3.5 * fwhm_nm / 2.3548 / px + 1.5 * blur_px
    windows = tracks_lib.plan_windows(tracks, (t, h, w), (H, W), n, stride, mask_px, dets)
    results = predict_windows(stack, windows, predictor, path, file_flags, mask_px,
                              f"D {name}")
  classical = tracks_lib.classical(tracks, px, dt, float(sim.exposure_s))
  rows = track_rows(path, tracks, results, classical, t, sim, file_flags)
  window_rows = [(win.track_id, row) for win, row, _, _ in results]
  info = {"detections": len(dets), "threshold": detector.threshold, "search_px": search_px,
          "frames": n}
  return rows, window_rows, maxproj, info


def plot_map(maxproj, rows, path, D_range, title=""):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.collections import LineCollection
  from matplotlib.colors import LogNorm
  lo, hi = np.percentile(maxproj, [1, 99.8])
  fig, ax = plt.subplots(figsize=(7, 7 * maxproj.shape[0] / maxproj.shape[1] + 0.5))
  ax.imshow(maxproj, cmap="gray", vmin=lo, vmax=hi, extent=(0, maxproj.shape[1],
                                                            maxproj.shape[0], 0))
  norm = LogNorm(*D_range)
  good = [r for r in rows if np.isfinite(r.D) and r.xy_track is not None]
  lc = LineCollection([r.xy_track for r in good], cmap="plasma", norm=norm, linewidths=1.2)
  lc.set_array(np.array([r.D for r in good]))
  ax.add_collection(lc)
  fig.colorbar(lc, ax=ax, label="D per molecule (um$^2$/s)", shrink=0.8)
  ax.set(title=title, xlabel="x (px)", ylabel="y (px)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(workdir, inputs, output_dir, options: Options, camera_offset_adu=None,
        camera_gain_adu_per_e=None, camera_qe=None, calibration=None, batch_size=None,
        plots=True) -> int:
  """The whole command; returns the exit code (1 when any input failed)."""
  t0 = time.time()
  predictor, camera_notes = predict.setup_predictor(
      workdir, camera_offset_adu, camera_gain_adu_per_e, camera_qe, calibration, batch_size)
  sim = predictor.config.sim
  os.makedirs(output_dir, exist_ok=True)
  warnings, assumed = {}, {"pixel_size_nm": 0, "frame_interval_s": 0}
  all_tracks, all_windows, infos = [], [], []
  for path, _, error in tiff_io.scan_files(inputs, lambda p: None, "movies"):
    if error:
      all_tracks.append(TrackRow(file=path, error=error[1]))
      continue
    try:
      rows, wins, maxproj, info = analyze_movie(path, predictor, options, warnings, assumed)
    except MovieError as e:
      print(f"error: {e}", file=sys.stderr)
      all_tracks.append(TrackRow(file=path, error=e.code))
      continue
    all_tracks += rows
    all_windows += wins
    infos.append(info)
    if plots:
      stem = os.path.splitext(os.path.basename(path))[0].removesuffix(".ome")
      plot_map(maxproj, rows, os.path.join(output_dir, f"{stem}_D_map.png"),
               sim.D_um2_per_s, f"{os.path.basename(path)}: {len(rows)} molecules")
  notes = predict.assumed_notes(assumed, sim)
  for n in notes:
    print(f"note: {n}", file=sys.stderr)
  for wmsg in warnings.values():
    print(f"\n!!! WARNING: {wmsg}\n", file=sys.stderr)
  stride = options.stride or predictor.window_shape[0]
  header = predict.header_lines("smlm_jax.diffusion.analyze", predictor, workdir,
                                camera_notes, notes, list(warnings.values()))
  header.append(f"detection: DoG, false_positives_per_frame="
                f"{options.false_positives_per_frame:g}; linking: trackpy, memory="
                f"{options.memory}, min_track_frames={options.min_track_frames}, max_D="
                f"{options.max_D_um2_per_s or sim.D_um2_per_s[1]:g} um^2/s; window stride="
                f"{stride}")
  track_header = header + [
      "D = posterior median per molecule from its windows (GLS over overlapping windows); "
      "D_low/D_high = 68% interval; D_cve/D_msd: classical estimates on the same tracks"]
  cli.atomic_write_text(os.path.join(output_dir, "tracks.csv"),
                        cli.csv_text(TRACK_COLUMNS, [r.cells() for r in all_tracks],
                                     track_header))
  cli.atomic_write_text(
      os.path.join(output_dir, "windows.csv"),
      cli.csv_text(WINDOW_COLUMNS, [[r.file, tid] + r.cells()[1:] for tid, r in all_windows],
                   header + ["D = posterior median per window; D_low/D_high = 68% interval"]))
  errors = [r for r in all_tracks if r.error]
  done = [r for r in all_tracks if not r.error]
  ok = [r for r in done if not r.flags]
  if plots:
    predict.plot_histogram(done, os.path.join(output_dir, "D_histogram.png"),
                           sim.D_um2_per_s, title=f"{len(done)} molecules",
                           ylabel="molecules")
  frames = sum(i["frames"] for i in infos)
  seconds = time.time() - t0
  summary = (f"{len(done)} molecule(s) ({len(ok)} ok, {len(done) - len(ok)} flagged) from "
             f"{len(infos)} movie(s), {frames} frames, {len(errors)} input(s) failed; wrote "
             f"{output_dir} in {seconds:.1f} s")
  if ok:
    q = np.quantile([r.D for r in ok], [0.25, 0.5, 0.75])
    summary += f"\nD of ok molecules: median {q[1]:.3g} um^2/s (IQR {q[0]:.3g}-{q[2]:.3g})"
  print(summary, file=sys.stderr)
  return 1 if errors else 0


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training run folder (its latest checkpoint).")
  flags.DEFINE_multi_string("input", [], "TIFF movie or folder; repeat for several.")
  flags.DEFINE_string("output", None, "Folder for tracks.csv, windows.csv and plots.")
  flags.DEFINE_integer("stride", None, "Frames between a track's windows "
                       "(default: the model's window length T; the last window ends at the track's end).")
  flags.DEFINE_float("false_positives_per_frame", 0.1,
                     "Expected noise detections per frame (sets the detection threshold).")
  flags.DEFINE_float("max_D_um2_per_s", None, "Fastest D to link (sets the search range; "
                     "default: the model's trained upper bound).")
  flags.DEFINE_integer("memory", 2, "Frames a molecule may be missed inside a track.")
  flags.DEFINE_integer("min_track_frames", 5, "Shorter tracks are dropped.")
  predict.define_camera_and_geometry_flags()
  flags.DEFINE_bool("plots", True, "Write the D map and histogram PNGs.")
  cli.define_channel_flag("movies")


def main(argv):
  cli.quiet_logs()
  f = flags.FLAGS
  if not f.workdir:
    cli.fail("--workdir is required (a trained run; see --help)")
  inputs = cli.inputs_and_output_folder(f, argv, output_kind="a folder for tracks.csv etc.")
  if f.stride is not None and f.stride < 1:
    cli.fail("--stride must be >= 1")
  if f.memory < 0:
    cli.fail("--memory must be >= 0")
  if f.min_track_frames < 2:
    cli.fail("--min_track_frames must be >= 2")
  cli.require_positive(f, ("pixel_size_nm", "frame_interval_s", "camera_gain_adu_per_e",
                           "batch_size", "camera_qe", "false_positives_per_frame",
                           "max_D_um2_per_s"))
  options = Options(stride=f.stride, false_positives_per_frame=f.false_positives_per_frame,
                    max_D_um2_per_s=f.max_D_um2_per_s, memory=f.memory,
                    min_track_frames=f.min_track_frames, pixel_size_nm=f.pixel_size_nm,
                    frame_interval_s=f.frame_interval_s, channel=cli.channel_flag(f))
  cli.run_or_fail(run, f.workdir, inputs, f.output, options, f.camera_offset_adu,
                  f.camera_gain_adu_per_e, f.camera_qe, f.calibration, f.batch_size,
                  f.plots, user_errors=(FileNotFoundError, camera_setup.CalibrationError))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
