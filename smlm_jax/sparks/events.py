"""From class probabilities to event instances, IoMin matching and per-class F1.

Conventions: a movie is ``[T, H, W]``; ``probs`` are ``[T, H, W, 4]`` (background,
spark, wave, puff); label volumes use 0 background, 1 spark, 2 wave, 3 puff, 4 ignore;
instance volumes are int32 with 0 = no event and ids 1..N. Tuples of per-class
settings are ordered (spark, wave, puff), i.e. indexed by class id - 1.

Extraction (:func:`extract_events`), following Dotti et al. 2024 (Cell Calcium
121:102893) and its reference code:
1. Each voxel takes its most probable class.
2. Per event class, 26-connected components in (t, y, x) (``scipy.ndimage.label``).
3. Sparks: peaks of the smoothed dF/F0 movie inside the spark mask, by non-maximum
   suppression with an ellipsoidal minimum distance (``spark_min_distance_um`` in
   space, ``spark_min_distance_ms`` in time; two peaks closer than both in the scaled
   norm cannot coexist). A component holding k >= 2 peaks is split into k sparks by
   assigning each voxel to its nearest peak in that scaled norm (a watershed without
   the intensity term).
4. Components shorter than ``min_duration_ms`` or with a projected (y, x) area below
   ``min_area_um2`` are dropped (per class).
5. Confidence (when the probabilities are given): components whose mean probability
   of their own class is below ``min_probability``, or whose volume (voxels x pixel
   area x frame interval) is below ``min_volume_um2_ms``, are dropped (per class).
   These apply to predictions only: unlike the minimum sizes of step 4 they say how
   sure the network is, not whether an event could be found at all, so true events
   are never removed by them. They depend on the trained network, so training chooses
   them per class on its validation movies (:func:`choose_filter`, ``config.events.tune``)
   and saves them in the run (FILTER_FILE), where evaluate and predict read them.
dF/F0 is estimated as ``S / F0 - 1`` with ``S`` the movie smoothed by a Gaussian
(``smooth_sigma_frames``, ``smooth_sigma_px``) and ``F0`` the per-pixel mean of ``S``
over the frames classified background (the median over all frames where a pixel is
never background); it gives peak positions and amplitudes.

Matching (:func:`match_events`): voxels labelled ignore are removed from both sides;
an instance left with no voxel is not scored; IoMin(p, g) = |p & g| / min(|p|, |g|)
(Dotti et al.); a prediction that reaches IoMin >= ``iomin_threshold`` with no true
event and has at least that fraction of its voxels in ignore is not scored either
(their "ignored" predictions: e.g. an event in the unannotated frames at the movie's
ends is neither a hit nor a false positive); pairs with IoMin >= ``iomin_threshold``
are matched one-to-one,
greedily in decreasing IoMin. Per class c, pairs of two class-c events are matched:
TP = matches, FP = unmatched predicted c, FN = unmatched true c; precision = TP / (TP
+ FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN). The confusion matrix
comes from a second, class-blind matching: entry [true class, predicted class], with
row/column 0 for unmatched predicted / true events. True events too small to be
found (below the minimum sizes after removing ignored voxels) are turned into ignore.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
from scipy import ndimage

from smlm_jax.sparks.simulator import (BACKGROUND, CLASS_NAMES, EVENT_CLASSES, IGNORE,
                                       PUFF, SPARK, WAVE)

NAMES = {SPARK: "spark", WAVE: "wave", PUFF: "puff"}
AMPLITUDE_BINS = (0.0, 0.3, 0.45, 0.6, 0.8, 1.0, 1.25, 1.5, 10.0)


@dataclasses.dataclass(frozen=True)
class EventSpec:
  pixel_size_um: float = 0.2
  frame_interval_ms: float = 6.8
  spark_min_distance_um: float = 1.8
  spark_min_distance_ms: float = 20.0
  smooth_sigma_px: float = 2.0
  smooth_sigma_frames: float = 1.0
  min_duration_ms: tuple = (13.6, 20.0, 81.6)   # as configs/sparks.py get_events_config
  min_area_um2: tuple = (1.2, 20.0, 0.36)
  iomin_threshold: float = 0.5
  min_probability: tuple = (0.0, 0.0, 0.0)       # predictions only (step 5); off here,
                                                 # configs/sparks.py sets them
  min_volume_um2_ms: tuple = (0.0, 0.0, 0.0)     # predictions only (step 5)

  def min_frames(self, cls: int) -> int:
    return max(1, int(math.ceil(self.min_duration_ms[cls - 1] / self.frame_interval_ms - 1e-6)))

  def min_pixels(self, cls: int) -> int:
    return max(1, int(math.ceil(self.min_area_um2[cls - 1] / self.pixel_size_um ** 2 - 1e-6)))


def spec_from_config(config, pixel_size_um: float | None = None,
                     frame_interval_ms: float | None = None) -> EventSpec:
  e = config.events
  return EventSpec(
      pixel_size_um=float(pixel_size_um or config.sim.pixel_size_um),
      frame_interval_ms=float(frame_interval_ms or config.sim.frame_interval_ms),
      spark_min_distance_um=float(e.spark_min_distance_um),
      spark_min_distance_ms=float(e.spark_min_distance_ms),
      smooth_sigma_px=float(e.smooth_sigma_px), smooth_sigma_frames=float(e.smooth_sigma_frames),
      min_duration_ms=tuple(float(v) for v in e.min_duration_ms),
      min_area_um2=tuple(float(v) for v in e.min_area_um2),
      iomin_threshold=float(e.iomin_threshold),
      # .get: runs trained before these settings existed keep them off.
      min_probability=tuple(float(v) for v in e.get("min_probability", (0.0,) * 3)),
      min_volume_um2_ms=tuple(float(v) for v in e.get("min_volume_um2_ms", (0.0,) * 3)))


@dataclasses.dataclass
class Event:
  event_id: int
  cls: int
  t_start: int
  t_end: int
  y_px: float
  x_px: float
  duration_ms: float
  area_um2: float
  amplitude: float
  num_voxels: int

  @property
  def class_name(self) -> str:
    return NAMES[self.cls]


# --------------------------------------------------------------------------- dF/F0
def smooth(movie, spec: EventSpec):
  s = (spec.smooth_sigma_frames, spec.smooth_sigma_px, spec.smooth_sigma_px)
  return ndimage.gaussian_filter(np.asarray(movie, np.float32), s, mode="nearest")


def estimate_dff(movie, classes, spec: EventSpec):
  """Smoothed dF/F0 [T, H, W] of a movie with predicted classes [T, H, W]."""
  s = smooth(movie, spec)
  bg = classes == BACKGROUND
  count = bg.sum(0)
  f0 = np.where(count > 0, (s * bg).sum(0) / np.maximum(count, 1), np.median(s, axis=0))
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


def _keep(cls, sl, mask, spec):
  frames = sl[0].stop - sl[0].start
  area = int(np.any(mask, axis=0).sum())
  return frames >= spec.min_frames(cls) and area >= spec.min_pixels(cls)


def event_confidence(inst, cls_of, probs, spec: EventSpec):
  """(mean own-class probability [N + 1], volume in um^2 ms [N + 1]) of each instance
  id (step 5 of the module doc; entry 0 is unused)."""
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


def confident(cls_of, pmean, volume, min_probability, min_volume_um2_ms):
  """Bool [N + 1]: ids that pass per-class thresholds (spark, wave, puff) of mean
  probability and volume; entry 0 (no event) is True."""
  cls_of = np.asarray(cls_of)
  min_p = np.concatenate([[0.0], np.asarray(min_probability, np.float64)])[cls_of]
  min_v = np.concatenate([[0.0], np.asarray(min_volume_um2_ms, np.float64)])[cls_of]
  keep = (np.asarray(pmean) >= min_p - 1e-9) & (np.asarray(volume) >= min_v - 1e-9)
  keep[0] = True
  return keep


def renumber(inst, cls_of, keep):
  """(instances, class per id) with the ids where ``keep`` is False removed and the
  others renumbered 1..K in their order."""
  keep = np.asarray(keep, bool)
  if keep.all():
    return inst, np.asarray(cls_of, np.int32)
  new_id = np.where(keep, np.cumsum(keep) - 1, 0).astype(np.int32)
  return new_id[inst], np.asarray(cls_of, np.int32)[keep]


def apply_confidence_filter(inst, cls_of, probs, spec: EventSpec):
  """(instances, class per id) without the ids below the spec's confidence filter."""
  keep = confident(cls_of, *event_confidence(inst, cls_of, probs, spec),
                   spec.min_probability, spec.min_volume_um2_ms)
  return renumber(inst, cls_of, keep)


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
        ts = np.nonzero(np.any(m, axis=(1, 2)))[0]
        sub = (slice(sl[0].start + ts[0], sl[0].start + ts[-1] + 1),) + sl[1:]
        if not _keep(c, sub, m[ts[0]:ts[-1] + 1], spec):
          continue
        cls_of.append(c)
        region = inst[sl]
        region[m] = len(cls_of) - 1
  cls_of = np.asarray(cls_of, np.int32)
  if probs is None:
    return inst, cls_of
  return apply_confidence_filter(inst, cls_of, probs, spec)


