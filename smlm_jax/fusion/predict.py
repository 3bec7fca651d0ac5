"""Predicts the fused multiview volume from single light-sheet views (your 3D TIFFs).

  python -m smlm_jax.fusion.predict --workdir=runs/fusion --input=VIEW.tif [--input=DIR]
      --output=OUT_DIR [--tile=24,96,96] [--overlap=12,16,16] [--halo=2,4,4]
      [--memory_gb=2] [--batch_size=2] [--depth_offset_um=0] [--surface=first] [--plot]
      [--tta | --notta] [--noresample] [--channel=N]

Inputs: single-channel 3D stacks (Z, Y, X; z = the detection axis) as TIFF / OME-TIFF /
ImageJ files or folders of them; of multi-channel stacks (Z, C, Y, X) the channel
``--channel`` (required for them: no default channel; a single-channel stack accepts
only 0). Each volume is percentile-normalized (2nd / 99.8th
percentile, as the training data and the challenge metric), predicted by overlapping
tiles blended with a smooth window (:mod:`smlm_jax.fusion.tiling`; ``--tile`` defaults
to the run's ``predict.tile``, shrunk to fit ``--memory_gb``), and written as
``OUT_DIR/<name>_fused.tif``: float32, normalized units (0 ~ background, 1 ~ the bright
structures), with the input's voxel-size metadata (OME when the input is OME-TIFF, else
ImageJ). Every tile is predicted in its 8 y/x flips and transposes and the results
averaged (``--tta``, the run's ``predict.tta`` by default; ``--notta``: one pass, 8x
faster, noisier). ``--plot`` also writes ``<name>_slices.png`` (orthogonal slices of view and
prediction). ``OUT_DIR/predict_summary.csv`` lists every input:
  file, output, shape_zyx, voxel_size_um_zyx, tiles, seconds, flag
flag is ``ok`` or ';'-joined reasons: ``voxel_size_mismatch`` (more than 10% from the
training voxel size: the network learned the PSF and the cells in voxels), ``resampled``
(then, by default, the volume was resampled linearly to the training voxels, predicted
and the prediction resampled back onto the input grid; ``--noresample`` predicts it as
it is), ``voxel_size_unknown`` (no metadata; training value assumed), or ``error:<code>`` (not_found, unreadable, truncated, not_3d, bad_shape,
bad_channel, bad_dtype, rgb, nan_or_inf, constant_input - all voxels equal: nothing to normalize,
no volume is written -, empty_folder) for inputs that could not be used. --output is
checked before anything is read (exit 2 when it cannot be written). Bad inputs never stop the
run: one ``error:`` line each on stderr, exit code 1 if any failed.

Models trained with ``model.depth_channel`` also get each slice's depth below the
sample surface: ``--depth_offset_um`` (depth of the first slice) and ``--surface``
(``first``: the stack starts at the surface facing the detection objective; ``last``).
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

import os
import sys
import time

from absl import app, flags
import numpy as np
from scipy import ndimage

from smlm_jax.core import cli
from smlm_jax.core import tiff_io
from smlm_jax.fusion import metrics
from smlm_jax.fusion import tiling
from smlm_jax.fusion import volume_io

COLUMNS = ("file", "output", "shape_zyx", "voxel_size_um_zyx", "tiles", "seconds", "flag")
VOXEL_TOLERANCE = 0.10


class Predictor:
  """A trained fusion run, ready to predict volumes of any size."""

  def __init__(self, workdir: str, mesh=None, tta: bool | None = None):
    """``tta``: average over the y/x flips and transposes of every tile (None: the
    run's ``predict.tta``)."""
    from smlm_jax.core import trainer
    self.mesh = mesh or trainer.make_mesh()
    self.config, self.task, self.state = trainer.load_run(workdir, self.mesh)
    if tta is not None:
      with self.task.config.unlocked():
        self.task.config.predict.tta = bool(tta)
    self._fn = self.task.predict_fn(self.mesh)

  @property
  def voxel_size_um(self):
    return tuple(float(v) for v in self.config.sim.voxel_size_um)

  def tile_settings(self, shape, tile=None, overlap=None, halo=None, memory_gb=None,
                    batch_size=1):
    """(tile, overlap, halo) for a volume: flags, else the run's defaults; the tile is
    shrunk to what fits ``memory_gb`` (default the run's predict.memory_gb)."""
    p = self.config.predict
    tile = tuple(tile or p.tile)
    budget = memory_gb or p.memory_gb
    fit = tiling.default_tile(shape, self.config.model.base_width, budget, batch_size)
    tile = tuple(min(t, f) for t, f in zip(tile, fit))
    if self.fixed_slices:                 # a z-as-channels model: tiles of its depth
      tile = (self.fixed_slices,) + tile[1:]
    return tile, tuple(overlap or p.overlap), tuple(halo or p.halo)

  @property
  def fixed_slices(self):
    from smlm_jax.fusion import task as task_lib
    return task_lib.fixed_slices(self.config.model, self.config.sim.shape)

  def apply_tiles(self, x, batch_size):
    """[n, tz, ty, tx, C] model inputs -> [n, tz, ty, tx] predictions."""
    from smlm_jax.core import trainer
    return trainer.batched(lambda c: self._fn(self.state, c), x, batch_size, self.mesh,
                           pad="edge")

  def model_input(self, volume, voxel_size_um=None, depth_offset_um=0.0,
                  surface="first"):
    """[Z, Y, X] raw volume -> [Z, Y, X, C] normalized model input."""
    v = metrics.percentile_normalize(volume)
    channels = [v]
    if self.config.model.depth_channel:
      dz = (voxel_size_um or self.voxel_size_um)[0] or self.voxel_size_um[0]
      depth = depth_offset_um + np.arange(v.shape[0]) * dz
      if surface == "last":
        depth = depth[::-1]
      d = depth / self.config.model.depth_scale_um
      channels.append(np.broadcast_to(d[:, None, None], v.shape).astype(np.float32))
    return np.stack(channels, axis=-1)

  def predict(self, volume, voxel_size_um=None, tile=None, overlap=None, halo=None,
              memory_gb=None, batch_size=2, depth_offset_um=0.0, surface="first",
              progress=False, resample=False):
    """Fused prediction [Z, Y, X] (float32, normalized units) of a raw volume. With
    ``resample`` and a ``voxel_size_um`` more than 10% from the training voxel size on
    any axis, the volume is resampled (linear) to the training voxels, predicted, and
    the prediction resampled back onto the input grid (the network learned the PSF and
    the structures' sizes in voxels)."""
    if resample and voxel_size_um is not None and _mismatch(voxel_size_um,
                                                             self.voxel_size_um):
      factors = [v / r for v, r in zip(voxel_size_um, self.voxel_size_um)]
      small = ndimage.zoom(np.asarray(volume, np.float32), factors, order=1,
                           mode="nearest")
      out, n = self.predict(small, self.voxel_size_um, tile, overlap, halo, memory_gb,
                            batch_size, depth_offset_um, surface, progress)
      back = [s / o for s, o in zip(volume.shape, out.shape)]
      out = ndimage.zoom(out, back, order=1, mode="nearest")
      return out[tuple(slice(0, s) for s in volume.shape)], n
    x = self.model_input(volume, voxel_size_um, depth_offset_um, surface)
    z = x.shape[0]
    if self.fixed_slices and z < self.fixed_slices:     # too thin: mirror-pad along z
      extra = self.fixed_slices - z
      x = np.pad(x, ((0, extra), (0, 0), (0, 0), (0, 0)),
                 mode="reflect" if extra < z else "edge")
    tile, overlap, halo = self.tile_settings(x.shape[:3], tile, overlap, halo, memory_gb,
                                             batch_size)
    n = tiling.num_tiles(x.shape[:3], tile, overlap, halo)
    bar = cli.progress(total=n, desc="tiles", unit="tile") if progress else None
    try:
      out = tiling.predict_tiled(lambda c: self.apply_tiles(c, batch_size), x, tile,
                                 overlap, halo, batch_size, progress=bar)[:z]
    finally:
      if bar is not None:
        bar.close()
    if self.config.loss.get("renormalize", False):
      # The loss was blind to the prediction's gain and offset (as the metric is): put
      # the blended volume back in percentile-normalized units.
      out = metrics.percentile_normalize(out)
    return out, n


def _mismatch(found, reference):
  return any(f is not None and abs(f / r - 1.0) > VOXEL_TOLERANCE
             for f, r in zip(found, reference))


def run(workdir, inputs, output_dir, tile=None, overlap=None, halo=None, memory_gb=None,
        batch_size=2, depth_offset_um=0.0, surface="first", plot=False, log=print,
        tta=None, resample=True, channel=None) -> int:
  """The whole command; returns the exit code (1 when any input failed)."""
  t0 = time.time()
  predictor = Predictor(workdir, tta=tta)
  cfg = predictor.config
  ref = predictor.voxel_size_um
  log(f"model from {workdir} (step {int(predictor.state['step'])}), trained on voxels "
      f"{ref[0]:g} x {ref[1]:g} x {ref[2]:g} um (z, y, x)", file=sys.stderr)
  os.makedirs(output_dir, exist_ok=True)
  rows, failed = [], 0
  read = lambda p: volume_io.read_volume(p, reject_constant=True, channel=channel)
  for path, result, error in tiff_io.scan_files(inputs, read, "predict", log):
    if error:
      failed += 1
      rows.append([path, "", "", "", "", "", f"error:{error[1]}"])
      continue
    volume, image = result
    t1 = time.time()
    vox = volume_io.voxel_size_um(image)
    flags_ = []
    if any(v is None for v in vox):
      flags_.append("voxel_size_unknown")
    if _mismatch(vox, ref):
      flags_.append("voxel_size_mismatch")
      if resample:
        flags_.append("resampled")
        log(f"note: {path}: voxel size {vox} um differs from the model's {ref} by more "
            "than 10%: resampled to it for the prediction and back (--noresample: off)",
            file=sys.stderr)
      else:
        log(f"warning: {path}: voxel size {vox} um differs from the model's {ref} by "
            "more than 10%; the prediction may be poor (drop --noresample, or retrain "
            "with --config.sim.voxel_size_um)", file=sys.stderr)
    used = tuple(v if v is not None else r for v, r in zip(vox, ref))
    pred, n_tiles = predictor.predict(volume, used, tile, overlap, halo, memory_gb,
                                      batch_size, depth_offset_um, surface, progress=True,
                                      resample=resample)
    name = volume_io.stem(path)
    ome = path.lower().endswith((".ome.tif", ".ome.tiff"))
    out_path = os.path.join(output_dir, f"{name}_fused" + (".ome.tif" if ome else ".tif"))
    with cli.atomic_path(out_path) as tmp:
      tiff_io.write_image(tmp, pred, "ZYX", pixel_size_nm=image.pixel_size_nm,
                          z_spacing_nm=image.z_spacing_nm, ome=ome)
    if plot:
      from smlm_jax.core import plotting
      fig = plotting.orthogonal_slices(
          [volume, pred], [f"{name} view", "prediction"],
          z_aspect=used[0] / used[1])
      plotting.save(fig, os.path.join(output_dir, f"{name}_slices.png"))
    rows.append([path, out_path, "x".join(map(str, volume.shape)),
                 "x".join(f"{v:g}" if v is not None else "?" for v in vox), n_tiles,
                 f"{time.time() - t1:.1f}", ";".join(flags_) or "ok"])
  summary = os.path.join(output_dir, "predict_summary.csv")
  header = [f"smlm_jax.fusion.predict workdir={os.path.abspath(workdir)} "
            f"step={int(predictor.state['step'])}",
            f"training voxel size (z, y, x) um: {ref[0]:g} {ref[1]:g} {ref[2]:g}",
            "outputs: float32 volumes in percentile-normalized units (2nd -> 0, 99.8th -> 1)"]
  cli.atomic_write_text(summary, cli.csv_text(COLUMNS, rows, header))
  done = len(rows) - failed
  log(f"{done} volume(s) predicted, {failed} input(s) failed; wrote {output_dir} "
      f"({time.time() - t0:.1f} s)", file=sys.stderr)
  return 1 if failed else 0


def _triple(text, name):
  if text is None:
    return None
  try:
    parts = [int(t) for t in str(text).split(",")]
  except ValueError:
    cli.fail(f"--{name} must be one or three integers (z,y,x), got {text!r}")
  if len(parts) == 1:
    parts = parts * 3
  if len(parts) != 3 or min(parts) < 0:
    cli.fail(f"--{name} must be one or three non-negative integers (z,y,x), got {text!r}")
  return tuple(parts)


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training run folder (its latest checkpoint).")
  flags.DEFINE_multi_string("input", [], "3D TIFF file or folder; repeat for several.")
  flags.DEFINE_string("output", None, "Folder for the fused volumes and the summary.")
  flags.DEFINE_string("tile", None, "Tile size z,y,x (voxels); default: the run's.")
  flags.DEFINE_string("overlap", None, "Tile overlap z,y,x; default: the run's.")
  flags.DEFINE_string("halo", None, "Discarded tile border z,y,x; default: the run's.")
  flags.DEFINE_float("memory_gb", None, "Memory budget for one batch of tiles.")
  flags.DEFINE_integer("batch_size", 2, "Tiles per device call.")
  flags.DEFINE_float("depth_offset_um", 0.0, "Depth of the first slice below the sample "
                     "surface (models with a depth channel).")
  flags.DEFINE_enum("surface", "first", ["first", "last"],
                    "Which end of the stack faces the detection objective.")
  flags.DEFINE_bool("plot", False, "Also write <name>_slices.png per input.")
  flags.DEFINE_bool("tta", None, "Average each tile over its y/x flips and transposes "
                    "(default: the run's predict.tta).")
  flags.DEFINE_bool("resample", True, "A volume whose voxel size (metadata) is more than "
                    "10% from the training voxel size is resampled to it, predicted and "
                    "resampled back (--noresample: predicted as it is).")
  cli.define_channel_flag("stacks")


def main(argv):
  cli.quiet_logs()
  f = flags.FLAGS
  if not f.workdir:
    cli.fail("--workdir is required (a trained fusion run; see --help)")
  inputs = cli.inputs_and_output_folder(f, argv, "3D TIFF file or folder",
                                        "a folder for the fused volumes")
  tile, overlap, halo = (_triple(f.tile, "tile"), _triple(f.overlap, "overlap"),
                         _triple(f.halo, "halo"))
  if tile is not None and min(tile) < 1:
    cli.fail("--tile must be >= 1 voxel per axis")
  if f.batch_size < 1:
    cli.fail("--batch_size must be >= 1")
  cli.require_positive(f, ("memory_gb",))
  cli.run_or_fail(run, f.workdir, inputs, f.output, tile, overlap, halo, f.memory_gb,
                  f.batch_size, f.depth_offset_um, f.surface, f.plot, tta=f.tta,
                  resample=f.resample, channel=cli.channel_flag(f),
                  user_errors=(FileNotFoundError, ValueError))   # ValueError: tile/overlap/halo


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
