"""Predicts the diffusion coefficient D of single molecules in your TIFF movies.

  python -m smlm_jax.diffusion.predict --workdir=runs/default --input=my_movies/ \
      --output=D.csv [--plot=D.png] [--camera_offset_adu=100 --camera_gain_adu_per_e=2]

Inputs: TIFF files, folders (searched recursively) and multi-page stacks; a shell glob
(``--input=data/*.tif``) works too. Each movie must be a crop of the model's frame size
(e.g. 64x64 px) around one molecule. A stack of exactly T frames (the model's window,
e.g. 16) gives one row; a longer stack gives one row per window starting every
``--stride`` frames (default T); a shorter one is an error for that file.

Camera counts are converted to photons exactly as during training
(:mod:`smlm_jax.diffusion.normalize`), with the camera offset and gain from the flags, else from
``--calibration=FILE`` (written by ``smlm_jax.diffusion.calibrate``), else the training config's
camera; the CSV header says which. Pixel size and frame interval come from the flags,
else from ImageJ/OME metadata, else are assumed equal to the training values; D scales
with both, so a mismatch of more than 5% is flagged on every affected row and warned
about on the console and in the CSV header.

Output CSV (``#`` comment lines first; read with ``pandas.read_csv(path, comment="#")``):
  file, first_frame, D_um2_per_s, D_low_um2_per_s, D_high_um2_per_s, photons,
  background_photons, flag
D is the posterior median and [D_low, D_high] the 68% interval of the model's
log-normal prediction; photons are the spot's photons per frame and background the
photons per pixel per frame (both before QE). flag is ``ok`` or ';'-joined reasons:
  no_spot                  the brightest spot is not above the noise (median over frames)
  spot_at_edge             the spot is within 2 px of the border in > 25% of frames
  D_below_trained_range / D_above_trained_range
  photons_outside_trained_range / background_outside_trained_range
                           (beyond half / twice the training priors: usually a wrong
                           camera offset or gain - calibrate, or the data differ)
  pixel_size_mismatch / frame_interval_mismatch   (> 5% from the training config)
  error:<reason>           the file could not be used (D columns empty), e.g.
                           error:unreadable, error:rgb, error:single_frame,
                           error:too_few_frames, error:nan_or_inf, error:wrong_size,
                           error:not_found, error:empty_folder, error:truncated,
                           error:bad_channel (several channels and no --channel),
                           error:constant_input (every value equal),
                           error:below_camera_offset (the movie's mean is not above
                           the camera offset: negative photons - set the camera)
Bad files never stop the run: each gets one line on stderr and an error row; the exit
code is 1 when any file failed, 0 otherwise. The CSV is written atomically. --output
and --plot are checked before anything is read (exit 2 when they cannot be written).
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

import dataclasses
import os
import sys
import time

from absl import app, flags
import numpy as np

from smlm_jax.diffusion import camera_setup
from smlm_jax.core import cli
from smlm_jax.core import tiff_io

COLUMNS = ("file", "first_frame", "D_um2_per_s", "D_low_um2_per_s", "D_high_um2_per_s",
           "photons", "background_photons", "flag")
MISMATCH_TOLERANCE = 0.05
NO_SPOT_SNR = 5.0       # pure noise gives a median peak SNR of 3.6-4.1; simulated spots > 6.8
EDGE_PX = 2
EDGE_FRACTION = 0.25

@dataclasses.dataclass(kw_only=True)
class Estimate:
  """D (um^2/s) with its 68% interval, photons and flags of one window (:class:`Row`)
  or one molecule (``analyze.TrackRow``)."""
  D: float = float("nan")
  D_low: float = float("nan")
  D_high: float = float("nan")
  photons: float = float("nan")
  background_photons: float = float("nan")
  flags: list = dataclasses.field(default_factory=list)
  error: str | None = None

  def flag(self) -> str:
    if self.error:
      return f"error:{self.error}"
    return ";".join(self.flags) or "ok"


@dataclasses.dataclass
class Row(Estimate):
  file: str
  first_frame: int | str = ""

  def cells(self):
    num = cli.number
    return [self.file, self.first_frame, num(self.D, ".5g"), num(self.D_low, ".5g"),
            num(self.D_high, ".5g"), num(self.photons, ".1f"),
            num(self.background_photons, ".3f"), self.flag()]


def make_infer_fn(model, mesh):
  """Jitted (state, frames ADU [B,T,H,W], camera) -> predictions and spot statistics."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from smlm_jax.core import noise, trainer
  from smlm_jax.diffusion import normalize

  data = NamedSharding(mesh, P("data"))

  def infer(state, frames_adu, camera):
    frames_adu = jax.lax.with_sharding_constraint(frames_adu, data)
    photons = noise.adu_to_photons(frames_adu, camera)
    x, bg = normalize.normalize_photons(photons)   # == normalize.model_input in training
    (mean, log_var), _ = trainer.model_apply(model, state["params"], state["batch_stats"],
                                             x, train=False)
    stats = normalize.spot_statistics(photons, bg, camera)
    h, w = frames_adu.shape[-2:]
    yx = stats["peak_yx_px"]
    near = ((yx[..., 0] < EDGE_PX) | (yx[..., 0] >= h - EDGE_PX)
            | (yx[..., 1] < EDGE_PX) | (yx[..., 1] >= w - EDGE_PX))
    return {"mean": mean, "log_var": log_var, "background_photons": bg,
            "photons": stats["spot_photons"].mean(-1),
            "peak_snr": jnp.median(stats["peak_snr"], axis=-1),
            "edge_fraction": near.mean(-1)}

  return jax.jit(infer)


