"""Reading and writing TIFF / OME-TIFF / ImageJ files with their physical metadata.

Shared by every system's command-line tools:
* ``read_image`` / ``write_image``: any dimensionality with its axes string (tifffile's:
  T time, C channel, Z depth, Y, X), pixel size, z spacing and frame interval from
  OME or ImageJ metadata (written back the same way, so metadata round-trips).
* ``read_movie`` / ``write_movie``: single-channel movies [T, H, W] in float32 (the
  diffusion tools), with ``read_windows`` / ``window_starts`` for long stacks.
* ``find_movies`` / ``scan_files`` / ``scan_inputs``: expand files and folders and read
  each with a progress bar, turning every unusable input into one ``error:`` line and
  an error record instead of a traceback.
Compressed files (LZW, Deflate, Zstd, PackBits, ...: what acquisition software and
Fiji's "save compressed" write) are read through tifffile's codec package imagecodecs;
without it, the file is one ``missing_codec`` error that says to install it.
Every way a user file can be unusable raises ``MovieError`` with a one-line reason and a
short code (for CSV flags ``error:<code>``), never another exception type.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
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


_LENGTH_NM = {"nm": 1.0, "um": 1000.0, "µm": 1000.0, "micron": 1000.0, "microns": 1000.0,
              "mm": 1e6, "m": 1e9, "pixel": None, "": None}
_TIME_S = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "min": 60.0}


def _length_nm(value, unit, default_unit="µm"):
  unit = (unit or default_unit).replace("\\u00b5", "µ").strip()
  scale = _LENGTH_NM.get(unit, _LENGTH_NM.get(unit.lower()))
  return float(value) * scale if scale else None


def _imagej_metadata(tif: tifffile.TiffFile):
  """(pixel size nm, z spacing nm, frame interval s) from ImageJ tags, None if absent."""
  px_nm = z_nm = interval = None
  ij = tif.imagej_metadata or {}
  if ij.get("finterval"):
    interval = float(ij["finterval"])
  unit = str(ij.get("unit", "")).lower().replace("\\u00b5", "u").replace("µ", "u")
  scale_nm = {"um": 1000.0, "micron": 1000.0, "microns": 1000.0, "nm": 1.0,
              "mm": 1e6}.get(unit)
  page = tif.pages[0]
  tag = page.tags.get("XResolution")
  if tag is not None:
    num, den = tag.value
    if num > 0 and den > 0:
      per_unit = num / den
      if scale_nm and per_unit > 0:
        px_nm = scale_nm / per_unit
  if ij.get("spacing") and scale_nm:
    z_nm = float(ij["spacing"]) * scale_nm
  return px_nm, z_nm, interval


def _ome_metadata(tif: tifffile.TiffFile):
  """(pixel size nm, z spacing nm, frame interval s, channel names) from OME-XML."""
  if not tif.is_ome or not tif.ome_metadata:
    return None, None, None, None
  try:
    root = ET.fromstring(tif.ome_metadata)
  except ET.ParseError:
    return None, None, None, None
  px_nm = z_nm = interval = None
  channels = None
  for el in root.iter():
    if el.tag.endswith("Pixels"):
      if el.get("PhysicalSizeX"):
        px_nm = _length_nm(el.get("PhysicalSizeX"), el.get("PhysicalSizeXUnit"))
      if el.get("PhysicalSizeZ"):
        z_nm = _length_nm(el.get("PhysicalSizeZ"), el.get("PhysicalSizeZUnit"))
      ti = el.get("TimeIncrement")
      if ti:
        interval = float(ti) * _TIME_S.get(el.get("TimeIncrementUnit", "s"), 1.0)
      channels = [c.get("Name") or f"channel {i}" for i, c in
                  enumerate(ch for ch in el if ch.tag.endswith("Channel"))] or None
      break
  return px_nm, z_nm, interval, channels


@dataclasses.dataclass
class Image:
  """An N-D image as stored (axes like 'TCYX', 'ZYX', 'YX') and its physical metadata."""
  path: str
  data: np.ndarray
  axes: str
  pixel_size_nm: float | None = None
  z_spacing_nm: float | None = None
  frame_interval_s: float | None = None
  channel_names: list | None = None

  def axis(self, name: str) -> int | None:
    return self.axes.index(name) if name in self.axes else None


def _missing_codec(page, decode_failed: bool = False) -> str | None:
  """The compression (or predictor) of a TIFF page that needs the ``imagecodecs``
  package, when that package is not installed; else None.

  tifffile decodes LZW, PackBits, JPEG, ... and horizontal-differencing predictors only
  through imagecodecs (Deflate without it, Zstd only on Python >= 3.14: its fallback
  decoder fails on import, hence ``decode_failed``). A file that cannot be decoded for
  another reason is left to fail as unreadable.
  """
  try:
    import imagecodecs  # noqa: F401
    return None
  except ImportError:
    pass
  compression, predictor = page.compression, page.predictor
  missing = [getattr(value, "name", str(value)) for value, needed in (
      (compression, decode_failed or compression not in tifffile.TIFF.DECOMPRESSORS),
      (predictor, predictor not in tifffile.TIFF.UNPREDICTORS)) if value != 1 and needed]
  return " and ".join(missing) or None


class _Collect(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@contextlib.contextmanager
def open_tiff(path: str):
  """``tifffile.TiffFile`` of a complete file. tifffile reads a truncated or damaged
  file without an exception (it logs a warning and returns fewer pages), so this
  raises MovieError (code ``truncated``) when tifffile warned about the file's
  structure while the block read it, or when the last page's data lie past its end."""
  logger = logging.getLogger("tifffile")
  handler, propagate = _Collect(), logger.propagate
  logger.addHandler(handler)
  logger.propagate = False
  try:
    with tifffile.TiffFile(path) as tif:
      yield tif
      size = tif.filehandle.size
      last = tif.series[0].pages[-1] if tif.series and len(tif.series[0].pages) else None
      ends = [o + c for o, c in zip(getattr(last, "dataoffsets", ()),
                                    getattr(last, "databytecounts", ()))]
    bad = [m.splitlines()[0] for m in handler.messages
           if any(w in m.lower() for w in ("invalid", "corrupt", "truncat"))]
    if bad or (ends and max(ends) > size):
      reason = bad[0] if bad else f"its data end at byte {max(ends)} of {size}"
      raise MovieError(f"{path}: truncated or damaged TIFF ({reason})", "truncated")
  finally:
    logger.removeHandler(handler)
    logger.propagate = propagate


