"""Differentiable calibration: fit the simulator's camera, PSF and emitter to real movies.

  python -m smlm_jax.diffusion.calibrate --input=PATH [--input=PATH ...] \
      --config=configs/diffusion.py --output=calibration.json [--plot=calibration.png] \
      [--camera_model=auto|scmos|emccd] [--camera_offset_adu=A] [--camera_gain_adu_per_e=G] \
      [--allow_implausible] [--fit_D] [--steps=120] [--num_sim=128] [--bootstrap=200]

Exit status: 0 written; 2 a usage error or unusable data (one ``error:`` line);
3 the fit is physically implausible under every camera model tried (one ``error:`` line
naming the value, its allowed range and what to try; nothing is written unless
``--allow_implausible``, which writes the fit with the failed checks in ``"implausible"``).

Two stages.

1. Camera by photon transfer (closed form, no simulation). Away from the spot, every
   pixel's T values are independent draws of offset + g x (Poisson photo-electrons
   [through an EM register] + read noise). The unbiased k-statistics of each pixel over
   time estimate its cumulants; averaged over a movie's background pixels, with
   a = mean - offset the background signal in ADU, they obey
       k2 = F2 g a + s^2,   k3 = F3 g^2 a
   with g the total ADU per photo-electron (EM gain included), s^2 the read variance
   in ADU^2 and (F2, F3) = (1, 1) for sCMOS/CCD, (2, 6) for an EMCCD (the exponential
   output of a high-gain EM register: cumulants n! g^n per electron; Basden et al.
   2003, MNRAS 345, 985; Hirsch et al. 2013, PLoS ONE 8, e53671). Only a static
   background is assumed, so illumination tilts and per-pixel offsets do not matter.
   The gain comes from the variance-vs-mean slope over movies (= F2 g; from k3/k2 when
   the backgrounds are too alike for a slope), the offset from k3 (the third cumulant
   is what separates the offset from the read noise), the read variance from what is
   left of k2. ``--camera_offset_adu`` / ``--camera_gain_adu_per_e`` fix either value
   (e.g. from the camera's spec sheet) and the rest is fitted around it.

   Camera model selection. Both models are fitted unless one is forced
   (``--camera_model=scmos|emccd``, or ``--config.sim.camera.model=...`` given on the
   command line; the config file's own value is only the training default and does not
   force anything). The offset-free excess-noise ratio
       kappa = k3 / (slope x k2) = (F3 / F2^2) x shot variance / total variance
   is <= 1 for an sCMOS (1 without read noise) and ~1.5 for an EMCCD at usable EM gain
   (read noise negligible); kappa > 1.25 says EMCCD. A model is a candidate only if its
   fit passes the plausibility checks below; among candidates the excess-noise test
   decides, or, when it is inconclusive (within 2 standard errors of 1.25, or no
   slope), the lower final simulator distance. Both fits and the reason are reported.

   Plausibility (a value fails when it lies outside its range by more than 2 standard
   errors): offset in [0, q + 3.09 s] with q the data's 0.1% quantile and s the read
   noise in ADU (from the read variance + 2 se: an EMCCD's is poorly pinned; no camera
   puts 0.1% of its pixels more than 3.09 read-noise sd below its baseline); gain in
   0.05-20 ADU/e- (sCMOS/CCD) or 0.5-2000 ADU/e- (EMCCD: EM x conversion gain); read noise referred to the input <= 10 e- (sCMOS/CCD) or <= 3 e-
   (EMCCD: an EM gain >= 20 on a ~60 e- read-out; more defeats the EM register);
   the model's shot variance may exceed the measured variance by at most 25% (a
   negative read variance beyond that means the model is wrong); with a fixed offset
   or gain the measured k3 and slope must match the model's within 25%; PSF FWHM in
   [max(150 nm, 0.75 px), 1000 nm] (150 nm ~ 0.51 lambda / NA for 450 nm at NA 1.49;
   wider than 1 um is not a single in-focus molecule); spot photons 20-1e6 per frame;
   background 0-1e5 photons/px/frame.

2. PSF, emitter photons, background (and optionally the population of D) through the
   differentiable simulator with optax. A pixel-by-pixel comparison of one real and one
   simulated movie is meaningless (different trajectories, different noise). Instead
   each movie is reduced to four statistics that do not depend on where the molecule
   happens to be, and we match their *distributions* over movies:
     log background     median of 4x4 block means of the time-averaged movie
     log spot photons   background-subtracted photons in a 15x15 px window around the
                        brightest 3x3 box, averaged over frames
     shape              spatial autocorrelation of the windowed, background-subtracted
                        spot at 2 px lag / at 1 px lag, summed over frames
                        (exp(-3/(4 sigma^2)) for a static Gaussian of sigma px; blur
                        within the exposure widens it)
     motion             overlap of consecutive frames (temporal lag 1, no spatial lag)
                        / spatial lag-1 autocorrelation (exp(1/(4 sigma^2)) for an
                        immobile molecule, falling with D)
   Pixel noise is independent between pixels and frames, so no product in these ratios
   has a noise term on average: they need no noise model and no lag-0 correction
   (which would depend on the fitted offset). The simulated set is
   ~128 movies whose random numbers (trajectory normals, start and gradient uniforms,
   stratified quantiles of the parameter priors, pixel noise normals) are drawn once:
   parameters enter only through differentiable maps (reparameterization; the pixel
   noise is Gaussian with the Poisson/EMCCD variance), so the loss is a smooth,
   deterministic function of the parameters. The loss is the sum over statistics of
   the squared difference of 32 quantiles (a 1D Wasserstein-2 distance), each scaled by
   the real statistic's robust spread. Photons, background and D are log-uniform
   ranges, exactly the priors training uses; the PSF FWHM is one value.

Uncertainty. Standard errors come from a bootstrap over movies (``--bootstrap``
resamples, default 200; Efron & Tibshirani 1993). The camera is re-solved in closed form
on every resample. The simulator fit is not re-run: each resample's change of the real
quantiles (movies resampled, their photons converted with that resample's camera) and
of the simulated quantiles (simulated movies resampled, which stands in for another
seed of the simulated set) is mapped to a parameter change through the Gauss-Newton
inverse of the fit's Jacobian (a linearized bootstrap; one Jacobian, ~7 simulator
passes). Fixed values have standard error 0.

The JSON written holds the keys of :data:`JSON_KEYS` with their meaning unchanged
(distributions as {"mean", "std", "low", "high"}: low/high is the fitted log-uniform
range that training uses; mean/std are those of the fitted distribution, except for
the background, whose mean/std are measured directly on every movie's spot-free pixels
in stage 1), ``<key>_se`` standard errors (``photons_mean_se``,
``background_photons_mean_se``), ``camera_model_selection`` (both fits, their checks,
the excess-noise ratio and the reason), ``warnings`` and, only with
``--allow_implausible``, ``implausible``; the distances before (training defaults) and
after, and the assumed geometry. Train with it via ``--config.sim.calibration=FILE``
and predict with ``--calibration=FILE``.
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

import dataclasses
import json
import math
import sys
import time

from absl import app, flags
import numpy as np

from smlm_jax.core import cli
from smlm_jax.core import tiff_io

JSON_KEYS = ("psf_fwhm_nm", "photons", "background_photons", "camera_offset_adu",
             "camera_gain_adu_per_e", "read_noise_e")
SE_KEYS = ("camera_offset_adu_se", "camera_gain_adu_per_e_se", "read_noise_e_se",
           "psf_fwhm_nm_se", "photons_mean_se", "background_photons_mean_se")
STAT_NAMES = ("log background", "log spot photons", "shape", "motion")
CAMERA_MODELS = ("scmos", "emccd")
MODEL_LABELS = {"scmos": "sCMOS", "emccd": "EMCCD"}
CUMULANT_FACTORS = {"scmos": (1.0, 1.0), "emccd": (2.0, 6.0)}
NUM_QUANTILES = 32
WINDOW_PX = 15
SPOT_EXCLUSION_PX = 8
MIN_SLOPE_PRECISION = 0.1      # variance slope used for the gain when its se < 10%
EXCESS_NOISE_SPLIT = 1.25      # kappa above: EMCCD (1.5); below: sCMOS (<= 1)
MODEL_TOLERANCE = 0.25         # cumulants must match a model within 25%
LOW_QUANTILE, LOW_QUANTILE_Z = 0.001, 3.09
GAIN_RANGE_ADU_PER_E = {"scmos": (0.05, 20.0), "emccd": (0.5, 2000.0)}
READ_NOISE_RANGE_E = {"scmos": (0.0, 10.0), "emccd": (0.0, 3.0)}
FWHM_RANGE_NM = (150.0, 1000.0)
PHOTONS_RANGE = (20.0, 1e6)
BACKGROUND_RANGE_PHOTONS = (0.0, 1e5)


class CalibrationFailed(ValueError):
  """Calibration cannot proceed with these movies; the message says why."""


class ImplausibleCalibration(CalibrationFailed):
  """Every camera model tried gives a physically implausible fit (one-line message)."""


# --------------------------------------------------------------- stage 1: the camera
def _far_from_spot(frames, level, radius_px: int):
  import jax.numpy as jnp
  from smlm_jax.diffusion import normalize
  py, px, _ = normalize.brightest_box(frames - level)              # [M, T]
  near = normalize.square_mask(py, px, radius_px, *frames.shape[-2:])
  return ~jnp.any(near, axis=1)                                     # [M, H, W]


def background_masks(frames_adu: np.ndarray, radius_px: int = SPOT_EXCLUSION_PX):
  """[M, H, W] True where a pixel is farther than radius_px from every frame's spot."""
  import jax
  import jax.numpy as jnp
  frames = np.asarray(frames_adu, np.float32)
  level = np.median(frames.reshape(frames.shape[0], -1), axis=-1)[:, None, None, None]
  fn = jax.jit(_far_from_spot, static_argnums=2)
  return np.asarray(fn(jnp.asarray(frames), jnp.asarray(level), radius_px))


