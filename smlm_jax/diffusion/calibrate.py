"""Differentiable calibration: fit the simulator's camera, PSF and emitter to real movies.

  python -m smlm_jax.diffusion.calibrate --input=PATH [--input=PATH ...] \
      --config=configs/diffusion.py --output=calibration.json [--plot=calibration.png] \
      [--fit_D] [--steps=120] [--num_sim=128]

Two stages.

1. Camera by photon transfer (closed form, no simulation). Away from the spot, every
   pixel's 16 values are independent draws of offset + gain x (Poisson electrons
   [+ EM register] + read noise). The unbiased k-statistics of each pixel over time
   estimate its cumulants; averaged over a movie's background pixels they obey
       mean  = offset + g u,   k2 = F2 g u + s^2,   k3 = F3 g^2 u
   with u the mean background in electrons, g the ADU per photo-electron, s^2 the read
   variance in ADU^2, and (F2, F3) = (1, 1) for sCMOS, (2, 6) for an EMCCD (exponential
   per-electron EM gain). Only a static background is assumed, so illumination tilts
   and per-pixel offsets do not matter; the third cumulant is what separates the
   offset from the read noise (variance vs. mean alone only gives the gain). The gain
   comes from the variance-vs-mean slope over movies, the offset from k3, the read
   noise from what is left of k2.

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

The JSON written holds the keys of :data:`JSON_KEYS` (distributions as
{"mean", "std", "low", "high"}: low/high is the fitted log-uniform range that training
uses; mean/std are those of the fitted distribution, except for the background, whose
mean/std are measured directly on every movie's spot-free pixels in stage 1), the distances before (training defaults) and after,
and the assumed geometry. Train with it via ``--config.sim.calibration=FILE`` and
predict with ``--calibration=FILE``.
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
STAT_NAMES = ("log background", "log spot photons", "shape", "motion")
CUMULANT_FACTORS = {"scmos": (1.0, 1.0), "emccd": (2.0, 6.0)}
NUM_QUANTILES = 32
WINDOW_PX = 15
SPOT_EXCLUSION_PX = 8


class CalibrationFailed(ValueError):
  """Calibration cannot proceed with these movies; the message says why."""


# --------------------------------------------------------------- stage 1: the camera
def background_masks(frames_adu: np.ndarray, radius_px: int = SPOT_EXCLUSION_PX):
  """[M, H, W] True where a pixel is farther than radius_px from every frame's spot."""
  import jax.numpy as jnp
  from smlm_jax.diffusion import normalize
  frames = jnp.asarray(frames_adu, jnp.float32)
  level = jnp.median(frames.reshape(frames.shape[0], -1), axis=-1)[:, None, None, None]
  py, px, _ = normalize.brightest_box(frames - level)              # [M, T]
  near = normalize.square_mask(py, px, radius_px, *frames.shape[-2:])
  return ~np.asarray(jnp.any(near, axis=1))                         # [M, H, W]


def pixel_cumulants(frames_adu: np.ndarray, masks: np.ndarray):
  """Per movie: (number of background pixels, mean, mean k2, mean k3, se k2, se k3).

  k2, k3 are the unbiased k-statistics of each pixel's T values (float64).
  """
  x = np.asarray(frames_adu, np.float64)
  n = x.shape[1]
  if n < 3:
    raise CalibrationFailed("photon transfer needs at least 3 frames per movie")
  mean = x.mean(axis=1)
  d = x - mean[:, None]
  m2 = (d ** 2).mean(axis=1)
  m3 = (d ** 3).mean(axis=1)
  k2 = n / (n - 1) * m2
  k3 = n * n / ((n - 1) * (n - 2)) * m3
  out = []
  for i in range(x.shape[0]):
    sel = masks[i]
    c = int(sel.sum())
    if c < 16:
      out.append((0, np.nan, np.nan, np.nan, np.nan, np.nan))
      continue
    a2, a3 = k2[i][sel], k3[i][sel]
    out.append((c, mean[i][sel].mean(), a2.mean(), a3.mean(), a2.std() / math.sqrt(c),
                a3.std() / math.sqrt(c)))
  return np.array(out, dtype=np.float64).T