def read_image(path: str, allow_rgb: bool = False) -> Image:
  """Reads the first series of a TIFF with its axes and metadata (OME preferred, then
  ImageJ), uncompressed or compressed (LZW, Deflate, Zstd, PackBits, ... through
  tifffile and imagecodecs). Raises MovieError for missing/unreadable files, RGB
  (unless allowed; told from the header, whatever the compression), a compression
  whose codec is not installed (``missing_codec``), complex/bool pixels and NaN/inf
  values."""
  if not os.path.exists(path):
    raise MovieError(f"{path}: no such file", "not_found")
  if os.path.isdir(path):
    raise MovieError(f"{path}: is a folder, expected a TIFF file", "not_a_file")
  data = codec = None
  try:
    with open_tiff(path) as tif:
      series = tif.series[0]
      axes = series.axes
      # Classified from the header, before any pixel is decoded: a compressed RGB file
      # is reported as RGB whether or not its codec is available.
      rgb = "S" in axes or tif.pages[0].photometric == tifffile.PHOTOMETRIC.RGB
      px_nm, z_nm, interval, channels = _ome_metadata(tif)
      if px_nm is None and interval is None and z_nm is None:
        px_nm, z_nm, interval = _imagej_metadata(tif)
      codec = _missing_codec(tif.pages[0])
      if codec is None and not (rgb and not allow_rgb):
        try:
          data = series.asarray()
        except ImportError:   # a decoder whose library is absent
          codec = _missing_codec(tif.pages[0], decode_failed=True)
          if codec is None:
            raise
  except MovieError:
    raise
  except Exception as e:  # tifffile raises many types for corrupt files
    raise MovieError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None
  if rgb and not allow_rgb:
    raise MovieError(f"{path}: RGB/RGBA image (axes {axes}); expected grayscale frames",
                     "rgb")
  if codec is not None:
    raise MovieError(f"{path}: compressed with {codec}, which needs the 'imagecodecs' "
                     "package: pip install imagecodecs", "missing_codec")
  if np.iscomplexobj(data) or data.dtype == bool:
    raise MovieError(f"{path}: unsupported pixel type {data.dtype}", "bad_dtype")
  if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
    raise MovieError(f"{path}: contains NaN or infinite pixel values", "nan_or_inf")
  # tifffile names unknown leading axes 'Q' / 'I'; squeeze length-1 axes of any name.
  keep = [i for i, n in enumerate(data.shape) if n > 1 or axes[i] in "YX"]
  data = data.reshape([data.shape[i] for i in keep])
  axes = "".join(axes[i] for i in keep)
  return Image(path=path, data=data, axes=axes, pixel_size_nm=px_nm, z_spacing_nm=z_nm,
               frame_interval_s=interval, channel_names=channels)


