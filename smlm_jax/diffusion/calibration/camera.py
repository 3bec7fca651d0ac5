"""Stage 1: the camera by photon transfer (closed form, no simulation), under both
camera models, with its plausibility checks.

Away from the spot, every
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
slope), the lower final simulator distance (the choice is made in ``pipeline``).

Plausibility (a value fails when it lies outside its range by more than 2 standard
errors): offset in [0, q + 3.09 s] with q the data's 0.1% quantile and s the read
noise in ADU (from the read variance + 2 se: an EMCCD's is poorly pinned; no camera
puts 0.1% of its pixels more than 3.09 read-noise sd below its baseline); gain in
0.05-20 ADU/e- (sCMOS/CCD) or 0.5-2000 ADU/e- (EMCCD: EM x conversion gain); read
noise referred to the input <= 10 e- (sCMOS/CCD) or <= 3 e- (EMCCD: an EM gain >= 20
on a ~60 e- read-out; more defeats the EM register); the model's shot variance may
exceed the measured variance by at most 25% (a negative read variance beyond that
means the model is wrong); with a fixed offset or gain the measured k3 and slope must
match the model's within 25%; background 0-1e5 photons/px/frame. (The PSF FWHM and
spot photons are checked after the simulator fit, in ``fit``.)

Reading order: background cumulants of every movie (``movie_cumulants``), one model's
closed-form camera (``solve_camera``), the plausibility checks (``check_range``), one
model with standard errors and checks (``camera_fit``; ``photon_transfer`` is its
one-call form) and the excess-noise test between the models
(``excess_noise_preference``).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from smlm_jax.diffusion.calibration.uncertainty import bootstrap_indices

CAMERA_MODELS = ("scmos", "emccd")
MODEL_LABELS = {"scmos": "sCMOS", "emccd": "EMCCD"}
CUMULANT_FACTORS = {"scmos": (1.0, 1.0), "emccd": (2.0, 6.0)}
SPOT_EXCLUSION_PX = 8
MIN_SLOPE_PRECISION = 0.1      # variance slope used for the gain when its se < 10%
EXCESS_NOISE_SPLIT = 1.25      # kappa above: EMCCD (1.5); below: sCMOS (<= 1)
MODEL_TOLERANCE = 0.25         # cumulants must match a model within 25%
LOW_QUANTILE, LOW_QUANTILE_Z = 0.001, 3.09
GAIN_RANGE_ADU_PER_E = {"scmos": (0.05, 20.0), "emccd": (0.5, 2000.0)}
READ_NOISE_RANGE_E = {"scmos": (0.0, 10.0), "emccd": (0.0, 3.0)}
BACKGROUND_RANGE_PHOTONS = (0.0, 1e5)


class CalibrationFailed(ValueError):
  """Calibration cannot proceed with these movies; the message says why."""


class ImplausibleCalibration(CalibrationFailed):
  """Every camera model tried gives a physically implausible fit (one-line message)."""


# ------------------------------------------------------------ background cumulants
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


# ---------------------------------------------------------------------- plausibility
def check_range(name, value, se, low, high, unit, why, hint):
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


# ------------------------------------------------------------ one model, with checks
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
      check_range("camera offset", value["offset_adu"], se["offset_adu"], 0.0,
             cum.low_quantile_adu + LOW_QUANTILE_Z * read_high_adu, "ADU",
             "0 to the data's 0.1% quantile + 3.09 read-noise sd", [other_hint, spec_hint]),
      check_range("read variance / background variance", value["read_variance_ratio"],
             se["read_variance_ratio"], -MODEL_TOLERANCE, 1.0, "",
             f"a negative value is shot noise the {MODEL_LABELS[model]} model predicts "
             "but the data do not have", [other_hint, spec_hint]),
      check_range("gain", value["gain_adu_per_e"], se["gain_adu_per_e"],
             *GAIN_RANGE_ADU_PER_E[model], "ADU/e-",
             "EM gain x conversion gain" if model == "emccd" else "sCMOS/CCD conversion gains",
             [other_hint, "--camera_gain_adu_per_e=<from the spec sheet>", more_hint]),
      check_range("input-referred read noise", value["read_noise_input_e"],
             se["read_noise_input_e"], *READ_NOISE_RANGE_E[model], "e-",
             "an EMCCD at EM gain >= 20" if model == "emccd" else "sCMOS/CCD read noise",
             [other_hint, more_hint]),
      check_range("background", value["background_photons"], se["background_photons"],
             *BACKGROUND_RANGE_PHOTONS, "photons/px/frame", "physical range",
             [other_hint, spec_hint]),
  ]
  if offset_adu is not None:
    checks.append(check_range("k3 measured / predicted", value["k3_ratio"], se["k3_ratio"],
                         1 / (1 + MODEL_TOLERANCE), 1 + MODEL_TOLERANCE, "",
                         f"third cumulant of the {MODEL_LABELS[model]} model",
                         [other_hint, "check --camera_offset_adu"]))
  if fit["gain_method"] != "variance slope" and np.isfinite(value["slope_ratio"]):
    checks.append(check_range("variance slope measured / predicted", value["slope_ratio"],
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
