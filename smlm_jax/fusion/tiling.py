"""Prediction of large volumes by overlapping tiles blended with a smooth window.

A volume ``[Z, Y, X, C]`` is covered by tiles of one shape (``tile``, clipped to the
volume), starting every ``tile - overlap`` voxels along each axis, the last tile flush
with the far side. Each tile's prediction is weighted by a separable window that, on
every side shared with a neighbouring tile,

  * is 0 over the first ``halo`` voxels (they see the tile border: zero padding and the
    network's border effects; the original U-Net's overlap-tile strategy), then
  * rises as sin^2 over ``ramp = overlap - 2 halo`` voxels to 1,

and is 1 on sides at the volume border. Neighbours at the nominal overlap cross-fade
with sin^2 + cos^2 = 1; the result is ``sum_t w_t pred_t / sum_t w_t``, so any spacing
works and there are no seams: the blend is smooth, and each voxel comes only from tile
interiors. For an operator whose reach is at most ``halo`` voxels the tiled result
equals the whole-volume one exactly (tested); a volume that fits one tile is predicted
in one piece.

Memory: tiles are predicted ``batch_size`` at a time; the host holds the volume, the
output and the weight sum (float32). :func:`default_tile` picks the largest tile whose
activations fit a memory budget.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
  """Start indices of tiles of length ``min(tile, n)`` covering ``[0, n)``."""
  if n <= tile:
    return [0]
  step = tile - overlap
  if step < 1:
    raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
  starts = list(range(0, n - tile, step)) + [n - tile]
  return sorted(set(starts))


def axis_window(n: int, tile: int, start: int, halo: int, ramp: int) -> np.ndarray:
  """1D weights of the tile ``[start, start + tile)`` of an axis of length n."""
  w = np.ones(tile, np.float64)
  rise = np.sin(0.5 * np.pi * (np.arange(ramp) + 0.5) / max(ramp, 1)) ** 2
  if start > 0:                              # a neighbour before: fade in
    w[:halo] = 0.0
    w[halo:halo + ramp] = np.minimum(w[halo:halo + ramp], rise)
  if start + tile < n:                       # a neighbour after: fade out
    w[tile - halo:] = 0.0
    w[tile - halo - ramp:tile - halo] = np.minimum(w[tile - halo - ramp:tile - halo],
                                                   rise[::-1])
  return w


def tile_plan(shape, tile, overlap, halo):
  """(tile shape, list of start tuples, per-axis window dicts) for a volume shape."""
  shape = tuple(int(n) for n in shape)
  tile = tuple(min(int(t), n) for t, n in zip(tile, shape))
  overlap = tuple(int(o) for o in overlap)
  halo = tuple(int(h) for h in halo)
  for t, n, o, h in zip(tile, shape, overlap, halo):
    if t < n and o - 2 * h < 1:
      raise ValueError(f"overlap {o} must exceed twice the halo {h}")
    if t < n and o >= t:
      raise ValueError(f"overlap {o} must be smaller than the tile {t}")
  starts = [tile_starts(n, t, o) for n, t, o in zip(shape, tile, overlap)]
  windows = [{s: axis_window(n, t, s, h, o - 2 * h) for s in st}
             for n, t, o, h, st in zip(shape, tile, overlap, halo, starts)]
  grid = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
  return tile, grid, windows


def predict_tiled(fn: Callable[[np.ndarray], np.ndarray], volume: np.ndarray, tile,
                  overlap, halo, batch_size: int = 1, progress=None) -> np.ndarray:
  """Blended tiled prediction of ``fn`` (``[B, tz, ty, tx, C] -> [B, tz, ty, tx]``)
  over ``volume`` ``[Z, Y, X, C]``; returns ``[Z, Y, X]`` float32."""
  volume = np.asarray(volume)
  tile, grid, windows = tile_plan(volume.shape[:3], tile, overlap, halo)
  out = np.zeros(volume.shape[:3], np.float64)
  wsum = np.zeros(volume.shape[:3], np.float64)
  for first in range(0, len(grid), batch_size):
    chunk = grid[first:first + batch_size]
    x = np.stack([volume[z:z + tile[0], y:y + tile[1], x:x + tile[2]] for z, y, x in chunk])
    pred = np.asarray(fn(x), np.float64)
    for (z, y, x), p in zip(chunk, pred):
      w = (windows[0][z][:, None, None] * windows[1][y][None, :, None]
           * windows[2][x][None, None, :])
      out[z:z + tile[0], y:y + tile[1], x:x + tile[2]] += w * p
      wsum[z:z + tile[0], y:y + tile[1], x:x + tile[2]] += w
    if progress is not None:
      progress.update(len(chunk))
  return (out / wsum).astype(np.float32)


def num_tiles(shape, tile, overlap, halo) -> int:
  return len(tile_plan(shape, tile, overlap, halo)[1])


def default_tile(shape, base_width: int, memory_gb: float, batch_size: int = 1,
                 multiple: int = 8, minimum: int = 16) -> tuple[int, int, int]:
  """The largest cubic tile (a multiple of ``multiple``, clipped to the volume) whose
  inference activations fit ``memory_gb``: about 4 bytes x 8 x base_width per voxel
  (the widest level-0 tensors alive at once in the U-Net's decoder), per tile."""
  bytes_per_voxel = 4.0 * 8.0 * base_width
  voxels = memory_gb * 2 ** 30 / (bytes_per_voxel * batch_size)
  side = max(minimum, int(voxels ** (1.0 / 3.0)) // multiple * multiple)
  return tuple(min(side, int(n)) for n in shape)