def pixel_cumulants(frames_adu: np.ndarray, masks: np.ndarray):
  """Per movie: (number of background pixels, mean, mean k2, mean k3, se k2, se k3).

  k2, k3 are the unbiased k-statistics of each pixel's T values (float64); movies with
  fewer than 16 background pixels get count 0 and NaNs.
  """
  x = np.asarray(frames_adu, np.float64)
  n = x.shape[1]
  if n < 3:
    raise CalibrationFailed("photon transfer needs at least 3 frames per movie")
  mean = x.mean(axis=1)
  d = x - mean[:, None]
  k2 = n / (n - 1) * (d ** 2).mean(axis=1)
  k3 = n * n / ((n - 1) * (n - 2)) * (d ** 3).mean(axis=1)
  w = masks.astype(np.float64).reshape(masks.shape[0], -1)
  c = w.sum(axis=1)
  safe = np.maximum(c, 1.0)

  def masked_mean(v):
    return (w * v.reshape(v.shape[0], -1)).sum(axis=1) / safe

  def masked_se(v, m):
    var = masked_mean(v ** 2) - m ** 2
    return np.sqrt(np.maximum(var, 0.0) / safe)

  mu, m2, m3 = masked_mean(mean), masked_mean(k2), masked_mean(k3)
  out = np.stack([c, mu, m2, m3, masked_se(k2, m2), masked_se(k3, m3)])
  bad = c < 16
  out[0, bad] = 0
  out[1:, bad] = np.nan
  return out


@dataclasses.dataclass(frozen=True)
class MovieCumulants:
  """Background-pixel cumulants of every movie ([M] arrays; NaN where ``ok`` is False)."""
  count: np.ndarray
  mean: np.ndarray
  k2: np.ndarray
  k3: np.ndarray
  se2: np.ndarray
  se3: np.ndarray
  low_quantile_adu: float          # the data's 0.1% quantile over all pixels and frames
  w2: np.ndarray                   # weights of k2 and k3 (:func:`_smooth_weights`)
  w3: np.ndarray

  @property
  def ok(self):
    return self.count > 0



def _smooth_weights(se, count, level):
  """Inverse-variance weights from a smooth fit of a movie's standard error vs. level.

  Weighting by each movie's own estimated error would correlate the weight with the
  estimate (a movie whose k3 came out high also gets a high se and a low weight, which
  biases the offset by ~1 se). So the per-pixel spread sqrt(count) x se is fitted as
  exp(quadratic in the background level) over movies, and the weights come from that.
  """
  ok = count > 0
  w = np.zeros_like(level, dtype=np.float64)
  x = level[ok]
  y = np.log(np.maximum(se[ok] * np.sqrt(count[ok]), 1e-300))
  span = max(float(np.ptp(x)), 1e-9)
  z = (x - x.mean()) / span
  deg = min(2, max(len(x) - 1, 0))
  coef = np.polyfit(z, y, deg) if deg > 0 else np.array([y.mean()])
  w[ok] = count[ok] / np.exp(2 * np.polyval(coef, z))
  return w


def movie_cumulants(frames_adu: np.ndarray) -> MovieCumulants:
  """Stage-1 input: per-movie background cumulants of [M, T, H, W] ADU movies."""
  count, mu, k2, k3, se2, se3 = pixel_cumulants(frames_adu, background_masks(frames_adu))
  ok = count > 0
  if ok.sum() < 2:
    raise CalibrationFailed("fewer than 2 movies have background pixels away from the spot")
  if np.mean(k3[ok]) <= 0:
    raise CalibrationFailed("background pixels show no positive skew (third cumulant); "
                            "the data do not look like photon counts in ADU")
  flat = np.asarray(frames_adu, np.float32).reshape(-1)
  k = int(LOW_QUANTILE * (flat.size - 1))
  low = float(np.partition(flat, k)[k])
  return MovieCumulants(count, mu, k2, k3, se2, se3, low,
                        _smooth_weights(se2, count, mu), _smooth_weights(se3, count, mu))


def _weighted_slope(x, y, w):
  """(slope, its standard error) of the weighted least-squares line y ~ x."""
  xm = np.sum(w * x) / np.sum(w)
  sxx = np.sum(w * (x - xm) ** 2)
  if not sxx > 0:
    return float("nan"), float("inf")
  slope = np.sum(w * (x - xm) * y) / sxx
  resid = y - (np.sum(w * y) / np.sum(w) + slope * (x - xm))
  dof = max(len(x) - 2, 1)
  return float(slope), float(math.sqrt(np.sum(w * resid ** 2) / dof / sxx))