def describe(inst, cls_of, dff, spec: EventSpec) -> list[Event]:
  """One :class:`Event` per instance id (properties documented in predict.py)."""
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
        amplitude=amp, num_voxels=int(m.sum())))
  return out


def extract_unfiltered(probs, movie, spec: EventSpec):
  """Steps 1-4 (no confidence filter): (classes [T, H, W] uint8, instances [T, H, W]
  int32, class per id, dF/F0 [T, H, W] or None without a movie)."""
  probs = np.asarray(probs)
  classes = np.argmax(probs, axis=-1).astype(np.uint8)
  dff = estimate_dff(movie, classes, spec) if movie is not None else None
  inst, cls_of = instances_from_classes(classes, spec, dff)
  return classes, inst, cls_of, dff


def extract_events(probs, movie, spec: EventSpec):
  """(classes [T, H, W] uint8, instances [T, H, W] int32, class per id, events,
  dF/F0 [T, H, W]) from probabilities [T, H, W, 4] and the movie [T, H, W] (any
  linear intensity scale)."""
  classes, inst, cls_of, dff = extract_unfiltered(probs, movie, spec)
  inst, cls_of = apply_confidence_filter(inst, cls_of, probs, spec)
  return classes, inst, cls_of, describe(inst, cls_of, dff, spec), dff


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
    ts = np.nonzero(np.any(m, axis=(1, 2)))[0]
    sub = (slice(ts[0], ts[-1] + 1),) + sl[1:]
    if not _keep(int(cls_of[i]), sub, m[ts[0]:ts[-1] + 1], spec):
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