def photon_transfer(frames_adu: np.ndarray, camera_model: str = "scmos") -> dict:
  """Camera gain (ADU per photo-electron), offset (ADU) and read noise (ADU) from movies.

  With mean_m = offset + g u_m, k2_m = F2 g u_m + s^2, k3_m = F3 g^2 u_m over movies m
  (see the module docstring): g from the weighted slope of k2 vs. mean (or from
  k3 / k2 when the backgrounds are too alike for a slope), the offset from k3, and s^2
  from the k2 intercept. A negative s^2 (the data's noise does not follow the camera
  model exactly) is reported in ``read_variance_adu2`` and the read noise set to 0.
  """
  f2, f3 = CUMULANT_FACTORS[camera_model]
  count, mu, k2, k3, se2, se3 = pixel_cumulants(frames_adu, background_masks(frames_adu))
  ok = count > 0
  if ok.sum() < 2:
    raise CalibrationFailed("fewer than 2 movies have background pixels away from the spot")
  mu, k2, k3, se2, se3 = mu[ok], k2[ok], k3[ok], se2[ok], se3[ok]
  se2 = np.maximum(se2, 1e-6 * np.abs(k2).max())
  se3 = np.maximum(se3, 1e-6 * np.abs(k3).max())
  if np.mean(k3) <= 0:
    raise CalibrationFailed("background pixels show no positive skew (third cumulant); "
                            "the data do not look like photon counts in ADU")
  w2 = 1.0 / se2 ** 2
  # Gain from the slope of variance vs. mean (classic photon transfer) when the movies'
  # background levels spread enough to pin it (slope standard error < 10%) ...
  xm = np.sum(w2 * mu) / np.sum(w2)
  sxx = np.sum(w2 * (mu - xm) ** 2)
  slope = np.sum(w2 * (mu - xm) * k2) / sxx
  resid = k2 - (np.sum(w2 * k2) / np.sum(w2) + slope * (mu - xm))
  dof = max(len(mu) - 2, 1)
  slope_se = math.sqrt(np.sum(w2 * resid ** 2) / dof / sxx)
  if slope > 0 and slope_se < 0.1 * slope:
    method = "variance slope"
    g = slope / f2
  else:   # ... else from the third cumulant: k3 / k2 = (F3 / F2) g, read noise neglected.
    method = "k3/k2 (backgrounds too similar for a slope)"
    g = f2 * np.sum(k3) / (f3 * np.sum(k2))
  # Offset from the third cumulant: u = k3 / (F3 g^2) electrons, offset = mean - g u.
  w3 = 1.0 / se3 ** 2
  offset = float(np.sum(w3 * (mu - k3 / (f3 * g * g))) / np.sum(w3))
  s2 = float(np.sum(w2 * (k2 - f2 * g * (mu - offset))) / np.sum(w2))
  return {"gain_adu_per_e": float(g), "offset_adu": float(offset),
          "read_noise_adu": float(math.sqrt(max(s2, 0.0))), "read_variance_adu2": s2,
          "method": method, "gain_relative_se": float(slope_se / slope) if slope > 0
          else float("nan"),
          "movie_mean_adu": mu, "movie_k2": k2, "movie_k3": k3, "used": ok,
          "background_pixels": count}


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