def solve_camera(cum: MovieCumulants, model: str, idx=None, offset_adu=None,
                 gain_adu_per_e=None, gain_method=None) -> dict:
  """Closed-form camera of one model from the movies ``idx`` (default: all).

  Returns offset (ADU), g (ADU per photo-electron), read variance s2 (ADU^2), the
  variance slope and its se, the excess-noise ratio kappa, and the ratios that check
  the model when values are fixed (k3 and slope measured / predicted).
  ``gain_method`` ('variance slope' or 'k3') is decided on the full data and kept
  fixed in bootstrap resamples.
  """
  f2, f3 = CUMULANT_FACTORS[model]
  idx = np.arange(cum.count.size) if idx is None else np.asarray(idx)
  idx = idx[cum.ok[idx]]
  mu, k2, k3 = cum.mean[idx], cum.k2[idx], cum.k3[idx]
  w2, w3 = cum.w2[idx], cum.w3[idx]
  slope, slope_se = _weighted_slope(mu, k2, w2)
  if gain_method is None:
    gain_method = ("variance slope" if slope > 0 and slope_se < MIN_SLOPE_PRECISION * slope
                   else "k3")
  if gain_adu_per_e is not None:
    g, gain_method = float(gain_adu_per_e), "fixed"
  elif gain_method == "variance slope":
    g = slope / f2
  elif offset_adu is not None:              # k3 = F3 g^2 a with a known
    a = mu - offset_adu
    g = math.sqrt(max(np.sum(w3 * k3 * a) / (f3 * np.sum(w3 * a * a)), 1e-30))
  else:                                     # k3 / k2 = (F3 / F2) g, read noise neglected
    g = f2 * np.sum(k3) / (f3 * np.sum(k2))
  if offset_adu is not None:
    o = float(offset_adu)
  else:
    o = float(np.sum(w3 * (mu - k3 / (f3 * g * g))) / np.sum(w3))
  a = mu - o
  s2 = float(np.sum(w2 * (k2 - f2 * g * a)) / np.sum(w2))
  slope_ok = slope > 0 and slope_se < MIN_SLOPE_PRECISION * slope
  return {"offset_adu": o, "gain_adu_per_e": float(g), "read_variance_adu2": s2,
          "read_noise_adu": math.sqrt(max(s2, 0.0)), "gain_method": gain_method,
          "slope": slope, "slope_se": slope_se,
          "kappa": float(np.sum(k3) / (slope * np.sum(k2))) if slope_ok else float("nan"),
          "read_variance_ratio": s2 / float(np.mean(k2)),
          "k3_ratio": float(np.sum(k3) / (f3 * g * g * np.sum(a))),
          "slope_ratio": float(slope / (f2 * g)) if slope_ok else float("nan"),
          "background_adu": a}


def _check(name, value, se, low, high, unit, why, hint):
  """A plausibility check: fails when value is outside [low, high] by more than 2 se."""
  se = float(se)
  value = float(value)
  margin = 2 * se if np.isfinite(se) else 0.0
  ok = bool(np.isfinite(value) and value + margin >= low and value - margin <= high)
  return {"name": name, "value": value, "se": se, "low": low, "high": high, "unit": unit,
          "why": why, "hint": hint, "ok": ok}


def _num(x):
  if x is None or not np.isfinite(x):
    return "inf" if x == float("inf") else ("-inf" if x == -float("inf") else "nan")
  return f"{x:.4g}"


def check_text(c: dict) -> str:
  """One phrase: '<name> <value> +- <se> <unit> is outside <low>..<high> (<why>)'."""
  se = f" ± {_num(c['se'])}" if np.isfinite(c["se"]) and c["se"] > 0 else ""
  return (f"{c['name']} {_num(c['value'])}{se} {c['unit']} is outside "
          f"{_num(c['low'])} to {_num(c['high'])} {c['unit']} ({c['why']})").replace("  ", " ")


def camera_fit(cum: MovieCumulants, model: str, qe: float, offset_adu=None,
               gain_adu_per_e=None, boot_idx=None) -> dict:
  """One model's camera with bootstrap standard errors and plausibility checks.

  boot_idx: [B, M] movie indices of the bootstrap resamples (None: no errors).
  """
  fit = solve_camera(cum, model, offset_adu=offset_adu, gain_adu_per_e=gain_adu_per_e)
  method = fit["gain_method"] if fit["gain_method"] != "fixed" else None

  def derived(f):
    g = f["gain_adu_per_e"]
    return {"offset_adu": f["offset_adu"], "gain_adu_per_e": g,
            "read_noise_adu": f["read_noise_adu"], "read_noise_input_e": f["read_noise_adu"] / g,
            "read_variance_adu2": f["read_variance_adu2"],
            "read_variance_ratio": f["read_variance_ratio"], "kappa": f["kappa"],
            "k3_ratio": f["k3_ratio"], "slope_ratio": f["slope_ratio"],
            "background_photons": float(np.mean(f["background_adu"]) / (g * qe))}

  value = derived(fit)
  boots = []
  if boot_idx is not None:
    for idx in boot_idx:
      boots.append(derived(solve_camera(cum, model, idx, offset_adu, gain_adu_per_e,
                                        method)))
  se = {k: (float(np.nanstd([b[k] for b in boots], ddof=1)) if len(boots) > 1
            else float("nan")) for k in value}
  if offset_adu is not None:
    se["offset_adu"] = 0.0
  if gain_adu_per_e is not None:
    se["gain_adu_per_e"] = 0.0
  other = "emccd" if model == "scmos" else "scmos"
  other_hint = f"--camera_model={other}"
  spec_hint = "--camera_offset_adu=<baseline from the camera's spec sheet>"
  more_hint = "more movies with different background levels"
  # Read noise sd for the offset's upper bound: 2 se above the estimate, as an EMCCD's
  # small read variance is poorly pinned next to its large shot variance.
  s2_se = se["read_variance_adu2"] if np.isfinite(se["read_variance_adu2"]) else 0.0
  read_high_adu = math.sqrt(max(value["read_variance_adu2"] + 2 * s2_se, 0.0))
  checks = [
      _check("camera offset", value["offset_adu"], se["offset_adu"], 0.0,
             cum.low_quantile_adu + LOW_QUANTILE_Z * read_high_adu, "ADU",
             "0 to the data's 0.1% quantile + 3.09 read-noise sd", [other_hint, spec_hint]),
      _check("read variance / background variance", value["read_variance_ratio"],
             se["read_variance_ratio"], -MODEL_TOLERANCE, 1.0, "",
             f"a negative value is shot noise the {MODEL_LABELS[model]} model predicts "
             "but the data do not have", [other_hint, spec_hint]),
      _check("gain", value["gain_adu_per_e"], se["gain_adu_per_e"],
             *GAIN_RANGE_ADU_PER_E[model], "ADU/e-",
             "EM gain x conversion gain" if model == "emccd" else "sCMOS/CCD conversion gains",
             [other_hint, "--camera_gain_adu_per_e=<from the spec sheet>", more_hint]),
      _check("input-referred read noise", value["read_noise_input_e"],
             se["read_noise_input_e"], *READ_NOISE_RANGE_E[model], "e-",
             "an EMCCD at EM gain >= 20" if model == "emccd" else "sCMOS/CCD read noise",
             [other_hint, more_hint]),
      _check("background", value["background_photons"], se["background_photons"],
             *BACKGROUND_RANGE_PHOTONS, "photons/px/frame", "physical range",
             [other_hint, spec_hint]),
  ]
  if offset_adu is not None:
    checks.append(_check("k3 measured / predicted", value["k3_ratio"], se["k3_ratio"],
                         1 / (1 + MODEL_TOLERANCE), 1 + MODEL_TOLERANCE, "",
                         f"third cumulant of the {MODEL_LABELS[model]} model",
                         [other_hint, "check --camera_offset_adu"]))
  if fit["gain_method"] != "variance slope" and np.isfinite(value["slope_ratio"]):
    checks.append(_check("variance slope measured / predicted", value["slope_ratio"],
                         se["slope_ratio"], 1 / (1 + MODEL_TOLERANCE), 1 + MODEL_TOLERANCE,
                         "", f"excess noise of the {MODEL_LABELS[model]} model",
                         [other_hint, "check --camera_gain_adu_per_e"]))
  # The offset is clipped onto its range when it is outside by less than 2 se.
  lo, hi = checks[0]["low"], checks[0]["high"]
  notes = []
  if checks[0]["ok"] and not lo <= value["offset_adu"] <= hi and offset_adu is None:
    clipped = min(max(value["offset_adu"], lo), hi)
    notes.append(f"{MODEL_LABELS[model]} offset {value['offset_adu']:.4g} ADU clipped to "
                 f"{clipped:.4g} (within 2 se of its range)")
    value["offset_adu"] = clipped
  if value["read_variance_ratio"] < 0 and checks[1]["ok"]:
    notes.append(f"{MODEL_LABELS[model]}: the shot noise predicted from the third "
                 f"cumulant exceeds the measured variance by "
                 f"{-100 * value['read_variance_ratio']:.0f}% (negative read variance); "
                 "read noise set to 0")
  return {"model": model, "value": value, "se": se, "checks": checks,
          "failed": [c for c in checks if not c["ok"]], "notes": notes,
          "gain_method": fit["gain_method"], "slope": fit["slope"],
          "slope_se": fit["slope_se"], "read_variance_adu2": fit["read_variance_adu2"],
          "boot_offset_gain": np.array([[b["offset_adu"], b["gain_adu_per_e"]]
                                        for b in boots]).reshape(-1, 2),
          "fixed": {k: v for k, v in (("camera_offset_adu", offset_adu),
                                      ("camera_gain_adu_per_e", gain_adu_per_e))
                    if v is not None}}