def check_channel(axes: str, shape, channel: int | None, path: str,
                  flag: str = "--channel") -> int | None:
  """The position of the C axis in ``axes`` (None: no C axis, one channel) after
  checking ``channel`` against it: MovieError ``bad_channel`` for a channel the file does
  not have, or for ``channel`` None (no choice made) when it has several: which channel
  holds the signal is the user's to say (with ``flag``, named in the message)."""
  if "C" not in axes:
    if channel not in (None, 0):
      raise MovieError(f"{path}: channel {channel} requested, the movie has 1",
                       "bad_channel")
    return None
  c = axes.index("C")
  n = shape[c]
  if channel is None:
    raise MovieError(f"{path}: {n} channels (axes {axes}, shape {tuple(shape)}); "
                     f"choose one with {flag}=0..{n - 1}", "bad_channel")
  if not 0 <= channel < n:
    raise MovieError(f"{path}: channel {channel} requested, the movie has {n}",
                     "bad_channel")
  return c


def take_channel(data: np.ndarray, axes: str, channel: int | None, path: str,
                 flag: str = "--channel"):
  """(data, axes) of one channel of a read image (``read_image``: length-1 axes already
  squeezed): the C axis taken at ``channel`` and removed (:func:`check_channel`)."""
  c = check_channel(axes, data.shape, channel, path, flag)
  if c is None:
    return data, axes
  return np.take(data, channel, axis=c), axes.replace("C", "")


def check_plausible(data: np.ndarray, path: str, camera_offset_adu: float | None = None):
  """MovieError for data that cannot be a recording of the sample: every value equal
  (code ``constant_input``: nothing to normalize) or, given the camera offset, a mean
  at or below it (``below_camera_offset``: the signal would be negative photons - a
  wrong --camera_offset_adu, or data already offset-subtracted or converted)."""
  lo, hi = float(np.min(data)), float(np.max(data))
  if lo == hi:
    raise MovieError(f"{path}: every value is {lo:g}; nothing to measure", "constant_input")
  if camera_offset_adu is not None:
    mean = float(np.mean(data, dtype=np.float64))
    if mean <= camera_offset_adu:
      raise MovieError(f"{path}: mean value {mean:.4g} is not above the camera offset "
                       f"{camera_offset_adu:g} ADU; set --camera_offset_adu for these "
                       "data", "below_camera_offset")


