"""Plot helpers shared by the systems: headless matplotlib, atomic PNGs, image panels.

Everything renders with the Agg backend (no display needed, works in CI and on
clusters). ``pyplot()`` returns matplotlib.pyplot configured that way; ``save`` writes
a figure atomically (a reader never sees half a PNG) and closes it.
"""
from __future__ import annotations

import numpy as np


def pyplot():
  """matplotlib.pyplot with the Agg backend."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save(fig, path: str, dpi: int = 120) -> str:
  """Saves a figure as PNG atomically (:func:`smlm_jax.core.cli.atomic_path`), closes
  it, returns the path."""
  from smlm_jax.core import cli
  plt = pyplot()
  try:
    fig.tight_layout()
    with cli.atomic_path(path) as tmp:
      fig.savefig(tmp, dpi=dpi, format="png")
  finally:
    plt.close(fig)
  return path


def percentile_limits(image, low: float = 1.0, high: float = 99.8):
  """(vmin, vmax) display limits at the given percentiles (robust to hot pixels)."""
  a = np.asarray(image, np.float64)
  a = a[np.isfinite(a)]
  if a.size == 0:
    return 0.0, 1.0
  lo, hi = np.percentile(a, [low, high])
  return float(lo), float(hi if hi > lo else lo + 1.0)


def image_grid(images, titles=None, ncols: int | None = None, cmap: str = "gray",
               overlays=None, panel_size: float = 2.6, suptitle: str | None = None):
  """A figure with one panel per 2D image (percentile-scaled), optional titles and
  optional overlays: a list (per panel) of callables ax -> None drawing on top."""
  plt = pyplot()
  n = len(images)
  ncols = ncols or min(n, 4)
  nrows = int(np.ceil(n / ncols))
  fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows),
                           squeeze=False)
  for i, ax in enumerate(axes.ravel()):
    ax.axis("off")
    if i >= n:
      continue
    vmin, vmax = percentile_limits(images[i])
    ax.imshow(np.asarray(images[i]), cmap=cmap, vmin=vmin, vmax=vmax,
              interpolation="nearest")
    if titles:
      ax.set_title(titles[i], fontsize=8)
    if overlays and overlays[i] is not None:
      overlays[i](ax)
  if suptitle:
    fig.suptitle(suptitle, fontsize=10)
  return fig


def orthogonal_slices(volumes, titles, z: int | None = None, y: int | None = None,
                      x: int | None = None, z_aspect: float = 1.0):
  """One row per [Z, Y, X] volume: the XY slice at z, XZ at y and YZ at x (centres by
  default), each percentile-scaled; z_aspect = z spacing / pixel size."""
  plt = pyplot()
  fig, axes = plt.subplots(len(volumes), 3, figsize=(9, 2.8 * len(volumes)), squeeze=False)
  for row, (vol, title) in enumerate(zip(volumes, titles)):
    vol = np.asarray(vol)
    zz = vol.shape[0] // 2 if z is None else z
    yy = vol.shape[1] // 2 if y is None else y
    xx = vol.shape[2] // 2 if x is None else x
    vmin, vmax = percentile_limits(vol)
    for col, (img, label, aspect) in enumerate((
        (vol[zz], f"XY (z={zz})", 1.0), (vol[:, yy, :], f"XZ (y={yy})", z_aspect),
        (vol[:, :, xx], f"YZ (x={xx})", z_aspect))):
      ax = axes[row, col]
      ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect,
                interpolation="nearest")
      ax.set_title(f"{title}: {label}", fontsize=8)
      ax.axis("off")
  return fig
