"""Detection metrics over a threshold sweep, detections (local maxima + NMS), plots.

Event level (per crop, i.e. per predicted frame): the true sites of a crop are the peaks
of its ground truth (:func:`smlm_jax.events.crops.find_peaks`). At threshold thr, a
site is a true positive when the probability reaches thr anywhere within ``radius_px``
of it, else a false negative; the crop counts one false positive when the probability
reaches thr anywhere farther than ``radius_px`` from every site (in a crop without
events: anywhere). So a crop with an event and one spurious blob elsewhere is a TP and
an FP. Pixel level: ground-truth pixels >= 0.5 are positive; prediction >= thr.

  precision P = TP / (TP + FP)  (1 when nothing is predicted)
  recall    R = TP / (TP + FN)
  F_beta      = (1 + beta^2) P R / (beta^2 P + R)
beta = 0.1 weighs precision 100 times as much as recall (van Rijsbergen 1979: F_beta
values recall beta times as much as precision), deep-events' choice: a false alarm
costs a triggered acquisition (light dose), a missed event only one example. The
operating threshold maximizes event-level F_beta; on a plateau of equal values the
middle of the plateau is taken (the most margin on both sides).
"""
from __future__ import annotations

import numpy as np

THRESHOLDS = np.round(np.linspace(0.01, 0.99, 99), 2)
PIXEL_POSITIVE = 0.5


def fbeta(precision, recall, beta: float):
  p, r = np.asarray(precision, np.float64), np.asarray(recall, np.float64)
  den = beta ** 2 * p + r
  return np.where(den > 0, (1 + beta ** 2) * p * r / np.where(den > 0, den, 1.0), 0.0)


def _rates(tp, fp, fn, beta):
  tp, fp, fn = (np.asarray(a, np.float64) for a in (tp, fp, fn))
  precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-12), 1.0)
  recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1e-12), 0.0)
  return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall,
          "f1": fbeta(precision, recall, 1.0), "fbeta": fbeta(precision, recall, beta)}


def disk_masks(shape, sites, radius_px: float):
  """[k, H, W] bool: pixels within radius of each site (y, x)."""
  y = np.arange(shape[0])[:, None]
  x = np.arange(shape[1])[None, :]
  return np.array([(y - sy) ** 2 + (x - sx) ** 2 <= radius_px ** 2 for sy, sx in sites],
                  bool).reshape(len(sites), *shape)


def clear_edge(prob: np.ndarray, edge_px: float) -> np.ndarray:
  """A copy of the map [H, W] with the band of pixels closer than ``edge_px`` to the
  border (pixel centres at integers: indices < ceil(edge_px) from either end) set to 0.
  The simulator never places a division site there (``sim.margin_px``), so the
  network's output in that band was never trained on a positive: detections are not
  taken there. ``edge_px`` <= 0: the map unchanged."""
  e = int(np.ceil(edge_px)) if edge_px > 0 else 0
  prob = np.array(prob, copy=True)
  if e:
    prob[:e] = 0
    prob[-e:] = 0
    prob[:, :e] = 0
    prob[:, -e:] = 0
  return prob


def crop_summary(prob: np.ndarray, sites, radius_px: float):
  """(max probability near each site [k], max probability away from all sites)."""
  masks = disk_masks(prob.shape, sites, radius_px)
  near = np.array([prob[m].max() if m.any() else 0.0 for m in masks])
  away = ~masks.any(axis=0) if len(sites) else np.ones(prob.shape, bool)
  return near, (float(prob[away].max()) if away.any() else 0.0)


def event_sweep(summaries, beta: float = 0.1, thresholds=THRESHOLDS) -> dict:
  """Counts and rates at every threshold from crop summaries [(near [k], away)]."""
  thr = np.asarray(thresholds)[:, None]
  near = np.concatenate([np.asarray(n, np.float64).ravel() for n, _ in summaries] or [[]])
  away = np.array([a for _, a in summaries], np.float64)
  tp = (near[None, :] >= thr).sum(1)
  fn = (near[None, :] < thr).sum(1)
  fp = (away[None, :] >= thr).sum(1)
  return {"thresholds": np.asarray(thresholds), **_rates(tp, fp, fn, beta)}


class PixelCounter:
  """Streaming pixel-level counts: histograms of the probability of positive and
  negative pixels (1000 bins), so large evaluations need no memory."""

  def __init__(self, bins: int = 1000):
    self.edges = np.linspace(0.0, 1.0, bins + 1)
    self.pos = np.zeros(bins, np.int64)
    self.neg = np.zeros(bins, np.int64)

  def add(self, prob, truth, positive: float = PIXEL_POSITIVE):
    prob, truth = np.asarray(prob, np.float64).ravel(), np.asarray(truth).ravel()
    is_pos = truth >= positive
    self.pos += np.histogram(prob[is_pos], self.edges)[0]
    self.neg += np.histogram(prob[~is_pos], self.edges)[0]

  def sweep(self, beta: float = 0.1, thresholds=THRESHOLDS) -> dict:
    idx = np.searchsorted(self.edges[:-1], np.asarray(thresholds) - 1e-9)
    above_pos = np.cumsum(self.pos[::-1])[::-1]
    above_neg = np.cumsum(self.neg[::-1])[::-1]
    tp, fp = above_pos[idx], above_neg[idx]
    return {"thresholds": np.asarray(thresholds),
            **_rates(tp, fp, self.pos.sum() - tp, beta)}


def best_index(values) -> int:
  """Index in the middle of the plateau of the (first) maximum."""
  values = np.asarray(values)
  i = int(np.argmax(values))
  j = i
  while j + 1 < len(values) and np.isclose(values[j + 1], values[i], rtol=0, atol=1e-12):
    j += 1
  return (i + j) // 2