def bootstrap_indices(num_movies: int, num_bootstrap: int, seed: int = 0):
  """[B, M] movie indices drawn with replacement (host-side statistics, not physics)."""
  if num_bootstrap < 2:
    return None
  rng = np.random.default_rng(seed)
  return rng.integers(0, num_movies, size=(num_bootstrap, num_movies))


def photon_transfer(frames_adu: np.ndarray, camera_model: str = "scmos",
                    offset_adu=None, gain_adu_per_e=None, num_bootstrap: int = 0,
                    qe: float = 1.0) -> dict:
  """Camera gain (ADU per photo-electron), offset (ADU) and read noise (ADU) of one model.

  See the module docstring; with ``num_bootstrap`` >= 2 also their standard errors
  (``*_se``) and the plausibility checks (``failed``).
  """
  cum = movie_cumulants(frames_adu)
  fit = camera_fit(cum, camera_model, qe, offset_adu, gain_adu_per_e,
                   bootstrap_indices(cum.count.size, num_bootstrap))
  v, se = fit["value"], fit["se"]
  return {"gain_adu_per_e": v["gain_adu_per_e"], "offset_adu": v["offset_adu"],
          "read_noise_adu": v["read_noise_adu"],
          "read_variance_adu2": fit["read_variance_adu2"], "method": fit["gain_method"],
          "gain_relative_se": fit["slope_se"] / fit["slope"] if fit["slope"] > 0
          else float("nan"),
          "gain_adu_per_e_se": se["gain_adu_per_e"], "offset_adu_se": se["offset_adu"],
          "read_noise_adu_se": se["read_noise_adu"], "kappa": v["kappa"],
          "kappa_se": se["kappa"], "failed": [check_text(c) for c in fit["failed"]],
          "movie_mean_adu": cum.mean[cum.ok], "movie_k2": cum.k2[cum.ok],
          "movie_k3": cum.k3[cum.ok], "used": cum.ok, "background_pixels": cum.count}


def excess_noise_preference(kappa: float, kappa_se: float):
  """(preferred model or None, conclusive?, one-line reason) from the ratio kappa."""
  if not np.isfinite(kappa):
    return None, False, ("excess-noise test unavailable (backgrounds too similar for a "
                         "variance slope)")
  model = "emccd" if kappa > EXCESS_NOISE_SPLIT else "scmos"
  se = kappa_se if np.isfinite(kappa_se) else 0.0
  conclusive = abs(kappa - EXCESS_NOISE_SPLIT) > 2 * se
  pm = f" ± {se:.3f}" if se > 0 else ""
  return model, conclusive, (
      f"excess-noise ratio k3/(slope k2) = {kappa:.3f}{pm} "
      f"(sCMOS <= 1, EMCCD ~1.5; split at {EXCESS_NOISE_SPLIT}) says "
      f"{MODEL_LABELS[model]}{'' if conclusive else ' (inconclusive)'}")


# ------------------------------------------------------------- stage 2: statistics
@dataclasses.dataclass(frozen=True)
class Noise:
  """Pixel noise in photon units: var = excess * p / qe + (read_e / qe)^2."""
  qe: float
  excess: float
  read_e: float

  def variance(self, photons):
    import jax.numpy as jnp
    return (self.excess * jnp.maximum(photons, 0.0) / self.qe
            + (self.read_e / self.qe) ** 2)


def _background(photons, block: int = 4):
  """Median over 4x4-pixel blocks of the time-averaged movie (photons/pixel/frame)."""
  import jax.numpy as jnp
  m, t, h, w = photons.shape
  hb, wb = h // block, w // block
  mean = photons[..., : hb * block, : wb * block].mean(axis=1)
  blocks = mean.reshape(m, hb, block, wb, block).mean(axis=(2, 4)).reshape(m, -1)
  return jnp.median(blocks, axis=-1)


