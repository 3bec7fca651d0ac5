"""Model inputs: normalization, frame windows, and database crops fed from the host.

* ``normalize(frames)`` (jnp, inside jit): frames ``[..., n, H, W]`` in any units ->
  ``(frames - median) / (q99.5 - median)`` with the median and 99.5th percentile over
  the whole window (a strided subsample of at most ~65k pixels for large frames). The
  median is the background of a sparse fluorescent scene and the 99.5th percentile its
  bright structures, so camera offset, gain and brightness drop out: simulated ADU,
  augmented real crops and a user's movie all reach the model on the same scale.
* ``window_indices(t, n)``: frames ``t-n+1 .. t`` of a movie, the first frame repeated
  before the start (so every frame gets a prediction).
* ``Crop`` / ``load_crops``: a database record's images and ground truth as float32.
* ``HostSampler``: per training step, ``batch_size`` random (crop, frame) windows of
  the training crops at a common size (a fraction around the annotated site, a
  fraction of hard negatives: windows that no annotated site of any frame of the
  crop comes within ``NEGATIVE_MARGIN_PX`` of, label 0), seeded by (seed, step) so
  that a resumed run sees the same data.
"""
from __future__ import annotations

import dataclasses

import numpy as np

QUANTILE_HIGH = 0.995
NEGATIVE_MARGIN_PX = 16   # hard negatives keep this far from any annotated site
MAX_STAT_PIXELS = 65536


def normalize(frames):
  """[..., n, H, W] -> float32 normalized by the window's median and 99.5th percentile."""
  import jax.numpy as jnp
  frames = jnp.asarray(frames, jnp.float32)
  n, h, w = frames.shape[-3:]
  stride = max(1, int(np.floor(np.sqrt(n * h * w / MAX_STAT_PIXELS))))
  sample = frames[..., ::stride, ::stride].reshape(frames.shape[:-3] + (-1,))
  q = jnp.quantile(sample, jnp.array([0.5, QUANTILE_HIGH]), axis=-1)
  med, high = q[0][..., None, None, None], q[1][..., None, None, None]
  scale = jnp.maximum(high - med, 1e-6 * (jnp.abs(med) + 1.0))
  return (frames - med) / scale


def window_indices(t: int, n: int) -> np.ndarray:
  """Indices of the n-frame input window ending at frame t (start repeated)."""
  return np.clip(np.arange(t - n + 1, t + 1), 0, None)


def windows(frames: np.ndarray, n: int, targets=None) -> np.ndarray:
  """[T, H, W] -> [len(targets), n, H, W] windows ending at each target frame."""
  targets = range(frames.shape[0]) if targets is None else targets
  return np.stack([frames[window_indices(t, n)] for t in targets])


def mirror_pad(windows: np.ndarray, pad_px: int):
  """[..., H, W] -> ([..., H + 2p, W + 2p] reflect-padded, p): the missing context at
  the border extrapolated by mirroring (Ronneberger et al. 2015, U-Net), p = pad_px
  capped at min(H, W) - 1 (what a reflection can supply); crop maps back with
  :func:`unpad`."""
  p = int(max(0, min(pad_px, min(windows.shape[-2:]) - 1)))
  if p == 0:
    return windows, 0
  width = [(0, 0)] * (windows.ndim - 2) + [(p, p), (p, p)]
  return np.pad(windows, width, mode="reflect"), p


def unpad(maps: np.ndarray, p: int) -> np.ndarray:
  """[..., H + 2p, W + 2p] -> [..., H, W] (the inverse crop of :func:`mirror_pad`)."""
  return maps if p == 0 else maps[..., p:-p, p:-p]


@dataclasses.dataclass
class Crop:
  """One database crop: frames [T, H, W] float32 (camera units), truth [T, H, W] in
  [0, 1], its record."""
  frames: np.ndarray
  truth: np.ndarray
  record: dict

  @property
  def event_id(self) -> str:
    return self.record["event_id"]


def load_crop(record: dict) -> Crop:
  import os
  from smlm_jax.events import annotate
  folder = record["folder"]
  frames, _ = annotate.read_frames(os.path.join(folder, "images.tif"))
  truth = annotate.read_ground_truth(os.path.join(folder, "ground_truth.tif"))
  if truth.shape != frames.shape:
    raise ValueError(f"{folder}: ground truth {truth.shape} and images {frames.shape} differ")
  return Crop(frames.astype(np.float32), truth, record)


def query_conditions(text) -> list[str]:
  """config.data.query ('microscope=isim; frames>=5' or a sequence) -> conditions."""
  if not text:
    return []
  if isinstance(text, str):
    return [c.strip() for c in text.split(";") if c.strip()]
  return [str(c) for c in text]


def split_records(data_config):
  """(train records, validation records) of config.data: db, query, split; crops
  flagged unusable (:mod:`.quality`) only with data.include_unusable."""
  from smlm_jax.events import db as db_lib
  if not data_config.db:
    raise ValueError("config.data.source needs config.data.db (an event database from "
                     "python -m smlm_jax.events.db add FOLDER --db=FILE)")
  include = bool(data_config.get("include_unusable", False))
  with db_lib.EventDB(data_config.db, must_exist=True) as database:
    records = database.query(query_conditions(data_config.query), usable_only=not include)
  if not records:
    raise ValueError(f"{data_config.db}: no usable events match config.data.query="
                     f"{data_config.query!r}" + ("" if include else " (crops flagged "
                     "unusable are left out; config.data.include_unusable=True keeps them)"))
  return db_lib.split_events(records, float(data_config.val_fraction),
                             int(data_config.split_seed), data_config.group_by or None)


