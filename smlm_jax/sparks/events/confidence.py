"""The confidence filter on predicted events (step 5 of the extraction, ``extraction``).

Components whose mean probability of their own class is below ``min_probability``,
whose volume (voxels x pixel area x frame interval) is below ``min_volume_um2_ms``, or
whose estimated peak dF/F0 (of the smoothed movie, ``extraction.estimate_dff``) is
below ``min_amplitude_dff``, or whose peak in units of the movie's own noise
(:func:`event_snr`) is below ``min_snr``, or whose volume is above the ceiling
``max_volume_um2_ms`` (0 = none), are dropped (per class). These apply to predictions only: unlike the minimum sizes
they say how sure the network is, not whether an event could be found at all, so true
events are never removed by them. They depend on the trained network, so training
chooses them per class on its validation movies (``tuning``).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import ndimage

from smlm_jax.sparks.events.spec import EventSpec
from smlm_jax.sparks.simulator import EVENT_CLASSES


def event_confidence(inst, cls_of, probs, spec: EventSpec):
  """(mean own-class probability [N + 1], volume in um^2 ms [N + 1]) of each instance
  id (the module doc; entry 0 is unused)."""
  cls_of = np.asarray(cls_of)
  n = len(cls_of)
  pmean = np.zeros(n)
  for c in EVENT_CLASSES:
    ids = np.nonzero(cls_of == c)[0]
    if len(ids):
      pmean[ids] = ndimage.mean(np.asarray(probs)[..., c], labels=inst, index=ids)
  voxel_um2_ms = spec.pixel_size_um ** 2 * spec.frame_interval_ms
  volume = np.bincount(np.asarray(inst).ravel(), minlength=n)[:n] * voxel_um2_ms
  return pmean, volume


def confident(cls_of, pmean, volume, min_probability, min_volume_um2_ms,
              amplitude=None, min_amplitude_dff=(0.0, 0.0, 0.0), snr=None,
              min_snr=(0.0, 0.0, 0.0), max_volume_um2_ms=(0.0, 0.0, 0.0)):
  """Bool [N + 1]: ids that pass per-class thresholds (spark, wave, puff) of mean
  probability, volume (floor and ceiling) and (when ``amplitude`` / ``snr`` per id are
  given) estimated peak dF/F0 and peak over the noise; entry 0 (no event) is True. A
  floor or ceiling of 0 is off; an unknown amplitude or SNR (nan) passes."""
  cls_of = np.asarray(cls_of)
  per_id = lambda v: np.concatenate([[0.0], np.asarray(v, np.float64)])[cls_of]
  keep = ((np.asarray(pmean) >= per_id(min_probability) - 1e-9)
          & (np.asarray(volume) >= per_id(min_volume_um2_ms) - 1e-9))
  ceiling = per_id(max_volume_um2_ms)
  keep &= ~((ceiling > 0) & (np.asarray(volume) > ceiling + 1e-9))
  for value, floors in ((amplitude, min_amplitude_dff), (snr, min_snr)):
    if value is not None:
      floor = per_id(floors)
      keep &= ~((floor > 0) & (np.asarray(value, np.float64) < floor - 1e-9))
  keep[0] = True
  return keep


def event_amplitude(inst, cls_of, dff):
  """Estimated peak dF/F0 [N + 1] of each instance id (nan without ``dff``)."""
  n = len(cls_of)
  if dff is None or n <= 1:
    return np.full(n, np.nan)
  out = np.full(n, np.nan)
  out[1:] = ndimage.maximum(np.asarray(dff), labels=inst, index=np.arange(1, n))
  return out


def masked_median(x, mask):
  """Per pixel median over time [H, W] of x [T, H, W] where mask [T, H, W] holds (nan
  where it never does)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)        # all-nan pixels: nan
    return np.nanmedian(np.where(mask, x, np.nan), axis=0)


NOISE_SMOOTH_PX = 4.0      # spatial smoothing of the per-pixel noise map (pixels)


DETREND_FRAMES = 31        # running median in time removed before the noise is measured