def movie_statistics(photons):
  """[M, T, H, W] photons -> [M, 4] statistics (see STAT_NAMES), differentiable."""
  import jax
  import jax.numpy as jnp
  from smlm_jax.diffusion import normalize
  bg = _background(photons)                                          # [M]
  d = photons - bg[:, None, None, None]
  t, h, w = photons.shape[1:]
  py, px, _ = normalize.brightest_box(d)
  win = normalize.square_mask(py, px, WINDOW_PX // 2, h, w).astype(photons.dtype)
  win = jax.lax.stop_gradient(win)
  s = d * win                                                       # [M, T, H, W]
  spot = s.sum(axis=(-1, -2)).mean(-1)
  # Spatial lag-1 and lag-2 products (x and y averaged) and the temporal lag-1 product;
  # pixel noise is independent, so none of them has a noise term on average and the
  # ratios need no noise model.
  def lag(k):
    return 0.5 * ((s[..., k:, :] * s[..., :-k, :]).sum(axis=(1, 2, 3))
                  + (s[..., :, k:] * s[..., :, :-k]).sum(axis=(1, 2, 3)))
  a1, a2 = lag(1), lag(2)
  c1 = (s[:, 1:] * s[:, :-1]).sum(axis=(1, 2, 3)) * t / (t - 1)
  denom = jnp.maximum(a1, 1e-3 * jnp.abs(a1).max())
  return jnp.stack([jnp.log(jnp.maximum(bg, 1e-3)), jnp.log(jnp.maximum(spot, 1.0)),
                    jnp.clip(a2 / denom, -0.5, 1.5), jnp.clip(c1 / denom, -0.5, 2.5)],
                   axis=-1)


def quantiles(stats):
  import jax.numpy as jnp
  levels = (jnp.arange(NUM_QUANTILES) + 0.5) / NUM_QUANTILES
  return jnp.quantile(stats, levels, axis=0)                         # [Q, 4]


def stat_distance(sim_q, real_q, scale):
  """Mean over statistics of the scaled squared quantile differences (W2^2 / spread^2)."""
  import jax.numpy as jnp
  return jnp.mean(((sim_q - real_q) / scale) ** 2)


# ---------------------------------------------------------- the differentiable simulator
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


def make_sim_statistics(simulator, num_sim: int, seed: int, noise: Noise):
  """(params -> [num_sim, 4] statistics), with every random number drawn once here."""
  import jax
  import jax.numpy as jnp
  from smlm_jax.diffusion import simulator as sim_lib
  geometry, priors = simulator.geometry, simulator.priors
  keys = sim_lib.movie_keys(jax.random.key(seed), jnp.arange(num_sim))
  base = jax.vmap(lambda k: sim_lib.sample_emitter(k, priors, geometry))(keys)
  k_u, k_traj, k_noise = jax.random.split(jax.random.key(seed + 1), 3)
  # Stratified quantiles of the priors (each of D, photons, background takes every
  # level (i + 1/2) / n once, independently permuted): the simulated set follows the
  # prior without the sampling error of n random uniforms, which would bias the fit.
  levels = (jnp.arange(num_sim) + 0.5) / num_sim
  u = jnp.stack([jax.random.permutation(k, levels) for k in jax.random.split(k_u, 3)])
  traj_keys = jax.random.split(k_traj, num_sim)
  shape = (num_sim, geometry.num_frames, geometry.height_px, geometry.width_px)
  z = jax.random.normal(k_noise, shape)

  def draw(c_h, ui):
    return jnp.exp(c_h[0] + jnp.exp(c_h[1]) * (2.0 * ui - 1.0))

  @jax.jit
  def stats(params):
    emitters = base.replace(
        D_um2_per_s=draw(params["D"], u[0]), photons=draw(params["photons"], u[1]),
        background_photons=draw(params["background"], u[2]),
        psf_fwhm_nm=jnp.full((num_sim,), jnp.exp(params["log_fwhm"])))

    def one(key, em):
      pos = sim_lib.brownian_substeps_nm(key, em.D_um2_per_s, em.start_nm, geometry)
      return sim_lib.expected_photons(pos, em, geometry)

    lam = jax.vmap(one)(traj_keys, emitters)
    photons = lam + jnp.sqrt(noise.variance(lam)) * z
    return movie_statistics(photons)

  return stats


# ------------------------------------------------------------------------ calibration
def log_uniform_moments(lo_hi):
  lo, hi = lo_hi
  if hi / lo < 1 + 1e-6:
    return {"mean": lo, "std": 0.0, "low": lo, "high": hi}
  ln = math.log(hi / lo)
  mean = (hi - lo) / ln
  second = (hi * hi - lo * lo) / (2 * ln)
  return {"mean": mean, "std": math.sqrt(max(second - mean * mean, 0.0)), "low": lo,
          "high": hi}


def _robust_scale(x):
  q25, q75 = np.quantile(x, [0.25, 0.75], axis=0)
  return np.maximum((q75 - q25) / 1.349, 1e-3)


def _reported(params, fit_D):
  """The stage-2 numbers that get standard errors, from (unconstrained) parameters."""
  r = ranges_from_params(params)
  out = {"psf_fwhm_nm": r["psf_fwhm_nm"],
         "photons_mean": log_uniform_moments(r["photons"])["mean"],
         "background_range_mean": log_uniform_moments(r["background_photons"])["mean"]}
  if fit_D:
    out["D_mean"] = log_uniform_moments(r["D_um2_per_s"])["mean"]
  return out


def linearized_bootstrap(sim_stats, params, trainable, real_stats, scale, camera_value,
                         camera_boot, qe, boot_idx, seed=0, fit_D=False) -> dict:
  """Standard errors of the stage-2 numbers without refitting (see the module docstring).

  Each resample b moves the real quantiles (movies ``boot_idx[b]``, converted with
  that resample's offset and gain ``camera_boot[b]``) and the simulated quantiles
  (simulated movies resampled); the optimum moves by the Gauss-Newton step
  pinv(J / scale) (delta_real - delta_sim) / scale with J = d sim quantiles / d params.
  """
  import jax
  import jax.numpy as jnp
  shapes = [(n, params[n].shape, int(np.prod(params[n].shape))) for n in trainable]
  v0 = jnp.concatenate([jnp.ravel(params[n]) for n in trainable])

  def unflat(vec):
    out, i = dict(params), 0
    for name, shape, size in shapes:
      out[name] = vec[i:i + size].reshape(shape)
      i += size
    return out

  jvp = jax.jit(lambda vec, t: jax.jvp(lambda x: quantiles(sim_stats(unflat(x))),
                                       (vec,), (t,))[1])
  eye = np.eye(v0.size, dtype=np.float32)
  jac = np.stack([np.asarray(jvp(v0, jnp.asarray(e))).reshape(-1) for e in eye], axis=1)
  s = np.tile(np.asarray(scale, np.float64), NUM_QUANTILES)          # [Q * 4]
  step = np.linalg.pinv(jac / s[:, None], rcond=1e-6)                # [P, Q * 4]
  levels = (np.arange(NUM_QUANTILES) + 0.5) / NUM_QUANTILES
  real = np.asarray(real_stats, np.float64)
  sim = np.asarray(sim_stats(params), np.float64)
  real_q0 = np.quantile(real, levels, axis=0)
  sim_q0 = np.quantile(sim, levels, axis=0)
  o, g = camera_value["offset_adu"], camera_value["gain_adu_per_e"]
  bg_adu = np.exp(real[:, 0]) * g * qe + o
  spot_adu = np.exp(real[:, 1]) * g * qe
  rng = np.random.default_rng(seed + 1)
  base = np.asarray(v0, np.float64)
  draws = []
  for b, idx in enumerate(boot_idx):
    r = real[idx].copy()
    ob, gb = camera_boot[b]
    r[:, 0] = np.log(np.maximum((bg_adu[idx] - ob) / (gb * qe), 1e-3))
    r[:, 1] = np.log(np.maximum(spot_adu[idx] / (gb * qe), 1.0))
    sim_b = sim[rng.integers(0, sim.shape[0], sim.shape[0])]
    delta = ((np.quantile(r, levels, axis=0) - real_q0)
             - (np.quantile(sim_b, levels, axis=0) - sim_q0))
    theta = base + step @ (delta.reshape(-1) / s)
    draws.append(_reported(unflat(jnp.asarray(theta, jnp.float32)), fit_D))
  return {k: float(np.std([d[k] for d in draws], ddof=1)) for k in draws[0]}


def fit_simulator(frames_adu: np.ndarray, sim_cfg, cam: dict, fit_D: bool = False,
                  steps: int = 120, num_sim: int = 128, learning_rate: float = 0.05,
                  seed: int = 0, progress: bool = True, boot_idx=None) -> dict:
  """Stage 2 for one camera fit ``cam`` (from :func:`camera_fit`)."""
  import jax
  import jax.numpy as jnp
  import optax
  from smlm_jax.diffusion import camera_setup
  from smlm_jax.core import noise as noise_lib
  from smlm_jax.diffusion import normalize
  from smlm_jax.diffusion import simulator as sim_lib

  simulator = sim_lib.simulator_from_config(sim_cfg)
  cam_cfg = sim_cfg.camera
  qe = float(cam_cfg.qe)
  model, v = cam["model"], cam["value"]
  g, offset, read_in_e = v["gain_adu_per_e"], v["offset_adu"], v["read_noise_input_e"]
  camera = noise_lib.Camera(model="scmos", qe=qe, gain_adu_per_e=g, offset_adu=offset,
                            read_noise_e=read_in_e)
  noise = Noise(qe=qe, excess=CUMULANT_FACTORS[model][0], read_e=read_in_e)
  photons = noise_lib.adu_to_photons(jnp.asarray(frames_adu, jnp.float32), camera)
  real_stats = movie_statistics(photons)
  real_q = quantiles(real_stats)
  scale = jnp.asarray(_robust_scale(np.asarray(real_stats)))

  # Initial ranges straight from the data (5-95% of per-movie estimates).
  bg_movie = np.asarray(normalize.background_photons(photons))
  spot = np.asarray(normalize.spot_statistics(photons, jnp.asarray(bg_movie),
                                              camera)["spot_photons"].mean(-1))

  def range_of(x, floor):
    lo, hi = np.quantile(np.maximum(x, floor), [0.05, 0.95])
    return float(lo), float(max(hi, lo * 1.05))
  pri = simulator.priors
  default_fwhm = float(np.mean(pri.psf_fwhm_nm))
  params = params_from_ranges(default_fwhm, range_of(spot, 10.0), range_of(bg_movie, 0.1),
                              pri.D_um2_per_s)
  default = params_from_ranges(default_fwhm, pri.photons, pri.background_photons,
                               pri.D_um2_per_s)
  sim_stats = make_sim_statistics(simulator, num_sim, seed, noise)

  def loss_fn(p):
    return stat_distance(quantiles(sim_stats(p)), real_q, scale)

  # "Before": the training defaults applied to the data as the pipeline would see them
  # without calibration (training camera, training priors).
  train_cam, _ = camera_setup.data_camera(cam_cfg)
  photons_default = noise_lib.adu_to_photons(jnp.asarray(frames_adu, jnp.float32), train_cam)
  real_default = movie_statistics(photons_default)
  sim_default = sim_stats(default)
  distance_before = float(stat_distance(quantiles(sim_default), quantiles(real_default),
                                        scale))

  trainable = ["log_fwhm", "photons", "background"] + (["D"] if fit_D else [])
  mask = {k: (k in trainable) for k in params}
  tx = optax.chain(optax.clip_by_global_norm(10.0),
                   optax.masked(optax.adam(learning_rate), mask))
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    grads = {k: (v if mask[k] else jnp.zeros_like(v)) for k, v in grads.items()}
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  best = (float("inf"), params)
  history = []
  bar = (cli.progress(total=steps, desc=f"calibrate {MODEL_LABELS[model]}", unit="step")
         if progress else None)
  for i in range(steps):
    new_params, opt_state, loss = step(params, opt_state)
    loss = float(loss)
    history.append(loss)
    if loss < best[0]:
      best = (loss, params)
    params = new_params
    if bar is not None:
      bar.update(1)
      if i % 10 == 0:
        bar.set_postfix(distance=f"{loss:.4f}",
                        fwhm=f"{math.exp(float(params['log_fwhm'])):.0f}nm")
  if bar is not None:
    bar.close()
  final = float(loss_fn(params))
  if final < best[0]:
    best = (final, params)
  distance_after, params = best
  fitted = ranges_from_params(params)
  value = _reported(params, fit_D)
  se = {k: float("nan") for k in value}
  if boot_idx is not None:
    camera_boot = cam["boot_offset_gain"]
    se = linearized_bootstrap(sim_stats, params, trainable, np.asarray(real_stats), scale,
                              v, camera_boot, qe, boot_idx, seed, fit_D)
  pixel = float(sim_cfg.pixel_size_nm)
  fwhm_low = max(FWHM_RANGE_NM[0], 0.75 * pixel)
  hint = [f"--camera_model={'emccd' if model == 'scmos' else 'scmos'}",
          "check --config.sim.pixel_size_nm", "more movies"]
  checks = [
      _check("PSF FWHM", value["psf_fwhm_nm"], se["psf_fwhm_nm"], fwhm_low,
             FWHM_RANGE_NM[1], "nm", f"diffraction limit ~150 nm, >= 0.75 px of {pixel:g} "
             "nm, <= 1 um for one in-focus molecule", hint),
      _check("spot photons", value["photons_mean"], se["photons_mean"], *PHOTONS_RANGE,
             "photons/frame", "physical range", hint)]
  notes = []
  if distance_after >= distance_before:
    notes.append(f"{MODEL_LABELS[model]}: the fit did not lower the distance "
                 f"({distance_before:.3g} -> {distance_after:.3g}); try more --steps")
  return {"model": model, "fitted": fitted, "value": value, "se": se,
          "distance_before": distance_before, "distance_after": float(distance_after),
          "checks": checks, "failed": [c for c in checks if not c["ok"]], "notes": notes,
          "_plot": {"real": np.asarray(real_stats), "real_default": np.asarray(real_default),
                    "sim_default": np.asarray(sim_default),
                    "sim_fitted": np.asarray(sim_stats(params)),
                    "history": np.array(history)}}


def implausible_message(cams: dict, fits: dict, tried, forced: bool, preference) -> str:
  """The one line for an exit on an implausible fit: value, range and what to try."""
  parts, hints = [], []
  for m in tried:
    failed = cams[m]["failed"] + (fits[m]["failed"] if m in fits else [])
    if failed:
      parts.append(f"{MODEL_LABELS[m]} {check_text(failed[0])}")
      hints += [h for h in failed[0]["hint"] if not h.startswith("--camera_model=")]
  if forced:
    other = [m for m in CAMERA_MODELS if m != tried[0]][0]
    hints.insert(0, f"the {MODEL_LABELS[other]} model (--camera_model={other} or auto "
                 "instead of the forced one"
                 + (f"; the {preference[2]}" if preference[0] == other else "") + ")")
  hints = list(dict.fromkeys(hints))
  head = ("implausible calibration"
          + (f" with the camera model forced to {MODEL_LABELS[tried[0]]}" if forced
             else " under every camera model"))
  return (f"{head}: {'; '.join(parts)}; try {', '.join(hints)}; or --allow_implausible to "
          "write the fit anyway")


def _fit_summary(cam: dict, fit: dict | None) -> dict:
  v, se = cam["value"], cam["se"]
  out = {"camera_offset_adu": v["offset_adu"], "camera_offset_adu_se": se["offset_adu"],
         "camera_gain_adu_per_e": v["gain_adu_per_e"],
         "camera_gain_adu_per_e_se": se["gain_adu_per_e"],
         "read_noise_input_e": v["read_noise_input_e"],
         "read_noise_input_e_se": se["read_noise_input_e"],
         "read_variance_ratio": v["read_variance_ratio"],
         "background_photons_mean": v["background_photons"],
         "background_photons_mean_se": se["background_photons"],
         "gain_method": cam["gain_method"],
         "implausible": [check_text(c) for c in cam["failed"]]}
  if fit is not None:
    out.update({"psf_fwhm_nm": fit["value"]["psf_fwhm_nm"],
                "psf_fwhm_nm_se": fit["se"]["psf_fwhm_nm"],
                "photons_mean": fit["value"]["photons_mean"],
                "photons_mean_se": fit["se"]["photons_mean"],
                "distance_after": fit["distance_after"]})
    out["implausible"] += [check_text(c) for c in fit["failed"]]
  else:
    out["simulator_fit"] = "skipped (camera implausible or model not selected)"
  return out


def calibrate(frames_adu: np.ndarray, sim_cfg, fit_D: bool = False, steps: int = 120,
              num_sim: int = 128, learning_rate: float = 0.05, seed: int = 0,
              progress: bool = True, camera_model: str = "auto", offset_adu=None,
              gain_adu_per_e=None, allow_implausible: bool = False,
              num_bootstrap: int = 200) -> dict:
  """Full calibration of [M, T, H, W] ADU movies against the config's simulator.

  camera_model: 'auto' (fit sCMOS and EMCCD, pick one; see the module docstring) or
    the one to use. offset_adu / gain_adu_per_e: fixed known values (None: fitted).
  Raises ImplausibleCalibration (one-line message) when no model tried gives a
  plausible fit, unless ``allow_implausible``, which returns the best one with the
  failed checks in ``result["implausible"]``.
  """
  if camera_model not in ("auto",) + CAMERA_MODELS:
    raise ValueError(f"camera_model must be auto, scmos or emccd, got {camera_model!r}")
  t0 = time.time()
  cam_cfg = sim_cfg.camera
  qe = float(cam_cfg.qe)
  cum = movie_cumulants(frames_adu)
  boot = bootstrap_indices(cum.count.size, num_bootstrap, seed)
  cams = {m: camera_fit(cum, m, qe, offset_adu, gain_adu_per_e, boot) for m in CAMERA_MODELS}
  kappa, kappa_se = cams["scmos"]["value"]["kappa"], cams["scmos"]["se"]["kappa"]
  preference = excess_noise_preference(kappa, kappa_se)
  forced = camera_model != "auto"
  tried = [camera_model] if forced else list(CAMERA_MODELS)
  # Candidates pass the camera checks; the simulator is fitted only for them.
  candidates = [m for m in tried if not cams[m]["failed"]]
  if not candidates:
    if not allow_implausible:
      raise ImplausibleCalibration(implausible_message(cams, {}, tried, forced, preference))
    if preference[0] in tried:
      candidates = [preference[0]]
    else:
      candidates = [min(tried, key=lambda m: len(cams[m]["failed"]))]
  fits = {m: fit_simulator(frames_adu, sim_cfg, cams[m], fit_D, steps, num_sim,
                           learning_rate, seed, progress, boot) for m in candidates}
  passing = [m for m in candidates if not cams[m]["failed"] and not fits[m]["failed"]]
  if forced:
    chosen = camera_model
    reason = f"forced on the command line; {preference[2]}"
  elif len(passing) == 2:
    if preference[0] is not None and preference[1]:
      chosen = preference[0]
      reason = f"both fits plausible; {preference[2]}"
    else:
      chosen = min(passing, key=lambda m: fits[m]["distance_after"])
      other = [m for m in passing if m != chosen][0]
      reason = (f"both fits plausible and {preference[2]}; lower final distance "
                f"({fits[chosen]['distance_after']:.3g} vs {fits[other]['distance_after']:.3g})")
  elif len(passing) == 1:
    chosen = passing[0]
    other = [m for m in CAMERA_MODELS if m != chosen][0]
    bad = cams[other]["failed"] + (fits[other]["failed"] if other in fits else [])
    reason = (f"the {MODEL_LABELS[other]} fit is implausible ({check_text(bad[0])}); "
              f"{preference[2]}")
  else:
    if not allow_implausible:
      raise ImplausibleCalibration(implausible_message(cams, fits, tried, forced,
                                                       preference))
    chosen = preference[0] if preference[0] in candidates else candidates[0]
    reason = f"no plausible fit (--allow_implausible); {preference[2]}"

  cam, fit = cams[chosen], fits[chosen]
  v, cse = cam["value"], cam["se"]
  em_gain = float(cam_cfg.em_gain) if chosen == "emccd" else 1.0
  g = v["gain_adu_per_e"]
  bg_direct = (cum.mean[cum.ok] - v["offset_adu"]) / (g * qe)
  fitted = fit["fitted"]
  failed = cam["failed"] + fit["failed"]
  warnings = cams[chosen]["notes"] + fit["notes"] + [
      f"IMPLAUSIBLE: {MODEL_LABELS[chosen]} {check_text(c)}" for c in failed]
  result = {
      "psf_fwhm_nm": fitted["psf_fwhm_nm"],
      "psf_fwhm_nm_se": fit["se"]["psf_fwhm_nm"],
      "photons": log_uniform_moments(fitted["photons"]),
      "photons_mean_se": fit["se"]["photons_mean"],
      "background_photons": dict(log_uniform_moments(fitted["background_photons"]),
                                 mean=float(np.mean(bg_direct)),
                                 std=float(np.std(bg_direct))),
      "background_photons_mean_se": cse["background_photons"],
      "camera_offset_adu": v["offset_adu"],
      "camera_offset_adu_se": cse["offset_adu"],
      "camera_gain_adu_per_e": g,
      "camera_gain_adu_per_e_se": cse["gain_adu_per_e"],
      "read_noise_e": v["read_noise_adu"] / (g / em_gain),
      "read_noise_e_se": cse["read_noise_adu"] / (g / em_gain),
      "camera_model": chosen,
      "em_gain": em_gain,
      "qe": qe,
      "read_noise_input_e": v["read_noise_input_e"],
      "read_noise_input_e_se": cse["read_noise_input_e"],
      "fixed": cam["fixed"],
      "camera_model_selection": {
          "mode": "forced" if forced else "auto", "chosen": chosen, "reason": reason,
          "excess_noise_ratio": kappa, "excess_noise_ratio_se": kappa_se,
          "fits": {m: _fit_summary(cams[m], fits.get(m)) for m in CAMERA_MODELS}},
      "warnings": warnings,
      "pixel_size_nm": float(sim_cfg.pixel_size_nm),
      "frame_interval_s": float(sim_cfg.frame_interval_s),
      "exposure_s": float(sim_cfg.exposure_s),
      "num_movies": int(frames_adu.shape[0]),
      "num_bootstrap": 0 if boot is None else int(boot.shape[0]),
      "distance_before": fit["distance_before"],
      "distance_after": fit["distance_after"],
      "statistics": list(STAT_NAMES),
      "photon_transfer": {"method": cam["gain_method"],
                          "gain_relative_se": (cam["slope_se"] / cam["slope"]
                                               if cam["slope"] > 0 else float("nan")),
                          "read_variance_adu2": cam["read_variance_adu2"],
                          "data_low_quantile_adu": cum.low_quantile_adu},
      "seconds": time.time() - t0,
  }
  if failed:
    result["implausible"] = [check_text(c) for c in failed]
  if fit_D:
    result["D_um2_per_s"] = log_uniform_moments(fitted["D_um2_per_s"])
    result["D_mean_se"] = fit["se"]["D_mean"]
  # Arrays for plots (not written to JSON).
  ok = cum.ok
  result["_plot"] = dict(fit["_plot"], pt={
      "movie_mean_adu": cum.mean[ok], "movie_k2": cum.k2[ok], "movie_k3": cum.k3[ok],
      "lines": {m: (cams[m]["value"]["offset_adu"], cams[m]["value"]["gain_adu_per_e"],
                    cams[m]["read_variance_adu2"]) for m in CAMERA_MODELS}})
  return result


def _finite(x):
  """JSON-safe: NaN/inf -> None, recursively."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x) if np.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x


def json_text(result: dict) -> str:
  return json.dumps(_finite({k: v for k, v in result.items() if not k.startswith("_")}),
                    indent=1)


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


def load_movies(paths, sim_cfg, log=print):
  """[M, T, H, W] ADU windows of the config's shape, and a list of skipped inputs."""
  skipped, windows = [], []
  t, h, w = int(sim_cfg.num_frames), int(sim_cfg.height_px), int(sim_cfg.width_px)
  skip_log = lambda msg, **kw: log(msg.replace("error: ", "skipped: ", 1), **kw)  # noqa: E731
  for path, movie, starts, error in tiff_io.scan_inputs(paths, t, h, w, None, "reading",
                                                       skip_log):
    if error:
      skipped.append((path, error[0]))
      continue
    windows += [movie.frames[s:s + t] for s in starts]
  if not windows:
    return np.zeros((0, t, h, w), np.float32), skipped
  return np.stack(windows), skipped


def _pm(value, se, spec, fixed=False):
  text = format(value, spec)
  if fixed:
    return f"{text} (fixed)"
  if se is None or not np.isfinite(se):
    return text
  return f"{text} ± {format(se, spec)}"


def summary_table(result: dict) -> str:
  """Console table: values ± standard errors, the model choice, warnings."""
  sel = result.get("camera_model_selection", {})
  fixed = result.get("fixed", {})
  model = result.get("camera_model", "scmos")
  rows = [("camera model", f"{MODEL_LABELS.get(model, model)} ({sel.get('mode', '?')}: "
                           f"{sel.get('reason', '')})"),
          ("camera offset (ADU)", _pm(result["camera_offset_adu"],
                                      result.get("camera_offset_adu_se"), ".2f",
                                      "camera_offset_adu" in fixed)),
          ("camera gain (ADU/e-)", _pm(result["camera_gain_adu_per_e"],
                                       result.get("camera_gain_adu_per_e_se"), ".4g",
                                       "camera_gain_adu_per_e" in fixed)),
          ("read noise, input (e-)", _pm(result.get("read_noise_input_e", float("nan")),
                                         result.get("read_noise_input_e_se"), ".3f")),
          ("PSF FWHM (nm)", _pm(result["psf_fwhm_nm"], result.get("psf_fwhm_nm_se"), ".1f"))]
  for key, se_key in (("photons", "photons_mean_se"),
                      ("background_photons", "background_photons_mean_se"),
                      ("D_um2_per_s", "D_mean_se")):
    if key in result:
      v = result[key]
      rows.append((key, f"mean {_pm(v['mean'], result.get(se_key), '.4g')}, std "
                        f"{v['std']:.4g}, log-uniform {v['low']:.4g}-{v['high']:.4g}"))
  for m, f in sel.get("fits", {}).items():
    offset, gain = (_pm(f[k], f[f"{k}_se"], ".4g", k in fixed)
                    for k in ("camera_offset_adu", "camera_gain_adu_per_e"))
    text = f"offset {offset} ADU, gain {gain} ADU/e-, read {f['read_noise_input_e']:.3g} e-"
    if "distance_after" in f:
      text += (f", FWHM {_pm(f['psf_fwhm_nm'], f['psf_fwhm_nm_se'], '.0f')} nm, "
               f"distance {f['distance_after']:.3g}")
    text += " -> " + ("IMPLAUSIBLE: " + f["implausible"][0] if f["implausible"]
                      else "plausible")
    rows.append((f"{MODEL_LABELS.get(m, m)} fit", text))
  for w in result.get("warnings", []):
    rows.append(("WARNING", w))
  rows += [("distance before -> after",
            f"{result['distance_before']:.4g} -> {result['distance_after']:.4g}"),
           ("seconds", f"{result['seconds']:.1f}")]
  width = max(len(r[0]) for r in rows)
  return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def _define_flags():
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/diffusion.py",
                                  "Config whose sim section is calibrated.")
  flags.DEFINE_multi_string("input", [], "TIFF file or folder; repeat for several.")
  flags.DEFINE_string("output", None, "Calibration JSON to write.")
  flags.DEFINE_string("plot", None, "Optional PNG of real vs simulated statistics.")
  flags.DEFINE_enum("camera_model", "auto", ["auto", "scmos", "emccd"],
                    "auto: fit both and pick the one the data support; or force one "
                    "(same as giving --config.sim.camera.model on the command line).")
  flags.DEFINE_float("camera_offset_adu", None,
                     "Known camera baseline (ADU, e.g. from the spec sheet): fixed, the "
                     "rest is fitted.")
  flags.DEFINE_float("camera_gain_adu_per_e", None,
                     "Known ADU per photo-electron (EMCCD: including EM gain): fixed.")
  flags.DEFINE_bool("allow_implausible", False,
                    "Write a fit that fails the plausibility checks (listed in the JSON "
                    "under 'implausible') instead of exiting with status 3.")
  flags.DEFINE_bool("fit_D", False, "Also fit the population range of D.")
  flags.DEFINE_integer("steps", 120, "optax steps.")
  flags.DEFINE_integer("num_sim", 128, "Simulated movies per loss evaluation.")
  flags.DEFINE_float("learning_rate", 0.05, "Adam learning rate on log parameters.")
  flags.DEFINE_integer("bootstrap", 200, "Bootstrap resamples over movies for standard "
                       "errors (0: none).")
  flags.DEFINE_integer("seed", 0, "Seed of the simulated set and the bootstrap.")