# --------------------------------------------------------------------------- matching
def _greedy(pairs, scores, threshold):
  """One-to-one matches among candidate (true, pred) pairs, highest score first."""
  order = np.argsort(-scores, kind="stable")
  used_t, used_p, out = set(), set(), []
  for k in order:
    if scores[k] < threshold:
      break
    t, p = int(pairs[k, 0]), int(pairs[k, 1])
    if t in used_t or p in used_p:
      continue
    used_t.add(t)
    used_p.add(p)
    out.append((t, p))
  return out


def overlaps(true_inst, true_cls, pred_inst, pred_cls, ignore, threshold: float = 0.5):
  """(scored true ids, scored predicted ids, overlapping (true, pred) id pairs [P, 2],
  their IoMin [P]) of one movie, ignore voxels removed (see the module doc). A
  prediction is not scored when it has no voxel outside ignore, or when it reaches
  IoMin >= ``threshold`` with no true event (of any class) and at least ``threshold``
  of its voxels are ignored (Dotti et al.'s "ignored" predictions: e.g. an event in
  the unannotated frames at the movie's ends)."""
  ignore = np.asarray(ignore, bool)
  valid = ~ignore
  pred_inst = np.asarray(pred_inst)
  t = np.asarray(true_inst)[valid].astype(np.int64)
  p = pred_inst[valid].astype(np.int64)
  size_t = np.bincount(t, minlength=len(true_cls))
  size_p = np.bincount(p, minlength=len(pred_cls))
  size_all = np.bincount(pred_inst.ravel().astype(np.int64), minlength=len(pred_cls))
  true_ids = [i for i in range(1, len(true_cls)) if size_t[i] > 0]
  both = (t > 0) & (p > 0)
  codes, inter = np.unique(t[both] * len(pred_cls) + p[both], return_counts=True)
  pairs = np.stack([codes // len(pred_cls), codes % len(pred_cls)], 1).reshape(-1, 2)
  iomin = inter / np.maximum(np.minimum(size_t[pairs[:, 0]], size_p[pairs[:, 1]]), 1)
  matchable = np.zeros(len(pred_cls), bool)
  matchable[pairs[iomin >= threshold, 1]] = True
  ignored = (size_all - size_p) >= threshold * np.maximum(size_all, 1)
  pred_ids = [i for i in range(1, len(pred_cls))
              if size_p[i] > 0 and (matchable[i] or not ignored[i])]
  return true_ids, pred_ids, pairs, iomin


def match_events(true_inst, true_cls, pred_inst, pred_cls, ignore, threshold: float = 0.5):
  """IoMin matching of one movie (see the module doc).

  Returns a dict: 'counts' {class: (tp, fp, fn)}, 'confusion' [4, 4] int,
  'true_matched' {id: bool}, 'pred_matched' {id: bool} (class-aware matching),
  'true_ids' / 'pred_ids' (scored ids).
  """
  true_ids, pred_ids, pairs, iomin = overlaps(true_inst, true_cls, pred_inst, pred_cls,
                                              ignore, threshold)
  return match_pairs(true_ids, true_cls, pred_ids, pred_cls, pairs, iomin, threshold)


def match_pairs(true_ids, true_cls, pred_ids, pred_cls, pairs, iomin, threshold: float = 0.5):
  """:func:`match_events` from :func:`overlaps`' result (any subset of the predicted
  ids with the pairs that involve them: how a confidence filter is applied after one
  extraction)."""
  true_cls, pred_cls = np.asarray(true_cls), np.asarray(pred_cls)
  same = true_cls[pairs[:, 0]] == pred_cls[pairs[:, 1]]
  aware = _greedy(pairs[same], iomin[same], threshold)
  true_matched = {int(i): False for i in true_ids}
  pred_matched = {int(i): False for i in pred_ids}
  for a, b in aware:
    true_matched[a] = pred_matched[b] = True
  counts = {}
  for c in EVENT_CLASSES:
    tp = sum(1 for a, _ in aware if true_cls[a] == c)
    n_t = sum(1 for i in true_ids if true_cls[i] == c)
    n_p = sum(1 for i in pred_ids if pred_cls[i] == c)
    counts[c] = (tp, n_p - tp, n_t - tp)
  confusion = np.zeros((4, 4), np.int64)
  blind = _greedy(pairs, iomin, threshold)
  mt, mp = {a for a, _ in blind}, {b for _, b in blind}
  for a, b in blind:
    confusion[true_cls[a], pred_cls[b]] += 1
  for i in true_ids:
    if i not in mt:
      confusion[true_cls[i], 0] += 1
  for i in pred_ids:
    if i not in mp:
      confusion[0, pred_cls[i]] += 1
  return {"counts": counts, "confusion": confusion, "true_matched": true_matched,
          "pred_matched": pred_matched, "true_ids": [int(i) for i in true_ids],
          "pred_ids": [int(i) for i in pred_ids]}


def prf(tp, fp, fn):
  precision = tp / (tp + fp) if tp + fp else float("nan")
  recall = tp / (tp + fn) if tp + fn else float("nan")
  f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
  return precision, recall, f1


@dataclasses.dataclass
class MovieRecord:
  """One scored movie, extracted once with the confidence filter off: what matching
  needs under any filter. Predicted ids are those of the unfiltered extraction."""
  true_ids: np.ndarray      # scored true ids
  true_cls: np.ndarray      # class per true id (index 0 unused)
  true_amp: np.ndarray      # true peak dF/F0 per true id (nan if unknown)
  cls: np.ndarray           # class per predicted id (index 0 unused)
  pmean: np.ndarray         # mean own-class probability per predicted id
  volume: np.ndarray        # um^2 ms per predicted id
  amp: np.ndarray           # estimated peak dF/F0 per predicted id
  scored: np.ndarray        # bool per predicted id (see overlaps)
  pairs: np.ndarray         # (true, pred) id pairs with IoMin >= the threshold [P, 2]
  iomin: np.ndarray         # [P]

  def n_true(self, cls: int) -> int:
    return int(np.sum(self.true_cls[self.true_ids] == cls))

  def match(self, keep, threshold: float) -> dict:
    """:func:`match_pairs` of the predicted ids where ``keep`` (bool per id) is True."""
    pred_ids = np.nonzero(self.scored & keep)[0]
    sel = keep[self.pairs[:, 1]]
    return match_pairs(self.true_ids, self.true_cls, pred_ids, self.cls, self.pairs[sel],
                       self.iomin[sel], threshold)


class Scorer:
  """Accumulates movies (:meth:`add`: one extraction each, with the confidence filter
  off); :meth:`metrics` scores them under the spec's filter or any other, and
  :func:`choose_filter` picks one from the same :attr:`records`."""

  def __init__(self, spec: EventSpec):
    self.spec = spec
    self.records: list[MovieRecord] = []
    self.inter = np.zeros(4)
    self.union = np.zeros(4)

  def add(self, probs, movie, labels, true_inst, true_cls, true_amplitude=None) -> MovieRecord:
    """One movie: probabilities [T, H, W, 4], movie [T, H, W], labels, true
    instances, class per true id, optional true peak dF/F0 per true id."""
    spec = self.spec
    classes, inst, cls_of, dff = extract_unfiltered(probs, movie, spec)
    pmean, volume = event_confidence(inst, cls_of, probs, spec)
    amp = np.full(len(cls_of), np.nan)
    for e in describe(inst, cls_of, dff, spec):
      amp[e.event_id] = e.amplitude
    ignore = filter_true_instances(labels, true_inst, true_cls, spec)
    true_ids, pred_ids, pairs, iomin = overlaps(true_inst, true_cls, inst, cls_of, ignore,
                                                spec.iomin_threshold)
    scored = np.zeros(len(cls_of), bool)
    scored[pred_ids] = True
    sel = iomin >= spec.iomin_threshold
    true_cls = np.asarray(true_cls, np.int64)
    true_amp = (np.full(len(true_cls), np.nan) if true_amplitude is None
                else np.asarray(true_amplitude, np.float64))
    rec = MovieRecord(np.asarray(true_ids, np.int64), true_cls, true_amp,
                      np.asarray(cls_of), pmean, volume, amp, scored, pairs[sel], iomin[sel])
    self.records.append(rec)
    valid = np.asarray(labels) != IGNORE
    for c in range(4):
      a, b = (classes == c) & valid, (np.asarray(labels) == c)
      self.inter[c] += np.sum(a & b)
      self.union[c] += np.sum(a | b)
    return rec

  def metrics(self, chosen: dict | None = None) -> dict:
    """Per-class P / R / F1 / counts, voxel IoU, confusion and F1 vs amplitude under the
    confidence filter ``chosen`` ({'min_probability', 'min_volume_um2_ms'}, per class)
    or, by default, the spec's."""
    f = chosen or {"min_probability": self.spec.min_probability,
                   "min_volume_um2_ms": self.spec.min_volume_um2_ms}
    counts = {c: np.zeros(3, np.int64) for c in EVENT_CLASSES}
    confusion = np.zeros((4, 4), np.int64)
    amp_rows = []            # (class, amplitude, tp, fp, fn) per scored event
    for rec in self.records:
      keep = confident(rec.cls, rec.pmean, rec.volume, f["min_probability"],
                       f["min_volume_um2_ms"])
      m = rec.match(keep, self.spec.iomin_threshold)
      for c in EVENT_CLASSES:
        counts[c] += np.asarray(m["counts"][c])
      confusion += m["confusion"]
      for i, ok in m["true_matched"].items():
        amp_rows.append((int(rec.true_cls[i]), float(rec.true_amp[i]), int(ok), 0, int(not ok)))
      for i, ok in m["pred_matched"].items():
        if not ok:
          amp_rows.append((int(rec.cls[i]), float(rec.amp[i]), 0, 1, 0))
    out = {}
    for c in EVENT_CLASSES:
      tp, fp, fn = (int(v) for v in counts[c])
      p, r, f1 = prf(tp, fp, fn)
      out[NAMES[c]] = {"precision": p, "recall": r, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
    out["voxel_iou"] = {CLASS_NAMES[c]: float(self.inter[c] / self.union[c])
                        if self.union[c] else float("nan") for c in range(4)}
    out["confusion"] = confusion.tolist()
    out["f1_vs_amplitude"] = amplitude_table(amp_rows)
    return out


def amplitude_table(amp_rows, bins=AMPLITUDE_BINS) -> dict:
  """{class: [{lo, hi, n_true, tp, fp, fn, recall, f1}]} from rows (class, amplitude,
  tp, fp, fn) per scored event: true events binned by their true peak dF/F0, unmatched
  predictions by their estimated dF/F0."""
  rows = np.asarray(amp_rows, np.float64).reshape(-1, 5)
  table = {}
  for c in EVENT_CLASSES:
    r = rows[rows[:, 0] == c]
    out = []
    for lo, hi in zip(bins[:-1], bins[1:]):
      sel = r[(r[:, 1] >= lo) & (r[:, 1] < hi)]
      tp, fp, fn = (int(sel[:, k].sum()) for k in (2, 3, 4))
      if tp + fp + fn == 0:
        continue
      p, rec, f = prf(tp, fp, fn)
      out.append({"lo": lo, "hi": hi, "n_true": tp + fn, "tp": tp, "fp": fp, "fn": fn,
                  "recall": rec, "f1": f})
    table[NAMES[c]] = out
  return table


def simulated_scorer(probs, data, spec: EventSpec) -> Scorer:
  """A :class:`Scorer` holding the movies of a simulated set (``SparksTask.simulate_set``)
  with probabilities [N, T, H, W, 4]."""
  scorer = Scorer(spec)
  for i in range(len(probs)):
    kind = np.concatenate([[0], np.asarray(data["kind"][i])])
    amp = np.concatenate([[np.nan], np.asarray(data["amplitude"][i])])
    scorer.add(probs[i], data["x"][i, ..., 0], data["labels"][i], data["instances"][i],
               kind, amp)
  return scorer


# --------------------------------------------------------------------------- tuning
# The confidence filter (step 5 of the module doc) is chosen per class on simulated
# validation movies (:func:`choose_filter`): every mean-probability threshold of
# PROBABILITY_GRID (0 = off) with every volume floor of VOLUME_GRID_UM2_MS.
PROBABILITY_GRID = (0.0,) + tuple(round(0.30 + 0.02 * i, 2) for i in range(31))
VOLUME_GRID_UM2_MS = (0.0, 100.0, 200.0, 400.0, 800.0)
FILTER_FILE = "events_filter.json"


def filter_counts(records, cls: int, min_probability: float, min_volume: float):
  """(TP, FP, FN) of class ``cls`` over :class:`MovieRecord` s when its predictions
  need mean probability >= min_probability and volume >= min_volume (the class-``cls``
  part of :meth:`Scorer.metrics`, fast enough for a grid)."""
  tp = fp = fn = 0
  for d in records:
    keep = ((d.cls == cls) & (d.pmean >= min_probability - 1e-9)
            & (d.volume >= min_volume - 1e-9))
    same = (d.true_cls[d.pairs[:, 0]] == cls) & keep[d.pairs[:, 1]]
    m = len(_greedy(d.pairs[same], d.iomin[same], -1.0))
    n_p = int(np.sum(keep & d.scored))
    tp, fp, fn = tp + m, fp + n_p - m, fn + d.n_true(cls) - m
  return tp, fp, fn


def choose_filter(records, classes=EVENT_CLASSES) -> dict:
  """Per class, the (min_probability, min_volume_um2_ms) of the grids with the highest
  event F1 over the movies' records (:attr:`Scorer.records`; ties: the weakest
  filter). Returns
  {'min_probability': (spark, wave, puff), 'min_volume_um2_ms': (...),
  'f1' / 'precision' / 'recall' / 'tp' / 'fp' / 'fn': {name: ...}, 'unfiltered_f1'}."""
  out = {"min_probability": [0.0] * 3, "min_volume_um2_ms": [0.0] * 3}
  stats = {k: {} for k in ("f1", "precision", "recall", "tp", "fp", "fn", "unfiltered_f1")}
  for c in classes:
    best = None
    for v in VOLUME_GRID_UM2_MS:
      for p in PROBABILITY_GRID:
        tp, fp, fn = filter_counts(records, c, p, v)
        f1 = prf(tp, fp, fn)[2]
        f1 = -1.0 if math.isnan(f1) else f1
        if best is None:
          stats["unfiltered_f1"][NAMES[c]] = f1
        if best is None or f1 > best[0] + 1e-12:
          best = (f1, p, v, tp, fp, fn)
    f1, p, v, tp, fp, fn = best
    out["min_probability"][c - 1], out["min_volume_um2_ms"][c - 1] = p, v
    pr, rc, _ = prf(tp, fp, fn)
    for k, val in zip(("f1", "precision", "recall", "tp", "fp", "fn"), (f1, pr, rc, tp, fp, fn)):
      stats[k][NAMES[c]] = val
  out["min_probability"] = tuple(out["min_probability"])
  out["min_volume_um2_ms"] = tuple(out["min_volume_um2_ms"])
  out.update(stats)
  return out


def tune_simulated(probs, data, spec: EventSpec) -> dict:
  """:func:`choose_filter` on a simulated set (``SparksTask.simulate_set``)."""
  return choose_filter(simulated_scorer(probs, data, spec).records)


def save_filter(workdir: str, chosen: dict, step: int, seed: int, num_movies: int) -> dict:
  """Writes a :func:`choose_filter` result with where it was chosen as the run's
  FILTER_FILE (atomically); returns the record."""
  from smlm_jax.core import cli
  record = dict(chosen, step=int(step), seed=int(seed), num_movies=int(num_movies))
  cli.atomic_write_text(os.path.join(workdir, FILTER_FILE),
                        json.dumps(record, indent=1, default=float))
  return record


def load_filter(workdir: str):
  """The confidence filter a run chose on its validation movies (FILTER_FILE written
  after training), or None for runs trained without it."""
  path = os.path.join(workdir, FILTER_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def use_run_filter(config, workdir: str) -> str:
  """Sets ``config.events.min_probability`` / ``min_volume_um2_ms`` to the run's tuned
  filter when it has one; returns a line saying which filter is used."""
  chosen = load_filter(workdir)
  ev = config.events
  if chosen is not None:
    ev.min_probability = tuple(float(v) for v in chosen["min_probability"])
    ev.min_volume_um2_ms = tuple(float(v) for v in chosen["min_volume_um2_ms"])
    source = (f"chosen on {chosen.get('num_movies', '?')} validation movies (seed "
              f"{chosen.get('seed', '?')}, step {chosen.get('step', '?')}; {FILTER_FILE})")
  else:
    source = "from the run's config"
  mp = tuple(ev.get("min_probability", (0.0,) * 3))
  mv = tuple(ev.get("min_volume_um2_ms", (0.0,) * 3))
  return (f"confidence filter (spark, wave, puff): mean probability >= {mp}, volume >= "
          f"{mv} um^2 ms, {source}")


def flat_metrics(metrics: dict) -> dict:
  out = {}
  for name in NAMES.values():
    if name in metrics:
      for k in ("precision", "recall", "f1"):
        out[f"{name}/{k}"] = metrics[name][k]
  for k, v in metrics.get("voxel_iou", {}).items():
    out[f"voxel_iou/{k}"] = v
  return out


def summary_table(metrics: dict, title: str = "") -> str:
  lines = [title] if title else []
  lines.append(f"{'class':<8} {'precision':>9} {'recall':>7} {'F1':>6} {'TP':>5} {'FP':>5} "
               f"{'FN':>5} {'voxel IoU':>9}")
  for name in NAMES.values():
    m = metrics[name]
    iou = metrics.get("voxel_iou", {}).get(name, float("nan"))
    lines.append(f"{name:<8} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['f1']:>6.3f} "
                 f"{m['tp']:>5d} {m['fp']:>5d} {m['fn']:>5d} {iou:>9.3f}")
  if "confusion" in metrics:
    lines.append(confusion_table(metrics["confusion"]))
  return "\n".join(lines)


def confusion_table(confusion) -> str:
  conf = np.asarray(confusion)
  heads = ["(none)", "spark", "wave", "puff"]
  lines = ["confusion (rows: true, columns: predicted; (none) = unmatched)",
           f"{'':<8}" + "".join(f"{h:>8}" for h in heads)]
  for i, h in enumerate(heads):
    lines.append(f"{h:<8}" + "".join(f"{int(v):>8d}" if not (i == 0 and j == 0) else f"{'':>8}"
                                     for j, v in enumerate(conf[i])))
  return "\n".join(lines)


def amplitude_table_text(table: dict) -> str:
  lines = [f"{'class':<6} {'dF/F0 bin':>11} {'n_true':>6} {'TP':>4} {'FP':>4} {'FN':>4} "
           f"{'recall':>6} {'F1':>6}"]
  for name, rows in table.items():
    for r in rows:
      hi = f"{r['hi']:.2f}" if r["hi"] < 10 else "inf"
      lines.append(f"{name:<6} {r['lo']:>5.2f}-{hi:<5} {r['n_true']:>6d} {r['tp']:>4d} "
                   f"{r['fp']:>4d} {r['fn']:>4d} {r['recall']:>6.2f} {r['f1']:>6.2f}")
  return "\n".join(lines)