def calibrate(frames_adu: np.ndarray, sim_cfg, fit_D: bool = False, steps: int = 120,
              num_sim: int = 128, learning_rate: float = 0.05, seed: int = 0,
              progress: bool = True) -> dict:
  """Full calibration of [M, T, H, W] ADU movies against the config's simulator."""
  import jax
  import jax.numpy as jnp
  import optax
  from smlm_jax.diffusion import camera_setup
  from smlm_jax.core import noise as noise_lib
  from smlm_jax.diffusion import normalize
  from smlm_jax.diffusion import simulator as sim_lib

  t0 = time.time()
  simulator = sim_lib.simulator_from_config(sim_cfg)
  cam_cfg = sim_cfg.camera
  model = str(cam_cfg.model)
  em_gain = float(cam_cfg.em_gain) if model == "emccd" else 1.0
  qe = float(cam_cfg.qe)
  excess = CUMULANT_FACTORS[model][0]

  # Stage 1: camera.
  pt = photon_transfer(frames_adu, model)
  g, offset = pt["gain_adu_per_e"], pt["offset_adu"]
  # Background photons of each movie, measured directly on its spot-free pixels.
  bg_direct = (pt["movie_mean_adu"] - offset) / (g * qe)
  read_in_e = pt["read_noise_adu"] / g                   # referred to photo-electrons
  camera = noise_lib.Camera(model="scmos", qe=qe, gain_adu_per_e=g, offset_adu=offset,
                            read_noise_e=read_in_e)
  noise = Noise(qe=qe, excess=excess, read_e=read_in_e)
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
  bar = cli.progress(total=steps, desc="calibrate", unit="step") if progress else None
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

  result = {
      "psf_fwhm_nm": fitted["psf_fwhm_nm"],
      "photons": log_uniform_moments(fitted["photons"]),
      "background_photons": dict(log_uniform_moments(fitted["background_photons"]),
                                 mean=float(np.mean(bg_direct)),
                                 std=float(np.std(bg_direct))),
      "camera_offset_adu": offset,
      "camera_gain_adu_per_e": g,
      "read_noise_e": pt["read_noise_adu"] / (g / em_gain),
      "camera_model": model,
      "em_gain": em_gain,
      "qe": qe,
      "read_noise_input_e": read_in_e,
      "pixel_size_nm": float(sim_cfg.pixel_size_nm),
      "frame_interval_s": float(sim_cfg.frame_interval_s),
      "exposure_s": float(sim_cfg.exposure_s),
      "num_movies": int(frames_adu.shape[0]),
      "distance_before": distance_before,
      "distance_after": float(distance_after),
      "statistics": list(STAT_NAMES),
      "photon_transfer": {"method": pt["method"],
                          "gain_relative_se": pt["gain_relative_se"],
                          "read_variance_adu2": pt["read_variance_adu2"]},
      "seconds": time.time() - t0,
  }
  if fit_D:
    result["D_um2_per_s"] = log_uniform_moments(fitted["D_um2_per_s"])
  # Arrays for plots (not written to JSON).
  result["_plot"] = {
      "real": np.asarray(real_stats), "real_default": np.asarray(real_default),
      "sim_default": np.asarray(sim_default),
      "sim_fitted": np.asarray(sim_stats(params)), "history": np.array(history),
      "pt": pt}
  return result


def json_text(result: dict) -> str:
  return json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=1)


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
  ax.plot(pt["movie_mean_adu"], pt["movie_k2"], ".", ms=4, label="movies: variance")
  xs = np.linspace(pt["movie_mean_adu"].min(), pt["movie_mean_adu"].max(), 10)
  f2 = CUMULANT_FACTORS[result["camera_model"]][0]
  s2 = pt["read_variance_adu2"]
  ax.plot(xs, f2 * result["camera_gain_adu_per_e"] * (xs - result["camera_offset_adu"]) + s2,
          "r-", label=f"fit: {f2:g} x gain x (mean - offset) + read variance")
  ax.set(xlabel="background mean (ADU)", ylabel="temporal variance (ADU$^2$)",
         title="photon transfer")
  ax.legend(fontsize=7)
  ax = axes.flat[5]
  ax.semilogy(d["history"])
  ax.set(xlabel="optax step", ylabel="distance", title="fit")
  fig.suptitle(
      f"FWHM {result['psf_fwhm_nm']:.0f} nm | photons {result['photons']['mean']:.0f} "
      f"({result['photons']['low']:.0f}-{result['photons']['high']:.0f}) | background "
      f"{result['background_photons']['mean']:.1f} ph/px | offset "
      f"{result['camera_offset_adu']:.1f} ADU | gain {result['camera_gain_adu_per_e']:.3f} "
      f"ADU/e | read {result['read_noise_e']:.2f} e | distance "
      f"{result['distance_before']:.3g} -> {result['distance_after']:.3g}", fontsize=9)
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