def at(sweep: dict, i: int) -> dict:
  """Scalars of a sweep at index i."""
  keys = ("thresholds", "precision", "recall", "f1", "fbeta", "tp", "fp", "fn")
  out = {k: float(sweep[k][i]) for k in keys}
  out["threshold"] = out.pop("thresholds")
  return out


def summarize(sweep: dict, threshold: float | None = None) -> dict:
  """Metrics at the F_beta-optimal threshold (or a given one) and the best F1."""
  thr = sweep["thresholds"]
  i = best_index(sweep["fbeta"]) if threshold is None else int(np.argmin(np.abs(thr - threshold)))
  out = at(sweep, i)
  out["best_f1"] = float(np.max(sweep["f1"]))
  out["best_f1_threshold"] = float(thr[best_index(sweep["f1"])])
  return out


# ----------------------------------------------------------------------- detections
def detect(prob: np.ndarray, threshold: float, radius_px: float):
  """[(y, x, score)] local maxima of prob >= threshold, highest first, none closer
  than radius_px to a higher one (greedy non-maximum suppression)."""
  from scipy import ndimage
  prob = np.asarray(prob, np.float32)
  r = max(1, int(np.ceil(radius_px)))
  peaks = (prob >= threshold) & (prob == ndimage.maximum_filter(prob, size=2 * r + 1,
                                                                 mode="constant"))
  ys, xs = np.nonzero(peaks)
  order = np.argsort(-prob[ys, xs], kind="stable")
  kept = []
  for i in order:
    if all((ys[i] - y) ** 2 + (xs[i] - x) ** 2 > radius_px ** 2 for y, x, _ in kept):
      kept.append((int(ys[i]), int(xs[i]), float(prob[ys[i], xs[i]])))
  return kept


def temporal_mean(maps, half_width: int):
  """Yields, for each map t of ``maps`` (an iterable of [H, W] arrays, streamed), the mean
  of maps t - half_width .. t + half_width (those that exist: fewer at the ends).
  A division site persists over several frames at nearly the same place (5 s frames:
  the shared crops' annotated sites move by <= 4 px per frame), while a spurious
  maximum on a junction or a bright blob need not stay on top: averaging the maps
  rewards the persistent one. ``half_width`` 0 yields the maps unchanged."""
  k = int(half_width)
  if k < 0:
    raise ValueError(f"half_width must be >= 0, got {k}")
  if k == 0:
    yield from maps
    return
  buffer, t = [], 0                      # buffer: (index, map), indices t - k .. latest

  def mean_at(t):
    return np.mean([m for j, m in buffer if abs(j - t) <= k], axis=0)

  for j, m in enumerate(maps):
    buffer.append((j, np.asarray(m, np.float32)))
    if j >= t + k:                       # map t has all its neighbours
      yield mean_at(t)
      t += 1
      buffer = [(i, x) for i, x in buffer if i >= t - k]
  while buffer and t <= buffer[-1][0]:
    yield mean_at(t)
    t += 1


def localization_error(prob: np.ndarray, sites) -> float:
  """Distance (px) from the most probable pixel to the nearest true site (nan if none)."""
  if not len(sites):
    return float("nan")
  y, x = np.unravel_index(int(np.argmax(prob)), prob.shape)
  return float(min(np.hypot(y - sy, x - sx) for sy, sx in sites))


# ---------------------------------------------------------------------------- plots
def plot_curves(sweeps: dict, threshold: float, path: str, title: str = "") -> str:
  """PR curves (event and pixel level) and the event-level rates vs. threshold."""
  from smlm_jax.core import plotting
  plt = plotting.pyplot()
  fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 4))
  for name, sw in sweeps.items():
    a0.plot(sw["recall"], sw["precision"], marker=".", ms=3, label=name)
    i = int(np.argmin(np.abs(sw["thresholds"] - threshold)))
    a0.plot(sw["recall"][i], sw["precision"][i], "ko", mfc="none")
  a0.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
         title="precision-recall (o = chosen threshold)")
  a0.legend(fontsize=8)
  ev = next(iter(sweeps.values()))
  for k in ("precision", "recall", "f1", "fbeta"):
    a1.plot(ev["thresholds"], ev[k], label=k)
  a1.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:.2f}")
  a1.set(xlabel="threshold", ylim=(0, 1.02), title=f"{next(iter(sweeps))} vs. threshold")
  a1.legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  return plotting.save(fig, path)


def plot_examples(frames, probs, sites, threshold: float, radius_px: float, path: str,
                  titles=None) -> str:
  """Current frames with the probability contour at the threshold (red), true sites
  (green circles of the match radius) and detections (yellow x)."""
  from smlm_jax.core import plotting
  plt = plotting.pyplot()

  def overlay(prob, true_sites):
    def draw(ax):
      if prob.max() >= threshold:
        ax.contour(prob, levels=[threshold], colors="red", linewidths=0.8)
      for sy, sx in true_sites:
        ax.add_patch(plt.Circle((sx, sy), radius_px, fill=False, color="lime", lw=0.8))
      for y, x, _ in detect(prob, threshold, radius_px):
        ax.plot(x, y, "x", color="yellow", ms=6)
    return draw

  overlays = [overlay(p, s) for p, s in zip(probs, sites)]
  fig = plotting.image_grid(list(frames), titles, ncols=min(4, len(frames)),
                            overlays=overlays, panel_size=3.0,
                            suptitle=f"red: p >= {threshold:.2f}; green: true site "
                                     f"(r = {radius_px:g} px); yellow x: detection")
  return plotting.save(fig, path)
