"""Reading and writing movie TIFFs (shared by simulate, predict, baselines, calibrate).

``read_movie`` returns float32 frames [T, H, W] and whatever pixel size / frame interval
the file's ImageJ or OME metadata records; every way a user file can be unusable raises
``MovieError`` with a one-line reason, never another exception type.
"""
from __future__ import annotations

import dataclasses
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import tifffile

TIFF_SUFFIXES = (".tif", ".tiff")


class MovieError(ValueError):
  """A user's movie file cannot be used; the message says why in one line.

  ``code`` is a short machine-readable reason (used as the CSV flag ``error:<code>``).
  """

  def __init__(self, message: str, code: str = "unreadable"):
    super().__init__(message)
    self.code = code


@dataclasses.dataclass
class Movie:
  path: str
  frames: np.ndarray                 # [T, H, W] float32, camera units (ADU)
  pixel_size_nm: float | None = None
  frame_interval_s: float | None = None


def write_movie(path: str, frames_adu: np.ndarray, pixel_size_nm: float,
                frame_interval_s: float) -> None:
  """Writes [T, H, W] ADU as a uint16 ImageJ hyperstack with pixel size and interval."""
  frames = np.asarray(frames_adu)
  if frames.ndim != 3:
    raise ValueError(f"expected frames [T, H, W], got shape {frames.shape}")
  data = np.clip(np.rint(frames), 0, np.iinfo(np.uint16).max).astype(np.uint16)
  px_um = pixel_size_nm / 1000.0
  tifffile.imwrite(
      path, data, imagej=True, resolution=(1.0 / px_um, 1.0 / px_um),
      metadata={"axes": "TYX", "unit": "um", "finterval": float(frame_interval_s)})


def _imagej_metadata(tif: tifffile.TiffFile):
  px_nm = interval = None
  ij = tif.imagej_metadata or {}
  if ij.get("finterval"):
    interval = float(ij["finterval"])
  page = tif.pages[0]
  tag = page.tags.get("XResolution")
  if tag is not None:
    num, den = tag.value
    if num > 0 and den > 0:
      per_unit = num / den
      unit = str(ij.get("unit", "")).lower().replace("\\u00b5", "u").replace("µ", "u")
      scale_nm = {"um": 1000.0, "micron": 1000.0, "microns": 1000.0, "nm": 1.0,
                  "mm": 1e6}.get(unit)
      if scale_nm and per_unit > 0:
        px_nm = scale_nm / per_unit
  return px_nm, interval


def _ome_metadata(tif: tifffile.TiffFile):
  if not tif.is_ome or not tif.ome_metadata:
    return None, None
  try:
    root = ET.fromstring(tif.ome_metadata)
  except ET.ParseError:
    return None, None
  px_nm = interval = None
  for el in root.iter():
    if el.tag.endswith("Pixels"):
      size = el.get("PhysicalSizeX")
      unit = el.get("PhysicalSizeXUnit", "µm")
      if size:
        scale = {"nm": 1.0, "µm": 1000.0, "um": 1000.0, "mm": 1e6}.get(unit, 1000.0)
        px_nm = float(size) * scale
      ti = el.get("TimeIncrement")
      if ti:
        unit_t = el.get("TimeIncrementUnit", "s")
        interval = float(ti) * {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6}.get(unit_t, 1.0)
      break
  return px_nm, interval


def read_movie(path: str) -> Movie:
  """Reads a TIFF movie as float32 [T, H, W] with its pixel size / frame interval.

  Raises MovieError (one line) for: missing or unreadable files, RGB/RGBA images,
  single 2D frames, other dimensionalities, and NaN/inf values.
  """
  if not os.path.exists(path):
    raise MovieError(f"{path}: no such file", "not_found")
  try:
    with tifffile.TiffFile(path) as tif:
      series = tif.series[0]
      data = series.asarray()
      axes = series.axes
      rgb = "S" in axes or tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
      px_nm, interval = _ome_metadata(tif)
      if px_nm is None and interval is None:
        px_nm, interval = _imagej_metadata(tif)
  except Exception as e:  # tifffile raises many types for corrupt files
    raise MovieError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None
  if rgb:
    raise MovieError(f"{path}: RGB/RGBA image (axes {axes}); expected grayscale frames",
                     "rgb")
  data = np.squeeze(data)
  if data.ndim == 2:
    raise MovieError(f"{path}: a single 2D frame {data.shape}; expected a movie [T, H, W]",
                     "single_frame")
  if data.ndim != 3:
    raise MovieError(f"{path}: {data.ndim}D data of shape {data.shape} (axes {axes}); "
                     "expected one channel, frames x height x width", "bad_shape")
  if np.iscomplexobj(data) or data.dtype == bool:
    raise MovieError(f"{path}: unsupported pixel type {data.dtype}", "bad_dtype")
  frames = data.astype(np.float32)
  if not np.all(np.isfinite(frames)):
    raise MovieError(f"{path}: contains NaN or infinite pixel values", "nan_or_inf")
  return Movie(path=path, frames=frames, pixel_size_nm=px_nm, frame_interval_s=interval)


