"""Napari point annotations -> Gaussian ground-truth movie.

  python -m smlm_jax.events.annotate --csv=labels.csv --movie=movie.ome.tif \
      [--output=ground_truth.tif] [--sigma_px=2] [--units=px|um]
  python -m smlm_jax.events.annotate --csv=labels.csv --shape=100,2048,2048 --output=gt.tif

Input CSV: a napari points-layer export, ``index, axis-0, axis-1, axis-2`` = point id,
frame, y, x (the 4-column form of a [T, Y, X] movie) or ``index, axis-0, ..., axis-3`` =
id, frame, channel, y, x (the 5-column form of a [T, C, Y, X] movie); the ``index``
column may be absent. Coordinates are pixels with pixel centres at integers (napari's
data coordinates); ``--units=um`` divides y and x by the pixel size, for layers that were
shown with a physical scale (napari then exports world coordinates).

The movie (OME-TIFF or ImageJ TIFF, any of T, C, Y, X; only its header is read) gives
the frame count, size, pixel size and time increment; ``--shape=T,H,W`` replaces it when
the movie is not at hand. Annotations outside the movie, non-integer frames, CSVs with
other columns, a truncated movie file and an output that cannot be written (checked
first) are errors (one line, exit 2).

Output: ``[T, H, W]`` uint8 TIFF (ImageJ hyperstack with the movie's pixel size and
frame interval), value ``254 * g``, with ``g = exp(-d^2 / (2 sigma^2))`` of the distance
``d`` of each pixel centre to the annotated sub-pixel position, set to 0 where
``g < 0.1``; overlapping spots of one frame combine by maximum (so the map stays in
[0, 1]). 254 and the 0.1 cut-off are deep-events' conventions (``myfunctions.poi``); the
default sigma of 2 px is what the shared iSIM crops were made with (fit to their
ground truth; 112 nm at 56 nm pixels, about the size of a constriction site).
Default output: ``ground_truth.tif`` next to the movie. Written frame by frame
(a 100 x 2048 x 2048 movie needs ~16 MB of memory, 400 MB on disk) and atomically.
"""
from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import sys

import numpy as np

from smlm_jax.core import cli
from smlm_jax.core import tiff_io
from smlm_jax.core.tiff_io import MovieError

GT_SCALE = 254.0          # stored ground truth = 254 * g (uint8), deep-events' convention
CUTOFF = 0.1              # g below this fraction of the peak is set to 0
DEFAULT_SIGMA_PX = 2.0


@dataclasses.dataclass
class Points:
  """Annotated event sites: frame [N] int, y/x [N] px (float), channel [N] int or None."""
  path: str
  frame: np.ndarray
  y: np.ndarray
  x: np.ndarray
  channel: np.ndarray | None = None
  rows: np.ndarray | None = None      # 1-based CSV data row of each point (messages)

  def __len__(self):
    return len(self.frame)


@dataclasses.dataclass
class MovieInfo:
  """A movie's geometry from its header: frames x height x width, channels, metadata."""
  path: str
  num_frames: int
  height: int
  width: int
  num_channels: int = 1
  axes: str = "TYX"
  pixel_size_nm: float | None = None
  frame_interval_s: float | None = None

  @property
  def shape(self):
    return self.num_frames, self.height, self.width


