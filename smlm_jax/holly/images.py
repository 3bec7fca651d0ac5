"""Training images from folders: FITS or TIFF, HOLLy's sigma sub-folders or a plain folder.

Layouts (``--config.data.images=DIR``):
  * HOLLy's: ``DIR/<sigma>/*.fits`` (sub-folders named by the sigma, in pixels, that
    the images were rendered with, e.g. ``DIR/2.0/test_00.fits``); during training the
    sub-folder whose sigma is closest to (and not above, when possible) the
    curriculum's current sigma is used;
  * plain: image files directly in ``DIR`` (searched recursively when it has no sigma
    sub-folders); their sigma is ``config.data.image_sigma`` (px).
Files: ``.fits``/``.fit``/``.fts`` (astropy; the primary HDU, or the first image HDU)
and ``.tif``/``.tiff`` (a 2D image, or a stack [T, H, W] giving T images; a file with
channels, e.g. [C, H, W] or [T, C, H, W], needs ``config.data.channel``: its channels
are not several images of the structure). Every image
must be square; all must have the same size (sum-binned by an integer factor to
``config.data.size`` when it divides theirs; the sigmas scale with it). Each image is made unit-mass (divided by
its sum) after negative values are clipped to 0 (render backgrounds are 0; subtract a
camera offset before if there is one).

Unusable files (unreadable, not 2D/3D, not square, NaN, zero sum) give one
``error:`` line each on stderr and are skipped; a folder with no usable image raises
``ValueError`` with a one-line message.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys

import numpy as np

from smlm_jax.core import tiff_io

FITS_SUFFIXES = (".fits", ".fit", ".fts")
IMAGE_SUFFIXES = FITS_SUFFIXES + tiff_io.TIFF_SUFFIXES


@dataclasses.dataclass
class ImageSet:
  sigmas: np.ndarray              # [S] sigma (px) of each group, ascending
  images: list                    # S arrays [n_s, H, W] float32, unit mass
  paths: list                     # S lists of source names (one per image)

  @property
  def size(self) -> int:
    return int(self.images[0].shape[-1])

  @property
  def count(self) -> int:
    return sum(len(a) for a in self.images)

  @property
  def particles(self) -> int:
    """Distinct images at one sigma (the largest group): the structures imaged."""
    return max(len(a) for a in self.images)

  def group_for(self, sigma_px: float) -> int:
    """Index of the group to use at curriculum sigma: the largest sigma <= sigma_px
    (so blurring further can match it exactly), else the smallest."""
    ok = np.nonzero(self.sigmas <= sigma_px + 1e-6)[0]
    return int(ok[-1]) if len(ok) else 0


def bin_to(image_set: ImageSet, size: int) -> ImageSet:
  """Sum-bins the images to ``size`` px when their size is a multiple of it (sigmas
  scale by the same factor: a pixel-integrated splat image of width s binned f x f is
  the one of width s/f); otherwise returns the set unchanged."""
  f = image_set.size // size if size > 0 else 0
  if f <= 1 or image_set.size != f * size:
    return image_set
  binned = [a.reshape(len(a), size, f, size, f).sum(axis=(2, 4)) for a in image_set.images]
  return ImageSet(image_set.sigmas / f, binned, image_set.paths)


def _read_fits(path):
  from astropy.io import fits
  try:
    with fits.open(path, memmap=False) as hdul:
      data = None
      for hdu in hdul:
        if hdu.data is not None and getattr(hdu, "is_image", True) and hdu.data.ndim >= 2:
          data = np.asarray(hdu.data, np.float32)
          break
  except Exception as e:   # astropy raises many types for corrupt files
    raise tiff_io.MovieError(f"{path}: not a readable FITS file ({type(e).__name__}: {e})")
  if data is None:
    raise tiff_io.MovieError(f"{path}: FITS file holds no image", "no_image")
  return data


CHANNEL_FLAG = "--config.data.channel"


def read_images(path: str, channel: int | None = None) -> np.ndarray:
  """[n, H, W] float32 unit-mass images of one file (``channel``: of a TIFF with a C
  axis; FITS files and TIFFs without one accept only None / 0); MovieError when
  unusable."""
  if path.lower().endswith(FITS_SUFFIXES):
    tiff_io.check_channel("", (), channel, path, CHANNEL_FLAG)
    data = _read_fits(path)
  else:
    image = tiff_io.read_image(path)
    data, _ = tiff_io.take_channel(image.data, image.axes, channel, path, CHANNEL_FLAG)
    data = np.asarray(data, np.float32)
  data = np.squeeze(data)
  if data.ndim == 2:
    data = data[None]
  if data.ndim != 3:
    raise tiff_io.MovieError(f"{path}: expected a 2D image or a [T, H, W] stack, got "
                             f"shape {data.shape}", "bad_shape")
  if data.shape[1] != data.shape[2]:
    raise tiff_io.MovieError(f"{path}: image is {data.shape[1]}x{data.shape[2]}; "
                             "square images are required", "not_square")
  if not np.all(np.isfinite(data)):
    raise tiff_io.MovieError(f"{path}: contains NaN or infinite values", "nan_or_inf")
  data = np.maximum(data, 0.0)
  sums = data.sum(axis=(1, 2))
  if np.any(sums <= 0):
    raise tiff_io.MovieError(f"{path}: an image has no positive pixel (all zero or "
                             "negative; negative values count as 0)", "empty_image")
  return (data / sums[:, None, None]).astype(np.float32)


def _sigma_of(name: str):
  try:
    s = float(name)
  except ValueError:
    return None
  return s if s > 0 else None


def load_folder(folder: str, default_sigma: float | None = None, log=print,
                channel: int | None = None) -> ImageSet:
  """Images of a folder (HOLLy's sigma sub-folders, or plain); see the module doc
  (``channel``: of multi-channel TIFFs, :func:`read_images`)."""
  if not os.path.exists(folder):
    raise ValueError(f"{folder}: no such folder")
  if not os.path.isdir(folder):
    raise ValueError(f"{folder}: is a file; give a folder of FITS/TIFF images")
  subs = sorted((s, os.path.join(folder, n)) for n in os.listdir(folder)
                if os.path.isdir(os.path.join(folder, n)) and (s := _sigma_of(n)))
  if subs:
    groups = subs
  else:
    if not default_sigma or default_sigma <= 0:
      raise ValueError(f"{folder} has no sigma sub-folders (e.g. {folder}/2.0/); give "
                       "the images' render sigma with --config.data.image_sigma=PX")
    groups = [(float(default_sigma), folder)]
  read = []                                   # (sigma, file, images [n, N, N])
  read_one = functools.partial(read_images, channel=channel)
  for sigma, path in groups:
    for f, result, err in tiff_io.scan_files([path], read_one, desc=f"sigma {sigma:g}",
                                             log=log, suffixes=IMAGE_SUFFIXES):
      if err is None:
        read.append((sigma, f, result))
  # the width most images have (a stray file of another size does not decide)
  counts = {}
  for _, _, r in read:
    counts[r.shape[-1]] = counts.get(r.shape[-1], 0) + len(r)
  size = max(counts, key=lambda w: counts[w]) if counts else None
  sigmas, images, paths = [], [], []
  for sigma, _ in groups:
    arrays, names = [], []
    for sg, f, result in read:
      if sg != sigma:
        continue
      if result.shape[-1] != size:
        log(f"error: {f}: image is {result.shape[-1]} px wide, most are {size} px; "
            "skipped", file=sys.stderr)
        continue
      arrays.append(result)
      names += [os.path.relpath(f, folder)] * len(result)
    if arrays:
      sigmas.append(sigma)
      images.append(np.concatenate(arrays))
      paths.append(names)
  if not images:
    raise ValueError(f"{folder}: no usable FITS/TIFF images")
  return ImageSet(np.asarray(sigmas, np.float32), images, paths)
