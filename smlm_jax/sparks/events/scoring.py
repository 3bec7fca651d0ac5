"""Scoring sets of movies: :class:`Scorer` extracts each movie once with the confidence
filter off and keeps what matching needs (:class:`MovieRecord`), so the metrics (per


class P / R / F1, voxel IoU, confusion, F1 vs. amplitude) can be computed under any
filter; plus the metrics' text tables."""
from __future__ import annotations

import dataclasses

import numpy as np

from smlm_jax.sparks.events.confidence import confident, event_confidence, event_snr
from smlm_jax.sparks.events.extraction import (describe, extract_unfiltered,
                                               filter_true_instances)
from smlm_jax.sparks.events.matching import match_pairs, overlaps, prf
from smlm_jax.sparks.events.spec import NAMES, EventSpec
from smlm_jax.sparks.simulator import CLASS_NAMES, EVENT_CLASSES, IGNORE

AMPLITUDE_BINS = (0.0, 0.3, 0.45, 0.6, 0.8, 1.0, 1.25, 1.5, 10.0)


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
  snr: np.ndarray           # peak dF/F0 over the movie's noise per predicted id
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
    snr = event_snr(inst, cls_of, dff, spec)
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
                      np.asarray(cls_of), pmean, volume, amp, snr,
                      scored, pairs[sel], iomin[sel])
    self.records.append(rec)
    valid = np.asarray(labels) != IGNORE
    for c in range(4):
      a, b = (classes == c) & valid, (np.asarray(labels) == c)
      self.inter[c] += np.sum(a & b)
      self.union[c] += np.sum(a | b)
    return rec

  def metrics(self, chosen: dict | None = None) -> dict:
    """Per-class P / R / F1 / counts, voxel IoU, confusion and F1 vs amplitude under the
    confidence filter ``chosen`` ({'min_probability', 'min_volume_um2_ms',
    'min_amplitude_dff', 'min_snr'}, per class; a missing amplitude or SNR floor is off)
    or, by default, the spec's; the volume ceiling (``max_volume_um2_ms``, fixed by the
    config, not chosen) is the spec's unless ``chosen`` names one."""
    f = chosen or {"min_probability": self.spec.min_probability,
                   "min_volume_um2_ms": self.spec.min_volume_um2_ms,
                   "min_amplitude_dff": self.spec.min_amplitude_dff,
                   "min_snr": self.spec.min_snr}
    counts = {c: np.zeros(3, np.int64) for c in EVENT_CLASSES}
    confusion = np.zeros((4, 4), np.int64)
    amp_rows = []            # (class, amplitude, tp, fp, fn) per scored event
    for rec in self.records:
      keep = confident(rec.cls, rec.pmean, rec.volume, f["min_probability"],
                       f["min_volume_um2_ms"], rec.amp,
                       f.get("min_amplitude_dff", (0.0,) * 3), rec.snr,
                       f.get("min_snr", (0.0,) * 3),
                       f.get("max_volume_um2_ms", self.spec.max_volume_um2_ms))
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