# ----------------------------------------------------------------------------- CSV
def read_points(path: str, units: str = "px", pixel_size_nm: float | None = None) -> Points:
  """Parses a napari points CSV (4- or 5-column form, see the module docstring).

  Raises MovieError (code 'bad_annotations') for a missing file, other columns,
  non-numeric cells or non-integer frames; ``units='um'`` needs ``pixel_size_nm``.
  """
  if not os.path.isfile(path):
    raise MovieError(f"{path}: no such annotation file", "not_found")
  with open(path, newline="") as f:
    reader = csv.reader(f)
    try:
      header = [h.strip() for h in next(reader)]
    except StopIteration:
      raise MovieError(f"{path}: empty file; expected a napari points CSV",
                       "bad_annotations") from None
    body = [r for r in reader if r and any(c.strip() for c in r)]
  axes = [h for h in header if h != "index"]
  expected = [[f"axis-{i}" for i in range(n)] for n in (3, 4)]
  if axes not in expected or header.count("index") > 1:
    raise MovieError(
        f"{path}: columns {header} are not a napari points export; expected "
        "index, axis-0, axis-1, axis-2 (frame, y, x) or index, axis-0..axis-3 "
        "(frame, channel, y, x)", "bad_annotations")
  cols = [header.index(a) for a in axes]
  values = np.zeros((len(body), len(axes)), np.float64)
  for i, r in enumerate(body):
    if len(r) != len(header):
      raise MovieError(f"{path}: data row {i + 1} has {len(r)} cells, the header "
                       f"{len(header)}", "bad_annotations")
    try:
      values[i] = [float(r[c]) for c in cols]
    except ValueError:
      raise MovieError(f"{path}: data row {i + 1} has a non-numeric cell: {r}",
                       "bad_annotations") from None
  if not np.all(np.isfinite(values)):
    raise MovieError(f"{path}: NaN or infinite coordinates", "bad_annotations")
  frame_f = values[:, 0]
  frame = np.rint(frame_f).astype(np.int64)
  bad = np.flatnonzero(np.abs(frame_f - frame) > 1e-3)
  if bad.size:
    raise MovieError(f"{path}: {bad.size} point(s) with a non-integer frame, first: data "
                     f"row {bad[0] + 1} (axis-0 = {frame_f[bad[0]]:g})", "bad_annotations")
  channel = None
  if len(axes) == 4:
    channel = np.rint(values[:, 1]).astype(np.int64)
  y, x = values[:, -2].copy(), values[:, -1].copy()
  if units == "um":
    if not pixel_size_nm:
      raise MovieError(f"{path}: --units=um needs the pixel size (movie metadata or "
                       "--pixel_size_nm)", "bad_annotations")
    y *= 1000.0 / pixel_size_nm
    x *= 1000.0 / pixel_size_nm
  elif units != "px":
    raise ValueError(f"units must be 'px' or 'um', got {units!r}")
  return Points(path=path, frame=frame, y=y, x=x, channel=channel,
                rows=np.arange(1, len(body) + 1))


def check_points(points: Points, info: MovieInfo) -> None:
  """Raises MovieError (code 'outside_movie') when any point lies outside the movie.

  Inside means frame in [0, T), channel in [0, C) and y, x within the pixel grid
  (pixel centres at 0 .. H-1, so [-0.5, H - 0.5)).
  """
  t, h, w = info.shape
  outside = ((points.frame < 0) | (points.frame >= t) | (points.y < -0.5)
             | (points.y >= h - 0.5) | (points.x < -0.5) | (points.x >= w - 0.5))
  if points.channel is not None:
    outside |= (points.channel < 0) | (points.channel >= info.num_channels)
  bad = np.flatnonzero(outside)
  if bad.size:
    i = bad[0]
    where = f"frame {points.frame[i]}, y {points.y[i]:.1f}, x {points.x[i]:.1f}"
    if points.channel is not None:
      where += f", channel {points.channel[i]}"
    raise MovieError(
        f"{points.path}: {bad.size} of {len(points)} annotation(s) outside the movie "
        f"({t} frames x {h} x {w} px, {info.num_channels} channel(s)); first: data row "
        f"{points.rows[i]} ({where}); wrong movie, or coordinates in um (--units=um)?",
        "outside_movie")


# ----------------------------------------------------------------------------- movie
def _movie_axes(axes: str, shape, path: str):
  """(time axis, channel axis or None) of a squeezed TIFF series; the one leading axis
  that is not C/S is time whatever tifffile named it (T, Z, I, Q)."""
  if axes[-2:] != "YX":
    raise MovieError(f"{path}: axes {axes}: expected Y and X last", "bad_shape")
  lead = [i for i, a in enumerate(axes[:-2]) if a != "C"]
  chan = axes.index("C") if "C" in axes[:-2] else None
  if "S" in axes:
    raise MovieError(f"{path}: RGB image (axes {axes}); expected grayscale frames", "rgb")
  if len(lead) > 1:
    raise MovieError(f"{path}: {len(shape)}D data (axes {axes}, shape {tuple(shape)}); "
                     "expected frames x [channels x] height x width", "bad_shape")
  return (lead[0] if lead else None), chan


