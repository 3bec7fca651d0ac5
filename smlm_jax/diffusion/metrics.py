"""Accuracy metrics for D estimates (shared by training, evaluation and studies).

Predictions are Gaussian in ln D: mean ``m`` and log-variance ``lv``. The point
estimate is the median exp(m); the 68% interval is exp(m +- sqrt(exp(lv))).
"""
from __future__ import annotations


import numpy as np

DECADES = ((0.01, 0.1), (0.1, 1.0), (1.0, 10.0))


def point_and_interval(mean_lnD, log_var):
  mean_lnD, log_var = np.asarray(mean_lnD, np.float64), np.asarray(log_var, np.float64)
  sd = np.sqrt(np.exp(np.clip(log_var, -30, 30)))
  return np.exp(mean_lnD), np.exp(mean_lnD - sd), np.exp(mean_lnD + sd)


def relative_errors(D_true, D_pred):
  D_true, D_pred = np.asarray(D_true, np.float64), np.asarray(D_pred, np.float64)
  return (D_pred - D_true) / D_true


def d_metrics(D_true, mean_lnD, log_var) -> dict:
  """relative_rmse, median_relative_error, rmse_log10_D, coverage_68, per-decade RMSE."""
  D_true = np.asarray(D_true, np.float64)
  D_pred, lo, hi = point_and_interval(mean_lnD, log_var)
  rel = relative_errors(D_true, D_pred)
  out = {
      "n": int(D_true.size),
      "relative_rmse": float(np.sqrt(np.mean(rel**2))),
      "median_relative_error": float(np.median(np.abs(rel))),
      "rmse_log10_D": float(np.sqrt(np.mean((np.log10(D_pred) - np.log10(D_true)) ** 2))),
      "coverage_68": float(np.mean((D_true >= lo) & (D_true <= hi))),
      "relative_bias": float(np.mean(rel)),
      "per_decade": {},
  }
  for a, b in DECADES:
    m = (D_true >= a) & (D_true < b)
    if m.any():
      out["per_decade"][f"{a:g}-{b:g}"] = {
          "n": int(m.sum()), "relative_rmse": float(np.sqrt(np.mean(rel[m] ** 2))),
          "median_relative_error": float(np.median(np.abs(rel[m]))),
          "relative_bias": float(np.mean(rel[m]))}
  return out


def flat(metrics: dict) -> dict:
  """Flattens per-decade entries into 'name/decade' scalar keys (for logs)."""
  out = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
  for dec, vals in metrics.get("per_decade", {}).items():
    for k, v in vals.items():
      out[f"{k}/D_{dec}"] = v
  return out


def summary_table(metrics: dict, title: str = "") -> str:
  lines = [title] if title else []
  lines.append(f"{'D range (um^2/s)':<18} {'n':>6} {'rel. RMSE':>10} {'median |rel|':>13} "
               f"{'rel. bias':>10}")
  for dec, v in metrics.get("per_decade", {}).items():
    lines.append(f"{dec:<18} {v['n']:>6} {v['relative_rmse']:>10.3f} "
                 f"{v['median_relative_error']:>13.3f} {v['relative_bias']:>10.3f}")
  lines.append(f"{'all':<18} {metrics['n']:>6} {metrics['relative_rmse']:>10.3f} "
               f"{metrics['median_relative_error']:>13.3f} {metrics['relative_bias']:>10.3f}")
  lines.append(f"RMSE log10 D = {metrics['rmse_log10_D']:.3f}   68% interval coverage = "
               f"{metrics['coverage_68']:.3f}")
  return "\n".join(lines)


def spearman(a, b) -> float:
  """Spearman rank correlation (average ranks for ties)."""
  def ranks(v):
    v = np.asarray(v, dtype=float)
    order = np.argsort(v, kind="mergesort")
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    for value in np.unique(v[np.r_[False, np.diff(v[order]) == 0]] if len(v) else []):
      tie = v == value
      r[tie] = r[tie].mean()
    return r
  ra, rb = ranks(a), ranks(b)
  if ra.std() == 0 or rb.std() == 0:
    return float("nan")
  return float(np.corrcoef(ra, rb)[0, 1])