def write_image(path: str, data: np.ndarray, axes: str, pixel_size_nm: float | None = None,
                z_spacing_nm: float | None = None, frame_interval_s: float | None = None,
                ome: bool | None = None, channel_names=None) -> None:
  """Writes an N-D array with its axes and physical metadata.

  OME-TIFF (``ome=True``, or a path ending in .ome.tif[f]) records PhysicalSizeX/Y/Z in
  µm and TimeIncrement in s; otherwise an ImageJ hyperstack (axes in TZCYX order,
  float32/uint8/uint16 data) records resolution, spacing and finterval. Both are read
  back by :func:`read_image`.
  """
  data = np.asarray(data)
  if data.ndim != len(axes):
    raise ValueError(f"data has {data.ndim} dimensions but axes={axes!r}")
  ome = path.lower().endswith((".ome.tif", ".ome.tiff")) if ome is None else ome
  kwargs = {}
  if pixel_size_nm:
    px_um = pixel_size_nm / 1000.0
    kwargs["resolution"] = (1.0 / px_um, 1.0 / px_um)
  if ome:
    md = {"axes": axes}
    if pixel_size_nm:
      md.update(PhysicalSizeX=pixel_size_nm / 1000.0, PhysicalSizeXUnit="µm",
                PhysicalSizeY=pixel_size_nm / 1000.0, PhysicalSizeYUnit="µm")
    if z_spacing_nm:
      md.update(PhysicalSizeZ=z_spacing_nm / 1000.0, PhysicalSizeZUnit="µm")
    if frame_interval_s:
      md.update(TimeIncrement=float(frame_interval_s), TimeIncrementUnit="s")
    if channel_names:
      md["Channel"] = {"Name": list(channel_names)}
    kwargs.pop("resolution", None)
    tifffile.imwrite(path, data, ome=True, metadata=md)
    return
  order = [a for a in "TZCYX" if a in axes]
  if sorted(order) != sorted(axes):
    raise ValueError(f"ImageJ TIFF axes must be a subset of TZCYX, got {axes!r}")
  data = np.transpose(data, [axes.index(a) for a in order])
  if data.dtype not in (np.uint8, np.uint16, np.float32):
    data = data.astype(np.float32)
  md = {"axes": "".join(order), "unit": "um"}
  if frame_interval_s:
    md["finterval"] = float(frame_interval_s)
  if z_spacing_nm:
    md["spacing"] = z_spacing_nm / 1000.0
  tifffile.imwrite(path, data, imagej=True, metadata=md, **kwargs)


def write_frames(path: str, frames, shape, dtype, pixel_size_nm: float | None = None,
                 frame_interval_s: float | None = None) -> None:
  """Writes a [T, H, W] ImageJ TIFF atomically, frame by frame: ``frames`` is an array
  or an iterable of [H, W] frames (streamed, for movies that need not fit in memory)
  of ``dtype`` (uint8, uint16 or float32), with pixel size and frame interval."""
  from smlm_jax.core import cli
  kwargs = {}
  if pixel_size_nm:
    kwargs["resolution"] = (1000.0 / pixel_size_nm, 1000.0 / pixel_size_nm)
  md = {"axes": "TYX", "unit": "um"}
  if frame_interval_s:
    md["finterval"] = float(frame_interval_s)
  with cli.atomic_path(path) as tmp:
    tifffile.imwrite(tmp, frames, shape=tuple(shape), dtype=dtype, imagej=True,
                     metadata=md, **kwargs)


def read_movie(path: str, channel: int | None = None) -> Movie:
  """Reads a TIFF movie as float32 [T, H, W] with its pixel size / frame interval; of a
  multi-channel movie [T, C, H, W] the ``channel`` (:func:`take_channel`).

  Raises MovieError (one line) for: missing or unreadable files, RGB/RGBA images,
  single 2D frames, other dimensionalities, a channel not chosen or not there, and
  NaN/inf values.
  """
  image = read_image(path)
  data, axes = take_channel(image.data, image.axes, channel, path)
  if data.ndim == 2:
    raise MovieError(f"{path}: a single 2D frame {data.shape}; expected a movie [T, H, W]",
                     "single_frame")
  if data.ndim != 3:
    raise MovieError(f"{path}: {data.ndim}D data of shape {data.shape} (axes {axes}); "
                     "expected one channel, frames x height x width", "bad_shape")
  frames = data.astype(np.float32)
  if not np.all(np.isfinite(frames)):
    raise MovieError(f"{path}: contains NaN or infinite pixel values", "nan_or_inf")
  return Movie(path=path, frames=frames, pixel_size_nm=image.pixel_size_nm,
               frame_interval_s=image.frame_interval_s)


