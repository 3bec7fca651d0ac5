"""Whole movies of any length read one frame at a time (bounded memory).

``FrameStack(path[, channel])`` opens a TIFF / OME-TIFF / ImageJ stack [T, H, W] (or
one channel of a [T, C, H, W] stack, :func:`smlm_jax.core.tiff_io.check_channel`)
without reading its pixels: ``stack[i]`` is frame i as float32, ``len(stack)`` the
frame count, plus the pixel size and frame interval from the metadata (as
:func:`smlm_jax.core.tiff_io.read_movie` reads them). Uncompressed contiguous data is
memory-mapped; otherwise each page is decoded on demand. Every way a file can be
unusable raises :class:`smlm_jax.core.tiff_io.MovieError` with a one-line reason and code
(including NaN/inf pixels, found when the frame is read).
"""
from __future__ import annotations

import os

import numpy as np
import tifffile

from smlm_jax.core import tiff_io
from smlm_jax.core.tiff_io import MovieError


class FrameStack:
  """A [T, H, W] movie on disk (one ``channel`` of a multi-channel one); index it for
  float32 frames. Use as a context manager (or call close()) to release the file."""

  def __init__(self, path: str, channel: int | None = None):
    self.path = path
    if not os.path.exists(path):
      raise MovieError(f"{path}: no such file", "not_found")
    if os.path.isdir(path):
      raise MovieError(f"{path}: is a folder, expected a TIFF file", "not_a_file")
    try:
      self._tif = tifffile.TiffFile(path)
      series = self._tif.series[0]
      shape, axes, dtype = series.shape, series.axes, series.dtype
      rgb = "S" in axes or self._tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
      px_nm, _, interval, _ = tiff_io._ome_metadata(self._tif)
      if px_nm is None and interval is None:
        px_nm, _, interval = tiff_io._imagej_metadata(self._tif)
    except Exception as e:  # tifffile raises many types for corrupt files
      self.close()
      raise MovieError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None
    if rgb:
      self.close()
      raise MovieError(f"{path}: RGB/RGBA image (axes {axes}); expected grayscale frames",
                       "rgb")
    if np.dtype(dtype).kind not in "uif":
      self.close()
      raise MovieError(f"{path}: unsupported pixel type {dtype}", "bad_dtype")
    kept = [i for i, n in enumerate(shape) if n > 1 or axes[i] in "YX"]
    keep = [shape[i] for i in kept]
    names = "".join(axes[i] for i in kept)
    try:
      c_pos = tiff_io.check_channel(names, keep, channel, path)
    except MovieError:
      self.close()
      raise
    lead = keep[:-2]
    if c_pos is not None:
      if len(keep) != 4:
        self.close()
        raise MovieError(f"{path}: {len(keep)}D data of shape {shape} (axes {axes}); "
                         "expected frames x channels x height x width", "bad_shape")
      keep = [lead[1 - c_pos]] + keep[-2:]
    if len(keep) == 2:
      self.close()
      raise MovieError(f"{path}: a single 2D frame {tuple(keep)}; expected a movie "
                       "[T, H, W]", "single_frame")
    if len(keep) != 3:
      self.close()
      raise MovieError(f"{path}: {len(keep)}D data of shape {shape} (axes {axes}); "
                       "expected one channel, frames x height x width", "bad_shape")
    self.shape = tuple(int(n) for n in keep)
    self.pixel_size_nm, self.frame_interval_s = px_nm, interval
    self._pages = None
    self._data = None
    self._lead, self._c_pos, self._channel = tuple(int(n) for n in lead), c_pos, channel
    # The frames of the chosen channel: index along C (a view of the memory map).
    pick = (lambda a: a) if c_pos is None else (
        lambda a: a[(slice(None),) * c_pos + (channel,)])
    if series.dataoffset is not None:       # uncompressed, contiguous: memory-map it
      self._data = pick(np.memmap(path, dtype=series.dtype.newbyteorder(self._tif.byteorder),
                                  mode="r", offset=series.dataoffset,
                                  shape=self._lead + self.shape[1:]))
    elif len(series.pages) == int(np.prod(self._lead)):
      self._pages = series.pages
    else:                                   # unusual layout: read it whole, once
      self._data = pick(series.asarray().reshape(self._lead + self.shape[1:]))

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, i: int) -> np.ndarray:
    if self._data is not None:
      frame = np.asarray(self._data[i], np.float32)
    else:
      page = i
      if self._c_pos is not None:           # pages in (T, C) or (C, T) order
        idx = [i, i]
        idx[self._c_pos] = self._channel
        page = int(np.ravel_multi_index(idx, self._lead))
      frame = self._pages[page].asarray().reshape(self.shape[1:]).astype(np.float32)
    if not np.all(np.isfinite(frame)):
      raise MovieError(f"{self.path}: frame {i} contains NaN or infinite pixel values",
                       "nan_or_inf")
    return frame

  def close(self):
    self._data = None
    tif = getattr(self, "_tif", None)
    if tif is not None:
      tif.close()
      self._tif = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