class Predictor:
  """A trained run ready to predict batches of raw camera windows."""

  def __init__(self, workdir: str, camera=None, batch_size: int | None = None):
    from smlm_jax.core import trainer
    self.mesh = trainer.make_mesh()
    self.config, task, self.state = trainer.load_run(workdir, self.mesh)
    self.model = task.model
    self.camera = camera
    self.batch_size = trainer.divisible_batch(batch_size or self.config.eval_batch_size,
                                              self.mesh)
    self._infer = make_infer_fn(self.model, self.mesh)

  @property
  def window_shape(self):
    s = self.config.sim
    return s.num_frames, s.height_px, s.width_px

  def __call__(self, frames_adu: np.ndarray) -> dict[str, np.ndarray]:
    """[N, T, H, W] ADU -> dict of [N] arrays (a short last batch is padded with copies
    of a real window, which are then dropped)."""
    from smlm_jax.core import trainer
    return trainer.batched(lambda chunk: self._infer(self.state, chunk, self.camera),
                           np.asarray(frames_adu), self.batch_size, self.mesh, pad="edge")


def _mismatch(value, reference):
  return abs(value / reference - 1.0) > MISMATCH_TOLERANCE


def fill_rows(rows, out, sim):
  """Fills D, interval, photons, background and flags of ``rows`` from the predictor's
  outputs ``out`` (dict of [len(rows)] arrays) for a model trained with ``sim``."""
  from smlm_jax.diffusion import metrics as metrics_lib
  D, lo, hi = metrics_lib.point_and_interval(out["mean"], out["log_var"])
  for i, row in enumerate(rows):
    row.D, row.D_low, row.D_high = float(D[i]), float(lo[i]), float(hi[i])
    row.photons = float(out["photons"][i])
    row.background_photons = float(out["background_photons"][i])
    if out["peak_snr"][i] < NO_SPOT_SNR:
      row.flags.append("no_spot")
    if out["edge_fraction"][i] > EDGE_FRACTION:
      row.flags.append("spot_at_edge")
    if not (sim.photons[0] / 2 <= row.photons <= sim.photons[1] * 2):
      row.flags.append("photons_outside_trained_range")
    if not (sim.background_photons[0] / 2 <= row.background_photons
            <= sim.background_photons[1] * 2):
      row.flags.append("background_outside_trained_range")
    row.flags += D_range_flags(row.D, sim)


def D_range_flags(D, sim) -> list[str]:
  """['D_below_trained_range'] / ['D_above_trained_range'] / [] for a D estimate."""
  if D < sim.D_um2_per_s[0]:
    return ["D_below_trained_range"]
  if D > sim.D_um2_per_s[1]:
    return ["D_above_trained_range"]
  return []


def geometry_flags(px, dt, sim, warnings: dict) -> list[str]:
  """Flags (and one warning each in ``warnings``) for a pixel size / frame interval more
  than 5% from the training config's."""
  file_flags = []
  if _mismatch(px, sim.pixel_size_nm):
    file_flags.append("pixel_size_mismatch")
    warnings.setdefault(f"px{px:.4g}", (
        f"pixel size {px:.4g} nm differs from the model's {sim.pixel_size_nm:.4g} nm by "
        f"more than 5% (D scales with pixel size squared); rows flagged "
        f"pixel_size_mismatch - retrain with --config.sim.pixel_size_nm={px:.4g}"))
  if _mismatch(dt, sim.frame_interval_s):
    file_flags.append("frame_interval_mismatch")
    warnings.setdefault(f"dt{dt:.4g}", (
        f"frame interval {dt:.4g} s differs from the model's {sim.frame_interval_s:.4g} s "
        f"by more than 5% (D scales with 1/interval and the blur changes); rows flagged "
        f"frame_interval_mismatch - retrain with --config.sim.frame_interval_s={dt:.4g}"))
  return file_flags