def movie_info(path: str) -> MovieInfo:
  """Geometry and OME/ImageJ metadata of a movie, from its header only (a truncated
  file is a MovieError, code ``truncated``)."""
  if not os.path.exists(path):
    raise MovieError(f"{path}: no such file", "not_found")
  try:
    with tiff_io.open_tiff(path) as tif:
      series = tif.series[0]
      shape, axes = series.shape, series.axes
      px, _, dt, _ = tiff_io._ome_metadata(tif)
      if px is None and dt is None:
        px, _, dt = tiff_io._imagej_metadata(tif)
  except MovieError:
    raise
  except Exception as e:  # tifffile raises many types for corrupt files
    raise MovieError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None
  keep = [i for i, n in enumerate(shape) if n > 1 or axes[i] in "YX"]
  shape = [shape[i] for i in keep]
  axes = "".join(axes[i] for i in keep)
  t_ax, c_ax = _movie_axes(axes, shape, path)
  return MovieInfo(path=path, num_frames=shape[t_ax] if t_ax is not None else 1,
                   height=shape[-2], width=shape[-1],
                   num_channels=shape[c_ax] if c_ax is not None else 1, axes=axes,
                   pixel_size_nm=px, frame_interval_s=dt)


def read_frames(path: str, channel: int = 0):
  """(frames [T, H, W] of one channel in the file's dtype, MovieInfo) of a movie."""
  image = tiff_io.read_image(path)
  data, axes = image.data, image.axes
  t_ax, c_ax = _movie_axes(axes, data.shape, path)
  data, axes = tiff_io.take_channel(data, axes, channel, path)
  if c_ax is not None and t_ax is not None and t_ax > c_ax:
    t_ax -= 1
  frames = np.asarray(data[None] if t_ax is None else data)
  info = MovieInfo(path=path, num_frames=frames.shape[0], height=frames.shape[1],
                   width=frames.shape[2],
                   num_channels=image.data.shape[c_ax] if c_ax is not None else 1,
                   axes=image.axes, pixel_size_nm=image.pixel_size_nm,
                   frame_interval_s=image.frame_interval_s)
  return frames, info


# ------------------------------------------------------------------------ ground truth
def spot_radius_px(sigma_px: float, cutoff: float = CUTOFF) -> float:
  """Distance at which the Gaussian falls to ``cutoff`` of its peak."""
  return sigma_px * math.sqrt(2.0 * math.log(1.0 / cutoff))


def gaussian_spots(y, x, shape, sigma_px: float = DEFAULT_SIGMA_PX,
                   cutoff: float = CUTOFF) -> np.ndarray:
  """One frame [H, W] float32: max over spots of exp(-d^2/2 sigma^2), 0 below cutoff.

  Each spot is evaluated only in its square of half-width ``spot_radius_px + 1``, so a
  2048 x 2048 frame with a few spots costs microseconds beyond the allocation.
  """
  h, w = shape
  out = np.zeros((h, w), np.float32)
  r = int(math.ceil(spot_radius_px(sigma_px, cutoff))) + 1
  for yy, xx in zip(np.atleast_1d(y), np.atleast_1d(x)):
    y0, y1 = max(0, int(math.floor(yy)) - r), min(h, int(math.floor(yy)) + r + 2)
    x0, x1 = max(0, int(math.floor(xx)) - r), min(w, int(math.floor(xx)) + r + 2)
    if y0 >= y1 or x0 >= x1:
      continue
    gy = np.exp(-0.5 * ((np.arange(y0, y1) - yy) / sigma_px) ** 2)
    gx = np.exp(-0.5 * ((np.arange(x0, x1) - xx) / sigma_px) ** 2)
    g = (gy[:, None] * gx[None, :]).astype(np.float32)
    g[g < cutoff] = 0.0
    np.maximum(out[y0:y1, x0:x1], g, out=out[y0:y1, x0:x1])
  return out


def ground_truth_frames(points: Points, shape, sigma_px: float = DEFAULT_SIGMA_PX,
                        cutoff: float = CUTOFF):
  """Yields the [H, W] ground truth of frames 0 .. T-1 (shape = (T, H, W))."""
  t, h, w = shape
  for f in range(t):
    sel = points.frame == f
    yield gaussian_spots(points.y[sel], points.x[sel], (h, w), sigma_px, cutoff)


def to_stored(gt: np.ndarray) -> np.ndarray:
  """Ground truth in [0, 1] -> the stored uint8 (254 * g, rounded)."""
  return np.rint(np.clip(gt, 0.0, 1.0) * GT_SCALE).astype(np.uint8)