def window_starts(num_frames_in_file: int, num_frames: int, stride: int) -> list[int]:
  """First frames of the T-frame windows of a stack: 0, stride, ... (full windows only)."""
  if stride < 1:
    raise ValueError(f"stride must be >= 1, got {stride}")
  return list(range(0, num_frames_in_file - num_frames + 1, stride))


def read_windows(path: str, num_frames: int, height_px: int | None, width_px: int | None,
                 stride: int | None = None) -> tuple[Movie, list[int]]:
  """Reads a movie and splits it into windows of ``num_frames`` frames.

  Returns (movie, first frames). A stack of exactly T frames is one window; longer
  stacks give one window per ``stride`` frames (default T). Raises MovieError for
  unreadable files, fewer than T frames, or frames of another size than the model's
  (no size check when height_px is None).
  """
  movie = read_movie(path)
  t, h, w = movie.frames.shape
  if height_px is not None and (h, w) != (height_px, width_px):
    raise MovieError(
        f"{path}: frames are {h}x{w} px but the model expects {height_px}x{width_px} px; "
        f"cut {height_px}x{width_px} crops centred on single molecules first", "wrong_size")
  if t < num_frames:
    raise MovieError(f"{path}: only {t} frames; the model needs windows of {num_frames}",
                     "too_few_frames")
  return movie, window_starts(t, num_frames, stride or num_frames)


def find_movies(paths) -> tuple[list[str], list[str]]:
  """Expands files and folders (recursively) into TIFF paths.

  Returns (files, problems): problems are (path, one-line message, short code) for
  paths that do not exist or folders with no TIFF in them.
  """
  files, problems = [], []
  for p in paths:
    if os.path.isdir(p):
      found = []
      for root, _, names in os.walk(p):
        found += [os.path.join(root, n) for n in names if n.lower().endswith(TIFF_SUFFIXES)]
      if not found:
        problems.append((p, f"{p}: folder contains no .tif/.tiff files", "empty_folder"))
      files += sorted(found, key=_natural_key)
    elif os.path.exists(p):
      files.append(p)
    else:
      problems.append((p, f"{p}: no such file or folder", "not_found"))
  return files, problems


def _natural_key(s):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def scan_inputs(inputs, num_frames: int, height_px: int | None, width_px: int | None,
                stride: int | None = None, desc: str = "reading", log=print):
  """Every input path as (path, movie, first frames, None) or (path, None, [], error).

  One loop for predict, baselines and calibrate: expands folders, reads and windows
  each file with a progress bar, and prints one ``error: ...`` line on stderr for each
  input that cannot be used (error = (message, short code)).
  """
  import sys
  from smlm_jax import cli
  files, problems = find_movies(inputs)
  for path, message, code in problems:
    log(f"error: {message}", file=sys.stderr)
    yield path, None, [], (message, code)
  bar = cli.progress(total=len(files), desc=desc, unit="file")
  try:
    for path in files:
      bar.update(1)
      try:
        movie, starts = read_windows(path, num_frames, height_px, width_px, stride)
      except MovieError as e:
        log(f"error: {e}", file=sys.stderr)
        yield path, None, [], (str(e), e.code)
        continue
      yield path, movie, starts, None
  finally:
    bar.close()


def resolve_geometry(movie: Movie, pixel_size_nm: float | None,
                     frame_interval_s: float | None, default_pixel_size_nm: float,
                     default_frame_interval_s: float):
  """(pixel size nm, frame interval s, names of the values that had to be assumed).

  A value given on the command line wins, then the file's metadata, then the default
  (the model's or config's value), which is then reported as assumed.
  """
  px = pixel_size_nm or movie.pixel_size_nm
  dt = frame_interval_s or movie.frame_interval_s
  assumed = []
  if px is None:
    px = float(default_pixel_size_nm)
    assumed.append("pixel_size_nm")
  if dt is None:
    dt = float(default_frame_interval_s)
    assumed.append("frame_interval_s")
  return px, dt, assumed
