"""The confidence filter on predicted events (step 5 of the extraction, ``extraction``).

Components whose mean probability of their own class is below ``min_probability``,
whose volume (voxels x pixel area x frame interval) is below ``min_volume_um2_ms``, or
whose estimated peak dF/F0 (of the smoothed movie, ``extraction.estimate_dff``) is
below ``min_amplitude_dff``, are dropped (per class). These apply to predictions only: unlike the minimum sizes
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


def confident(cls_of, pmean, volume, min_probability, min_volume_um2_ms,
              amplitude=None, min_amplitude_dff=(0.0, 0.0, 0.0)):
  """Bool [N + 1]: ids that pass per-class thresholds (spark, wave, puff) of mean
  probability, volume and (when ``amplitude`` per id is given) estimated peak dF/F0;
  entry 0 (no event) is True. A floor of 0 is off; an unknown amplitude (nan) passes."""
  cls_of = np.asarray(cls_of)
  per_id = lambda v: np.concatenate([[0.0], np.asarray(v, np.float64)])[cls_of]
  keep = ((np.asarray(pmean) >= per_id(min_probability) - 1e-9)
          & (np.asarray(volume) >= per_id(min_volume_um2_ms) - 1e-9))
  if amplitude is not None:
    floor = per_id(min_amplitude_dff)
    keep &= ~((floor > 0) & (np.asarray(amplitude, np.float64) < floor - 1e-9))
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


def renumber(inst, cls_of, keep):
  """(instances, class per id) with the ids where ``keep`` is False removed and the
  others renumbered 1..K in their order."""
  keep = np.asarray(keep, bool)
  if keep.all():
    return inst, np.asarray(cls_of, np.int32)
  new_id = np.where(keep, np.cumsum(keep) - 1, 0).astype(np.int32)
  return new_id[inst], np.asarray(cls_of, np.int32)[keep]


def apply_confidence_filter(inst, cls_of, probs, spec: EventSpec, dff=None):
  """(instances, class per id) without the ids below the spec's confidence filter
  (the amplitude floor only with ``dff``)."""
  keep = confident(cls_of, *event_confidence(inst, cls_of, probs, spec),
                   spec.min_probability, spec.min_volume_um2_ms,
                   event_amplitude(inst, cls_of, dff), spec.min_amplitude_dff)
  return renumber(inst, cls_of, keep)