def _define_flags():
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", "configs/diffusion.py",
                                  "Config whose sim section is calibrated.")
  flags.DEFINE_multi_string("input", [], "TIFF file or folder; repeat for several.")
  flags.DEFINE_string("output", None, "Calibration JSON to write.")
  flags.DEFINE_string("plot", None, "Optional PNG of real vs simulated statistics.")
  flags.DEFINE_bool("fit_D", False, "Also fit the population range of D.")
  flags.DEFINE_integer("steps", 120, "optax steps.")
  flags.DEFINE_integer("num_sim", 128, "Simulated movies per loss evaluation.")
  flags.DEFINE_float("learning_rate", 0.05, "Adam learning rate on log parameters.")
  flags.DEFINE_integer("seed", 0, "Seed of the simulated set.")


def main(argv):
  cli.quiet_logs()
  f = flags.FLAGS
  inputs = cli.inputs_and_output(f, argv, "a .json file")
  if f.steps < 1 or f.num_sim < 8:
    cli.fail("--steps must be >= 1 and --num_sim >= 8")
  sim_cfg = f.config.sim
  frames, skipped = load_movies(inputs, sim_cfg)
  if frames.shape[0] < 8:
    cli.fail(f"only {frames.shape[0]} usable movie window(s); calibration needs >= 8")
  print(f"calibrating on {frames.shape[0]} movie window(s) "
        f"({len(skipped)} input(s) skipped)", file=sys.stderr)
  try:
    result = calibrate(frames, sim_cfg, fit_D=f.fit_D, steps=f.steps, num_sim=f.num_sim,
                       learning_rate=f.learning_rate, seed=f.seed)
  except CalibrationFailed as e:
    cli.fail(str(e))
  cli.atomic_write_text(f.output, json_text(result))
  print(summary_table(result))
  print(f"wrote {f.output}", file=sys.stderr)
  if f.plot:
    plot_calibration(result, f.plot)
    print(f"wrote {f.plot}", file=sys.stderr)


def summary_table(result: dict) -> str:
  rows = [("camera offset (ADU)", f"{result['camera_offset_adu']:.2f}"),
          ("camera gain (ADU/e-)", f"{result['camera_gain_adu_per_e']:.4f}"),
          ("read noise (e-)", f"{result['read_noise_e']:.3f}"),
          ("PSF FWHM (nm)", f"{result['psf_fwhm_nm']:.1f}")]
  for key in ("photons", "background_photons", "D_um2_per_s"):
    if key in result:
      v = result[key]
      rows.append((key, f"mean {v['mean']:.4g}, std {v['std']:.4g}, log-uniform "
                        f"{v['low']:.4g}-{v['high']:.4g}"))
  pt = result.get("photon_transfer", {})
  if pt.get("read_variance_adu2", 0.0) < 0:
    rows.append(("WARNING", f"the variance-vs-mean line implies a negative read variance "
                 f"({pt['read_variance_adu2']:.4g} ADU^2), so the data's noise does not "
                 f"follow the {result['camera_model']} model exactly (check "
                 "--config.sim.camera.model); read noise set to 0"))
  rows += [("distance before -> after",
            f"{result['distance_before']:.4g} -> {result['distance_after']:.4g}"),
           ("seconds", f"{result['seconds']:.1f}")]
  width = max(len(r[0]) for r in rows)
  return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