def camera_model_flag(f) -> str:
  """'auto' or the forced model: --camera_model, or --config.sim.camera.model given on
  the command line (the config file's own value is a training default, not a choice)."""
  from ml_collections import config_flags
  override = config_flags.get_override_values(f["config"]).get("sim.camera.model")
  if override is not None and f.camera_model not in ("auto", override):
    cli.fail(f"--camera_model={f.camera_model} contradicts "
             f"--config.sim.camera.model={override}; give one")
  if override is not None:
    if override not in CAMERA_MODELS:
      cli.fail(f"--config.sim.camera.model must be scmos or emccd, got {override!r}")
    return override
  return f.camera_model


def main(argv):
  cli.quiet_logs()
  f = flags.FLAGS
  inputs = cli.inputs_and_output(f, argv, "a .json file")
  if f.steps < 1 or f.num_sim < 8:
    cli.fail("--steps must be >= 1 and --num_sim >= 8")
  if f.bootstrap == 1 or f.bootstrap < 0:
    cli.fail("--bootstrap must be 0 (no standard errors) or >= 2")
  if f.camera_gain_adu_per_e is not None and not f.camera_gain_adu_per_e > 0:
    cli.fail("--camera_gain_adu_per_e must be > 0")
  model = camera_model_flag(f)
  sim_cfg = f.config.sim
  frames, skipped = load_movies(inputs, sim_cfg)
  if frames.shape[0] < 8:
    cli.fail(f"only {frames.shape[0]} usable movie window(s); calibration needs >= 8")
  print(f"calibrating on {frames.shape[0]} movie window(s) "
        f"({len(skipped)} input(s) skipped), camera model {model}", file=sys.stderr)
  try:
    result = calibrate(frames, sim_cfg, fit_D=f.fit_D, steps=f.steps, num_sim=f.num_sim,
                       learning_rate=f.learning_rate, seed=f.seed, camera_model=model,
                       offset_adu=f.camera_offset_adu,
                       gain_adu_per_e=f.camera_gain_adu_per_e,
                       allow_implausible=f.allow_implausible, num_bootstrap=f.bootstrap)
  except ImplausibleCalibration as e:
    cli.fail(str(e), code=3)
  except CalibrationFailed as e:
    cli.fail(str(e))
  cli.atomic_write_text(f.output, json_text(result))
  print(summary_table(result))
  print(f"wrote {f.output}", file=sys.stderr)
  if f.plot:
    plot_calibration(result, f.plot)
    print(f"wrote {f.plot}", file=sys.stderr)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