def _origin(rng, length: int, size: int, inside=None) -> int:
  """Start of a window of ``size`` in ``length``: uniform, or uniform among the starts
  that put position ``inside`` in [size - crop, crop) of the window (given as a pair
  (position, crop)) when that is possible."""
  if inside is not None:
    pos, crop = inside
    lo, hi = max(0, int(pos) - crop + 1), min(length - size, int(pos) - (size - crop))
    if lo <= hi:
      return int(rng.integers(lo, hi + 1))
  return int(rng.integers(length - size + 1))


def fit(frames: np.ndarray, label: np.ndarray, size: int, rng, site=None, crop_px=None):
  """A size x size window of frames [n, H, W] and label [H, W]: a random one (rng) of a
  larger crop; a smaller one is padded with its median (label with 0), centred, so no
  event is duplicated the way reflection would. With ``site`` (y, x), the window puts
  it in its central [size - crop_px, crop_px) square, so that every crop_px crop of
  the window contains it."""
  h, w = frames.shape[-2:]
  if h < size or w < size:
    py, px = max(0, size - h), max(0, size - w)
    pad = [(py // 2, py - py // 2), (px // 2, px - px // 2)]
    frames = np.pad(frames, [(0, 0)] + pad, constant_values=float(np.median(frames)))
    label = np.pad(label, pad)
    site = None if site is None else (site[0] + py // 2, site[1] + px // 2)
    h, w = frames.shape[-2:]
  y0 = _origin(rng, h, size, None if site is None else (site[0], crop_px))
  x0 = _origin(rng, w, size, None if site is None else (site[1], crop_px))
  return frames[:, y0:y0 + size, x0:x0 + size], label[y0:y0 + size, x0:x0 + size]


def site_mask(truth: np.ndarray, margin_px: int = NEGATIVE_MARGIN_PX) -> np.ndarray:
  """[H, W] bool: pixels within margin_px (square) of an annotated pixel (truth > 0)
  in ANY frame of the crop [T, H, W]: a division is annotated in some frames only."""
  from scipy import ndimage
  any_site = (np.asarray(truth) > 0).any(axis=0)
  if margin_px <= 0 or not any_site.any():
    return any_site
  return ndimage.binary_dilation(any_site, np.ones((2 * margin_px + 1,) * 2, bool))


def negative_origins(mask: np.ndarray, size: int) -> np.ndarray:
  """[k, 2] window origins (y0, x0) whose size x size window holds no True of mask."""
  h, w = mask.shape
  if h < size or w < size:
    return np.zeros((0, 2), int)
  c = np.pad(np.cumsum(np.cumsum(mask.astype(np.int64), 0), 1), ((1, 0), (1, 0)))
  inside = c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]
  return np.argwhere(inside == 0)


class HostSampler:
  """Random training windows of database crops, as numpy, reproducible per step.

  A window is ``size`` = min(1.5 crop_px, smallest crop side) (at least crop_px)
  square; the device then cuts its random ``crop_px`` crop from it
  (:mod:`.augment`). With probability ``positive_fraction`` a frame with an annotated
  site gets a window that has the site in its central square, so that the device's
  crop always contains it: an event is a few hundred pixels of a 256 x 256 crop, and
  a uniform 64 px crop would miss it ~90% of the time. With probability
  ``negative_fraction`` a window is a hard negative (:func:`negative_origins` of
  :func:`site_mask`: real structure, no event; label 0); the rest are uniform.
  """

  def __init__(self, crops: list[Crop], num_frames: int, crop_px: int, seed: int,
               positive_fraction: float = 0.5, negative_fraction: float = 0.0):
    if not crops:
      raise ValueError("no training crops (all events went to validation?); lower "
                       "config.data.val_fraction or add events")
    self.crops, self.n, self.seed, self.crop_px = crops, num_frames, seed, crop_px
    self.positive_fraction = positive_fraction
    self.negative_fraction = negative_fraction
    self.size = max(crop_px, min([crop_px + crop_px // 2]
                                 + [min(c.frames.shape[1:]) for c in crops]))
    self.sites = [[np.unravel_index(int(np.argmax(g)), g.shape) if g.max() >= 0.5 else None
                   for g in c.truth] for c in crops]
    self.negatives = [negative_origins(site_mask(c.truth), self.size)
                      if negative_fraction > 0 else np.zeros((0, 2), int) for c in crops]

  def __call__(self, step: int, batch_size: int) -> dict:
    rng = np.random.default_rng([self.seed, step])
    frames = np.empty((batch_size, self.n, self.size, self.size), np.float32)
    labels = np.empty((batch_size, self.size, self.size), np.float32)
    for i in range(batch_size):
      c = int(rng.integers(len(self.crops)))
      crop = self.crops[c]
      t = int(rng.integers(crop.frames.shape[0]))
      r = rng.random()
      window = crop.frames[window_indices(t, self.n)]
      origins = self.negatives[c]
      if self.positive_fraction <= r < self.positive_fraction + self.negative_fraction \
          and len(origins):
        y0, x0 = origins[int(rng.integers(len(origins)))]
        frames[i] = window[:, y0:y0 + self.size, x0:x0 + self.size]
        labels[i] = 0.0
        continue
      site = self.sites[c][t] if r < self.positive_fraction else None
      frames[i], labels[i] = fit(window, crop.truth[t], self.size, rng, site, self.crop_px)
    return {"frames": frames, "label": labels}
