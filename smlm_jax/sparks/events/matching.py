"""IoMin matching of true and predicted events, and precision / recall / F1.

Matching (:func:`match_events`): voxels labelled ignore are removed from both sides;
an instance left with no voxel is not scored; IoMin(p, g) = |p & g| / min(|p|, |g|)
(Dotti et al.); a prediction that reaches IoMin >= ``iomin_threshold`` with no true
event and has at least that fraction of its voxels in ignore is not scored either
(their "ignored" predictions: e.g. an event in the unannotated frames at the movie's
ends is neither a hit nor a false positive); pairs with IoMin >= ``iomin_threshold``
are matched one-to-one, greedily in decreasing IoMin (:func:`greedy`). Per class c, pairs of two class-c events are matched:
TP = matches, FP = unmatched predicted c, FN = unmatched true c; precision = TP / (TP
+ FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN). The confusion matrix
comes from a second, class-blind matching: entry [true class, predicted class], with
row/column 0 for unmatched predicted / true events. True events too small to be
found (below the minimum sizes after removing ignored voxels) are turned into ignore
(``extraction.filter_true_instances``).
"""
from __future__ import annotations

import numpy as np

from smlm_jax.sparks.simulator import EVENT_CLASSES


def greedy(pairs, scores, threshold):
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
  aware = greedy(pairs[same], iomin[same], threshold)
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
  blind = greedy(pairs, iomin, threshold)
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