def assumed_notes(assumed: dict, sim) -> list[str]:
  """Header/console notes for geometry values assumed (training value) for ``assumed``
  ({name: number of files}) files without metadata."""
  notes = []
  if assumed["pixel_size_nm"]:
    notes.append(f"pixel_size_nm={sim.pixel_size_nm:g} ASSUMED (training value) for "
                 f"{assumed['pixel_size_nm']} file(s) without metadata; set --pixel_size_nm")
  if assumed["frame_interval_s"]:
    notes.append(f"frame_interval_s={sim.frame_interval_s:g} ASSUMED (training value) for "
                 f"{assumed['frame_interval_s']} file(s) without metadata; "
                 "set --frame_interval_s")
  return notes


def header_lines(tool, predictor, workdir, camera_notes, notes, warnings) -> list[str]:
  """The CSV header of predict and analyze: model, training geometry, camera sources,
  assumed values and warnings."""
  cfg = predictor.config
  header = [f"{tool} model={cfg.model.name} step={int(predictor.state['step'])} "
            f"workdir={os.path.abspath(workdir)}",
            f"training: pixel_size_nm={cfg.sim.pixel_size_nm:g} "
            f"frame_interval_s={cfg.sim.frame_interval_s:g} exposure_s={cfg.sim.exposure_s:g} "
            f"D_um2_per_s={cfg.sim.D_um2_per_s[0]:g}-{cfg.sim.D_um2_per_s[1]:g}",
            "camera: " + ", ".join(camera_notes)]
  return header + [f"note: {n}" for n in notes] + [f"WARNING: {w}" for w in warnings]


def setup_predictor(workdir, camera_offset_adu=None, camera_gain_adu_per_e=None,
                    camera_qe=None, calibration=None, batch_size=None):
  """(predictor with the data's camera, camera notes): loads the run, resolves the camera
  (flags > calibration file > training config) and prints the start-up lines."""
  cal = camera_setup.read_calibration(calibration) if calibration else None
  predictor = Predictor(workdir, batch_size=batch_size)
  cfg = predictor.config
  camera, camera_notes = camera_setup.data_camera(
      cfg.sim.camera, camera_offset_adu, camera_gain_adu_per_e, camera_qe, cal)
  predictor.camera = camera
  print(f"model {cfg.model.name} (step {int(predictor.state['step'])}) from "
        f"{workdir}; windows of {'x'.join(map(str, predictor.window_shape))} (T x H x W)",
        file=sys.stderr)
  for n in camera_notes:
    if "ASSUMED" in n:
      print(f"note: camera {n}", file=sys.stderr)
  return predictor, camera_notes


def predict_files(predictor: Predictor, inputs, stride=None, pixel_size_nm=None,
                  frame_interval_s=None, log=print, channel=None):
  """Rows (one per window or failed path) and warnings for the header and console."""
  sim = predictor.config.sim
  t, h, w = predictor.window_shape
  rows: list[Row] = []
  pending: list[tuple[Row, np.ndarray]] = []
  warnings: dict[str, str] = {}
  assumed = {"pixel_size_nm": 0, "frame_interval_s": 0}

  def flush():
    if not pending:
      return
    fill_rows([row for row, _ in pending], predictor(np.stack([f for _, f in pending])), sim)
    pending.clear()

  offset = float(predictor.camera.offset_adu) if predictor.camera is not None else None
  for path, movie, starts, error in tiff_io.scan_inputs(inputs, t, h, w, stride, "predict",
                                                       log, offset, channel):
    if error:
      rows.append(Row(file=path, error=error[1]))
      continue
    px, dt, missing = tiff_io.resolve_geometry(movie, pixel_size_nm, frame_interval_s,
                                               sim.pixel_size_nm, sim.frame_interval_s)
    for name in missing:
      assumed[name] += 1
    file_flags = geometry_flags(px, dt, sim, warnings)
    for first in starts:
      row = Row(file=path, first_frame=first, flags=list(file_flags))
      rows.append(row)
      pending.append((row, movie.frames[first:first + t]))
    if len(pending) >= predictor.batch_size:
      flush()
  flush()
  notes = assumed_notes(assumed, sim)
  return rows, list(warnings.values()), notes


