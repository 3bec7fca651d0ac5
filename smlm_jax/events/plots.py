"""Plots of real vs. simulated crops: statistics (calibration, domain gap), patches."""
from __future__ import annotations

import numpy as np

from smlm_jax.core import plotting


def plot_statistics(statistics: dict, path: str, title: str = "") -> str:
  """One panel per statistic: its quantiles (x: 0.1 ... 0.9) for each set
  (``{name: {set: [quantiles]}}``, e.g. real / initial / calibrated)."""
  plt = plotting.pyplot()
  names = list(statistics)
  cols = 6
  rows = int(np.ceil(len(names) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.4 * rows), squeeze=False)
  styles = {"real": "k-o", "initial": "r--", "calibrated": "b-", "simulated": "r--"}
  for ax, name in zip(axes.ravel(), names):
    for label, q in statistics[name].items():
      ax.plot(np.linspace(0.1, 0.9, len(q)), q, styles.get(label, "g-"), label=label, ms=3)
    ax.set_title(name, fontsize=9)
  for ax in axes.ravel()[len(names):]:
    ax.axis("off")
  axes.ravel()[0].legend(fontsize=7)
  if title:
    fig.suptitle(title)
  return plotting.save(fig, path)


def plot_patches(sets: dict, path: str, per_set: int = 8, title: str = "") -> str:
  """Rows of patches (the current frame of windows [N, n, S, S], each shown with its
  1-99.8 percentile range), one row per named set."""
  plt = plotting.pyplot()
  fig, axes = plt.subplots(len(sets), per_set, figsize=(1.6 * per_set, 1.7 * len(sets)),
                           squeeze=False)
  for row, (name, windows) in zip(axes, sets.items()):
    for i, ax in enumerate(row):
      ax.axis("off")
      if i < len(windows):
        img = np.asarray(windows[i][-1])
        lo, hi = plotting.percentile_limits(img)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
    row[0].set_title(name, fontsize=9, loc="left")
  if title:
    fig.suptitle(title)
  return plotting.save(fig, path)
