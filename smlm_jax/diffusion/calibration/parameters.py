"""The fitted parameters of stage 2: one PSF FWHM and log-uniform ranges of photons,
background and D (exactly the priors training uses).

The optimizer sees them unconstrained (``params_from_ranges``: log FWHM, and the
centre and log half-width of each log range; ``ranges_from_params`` maps back);
``log_uniform_moments`` gives a range's mean and std, and ``reported`` the numbers
that get standard errors.
"""
from __future__ import annotations

import math


def _log_range(lo_hi):
  lo, hi = lo_hi
  return math.log(lo), math.log(hi)


def params_from_ranges(fwhm_nm, photons, background, D):
  """Unconstrained parameters: log FWHM, and (centre, log half-width) of log ranges."""
  import jax.numpy as jnp

  def pack(lo_hi):
    a, b = _log_range(lo_hi)
    return jnp.array([(a + b) / 2, math.log(max((b - a) / 2, 1e-3))])

  return {"log_fwhm": jnp.array(math.log(fwhm_nm)), "photons": pack(photons),
          "background": pack(background), "D": pack(D)}


def ranges_from_params(params):
  def unpack(c_h):
    c, h = float(c_h[0]), math.exp(float(c_h[1]))
    return math.exp(c - h), math.exp(c + h)
  return {"psf_fwhm_nm": math.exp(float(params["log_fwhm"])),
          "photons": unpack(params["photons"]),
          "background_photons": unpack(params["background"]),
          "D_um2_per_s": unpack(params["D"])}


def log_uniform_moments(lo_hi):
  lo, hi = lo_hi
  if hi / lo < 1 + 1e-6:
    return {"mean": lo, "std": 0.0, "low": lo, "high": hi}
  ln = math.log(hi / lo)
  mean = (hi - lo) / ln
  second = (hi * hi - lo * lo) / (2 * ln)
  return {"mean": mean, "std": math.sqrt(max(second - mean * mean, 0.0)), "low": lo,
          "high": hi}


def reported(params, fit_D):
  """The stage-2 numbers that get standard errors, from (unconstrained) parameters."""
  r = ranges_from_params(params)
  out = {"psf_fwhm_nm": r["psf_fwhm_nm"],
         "photons_mean": log_uniform_moments(r["photons"])["mean"],
         "background_range_mean": log_uniform_moments(r["background_photons"])["mean"]}
  if fit_D:
    out["D_mean"] = log_uniform_moments(r["D_um2_per_s"])["mean"]
  return out
