"""Stage 2: PSF, emitter photons, background (and optionally the population of D)
through the differentiable simulator with optax.

The simulated set is ~128 movies whose random numbers (trajectory normals, start and
gradient uniforms, stratified quantiles of the parameter priors, pixel noise normals)
are drawn once (``make_sim_statistics``): parameters enter only through
differentiable maps (reparameterization; the pixel noise is Gaussian with the
Poisson/EMCCD variance), so the loss, the distance between the real and simulated
statistics (``statistics``), is a smooth, deterministic function of the parameters
(``parameters``). ``fit_simulator`` minimizes it from ranges measured on the data,
keeps the best step, gets standard errors from ``uncertainty`` and checks the PSF FWHM
(in [max(150 nm, 0.75 px), 1000 nm]: 150 nm ~ 0.51 lambda / NA for 450 nm at NA 1.49;
wider than 1 um is not a single in-focus molecule) and the spot photons (20-1e6 per
frame), each with 2 standard errors of slack.
"""
from __future__ import annotations

import math

import numpy as np

from smlm_jax.core import cli
from smlm_jax.diffusion.calibration.camera import (CUMULANT_FACTORS, MODEL_LABELS,
                                                   check_range)
from smlm_jax.diffusion.calibration.parameters import (params_from_ranges,
                                                       ranges_from_params, reported)
from smlm_jax.diffusion.calibration.statistics import (Noise, movie_statistics,
                                                       quantiles, robust_scale,
                                                       stat_distance)
from smlm_jax.diffusion.calibration.uncertainty import linearized_bootstrap

FWHM_RANGE_NM = (150.0, 1000.0)
PHOTONS_RANGE = (20.0, 1e6)


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
  scale = jnp.asarray(robust_scale(np.asarray(real_stats)))

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
  value = reported(params, fit_D)
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
      check_range("PSF FWHM", value["psf_fwhm_nm"], se["psf_fwhm_nm"], fwhm_low,
             FWHM_RANGE_NM[1], "nm", f"diffraction limit ~150 nm, >= 0.75 px of {pixel:g} "
             "nm, <= 1 um for one in-focus molecule", hint),
      check_range("spot photons", value["photons_mean"], se["photons_mean"], *PHOTONS_RANGE,
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
