"""The confidence filter on predicted events (step 5 of the extraction, ``extraction``).

Components whose mean probability of their own class is below ``min_probability``, or
whose volume (voxels x pixel area x frame interval) is below ``min_volume_um2_ms``,
are dropped (per class). These apply to predictions only: unlike the minimum sizes
they say how sure the network is, not whether an event could be found at all, so true
events are never removed by them. They depend on the trained network, so training
chooses them per class on its validation movies (``tuning``).
"""
from __future__ import annotations

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