def from_stored(data: np.ndarray) -> np.ndarray:
  """A stored ground-truth array -> float32 in [0, 1]: integer types and any map with
  values above 1 (e.g. the shared crops' float16 0-254) are divided by 254."""
  data = np.asarray(data)
  g = data.astype(np.float32)
  if data.dtype.kind in "ui" or (g.size and float(g.max()) > 1.0 + 1e-6):
    g = g / GT_SCALE
  return np.clip(g, 0.0, 1.0)


def read_ground_truth(path: str) -> np.ndarray:
  """[T, H, W] float32 ground truth in [0, 1] (a 2D map is one frame)."""
  image = tiff_io.read_image(path)
  data = image.data
  if data.ndim == 2:
    data = data[None]
  if data.ndim != 3:
    raise MovieError(f"{path}: ground truth of shape {data.shape}; expected [T, H, W]",
                     "bad_shape")
  return from_stored(data)


def write_ground_truth(path: str, frames, shape, pixel_size_nm=None,
                       frame_interval_s=None) -> None:
  """Writes [T, H, W] ground truth (an array, or an iterable of [H, W] frames in [0,
  1]) as uint8 ImageJ TIFF, frame by frame and atomically."""
  tiff_io.write_frames(path, (to_stored(f) for f in frames), shape, np.uint8,
                       pixel_size_nm, frame_interval_s)


def parse_shape(text: str):
  """'T,H,W' -> (T, H, W) positive ints, or ValueError."""
  parts = [p for p in re.split(r"[,x ]+", text.strip()) if p]
  if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise ValueError(f"--shape={text!r}: expected T,H,W (three positive integers)")
  return tuple(int(p) for p in parts)


# ----------------------------------------------------------------------------- CLI
def _define_flags():
  from absl import flags
  flags.DEFINE_string("csv", None, "napari points CSV (index, axis-0, axis-1, axis-2[, "
                      "axis-3]).")
  flags.DEFINE_string("movie", None, "The annotated movie (TIFF/OME-TIFF); only its "
                      "header is read.")
  flags.DEFINE_string("shape", None, "T,H,W instead of --movie.")
  flags.DEFINE_string("output", None, "Ground-truth TIFF (default: ground_truth.tif "
                      "next to the movie).")
  flags.DEFINE_float("sigma_px", DEFAULT_SIGMA_PX, "Gaussian sigma (px).")
  flags.DEFINE_enum("units", "px", ["px", "um"], "Units of the CSV's y and x.")
  flags.DEFINE_float("pixel_size_nm", None, "Pixel size (nm); overrides the movie's.")
  flags.DEFINE_float("frame_interval_s", None, "Frame interval (s); overrides the movie's.")


def main(argv):
  from absl import flags
  cli.quiet_logs()
  f = flags.FLAGS
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not f.csv:
    cli.fail("--csv is required (a napari points CSV)")
  if bool(f.movie) == bool(f.shape):
    cli.fail("give exactly one of --movie=PATH or --shape=T,H,W")
  if not f.sigma_px > 0:
    cli.fail("--sigma_px must be > 0")
  output = f.output or os.path.join(os.path.dirname(os.path.abspath(f.movie or ".")),
                                    "ground_truth.tif")
  if os.path.isdir(output):
    cli.fail(f"--output={output} is a folder; give a .tif file name")
  cli.check_writable(output)
  try:
    if f.movie:
      info = movie_info(f.movie)
    else:
      info = MovieInfo(f.shape or "", *parse_shape(f.shape))
    info.pixel_size_nm = f.pixel_size_nm or info.pixel_size_nm
    info.frame_interval_s = f.frame_interval_s or info.frame_interval_s
    points = read_points(f.csv, f.units, info.pixel_size_nm)
    check_points(points, info)
  except (MovieError, ValueError) as e:
    cli.fail(str(e))
  bar = cli.progress(ground_truth_frames(points, info.shape, f.sigma_px),
                     total=info.num_frames, desc="ground truth", unit="frame")
  try:
    write_ground_truth(output, bar, info.shape, info.pixel_size_nm, info.frame_interval_s)
  except OSError as e:
    cli.fail(f"cannot write {output}: {e}")
  frames = len(np.unique(points.frame))
  print(f"{len(points)} annotation(s) in {frames} frame(s) -> {output} "
        f"({info.num_frames} x {info.height} x {info.width}, sigma {f.sigma_px:g} px"
        + (f", {info.pixel_size_nm:g} nm/px" if info.pixel_size_nm else "") + ")",
        file=sys.stderr)


if __name__ == "__main__":
  from absl import app
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
