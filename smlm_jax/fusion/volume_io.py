"""Reading users' 3D volumes for the fusion tools: one clear error per unusable file."""
from __future__ import annotations

import os

import numpy as np

from smlm_jax.core import tiff_io
from smlm_jax.core.tiff_io import MovieError

MIN_SIDE = 2


def read_volume(path: str, reject_constant: bool = False, channel: int | None = None):
  """(float32 volume [Z, Y, X], tiff_io.Image) of a 3D TIFF stack; of a multi-channel
  stack [Z, C, Y, X] the ``channel`` (:func:`smlm_jax.core.tiff_io.take_channel`: required
  for it, ``bad_channel`` otherwise).

  Raises MovieError (one line, a short code) for missing/unreadable/truncated files,
  RGB, complex/bool/non-numeric pixels, NaN/inf, 2D images, data with more than three
  axes once the channel is taken (time series: split them first) and, with
  ``reject_constant``, a volume whose 2nd and 99.8th percentiles are equal
  (``constant_input``: nothing to normalize by)."""
  image = tiff_io.read_image(path)
  data, image.axes = tiff_io.take_channel(image.data, image.axes, channel, path)
  image.data = data
  if data.dtype.kind not in "uif":
    raise MovieError(f"{path}: unsupported pixel type {data.dtype}; expected integer or "
                     "float intensities", "bad_dtype")
  if data.ndim == 2:
    raise MovieError(f"{path}: a single 2D image {data.shape}; expected a 3D stack "
                     "(Z, Y, X)", "not_3d")
  if data.ndim != 3:
    raise MovieError(f"{path}: {data.ndim}D data of shape {data.shape} (axes "
                     f"{image.axes}); expected one 3D stack (Z, Y, X) - split time "
                     "points first (channels: --channel)", "bad_shape")
  if min(data.shape) < MIN_SIDE:
    raise MovieError(f"{path}: stack {data.shape} is too thin; expected a 3D volume",
                     "not_3d")
  volume = data.astype(np.float32)
  if not np.all(np.isfinite(volume)):
    raise MovieError(f"{path}: contains NaN or infinite voxel values", "nan_or_inf")
  if reject_constant:
    from smlm_jax.fusion import metrics
    lo, hi = metrics.percentiles(volume)
    if not hi > lo:
      raise MovieError(f"{path}: its 2nd and 99.8th percentiles are equal ({lo:g}): a "
                       "constant (or almost empty) volume has nothing to normalize by",
                       "constant_input")
  return volume, image


def voxel_size_um(image) -> tuple:
  """(dz, dy, dx) in um from the file's metadata; None where absent."""
  dz = image.z_spacing_nm / 1000.0 if image.z_spacing_nm else None
  dxy = image.pixel_size_nm / 1000.0 if image.pixel_size_nm else None
  return dz, dxy, dxy


def stem(path: str) -> str:
  name = os.path.basename(path)
  for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
    if name.lower().endswith(suffix):
      return name[:-len(suffix)]
  return os.path.splitext(name)[0]
