"""Segments Ca2+ release events (sparks, waves, puffs) in your confocal TIFF movies.

  python -m smlm_jax.sparks.predict --workdir=runs/sparks --input=movies/ --output=out/ \
      [--chunk_frames=256 --stride_frames=128] [--pixel_size_nm=200 --frame_interval_s=0.0068] \
      [--camera_offset_adu=100 --camera_gain_adu_per_e=1] [--noprobabilities] [--noplots] \
      [--channel=N] [--max_puff_volume_um2_ms=10000]

Inputs: TIFF files or folders (searched recursively; shell globs work), each one
movie [T, H, W] (any frame size and length, at least 8 frames), in camera units; a
multi-channel movie [T, C, H, W] needs --channel (the channel with the Ca2+ dye; no
default: a movie with several channels and no --channel is an error row, and so is a
single-channel movie with --channel > 0).
Predicted puffs larger than --max_puff_volume_um2_ms (default: the run's
config.events.max_volume_um2_ms) are dropped: raise it (0 = none) if your puffs are
larger than ~10 um^2 for ~1 s. Pixel size and frame interval come from the TIFF's OME/ImageJ metadata,
else from --pixel_size_nm / --frame_interval_s (which also override the metadata),
else the training values (0.2 um, 6.8 ms by default; reported as ASSUMED). A movie
whose pixel size or frame interval differs by > 5% from the training values is
processed but flagged (the network saw events at the trained scale; retrain with
--config.sim.pixel_size_um / frame_interval_ms). The camera offset (ADU) is
subtracted before normalization (default: the training value, 100 ADU); the gain
cancels in the normalization but sets the photon scale.

Long movies run in overlapping chunks of --chunk_frames frames every
--stride_frames frames, each frame kept from the chunk where it is most central, so
there are no seams (exactly the whole-movie result when the overlap covers the
network's receptive field; a note says when it does not).

Outputs in --output (a folder), for each movie STEM.tif:
  STEM_classes.tif        uint8 [T, H, W]: 0 background, 1 spark, 2 wave, 3 puff (the
                          first / last sim.labels.ignore_frames frames, which training
                          never scores, are 0)
  STEM_probabilities.tif  float32 [T, 4, H, W] (ImageJ TCYX): class probabilities
  STEM_events.csv         one row per event:
      file, event_id, class, t_start, t_end, y_px, x_px, duration_ms, area_um2,
      amplitude_dF_F0, peak_over_noise
    event_id matches STEM_instances.tif; t_start/t_end first/last frame (0-based,
    inclusive); (y_px, x_px) the event's peak of smoothed dF/F0; duration_ms =
    (t_end - t_start + 1) x frame interval; area_um2 = area of the event's projection
    on the frame; amplitude_dF_F0 = peak smoothed dF/F0 (F0: per-pixel median over
    frames classified background; config.events.dff_estimator 'mean': their mean);
    peak_over_noise = the same peak in units of the movie's own noise there (1.4826 x
    the MAD over time of the smoothed dF/F0 away from events about its 31-frame
    running median; 'mean': its SD; faint events near 3-5 are hard to tell from
    noise).
  STEM_instances.tif      uint16/int32 [T, H, W] event ids (0 = none)
  STEM_events.png         max-over-time dF/F0 with the events, and a t-x kymograph
and summary.csv: file, frames, height_px, width_px, pixel_size_nm, frame_interval_ms,
sparks, waves, puffs, flag (ok; pixel_size_mismatch / frame_interval_mismatch;
error:<reason> such as error:not_found, error:unreadable, error:rgb, error:bad_shape,
error:bad_channel,
error:single_frame, error:too_few_frames, error:nan_or_inf, error:empty_folder,
error:truncated, error:constant_input, error:below_camera_offset - the movie's mean is
not above the camera offset: negative photons, so no events are reported; set
--camera_offset_adu). --output is checked before anything is read (exit 2 when it
cannot be written; nothing is left behind).
Bad inputs never stop the run: one error line each on stderr, an error row in
summary.csv, exit code 1 when any input failed (0 otherwise). Files are written
atomically (temporary file + rename).
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

MIN_FRAMES = 8


class UsageError(ValueError):
  """A flag value that cannot work (reported in one line)."""
MISMATCH_TOLERANCE = 0.05
EVENT_COLUMNS = ("file", "event_id", "class", "t_start", "t_end", "y_px", "x_px",
                 "duration_ms", "area_um2", "amplitude_dF_F0", "peak_over_noise")
SUMMARY_COLUMNS = ("file", "frames", "height_px", "width_px", "pixel_size_nm",
                   "frame_interval_ms", "sparks", "waves", "puffs", "flag")


def read_movie(path: str, camera_offset_adu: float | None = None,
               channel: int | None = None) -> tiff_io.Image:
  """A [T, H, W] movie (float32 data) with its metadata; MovieError otherwise, also
  for a constant movie and, given the camera offset, one whose mean is not above it
  (:func:`smlm_jax.core.tiff_io.check_plausible`). A multi-channel movie needs
  ``channel`` (:func:`smlm_jax.core.tiff_io.take_channel`)."""
  image = tiff_io.read_image(path)
  data, image.axes = tiff_io.take_channel(image.data, image.axes, channel, path)
  if data.ndim == 2:
    raise tiff_io.MovieError(f"{path}: a single 2D frame {data.shape}; expected a movie "
                             "[T, H, W] (line-scan x-t images are not supported: the "
                             "network was trained on 2D frames over time)", "single_frame")
  if data.ndim != 3:
    raise tiff_io.MovieError(f"{path}: {data.ndim}D data of shape {data.shape} (axes "
                             f"{image.axes}); expected one channel, frames x height x width",
                             "bad_shape")
  if data.shape[0] < MIN_FRAMES:
    raise tiff_io.MovieError(f"{path}: only {data.shape[0]} frames; need at least "
                             f"{MIN_FRAMES}", "too_few_frames")
  tiff_io.check_plausible(data, path, camera_offset_adu)
  image.data = data.astype(np.float32)
  return image


def write_tiff_atomic(path, data, axes, pixel_size_nm, frame_interval_s):
  with cli.atomic_path(path) as tmp:
    tiff_io.write_image(tmp, data, axes, pixel_size_nm=pixel_size_nm,
                        frame_interval_s=frame_interval_s, ome=False)


class Segmenter:
  """A trained run ready to segment whole movies (chunked in time)."""

  def __init__(self, workdir, chunk_frames=None, stride_frames=None, batch_size=None,
               camera_offset_adu=None, camera_gain_adu_per_e=None,
               max_puff_volume_um2_ms=None):
    from smlm_jax.core import trainer
    from smlm_jax.sparks import inference
    self.mesh = trainer.make_mesh()
    self.config, self.task, self.state = trainer.load_run(workdir, self.mesh)
    from smlm_jax.sparks import events as events_lib
    self.filter_note = events_lib.use_run_filter(self.task.config, workdir,
                                                 max_puff_volume_um2_ms)
    infer = self.config.infer
    self.chunk = int(chunk_frames or infer.chunk_frames)
    self.stride = int(stride_frames or infer.stride_frames)
    if self.stride > self.chunk:
      raise UsageError(f"--stride_frames={self.stride} exceeds --chunk_frames={self.chunk}")
    self.batch_size = int(batch_size or infer.batch_size)
    cam = self.task.camera
    if camera_offset_adu is not None:
      cam = cam.replace(offset_adu=float(camera_offset_adu))
    if camera_gain_adu_per_e is not None:
      cam = cam.replace(gain_adu_per_e=float(camera_gain_adu_per_e))
    self.camera = cam
    self._predict_batch = inference.make_predict_batch(self.task, self.state, self.mesh)

  def plan(self, num_frames):
    from smlm_jax.sparks import inference
    return inference.plan_for_model(num_frames, self.chunk, self.stride, self.config.model)

  def normalize(self, frames_adu):
    import jax.numpy as jnp
    from smlm_jax.sparks import task as task_lib
    return np.asarray(task_lib.model_input(jnp.asarray(frames_adu), self.camera,
                                           f0_window_frames=task_lib.f0_window_frames(
                                               self.config)))

  def probabilities(self, frames_adu, desc=None):
    """(probabilities [T, H, W, 4], normalized movie [T, H, W, 1], plan)."""
    from smlm_jax.sparks import inference
    x = self.normalize(frames_adu)
    plan = self.plan(x.shape[0])
    with cli.progress(total=len(plan.starts), desc=desc or "chunks", unit="chunk") as bar:
      probs = inference.predict_chunked(self._predict_batch, x, plan, self.batch_size,
                                        self.mesh, progress=bar.update)
    return probs, x, plan


def event_rows(name, events):
  num = cli.number
  return [[name, e.event_id, e.class_name, e.t_start, e.t_end, f"{e.y_px:.0f}",
           f"{e.x_px:.0f}", num(e.duration_ms, ".1f"), num(e.area_um2, ".3f"),
           num(e.amplitude, ".3f"), num(e.snr, ".1f")] for e in events]


def plot_events(path, dff, classes, events, title=""):
  from smlm_jax.core import plotting
  plt = plotting.pyplot()
  colors = {1: "tab:red", 2: "tab:green", 3: "tab:orange"}
  fig, axes = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 1.3]})
  proj = dff.max(0)
  vmin, vmax = plotting.percentile_limits(proj, 1, 99.5)
  axes[0].imshow(proj, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
  for e in events:
    axes[0].plot(e.x_px, e.y_px, "o", mfc="none", mec=colors[e.cls], ms=8)
  axes[0].set_title("max dF/F0 over time; o = events (red spark, green wave, orange puff)",
                    fontsize=8)
  # Kymograph (t, x) of the class map at the row with the most event voxels.
  row = int(np.argmax((classes > 0).sum(axis=(0, 2)))) if classes.any() else classes.shape[1] // 2
  kymo = dff[:, row, :]
  vmin, vmax = plotting.percentile_limits(kymo, 1, 99.5)
  axes[1].imshow(kymo.T, cmap="gray", vmin=vmin, vmax=vmax, aspect="auto",
                 interpolation="nearest")
  for c, col in colors.items():
    m = classes[:, row, :] == c
    if m.any():
      axes[1].contour(m.T.astype(float), levels=[0.5], colors=[col], linewidths=0.8)
  axes[1].set(xlabel="frame", ylabel="x (px)", title=f"t-x at row {row}; contours = classes")
  fig.suptitle(title, fontsize=9)
  plotting.save(fig, path)


def _unique_stems(paths):
  seen, out = {}, {}
  for p in paths:
    stem = os.path.basename(p)
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
      if stem.lower().endswith(suffix):
        stem = stem[:-len(suffix)]
        break
    k = seen.get(stem, 0)
    seen[stem] = k + 1
    out[p] = stem if k == 0 else f"{stem}_{k + 1}"
  return out


def run(workdir, inputs, output, chunk_frames=None, stride_frames=None, batch_size=None,
        pixel_size_nm=None, frame_interval_s=None, camera_offset_adu=None,
        camera_gain_adu_per_e=None, probabilities=True, plots=True, log=print,
        max_puff_volume_um2_ms=None, channel=None) -> int:
  """The whole command; returns the exit code (1 when any input failed)."""
  from smlm_jax.sparks import events as events_lib
  t0 = time.time()
  seg = Segmenter(workdir, chunk_frames, stride_frames, batch_size, camera_offset_adu,
                  camera_gain_adu_per_e, max_puff_volume_um2_ms)
  cfg = seg.config
  train_px_nm = cfg.sim.pixel_size_um * 1000.0
  train_dt_s = cfg.sim.frame_interval_ms / 1000.0
  log(f"model {cfg.model.name} (step {int(seg.state['step'])}) from {workdir}; chunks of "
      f"{seg.chunk} frames every {seg.stride}", file=sys.stderr)
  log(seg.filter_note, file=sys.stderr)
  os.makedirs(output, exist_ok=True)
  files, _ = tiff_io.find_movies(inputs)
  stems = _unique_stems(files)
  summary, failed, assumed, notes = [], 0, set(), set()
  offset = float(seg.camera.offset_adu)
  for path, image, error in tiff_io.scan_files(inputs, lambda p: read_movie(p, offset, channel),
                                               "predict", log):
    if error:
      failed += 1
      summary.append([path, "", "", "", "", "", "", "", "", f"error:{error[1]}"])
      continue
    px_nm, dt_s, missing = tiff_io.resolve_geometry(image, pixel_size_nm, frame_interval_s,
                                                    train_px_nm, train_dt_s)
    assumed.update(missing)
    flag = []
    if abs(px_nm / train_px_nm - 1) > MISMATCH_TOLERANCE:
      flag.append("pixel_size_mismatch")
    if abs(dt_s / train_dt_s - 1) > MISMATCH_TOLERANCE:
      flag.append("frame_interval_mismatch")
    for f in flag:
      log(f"warning: {path}: {f} (pixel {px_nm:.4g} nm, interval {dt_s * 1e3:.4g} ms; "
          f"trained at {train_px_nm:.4g} nm, {train_dt_s * 1e3:.4g} ms)", file=sys.stderr)
    frames = image.data
    probs, x, plan = seg.probabilities(frames, desc=os.path.basename(path))
    if not plan.exact:
      notes.add(f"chunked inference is approximate ({plan.reason}); use a larger "
                "--chunk_frames - --stride_frames overlap for the exact whole-movie result")
    spec = events_lib.spec_from_config(cfg, px_nm / 1000.0, dt_s * 1000.0)
    classes, inst, cls_of, events, dff = events_lib.extract_events(probs, x[..., 0], spec)
    stem = os.path.join(output, stems.get(path, os.path.basename(path)))
    name = os.path.basename(path)
    write_tiff_atomic(stem + "_classes.tif", classes, "TYX", px_nm, dt_s)
    inst_dtype = np.uint16 if inst.max() < 65535 else np.float32
    write_tiff_atomic(stem + "_instances.tif", inst.astype(inst_dtype), "TYX", px_nm, dt_s)
    if probabilities:
      write_tiff_atomic(stem + "_probabilities.tif",
                        np.transpose(probs, (0, 3, 1, 2)).astype(np.float32), "TCYX",
                        px_nm, dt_s)
    header = [f"smlm_jax.sparks.predict workdir={os.path.abspath(workdir)} "
              f"step={int(seg.state['step'])}",
              f"pixel_size_nm={px_nm:.4g} frame_interval_ms={dt_s * 1e3:.4g}"
              + (f" (ASSUMED: {', '.join(missing)})" if missing else "")]
    cli.atomic_write_text(stem + "_events.csv",
                          cli.csv_text(EVENT_COLUMNS, event_rows(name, events), header))
    if plots:
      plot_events(stem + "_events.png", dff, classes, events, title=name)
    n = {c: sum(1 for e in events if e.cls == c) for c in (1, 2, 3)}
    summary.append([path, frames.shape[0], frames.shape[1], frames.shape[2], f"{px_nm:.4g}",
                    f"{dt_s * 1e3:.4g}", n[1], n[2], n[3], ";".join(flag) or "ok"])
    log(f"{name}: {n[1]} sparks, {n[2]} waves, {n[3]} puffs", file=sys.stderr)
  for a in sorted(assumed):
    notes.add(f"{a} ASSUMED (training value) for file(s) without metadata; set --{a}")
  for n_ in sorted(notes):
    log(f"note: {n_}", file=sys.stderr)
  cli.atomic_write_text(os.path.join(output, "summary.csv"),
                        cli.csv_text(SUMMARY_COLUMNS, summary,
                                     [f"smlm_jax.sparks.predict {len(summary)} input(s)"]
                                     + [f"note: {n_}" for n_ in sorted(notes)]))
  log(f"{len(summary) - failed} movie(s) segmented, {failed} input(s) failed; wrote "
      f"{output} in {time.time() - t0:.1f} s", file=sys.stderr)
  return 1 if failed else 0


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training run folder (its latest checkpoint).")
  flags.DEFINE_multi_string("input", [], "TIFF movie or folder; repeat for several.")
  flags.DEFINE_string("output", None, "Output folder.")
  flags.DEFINE_integer("chunk_frames", None, "Frames per chunk (default: config.infer).")
  flags.DEFINE_integer("stride_frames", None, "Frames between chunk starts "
                       "(default: config.infer).")
  flags.DEFINE_integer("batch_size", None, "Chunks per device call.")
  flags.DEFINE_float("pixel_size_nm", None, "Pixel size (nm); overrides file metadata.")
  flags.DEFINE_float("frame_interval_s", None, "Frame interval (s); overrides metadata.")
  flags.DEFINE_float("camera_offset_adu", None, "Detector offset (ADU) to subtract.")
  flags.DEFINE_float("camera_gain_adu_per_e", None, "ADU per detected photon.")
  flags.DEFINE_bool("probabilities", True, "Write STEM_probabilities.tif.")
  flags.DEFINE_bool("plots", True, "Write STEM_events.png.")
  flags.DEFINE_float("max_puff_volume_um2_ms", None, "Drop predicted puffs larger than this "
                     "(um^2 x ms; 0 = no ceiling; default: the run's "
                     "config.events.max_volume_um2_ms, 10000 for runs since 2026-12-07).")
  cli.define_channel_flag("movies")


def main(argv):
  cli.quiet_logs()
  f = flags.FLAGS
  if not f.workdir:
    cli.fail("--workdir is required (a trained run; see --help)")
  cli.require_nonnegative(f, ("max_puff_volume_um2_ms",))
  inputs = cli.inputs_and_output_folder(f, argv)
  cli.require_positive(f, ("chunk_frames", "stride_frames", "batch_size", "pixel_size_nm",
                           "frame_interval_s", "camera_gain_adu_per_e"))
  cli.run_or_fail(run, f.workdir, inputs, f.output, f.chunk_frames, f.stride_frames,
                  f.batch_size, f.pixel_size_nm, f.frame_interval_s, f.camera_offset_adu,
                  f.camera_gain_adu_per_e, f.probabilities, f.plots,
                  max_puff_volume_um2_ms=f.max_puff_volume_um2_ms,
                  channel=cli.channel_flag(f),
                  user_errors=(FileNotFoundError, UsageError))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
