"""Extraction of event instances from class probabilities (:func:`extract_events`),
following Dotti et al. 2024 (Cell Calcium 121:102893) and its reference code:
1. Each voxel takes its most probable class; the first and last ``edge_frames`` frames
   of the movie (those the training labels ignore, so the network never learned them)
   are background.
   1b. With ``absorb_into_waves``: every connected spark / puff region (26-connected,
   both classes together) that touches a wave component of at least the wave's
   minimum size becomes wave (segment first, then
   classify: a wave front the network breaks into pieces is one wave).
2. Per event class, 26-connected components in (t, y, x) (``scipy.ndimage.label``).
3. Sparks: peaks of the smoothed dF/F0 movie inside the spark mask, by non-maximum
   suppression with an ellipsoidal minimum distance (``spark_min_distance_um`` in
   space, ``spark_min_distance_ms`` in time; two peaks closer than both in the scaled
   norm cannot coexist). A component holding k >= 2 peaks is split into k sparks by
   assigning each voxel to its nearest peak in that scaled norm (a watershed without
   the intensity term).
4. Components shorter than ``min_duration_ms`` or with a projected (y, x) area below
   ``min_area_um2`` are dropped (per class).
   4b. With ``wave_tail_fraction`` f > 0: a puff with at least a fraction f of its
   voxels at pixels a wave occupied in an earlier frame is dropped (the slow decay
   of a bright wave, not a new release: local release is refractory after a wave).
5. Confidence (when the probabilities are given): components whose mean probability
   of their own class is below ``min_probability``, whose volume is below
   ``min_volume_um2_ms`` or whose estimated peak dF/F0 is below ``min_amplitude_dff``
   are dropped (per class; predictions only; see
   ``confidence``, and ``tuning`` for how training chooses them).
dF/F0 is estimated as ``S / F0 - 1`` with ``S`` the movie smoothed by a Gaussian
(``smooth_sigma_frames``, ``smooth_sigma_px``) and ``F0`` the per-pixel mean of ``S``
over the frames classified background (the median over all frames where a pixel is
never background); it gives peak positions and amplitudes.

Truth side: :func:`instances_from_labels` splits a label volume into instances, and
:func:`filter_true_instances` turns true events too small to be found (below the
minimum sizes of step 4 after removing ignored voxels) into ignore for scoring.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from smlm_jax.sparks.events.confidence import (apply_confidence_filter, confidence_keep,
                                               event_snr, masked_median, renumber)
from smlm_jax.sparks.events.spec import Event, EventSpec
from smlm_jax.sparks.simulator import BACKGROUND, EVENT_CLASSES, IGNORE, PUFF, SPARK, WAVE


# --------------------------------------------------------------------------- dF/F0
def smooth(movie, spec: EventSpec):
  s = (spec.smooth_sigma_frames, spec.smooth_sigma_px, spec.smooth_sigma_px)
  return ndimage.gaussian_filter(np.asarray(movie, np.float32), s, mode="nearest")


def estimate_dff(movie, classes, spec: EventSpec):
  """Smoothed dF/F0 [T, H, W] of a movie with predicted classes [T, H, W]. F0 per pixel:
  the median over time of the smoothed movie at its background voxels (``spec``
  'robust'; robust to the parts of events below the segmentation, e.g. a wave's
  decay, which a mean absorbs: with the mean, sparks in movies with a wave came out
  ~30% below those without on the independent simulator), or their mean ('mean')."""
  s = smooth(movie, spec)
  bg = classes == BACKGROUND
  count = bg.sum(0)
  if spec.dff_estimator == "mean":
    f0 = np.where(count > 0, (s * bg).sum(0) / np.maximum(count, 1), np.median(s, axis=0))
  else:                                  # 'robust' (EventSpec checks the value)
    f0 = np.where(count > 0, masked_median(s, bg), np.median(s, axis=0))
  floor = 0.05 * max(float(np.mean(np.abs(s))), 1e-6)   # out-of-cell pixels: no dF/F0
  return np.where(f0 > floor, s / np.maximum(f0, floor) - 1.0, 0.0).astype(np.float32)


# --------------------------------------------------------------------------- peaks
def _ellipsoid(r_t: float, r_px: float):
  """Offsets (dt, dy, dx) with (dt / r_t)^2 + (dy^2 + dx^2) / r_px^2 < 1 (a footprint)."""
  nt, nr = int(math.floor(r_t)), int(math.floor(r_px))
  t, y, x = np.mgrid[-nt:nt + 1, -nr:nr + 1, -nr:nr + 1]
  return (t / max(r_t, 1e-9)) ** 2 + (y ** 2 + x ** 2) / max(r_px, 1e-9) ** 2 < 1.0


def find_peaks(value, mask, spec: EventSpec) -> np.ndarray:
  """Peaks [(t, y, x)] of ``value`` inside ``mask``, at least the minimum spark
  distance apart (greedy non-maximum suppression, highest first)."""
  r_t = spec.spark_min_distance_ms / spec.frame_interval_ms
  r_px = spec.spark_min_distance_um / spec.pixel_size_um
  v = np.where(mask, value, -np.inf)
  mx = ndimage.maximum_filter(v, footprint=_ellipsoid(r_t, r_px), mode="constant",
                              cval=-np.inf)
  cand = np.argwhere(mask & (v == mx))
  if len(cand) == 0:
    return cand.reshape(0, 3)
  order = np.argsort(-value[tuple(cand.T)], kind="stable")
  cand = cand[order]
  scale = np.array([1.0 / r_t, 1.0 / r_px, 1.0 / r_px])
  kept = []
  for c in cand:
    if kept:
      d = ((np.asarray(kept) - c) * scale) ** 2
      if np.any(d.sum(1) < 1.0):
        continue
    kept.append(c)
  return np.asarray(kept, np.int64).reshape(-1, 3)


def _split(component_mask, peaks, spec: EventSpec):
  """Labels 1..k of the voxels of one component by nearest peak (scaled norm)."""
  coords = np.argwhere(component_mask)
  r_t = spec.spark_min_distance_ms / spec.frame_interval_ms
  r_px = spec.spark_min_distance_um / spec.pixel_size_um
  scale = np.array([1.0 / r_t, 1.0 / r_px, 1.0 / r_px])
  d = (((coords[:, None, :] - peaks[None, :, :]) * scale) ** 2).sum(-1)
  return coords, np.argmin(d, axis=1)


# --------------------------------------------------------------------------- extraction
_STRUCT26 = np.ones((3, 3, 3), bool)


def _component_passes(cls, mask, spec) -> bool:
  """Whether one component (boolean mask [T, H, W] of its voxels) lasts the class's
  minimum number of frames (first to last frame it occupies) and covers its minimum
  area (pixels of its projection over time)."""
  ts = np.nonzero(np.any(mask, axis=(1, 2)))[0]
  if len(ts) == 0:
    return False
  frames = int(ts[-1] - ts[0] + 1)
  area = int(np.any(mask, axis=0).sum())
  return frames >= spec.min_frames(cls) and area >= spec.min_pixels(cls)


def passing_waves(classes, spec: EventSpec):
  """Boolean [T, H, W]: the voxels of wave components that pass the wave's minimum
  duration and area (a few stray wave voxels are no wave)."""
  comp, _ = ndimage.label(np.asarray(classes) == WAVE, structure=_STRUCT26)
  wave = np.zeros(comp.shape, bool)
  for i, sl in enumerate(ndimage.find_objects(comp), start=1):
    if sl is not None and _component_passes(WAVE, comp[sl] == i, spec):
      wave[sl] |= comp[sl] == i
  return wave


def wave_passed(classes, spec: EventSpec):
  """Boolean [T, H, W]: pixels that a passing wave occupied in an earlier frame
  (step 4b's test of a wave tail)."""
  seen = np.logical_or.accumulate(passing_waves(classes, spec), axis=0)
  out = np.zeros_like(seen)
  out[1:] = seen[:-1]
  return out


def instances_from_classes(classes, spec: EventSpec, dff=None, probs=None):
  """(instances [T, H, W] int32, class of each id [N + 1]) from a class volume.

  ``dff`` (same shape) gives the spark peaks that split merged sparks; without it
  components are not split. ``probs`` ([T, H, W, 4]) enables the confidence filter
  (``spec.min_probability``, ``spec.min_volume_um2_ms``; applied to the extracted
  instances, which it only removes); without it nothing is dropped for confidence.
  """
  classes = np.asarray(classes)
  inst = np.zeros(classes.shape, np.int32)
  cls_of = [0]
  tail = wave_passed(classes, spec) if spec.wave_tail_fraction > 0 else None
  for c in EVENT_CLASSES:
    mask = classes == c
    comp, n = ndimage.label(mask, structure=_STRUCT26)
    if n == 0:
      continue
    peaks = find_peaks(dff, mask, spec) if (c == SPARK and dff is not None) else None
    peak_comp = comp[tuple(peaks.T)] if peaks is not None and len(peaks) else None
    for i, sl in enumerate(ndimage.find_objects(comp), start=1):
      if sl is None:
        continue
      local = comp[sl] == i
      pieces = [local]
      if peak_comp is not None:
        p = peaks[peak_comp == i]
        if len(p) >= 2:
          offset = np.array([s.start for s in sl])
          coords, owner = _split(local, p - offset, spec)
          pieces = []
          for k in range(len(p)):
            m = np.zeros_like(local)
            sel = coords[owner == k]
            m[tuple(sel.T)] = True
            pieces.append(m)
      for m in pieces:
        if not m.any():
          continue
        if not _component_passes(c, m, spec):
          continue
        if c == PUFF and tail is not None and tail[sl][m].mean() >= spec.wave_tail_fraction:
          continue                                   # step 4b: a wave's decay
        cls_of.append(c)
        region = inst[sl]
        region[m] = len(cls_of) - 1
  cls_of = np.asarray(cls_of, np.int32)
  if probs is None:
    return inst, cls_of
  return apply_confidence_filter(inst, cls_of, probs, spec, dff)


def describe(inst, cls_of, dff, spec: EventSpec, snr=None) -> list[Event]:
  """One :class:`Event` per instance id (properties documented in predict.py); ``snr``
  per id (peak dF/F0 over the noise, ``confidence.event_snr``) or nan."""
  out = []
  objs = ndimage.find_objects(inst)
  for i, sl in enumerate(objs, start=1):
    if sl is None:
      continue
    m = inst[sl] == i
    ts = np.nonzero(np.any(m, axis=(1, 2)))[0]
    if dff is not None:
      v = np.where(m, dff[sl], -np.inf)
      k = np.unravel_index(int(np.argmax(v)), v.shape)
      amp = float(v[k])
    else:
      k = tuple(int(np.round(c)) for c in ndimage.center_of_mass(m))
      amp = float("nan")
    t0 = sl[0].start + int(ts[0])
    t1 = sl[0].start + int(ts[-1])
    out.append(Event(
        event_id=i, cls=int(cls_of[i]), t_start=t0, t_end=t1,
        y_px=float(sl[1].start + k[1]), x_px=float(sl[2].start + k[2]),
        duration_ms=(t1 - t0 + 1) * spec.frame_interval_ms,
        area_um2=float(np.any(m, axis=0).sum()) * spec.pixel_size_um ** 2,
        amplitude=amp, num_voxels=int(m.sum()),
        snr=float(snr[i]) if snr is not None else float("nan")))
  return out


def absorb_into_waves(classes, spec: EventSpec):
  """Class volume [T, H, W] where each 26-connected region of spark / puff voxels that
  touches a wave (26-neighbourhood) becomes wave (step 1b). Only wave components that
  pass the wave's minimum duration and area count: a few stray wave voxels in a spark
  must not turn the spark into a (then discarded) wave."""
  wave = passing_waves(classes, spec)
  if not wave.any():
    return classes
  local = (classes == SPARK) | (classes == PUFF)
  comp, n = ndimage.label(local, structure=_STRUCT26)
  if n == 0:
    return classes
  near = ndimage.binary_dilation(wave, structure=_STRUCT26)
  touching = np.unique(comp[near & local])
  out = classes.copy()
  out[np.isin(comp, touching[touching > 0])] = WAVE
  return out


def extract_unfiltered(probs, movie, spec: EventSpec):
  """Steps 1-4 (no confidence filter): (classes [T, H, W] uint8, instances [T, H, W]
  int32, class per id, dF/F0 [T, H, W] or None without a movie)."""
  probs = np.asarray(probs)
  classes = np.argmax(probs, axis=-1).astype(np.uint8)
  k = int(spec.edge_frames)
  if k and classes.shape[0] > 2 * k:
    classes[:k] = BACKGROUND
    classes[-k:] = BACKGROUND
  if spec.absorb_into_waves:
    classes = absorb_into_waves(classes, spec)
  dff = estimate_dff(movie, classes, spec) if movie is not None else None
  inst, cls_of = instances_from_classes(classes, spec, dff)
  return classes, inst, cls_of, dff


def extract_events(probs, movie, spec: EventSpec):
  """(classes [T, H, W] uint8, instances [T, H, W] int32, class per id, events,
  dF/F0 [T, H, W]) from probabilities [T, H, W, 4] and the movie [T, H, W] (any
  linear intensity scale)."""
  classes, inst, cls_of, dff = extract_unfiltered(probs, movie, spec)
  snr = event_snr(inst, cls_of, dff, spec)
  keep = confidence_keep(inst, cls_of, probs, spec, dff, snr)
  inst, cls_of = renumber(inst, cls_of, keep)
  return classes, inst, cls_of, describe(inst, cls_of, dff, spec, snr[keep]), dff


# --------------------------------------------------------------------------- truth
def filter_true_instances(labels, instances, cls_of, spec: EventSpec):
  """Ignore mask [T, H, W] for scoring: the ignore label plus true instances too small
  to be detected once the ignored voxels are removed (below the class's minimum
  duration or area)."""
  ignore = np.asarray(labels) == IGNORE
  inst = np.where(ignore, 0, instances)
  for i, sl in enumerate(ndimage.find_objects(inst), start=1):
    if sl is None:
      continue
    m = inst[sl] == i
    if not _component_passes(int(cls_of[i]), m, spec):
      ignore[sl] |= m
  return ignore


def instances_from_labels(labels):
  """(instances, class per id) of a label volume: 26-connected components per class
  (for user annotations that carry no instance ids)."""
  labels = np.asarray(labels)
  inst = np.zeros(labels.shape, np.int32)
  cls_of = [0]
  for c in EVENT_CLASSES:
    comp, n = ndimage.label(labels == c, structure=_STRUCT26)
    if n:
      inst = np.where(comp > 0, comp + len(cls_of) - 1, inst)
      cls_of += [c] * n
  return inst.astype(np.int32), np.asarray(cls_of, np.int32)


def annotated_instances(labels, instances=None):
  """(instances, class per id) of a user's annotation: with instance ids, each id takes
  the majority event class (1-3) of its labelled voxels, and ids with none are dropped;
  without, :func:`instances_from_labels`."""
  labels = np.asarray(labels, np.int64)
  if instances is None:
    return instances_from_labels(labels)
  inst = np.asarray(instances, np.int32)
  cls_of = np.zeros(int(inst.max()) + 1, np.int32)
  for i in range(1, len(cls_of)):
    vals = labels[inst == i]
    vals = vals[(vals >= 1) & (vals <= 3)]
    cls_of[i] = np.bincount(vals, minlength=4).argmax() if vals.size else 0
  return np.where(cls_of[inst] > 0, inst, 0), cls_of