def noise_dff(dff, background, reach=(3, 6), min_frames: int = 8, robust: bool = True):
  """Noise SD map [H, W] of a smoothed dF/F0 movie [T, H, W] (``extraction.estimate_dff``):
  per pixel, the spread over time of dF/F0 over the voxels where ``background`` (bool
  [T, H, W]: no extracted event) holds and no event lies within ``reach`` (frames,
  pixels: the smoothing spreads each event's dF/F0 that far), averaged over a Gaussian
  of NOISE_SMOOTH_PX pixels among the pixels with at least ``min_frames`` such frames
  (elsewhere: the median of those). ``robust`` (the default): 1.4826 x the median
  absolute deviation of dF/F0 about its running median over DETREND_FRAMES frames, so
  slow changes (bleaching, a wave's decay below the segmentation) and the rare
  unsegmented event do not count as noise; otherwise their SD over time (before
  2026-12-07: 4-12x the noise in the independent simulator's movies with a wave).
  Photon noise makes it larger where the dye is dim (low F0, a dimmer dye, fewer
  photons), so an event's peak over it (:func:`event_snr`) is in units of the movie's
  own noise, as the classical detectors' thresholds are (Cheng et al. 1999), not in
  those of one simulator's photon budget."""
  dff = np.asarray(dff, np.float32)
  rt, rp = (int(r) for r in reach)
  near = ndimage.maximum_filter(~np.asarray(background, bool),
                                size=(2 * rt + 1, 2 * rp + 1, 2 * rp + 1))
  bg = ~near
  count = bg.sum(0).astype(np.float32)
  if robust:
    resid = dff - ndimage.median_filter(dff, size=(DETREND_FRAMES, 1, 1), mode="nearest")
    med = masked_median(resid, bg)
    ms = np.nan_to_num((1.4826 * masked_median(np.abs(resid - med[None]), bg)) ** 2, nan=0.0)
  else:
    mean = np.where(bg, dff, 0.0).sum(0) / np.maximum(count, 1.0)
    ms = np.maximum(np.where(bg, dff * dff, 0.0).sum(0) / np.maximum(count, 1.0) - mean ** 2,
                    0.0)
  ok = (count >= min_frames) & (ms > 0)
  if not ok.any():
    return np.full(dff.shape[1:], max(float(np.std(dff)), 1e-6), np.float32)
  w = ndimage.gaussian_filter(ok.astype(np.float32), NOISE_SMOOTH_PX, mode="nearest")
  v = ndimage.gaussian_filter(np.where(ok, ms, 0.0).astype(np.float32), NOISE_SMOOTH_PX,
                              mode="nearest")
  fallback = float(np.median(ms[ok]))
  var = np.where(w > 0.2, v / np.maximum(w, 1e-6), fallback)
  return np.sqrt(np.maximum(var, 1e-12)).astype(np.float32)


def event_snr(inst, cls_of, dff, spec: EventSpec | None = None):
  """Peak of dF/F0 over its noise (:func:`noise_dff`, background = no instance, reach
  three times the spec's smoothing) [N + 1] for each instance id (nan without ``dff``)."""
  n = len(cls_of)
  if dff is None or n <= 1:
    return np.full(n, np.nan)
  spec = spec or EventSpec()
  reach = (math.ceil(3 * spec.smooth_sigma_frames), math.ceil(3 * spec.smooth_sigma_px))
  inst = np.asarray(inst)
  sd = noise_dff(dff, inst == 0, reach, robust=spec.dff_estimator != "mean")
  out = np.full(n, np.nan)
  out[1:] = ndimage.maximum(np.asarray(dff) / sd[None], labels=inst, index=np.arange(1, n))
  return out


def renumber(inst, cls_of, keep):
  """(instances, class per id) with the ids where ``keep`` is False removed and the
  others renumbered 1..K in their order."""
  keep = np.asarray(keep, bool)
  if keep.all():
    return inst, np.asarray(cls_of, np.int32)
  new_id = np.where(keep, np.cumsum(keep) - 1, 0).astype(np.int32)
  return new_id[inst], np.asarray(cls_of, np.int32)[keep]


def confidence_keep(inst, cls_of, probs, spec: EventSpec, dff=None, snr=None):
  """Bool [N + 1]: the ids that pass the spec's confidence filter (the amplitude and
  SNR floors only with ``dff``; ``snr`` per id if already computed)."""
  if snr is None and dff is not None and any(v > 0 for v in spec.min_snr):
    snr = event_snr(inst, cls_of, dff, spec)
  return confident(cls_of, *event_confidence(inst, cls_of, probs, spec),
                   spec.min_probability, spec.min_volume_um2_ms,
                   event_amplitude(inst, cls_of, dff), spec.min_amplitude_dff,
                   snr, spec.min_snr, spec.max_volume_um2_ms)


def apply_confidence_filter(inst, cls_of, probs, spec: EventSpec, dff=None):
  """(instances, class per id) without the ids below the spec's confidence filter
  (the amplitude and SNR floors only with ``dff``)."""
  return renumber(inst, cls_of, confidence_keep(inst, cls_of, probs, spec, dff))
