"""Choosing the confidence filter (``confidence``) per class on validation movies, and
keeping it with the trained run (FILTER_FILE), where evaluate and predict read it."""
from __future__ import annotations

import json
import math
import os

import numpy as np

from smlm_jax.sparks.events.matching import greedy, prf
from smlm_jax.sparks.events.scoring import simulated_scorer
from smlm_jax.sparks.events.spec import NAMES, EventSpec
from smlm_jax.sparks.simulator import EVENT_CLASSES, PUFF

# The confidence filter (``confidence``) is chosen per class on simulated
# validation movies (:func:`choose_filter`): every mean-probability threshold of
# PROBABILITY_GRID (0 = off) with every volume floor of VOLUME_GRID_UM2_MS and every
# floor of the estimated peak dF/F0 of AMPLITUDE_GRID_DFF (smoothed movie: a puff of the
# prior's smallest dF/F0, 0.2, reads ~0.14-0.2 after the smoothing). A floor of the
# peak in units of the movie's noise (``min_snr``, ``confidence.event_snr``) can be
# searched as well (``choose_filter(floors=...)`` with SNR_FLOORS) but is not by
# default: it has not been validated on out-of-simulator movies yet.
PROBABILITY_GRID = (0.0,) + tuple(round(0.30 + 0.02 * i, 2) for i in range(31))
VOLUME_GRID_UM2_MS = (0.0, 100.0, 200.0, 400.0, 800.0)
AMPLITUDE_GRID_DFF = (0.0, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2)
FLOOR_GRID = tuple((a, 0.0) for a in AMPLITUDE_GRID_DFF)   # (amplitude, snr); 0 = off
SNR_FLOORS = tuple((0.0, s) for s in (3.0, 4.0, 5.0, 6.0, 8.0))
FILTER_FILE = "events_filter.json"


def filter_counts(records, cls: int, min_probability: float, min_volume: float,
                  min_amplitude: float = 0.0, min_snr: float = 0.0,
                  max_volume: float = 0.0):
  """(TP, FP, FN) of class ``cls`` over :class:`MovieRecord` s when its predictions
  need mean probability >= min_probability, volume >= min_volume (and <= max_volume
  unless it is 0), estimated peak dF/F0 >= min_amplitude and peak over the noise >=
  min_snr (the class-``cls`` part of :meth:`Scorer.metrics`, fast enough for a grid)."""
  tp = fp = fn = 0
  for d in records:
    keep = ((d.cls == cls) & (d.pmean >= min_probability - 1e-9)
            & (d.volume >= min_volume - 1e-9))
    if min_amplitude > 0:                  # 0: off (estimates can be negative)
      keep &= ~(d.amp < min_amplitude - 1e-9)
    if min_snr > 0:
      keep &= ~(d.snr < min_snr - 1e-9)
    if max_volume > 0:
      keep &= d.volume <= max_volume + 1e-9
    same = (d.true_cls[d.pairs[:, 0]] == cls) & keep[d.pairs[:, 1]]
    m = len(greedy(d.pairs[same], d.iomin[same], -1.0))
    n_p = int(np.sum(keep & d.scored))
    tp, fp, fn = tp + m, fp + n_p - m, fn + d.n_true(cls) - m
  return tp, fp, fn


def choose_filter(records, classes=EVENT_CLASSES, floors=FLOOR_GRID,
                  min_snr_fixed=(0.0, 0.0, 0.0),
                  max_volume_um2_ms=(0.0, 0.0, 0.0)) -> dict:
  """Per class, the (min_probability, min_volume_um2_ms, min_amplitude_dff, min_snr) of
  the grids with the highest event F1 over the movies' records (:attr:`Scorer.records`;
  ``floors``: the (amplitude, SNR) floor pairs to try, in order; ties: the weakest
  filter, the earlier floor; ``min_snr_fixed``: per class a floor on the peak over the
  noise that every candidate keeps, ``config.events.min_snr_fixed``;
  ``max_volume_um2_ms``: per class the volume ceiling every candidate keeps, 0 = none,
  ``config.events.max_volume_um2_ms``). Returns
  {'min_probability': (spark, wave, puff), 'min_volume_um2_ms': (...),
  'min_amplitude_dff': (...), 'min_snr': (...), 'max_volume_um2_ms': (...) (the ceiling
  it was chosen under, kept with it), 'f1' / 'precision' / 'recall' / 'tp' / 'fp' /
  'fn': {name: ...}, 'unfiltered_f1'}."""
  keys = ("min_probability", "min_volume_um2_ms", "min_amplitude_dff", "min_snr")
  out = {k: [0.0] * 3 for k in keys}
  stats = {k: {} for k in ("f1", "precision", "recall", "tp", "fp", "fn", "unfiltered_f1")}
  for c in classes:
    best = None
    stats["unfiltered_f1"][NAMES[c]] = _f1(filter_counts(records, c, 0.0, 0.0))
    for a, s in floors:
      s = max(float(s), float(min_snr_fixed[c - 1]))
      for v in VOLUME_GRID_UM2_MS:
        for p in PROBABILITY_GRID:
          tp, fp, fn = filter_counts(records, c, p, v, a, s, float(max_volume_um2_ms[c - 1]))
          f1 = _f1((tp, fp, fn))
          if best is None or f1 > best[0] + 1e-12:
            best = (f1, (p, v, a, s), tp, fp, fn)
    f1, chosen, tp, fp, fn = best
    for k, val in zip(keys, chosen):
      out[k][c - 1] = val
    pr, rc, _ = prf(tp, fp, fn)
    for k, val in zip(("f1", "precision", "recall", "tp", "fp", "fn"), (f1, pr, rc, tp, fp, fn)):
      stats[k][NAMES[c]] = val
  for k in keys:
    out[k] = tuple(out[k])
  out["max_volume_um2_ms"] = tuple(float(v) for v in max_volume_um2_ms)
  out.update(stats)
  return out


