"""The calibration figure: real vs. default vs. calibrated statistics, the photon
transfer fit of both camera models, and the loss during the fit."""
from __future__ import annotations

import numpy as np

from smlm_jax.diffusion.calibration.camera import CUMULANT_FACTORS, MODEL_LABELS
from smlm_jax.diffusion.calibration.statistics import STAT_NAMES


def plot_calibration(result: dict, path: str):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  d = result["_plot"]
  fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
  for k, ax in enumerate(axes.flat[:4]):
    real = d["real"][:, k]
    lo, hi = np.quantile(np.concatenate([real, d["sim_fitted"][:, k],
                                         d["sim_default"][:, k]]), [0.005, 0.995])
    bins = np.linspace(lo, hi, 31)
    ax.hist(real, bins, density=True, color="k", alpha=0.35, label="real (calibrated camera)")
    ax.hist(d["sim_default"][:, k], bins, density=True, histtype="step", lw=1.5,
            color="tab:red", label="simulation, training defaults")
    ax.hist(d["sim_fitted"][:, k], bins, density=True, histtype="step", lw=1.5,
            color="tab:blue", label="simulation, calibrated")
    ax.set(xlabel=STAT_NAMES[k], ylabel="density")
    if k == 0:
      ax.legend(fontsize=7)
  pt = d["pt"]
  ax = axes.flat[4]
  ax.plot(pt["movie_mean_adu"], pt["movie_k2"], "k.", ms=4, label="movies: variance")
  xs = np.linspace(pt["movie_mean_adu"].min(), pt["movie_mean_adu"].max(), 10)
  fits = result.get("camera_model_selection", {}).get("fits", {})
  for m, (o, g, s2) in pt["lines"].items():
    f2 = CUMULANT_FACTORS[m][0]
    style = "-" if m == result["camera_model"] else "--"
    ax.plot(xs, f2 * g * (xs - o) + max(s2, 0.0), style,
            label=f"{MODEL_LABELS[m]}: offset {o:.4g} ADU, gain {g:.3g} ADU/e-"
                  + (" (chosen)" if m == result["camera_model"] else "")
                  + (" (implausible)" if fits.get(m, {}).get("implausible") else ""))
  ax.set(xlabel="background mean (ADU)", ylabel="temporal variance (ADU$^2$)",
         title="photon transfer")
  ax.legend(fontsize=7)
  ax = axes.flat[5]
  ax.semilogy(d["history"])
  ax.set(xlabel="optax step", ylabel="distance", title="fit")
  fig.suptitle(
      f"{MODEL_LABELS[result['camera_model']]} | FWHM {result['psf_fwhm_nm']:.0f} nm | "
      f"photons {result['photons']['mean']:.0f} | background "
      f"{result['background_photons']['mean']:.1f} ph/px | offset "
      f"{result['camera_offset_adu']:.1f} ADU | gain {result['camera_gain_adu_per_e']:.3g} "
      f"ADU/e | distance {result['distance_before']:.3g} -> {result['distance_after']:.3g}"
      + (" | IMPLAUSIBLE" if result.get("implausible") else ""), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