def window_starts(num_frames_in_file: int, num_frames: int, stride: int) -> list[int]:
  """First frames of the T-frame windows of a stack: 0, stride, ... (full windows only)."""
  if stride < 1:
    raise ValueError(f"stride must be >= 1, got {stride}")
  return list(range(0, num_frames_in_file - num_frames + 1, stride))


def read_windows(path: str, num_frames: int, height_px: int | None, width_px: int | None,
                 stride: int | None = None, camera_offset_adu: float | None = None,
                 channel: int | None = None) -> tuple[Movie, list[int]]:
  """Reads a movie and splits it into windows of ``num_frames`` frames.

  Returns (movie, first frames). A stack of exactly T frames is one window; longer
  stacks give one window per ``stride`` frames (default T). Raises MovieError for
  unreadable files, fewer than T frames, frames of another size than the model's
  (no size check when height_px is None), a constant movie and, given the camera
  offset, a mean not above it (:func:`check_plausible`); ``channel``: as
  :func:`read_movie`.
  """
  movie = read_movie(path, channel)
  t, h, w = movie.frames.shape
  if height_px is not None and (h, w) != (height_px, width_px):
    raise MovieError(
        f"{path}: frames are {h}x{w} px but the model expects {height_px}x{width_px} px; "
        f"cut {height_px}x{width_px} crops centred on single molecules first", "wrong_size")
  if t < num_frames:
    raise MovieError(f"{path}: only {t} frames; the model needs windows of {num_frames}",
                     "too_few_frames")
  check_plausible(movie.frames, path, camera_offset_adu)
  return movie, window_starts(t, num_frames, stride or num_frames)


def find_movies(paths, suffixes=TIFF_SUFFIXES) -> tuple[list[str], list[str]]:
  """Expands files and folders (recursively) into paths of files ending in ``suffixes``.

  Returns (files, problems): problems are (path, one-line message, short code) for
  paths that do not exist or folders with no TIFF in them.
  """
  files, problems = [], []
  for p in paths:
    if os.path.isdir(p):
      found = []
      for root, _, names in os.walk(p):
        found += [os.path.join(root, n) for n in names if n.lower().endswith(suffixes)]
      if not found:
        problems.append((p, f"{p}: folder contains no {'/'.join(suffixes)} files",
                         "empty_folder"))
      files += sorted(found, key=_natural_key)
    elif os.path.exists(p):
      files.append(p)
    else:
      problems.append((p, f"{p}: no such file or folder", "not_found"))
  return files, problems


def _natural_key(s):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def scan_files(inputs, read_fn, desc: str = "reading", log=print,
               suffixes=TIFF_SUFFIXES):
  """Every input path as (path, read_fn(path), None) or (path, None, (message, code)).

  One loop for every command-line tool: expands folders (recursively, files ending in
  ``suffixes``), reads each file with ``read_fn`` under a progress bar, and prints one
  ``error: ...`` line on stderr for each input that cannot be used; ``read_fn`` signals
  an unusable file by raising MovieError.
  """
  import sys
  from smlm_jax.core import cli
  files, problems = find_movies(inputs, suffixes)
  for path, message, code in problems:
    log(f"error: {message}", file=sys.stderr)
    yield path, None, (message, code)
  bar = cli.progress(total=len(files), desc=desc, unit="file")
  try:
    for path in files:
      bar.update(1)
      try:
        result = read_fn(path)
      except MovieError as e:
        log(f"error: {e}", file=sys.stderr)
        yield path, None, (str(e), e.code)
        continue
      yield path, result, None
  finally:
    bar.close()


def scan_inputs(inputs, num_frames: int, height_px: int | None, width_px: int | None,
                stride: int | None = None, desc: str = "reading", log=print,
                camera_offset_adu: float | None = None, channel: int | None = None):
  """Every input movie as (path, movie, first frames, None) or (path, None, [], error):
  :func:`scan_files` with :func:`read_windows` (predict, baselines, calibrate)."""
  read = lambda p: read_windows(p, num_frames, height_px, width_px, stride,
                                camera_offset_adu, channel)
  for path, result, error in scan_files(inputs, read, desc, log):
    if error:
      yield path, None, [], error
    else:
      yield path, result[0], result[1], None


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