def plot_histogram(rows, path, D_range, title="", ylabel="windows"):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ok = np.array([r.D for r in rows if not r.error and not r.flags])
  flagged = np.array([r.D for r in rows if not r.error and r.flags])
  every = np.concatenate([ok, flagged])
  fig, ax = plt.subplots(figsize=(6, 4))
  if every.size:
    lo = min(every.min(), D_range[0]) / 1.2
    hi = max(every.max(), D_range[1]) * 1.2
    bins = np.logspace(np.log10(lo), np.log10(hi), 31)
    ax.hist([ok, flagged], bins=bins, stacked=True, color=["tab:blue", "tab:orange"],
            label=[f"ok ({ok.size})", f"flagged ({flagged.size})"])
    if ok.size:
      ax.axvline(np.median(ok), color="k", ls="--", lw=1,
                 label=f"median ok = {np.median(ok):.3g}")
  ax.axvspan(*D_range, color="0.9", zorder=-1, label="trained D range")
  ax.set(xscale="log", xlabel="predicted D (um$^2$/s)", ylabel=ylabel, title=title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(workdir, inputs, output, stride=None, camera_offset_adu=None,
        camera_gain_adu_per_e=None, camera_qe=None, calibration=None, pixel_size_nm=None,
        frame_interval_s=None, batch_size=None, plot=None, channel=None) -> int:
  """The whole command; returns the exit code (1 when any input failed)."""
  t0 = time.time()
  predictor, camera_notes = setup_predictor(workdir, camera_offset_adu, camera_gain_adu_per_e,
                                            camera_qe, calibration, batch_size)
  cfg = predictor.config
  rows, warnings, notes = predict_files(predictor, inputs, stride, pixel_size_nm,
                                        frame_interval_s, channel=channel)
  for n in notes:
    print(f"note: {n}", file=sys.stderr)
  for wmsg in warnings:
    print(f"\n!!! WARNING: {wmsg}\n", file=sys.stderr)
  header = header_lines("smlm_jax.diffusion.predict", predictor, workdir, camera_notes, notes,
                        warnings)
  header.append("D = posterior median; D_low/D_high = 68% interval; photons per frame "
                "(spot) and per pixel per frame (background), before QE")
  cli.atomic_write_text(output, cli.csv_text(COLUMNS, [r.cells() for r in rows], header))
  errors = [r for r in rows if r.error]
  done = [r for r in rows if not r.error]
  ok = [r for r in done if not r.flags]
  summary = (f"{len(done)} window(s) predicted ({len(ok)} ok, {len(done) - len(ok)} flagged), "
             f"{len(errors)} input(s) failed; wrote {output} in {time.time() - t0:.1f} s")
  if ok:
    d = np.array([r.D for r in ok])
    q = np.quantile(d, [0.25, 0.5, 0.75])
    summary += f"\nD of ok windows: median {q[1]:.3g} um^2/s (IQR {q[0]:.3g}-{q[2]:.3g})"
  print(summary, file=sys.stderr)
  if plot:
    plot_histogram(rows, plot, cfg.sim.D_um2_per_s,
                   title=f"{len(done)} windows, {cfg.model.name}")
    print(f"wrote {plot}", file=sys.stderr)
  return 1 if errors else 0


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training run folder (its latest checkpoint).")
  flags.DEFINE_multi_string("input", [], "TIFF file or folder; repeat for several.")
  flags.DEFINE_string("output", None, "CSV file to write.")
  flags.DEFINE_integer("stride", None, "Frames between windows of long stacks "
                       "(default: the model's window length T).")
  define_camera_and_geometry_flags()
  flags.DEFINE_string("plot", None, "Optional PNG: histogram of predicted D.")
  cli.define_channel_flag("movies")


def define_camera_and_geometry_flags():
  """The camera, pixel-size, frame-interval and batch flags that predict and analyze
  share (read by :func:`camera_setup` and the geometry checks)."""
  flags.DEFINE_float("camera_offset_adu", None, "Camera baseline (ADU).")
  flags.DEFINE_float("camera_gain_adu_per_e", None,
                     "ADU per photo-electron (EMCCD: including EM gain).")
  flags.DEFINE_float("camera_qe", None, "Quantum efficiency (default: training value).")
  flags.DEFINE_string("calibration", None,
                      "Calibration JSON from smlm_jax.diffusion.calibrate (camera offset/gain).")
  flags.DEFINE_float("pixel_size_nm", None, "Pixel size (nm); overrides file metadata.")
  flags.DEFINE_float("frame_interval_s", None,
                     "Frame interval (s); overrides file metadata.")
  flags.DEFINE_integer("batch_size", None, "Windows per device call "
                       "(default: the run's eval_batch_size).")


def main(argv):
  cli.quiet_logs()
  f = flags.FLAGS
  inputs = cli.workdir_inputs_and_output(f, argv)
  if f.plot:
    cli.check_writable(f.plot, "plot")
  if f.stride is not None and f.stride < 1:
    cli.fail("--stride must be >= 1")
  cli.require_positive(f, ("pixel_size_nm", "frame_interval_s", "camera_gain_adu_per_e",
                           "batch_size", "camera_qe"))
  cli.run_or_fail(run, f.workdir, inputs, f.output, f.stride, f.camera_offset_adu,
                  f.camera_gain_adu_per_e, f.camera_qe, f.calibration, f.pixel_size_nm,
                  f.frame_interval_s, f.batch_size, f.plot, channel=cli.channel_flag(f),
                  user_errors=(FileNotFoundError, camera_setup.CalibrationError))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