def _f1(counts) -> float:
  f1 = prf(*counts)[2]
  return -1.0 if math.isnan(f1) else f1


def filter_floors(snr_floor: bool = False) -> tuple:
  """The (amplitude, SNR) floor pairs :func:`choose_filter` tries: FLOOR_GRID, plus
  SNR_FLOORS with ``snr_floor`` (``config.events.tune_snr_floor``)."""
  return FLOOR_GRID + (SNR_FLOORS if snr_floor else ())


def choice_options(events_config, snr_floor: bool | None = None) -> dict:
  """The keyword arguments of :func:`choose_filter` that a run's ``config.events``
  sets: the floors to try (``tune_snr_floor``, or ``snr_floor`` when given),
  ``min_snr_fixed`` and ``max_volume_um2_ms`` (configs without the keys: the grid as
  before, no fixed floor, no ceiling)."""
  if snr_floor is None:
    snr_floor = bool(events_config.get("tune_snr_floor", False))
  return {"floors": filter_floors(snr_floor),
          "min_snr_fixed": tuple(events_config.get("min_snr_fixed", (0.0, 0.0, 0.0))),
          "max_volume_um2_ms": tuple(events_config.get("max_volume_um2_ms", (0.0, 0.0, 0.0)))}


def set_puff_ceiling(config, max_volume_um2_ms: float | None) -> None:
  """Sets the puff part of ``config.events.max_volume_um2_ms`` (0 = no ceiling; None:
  the run's own), e.g. for a trained run whose user's puffs are larger."""
  if max_volume_um2_ms is None:
    return
  if max_volume_um2_ms < 0:
    raise ValueError(f"a puff volume ceiling must be >= 0 (0 = none), got {max_volume_um2_ms}")
  cap = [float(v) for v in config.events.get("max_volume_um2_ms", (0.0,) * 3)]
  cap[PUFF - 1] = float(max_volume_um2_ms)
  config.events.max_volume_um2_ms = tuple(cap)


def tune_simulated(probs, data, spec: EventSpec, **options) -> dict:
  """:func:`choose_filter` on a simulated set (``SparksTask.simulate_set``); ``options``
  as :func:`choice_options` returns them."""
  return choose_filter(simulated_scorer(probs, data, spec).records, **options)


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


def use_run_filter(config, workdir: str, max_puff_volume_um2_ms: float | None = None) -> str:
  """Sets ``config.events.min_probability`` / ``min_volume_um2_ms`` /
  ``min_amplitude_dff`` / ``min_snr`` to the run's tuned filter when it has one (a
  filter chosen before the amplitude or SNR floor existed: that floor off), and
  ``max_volume_um2_ms`` to the ceiling it was chosen under (a filter file without one:
  the config's); ``max_puff_volume_um2_ms`` (a user's flag) then replaces the puff
  ceiling (:func:`set_puff_ceiling`). Returns a line saying which filter is used."""
  chosen = load_filter(workdir)
  ev = config.events
  if chosen is not None and "max_volume_um2_ms" in chosen:
    ev.max_volume_um2_ms = tuple(float(v) for v in chosen["max_volume_um2_ms"])
  set_puff_ceiling(config, max_puff_volume_um2_ms)
  if chosen is not None:
    ev.min_probability = tuple(float(v) for v in chosen["min_probability"])
    ev.min_volume_um2_ms = tuple(float(v) for v in chosen["min_volume_um2_ms"])
    ev.min_amplitude_dff = tuple(float(v) for v in chosen.get("min_amplitude_dff",
                                                              (0.0,) * 3))
    ev.min_snr = tuple(float(v) for v in chosen.get("min_snr", (0.0,) * 3))
    source = (f"chosen on {chosen.get('num_movies', '?')} validation movies (seed "
              f"{chosen.get('seed', '?')}, step {chosen.get('step', '?')}; {FILTER_FILE})")
  else:
    source = "from the run's config"
  mp = tuple(ev.get("min_probability", (0.0,) * 3))
  mv = tuple(ev.get("min_volume_um2_ms", (0.0,) * 3))
  ma = tuple(ev.get("min_amplitude_dff", (0.0,) * 3))
  ms = tuple(ev.get("min_snr", (0.0,) * 3))
  cap = tuple(ev.get("max_volume_um2_ms", (0.0,) * 3))
  capped = ("" if not any(v > 0 for v in cap) else
            f", volume <= {tuple(v if v > 0 else float('inf') for v in cap)} um^2 ms")
  return (f"confidence filter (spark, wave, puff): mean probability >= {mp}, volume >= "
          f"{mv} um^2 ms{capped}, estimated peak dF/F0 >= {ma}, peak / noise >= {ms}, "
          f"{source}")
