"""locformer physics: the in-model spot fit reaches its stated precision and sees the
blur, the tridiagonal track likelihood is the exact Gaussian likelihood of blurred
positions (gaps included), and the untrained model's posterior is already calibrated."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import diffusion
from smlm_jax.diffusion import models, normalize
from smlm_jax.diffusion import simulator as sim_lib

DT, R = 0.01, 1.0 / 6.0   # frame interval (s), full-exposure blur coefficient


def _blurred_position_cov(T, D_dt):
  """Covariance (px^2) of the frame-averaged positions of 1D Brownian motion with the
  shutter open the whole frame: Cov(X_i, X_j) = 2 D (min of the two frames' mean
  time), and 2 D (i dt + dt / 3) on the diagonal (E min(s, t) of one frame)."""
  i = np.arange(T)
  cov = 2 * D_dt * (np.minimum.outer(i, i) + 0.5)
  cov[i, i] = 2 * D_dt * (i + 1.0 / 3.0)
  return cov


def _dense_loglik(pos, var, D_dt, keep):
  """ln p (without 2 pi) of the displacements between consecutive kept frames, per
  axis summed, from the full covariance of blurred positions + localization noise."""
  keep = np.asarray(keep)
  A = np.zeros((keep.size - 1, keep.size))
  A[np.arange(keep.size - 1), np.arange(keep.size - 1)] = -1
  A[np.arange(keep.size - 1), np.arange(1, keep.size)] = 1
  total = 0.0
  for ax in range(2):
    S = _blurred_position_cov(len(pos), D_dt) + np.diag(var[:, ax])
    S = S[np.ix_(keep, keep)]
    C = A @ S @ A.T
    d = A @ pos[keep, ax]
    total += -0.5 * (d @ np.linalg.solve(C, d) + np.linalg.slogdet(C)[1])
  return total


def test_track_likelihood_is_exact_and_a_lost_frame_is_marginalized():
  rng = np.random.default_rng(0)
  T = 9
  pos = rng.normal(scale=0.6, size=(T, 2))
  var = rng.uniform(0.002, 0.05, size=(T, 2))
  lnD = np.log(np.array([0.3, 3.0, 30.0, 300.0]))          # px^2/s
  ll = np.asarray(models.track_log_likelihood(
      jnp.asarray(pos[None], jnp.float32), jnp.asarray(var[None], jnp.float32),
      jnp.asarray(lnD, jnp.float32), DT, R))[0]
  dense = [_dense_loglik(pos, var, math.exp(l) * DT, np.arange(T)) for l in lnD]
  np.testing.assert_allclose(ll, dense, rtol=1e-4, atol=1e-3)
  # Frame 4 lost: a huge variance there must give the likelihood of the track without
  # it (displacement 3 -> 5 spanning two intervals), up to a D-independent constant.
  gap = var.copy()
  gap[4] = models.INVALID_VAR_PX2
  ll_gap = np.asarray(models.track_log_likelihood(
      jnp.asarray(pos[None], jnp.float32), jnp.asarray(gap[None], jnp.float32),
      jnp.asarray(lnD, jnp.float32), DT, R))[0]
  keep = np.delete(np.arange(T), 4)
  without = np.array([_dense_loglik(pos, var, math.exp(l) * DT, keep) for l in lnD])
  diff = ll_gap - without
  # (float32: the 1e3 px^2 variance cancels to ~1e-4 px^2 in the next pivot)
  assert np.ptp(diff) < 0.05, diff
  assert diff.mean() == pytest.approx(-math.log(models.INVALID_VAR_PX2), abs=0.05)


@functools.lru_cache(maxsize=1)
def _fit_movies_fn():
  """jit((keys [N], D) -> (spot fit, true frame positions px, background)) for 8-frame
  32x32 movies of one spot: 1500 photons on 8 photons/px, FWHM 225 nm, near the centre."""
  cfg = diffusion.get_config()
  cfg.sim.num_frames, cfg.sim.height_px, cfg.sim.width_px = 8, 32, 32
  sim = sim_lib.simulator_from_config(cfg.sim)
  model = models.build_model(diffusion.get_model_config("locformer"),
                             **models.physics_context(sim))

  def one(key, D):
    k_start, k_movie = jax.random.split(key)
    start = 1600.0 + jax.random.uniform(k_start, (2,), minval=-100.0, maxval=100.0)
    em = sim_lib.Emitter(D_um2_per_s=D, photons=jnp.float32(1500.0),
                         background_photons=jnp.float32(8.0),
                         background_gradient=jnp.zeros(2), psf_fwhm_nm=jnp.float32(225.0),
                         start_nm=start)
    return sim_lib.simulate_movie(k_movie, em, sim.camera, sim.geometry)

  @jax.jit
  def run(keys, D):
    frames, truth = jax.vmap(one, in_axes=(0, None))(keys, D)
    x, _, _ = normalize.model_input(frames, sim.camera)
    fit, _, bg = model.spot_features(x)
    n = keys.shape[0]
    return fit, truth["positions_nm"].reshape(n, 8, -1, 2).mean(2) / 100.0, bg

  return run


def _fit_movies(D, n_movies, seed):
  fit, pos, bg = _fit_movies_fn()(jax.random.split(jax.random.key(seed), n_movies),
                                  jnp.float32(D))
  return jax.tree.map(np.asarray, fit), np.asarray(pos), np.asarray(bg)


def test_spot_fit_precision_matches_its_standard_errors_and_sees_the_blur():
  fit, true_px, bg = _fit_movies(1e-6, 12, seed=0)
  th, se = fit["theta"], fit["se"]
  assert fit["valid"].all()
  z = (th[..., :2] - true_px) / se[..., :2]                     # 96 frames x 2 axes
  assert abs(z.mean()) < 0.35 and 0.6 < np.mean(z ** 2) < 1.6, (z.mean(), np.mean(z ** 2))
  # ~1500 photons on 8 photons/px background: the Mortensen bound is ~3-4 nm.
  assert 0.02 < np.median(se[..., :2]) < 0.06
  # The background level recovered from the noise of the normalized input.
  assert 5.0 < np.median(bg) < 13.0
  # Width of the static spot: PSF sigma 0.955 px (+ 1/12 px^2 of pixel integration).
  var_static = np.exp(2 * th[..., 4:6]).mean()
  assert var_static == pytest.approx(0.955 ** 2 + 1 / 12, rel=0.1)
  # Motion blur at D = 3 um^2/s adds D t_exp / 3 = 1.0 px^2 per axis on average
  # (measured 1.15 for this seed; the per-frame blur varies by ~60%).
  fit_b, _, _ = _fit_movies(3.0, 12, seed=1)
  excess = np.exp(2 * fit_b["theta"][..., 4:6]).mean() - var_static
  assert 0.7 < excess < 1.4, excess


def test_untrained_locformer_posterior_is_calibrated():
  """Before any training (zero-initialized head) the model's output is the posterior of
  the localized track under the exact likelihood and the log-uniform prior: unbiased
  in ln D, with honest 68% intervals, on movies from the training prior."""
  cfg = diffusion.get_config()
  sim = sim_lib.simulator_from_config(cfg.sim)
  model = models.build_model(cfg.model, **models.physics_context(sim))

  @jax.jit
  def run(key):
    frames, truth = sim.batch(key, 64)
    x, _, _ = normalize.model_input(frames, sim.camera)
    fit, _, _ = model.spot_features(x)
    _, m0, v0 = model.track_posterior(fit)
    return m0, v0, truth["D_um2_per_s"]

  m0, v0, D = map(np.asarray, run(jax.random.key(3)))
  err, sd = m0 - np.log(D), np.sqrt(v0)
  assert np.sqrt(np.mean(err ** 2)) < 0.45
  assert abs(err.mean()) < 0.12
  assert 0.52 < np.mean(np.abs(err) <= sd) < 0.84     # 68% +- 2.5 binomial sd (n = 64)
  assert 0.15 < np.median(sd) < 0.45


def test_build_model_passes_physics_only_to_models_that_declare_it():
  m = models.build_model(diffusion.get_model_config("locformer"), pixel_size_nm=65.0,
                         frame_interval_s=0.02)
  assert m.pixel_size_nm == 65.0 and m.frame_interval_s == 0.02
  cfg = diffusion.get_model_config("locformer")
  cfg.roi_px = 11
  assert models.build_model(cfg, roi_px=15).roi_px == 11     # config wins
  b = models.build_model(diffusion.get_model_config("blurformer"), pixel_size_nm=65.0)
  assert isinstance(b, models.BlurFormer)


def _dot_precisions(jaxpr):
  """The precision of every dot_general in a (closed) jaxpr, sub-jaxprs included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn.params["precision"])
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          found += _dot_precisions(sub)
  return found


def test_spot_fit_stays_finite_on_a_broken_frame_and_runs_in_full_precision():
  """A frame whose fit breaks is reported not valid with finite outputs (in training a
  singular Fisher matrix once gave se = inf, 1 frame in 4096 at step 39 of
  configs/diffusion.py:gpu, and the loss gradient turned NaN); here NaN pixels under
  the spot. The normal equations ask for full float32 (not TF32 on a GPU)."""
  yy, xx = np.mgrid[:64, :64] + 0.5
  frame = 30.0 * np.exp(-((xx - 32.3) ** 2 + (yy - 30.8) ** 2) / 2.0)
  fit = models.fit_spot(jnp.asarray(frame, jnp.float32), 1.0, 0.5, 13, 10)
  assert bool(fit["valid"]) and abs(float(fit["theta"][0]) - 32.3) < 0.1
  frame[30:32, 31:34] = np.nan
  fit = models.fit_spot(jnp.asarray(frame, jnp.float32), 1.0, 0.5, 13, 10)
  assert not bool(fit["valid"])
  for k in ("theta", "se", "chi2"):
    assert np.isfinite(np.asarray(fit[k])).all(), (k, fit[k])
  precisions = _dot_precisions(jax.make_jaxpr(
      lambda f: models.fit_spot(f, 1.0, 0.5, 13, 10))(jnp.asarray(frame, jnp.float32)))
  assert precisions and all(
      p is not None and all(q == jax.lax.Precision.HIGHEST for q in p) for p in precisions)


@functools.lru_cache(maxsize=1)
def _tiny_model_and_fit_fn():
  """(the tiny config's locformer, jit(key -> its spot fits of two simulated movies));
  compiled, as in training (eagerly, every operation compiles on its own: ~1 min)."""
  cfg = diffusion.get_config("tiny")
  sim = sim_lib.simulator_from_config(cfg.sim)
  model = models.build_model(cfg.model, **models.physics_context(sim))

  @jax.jit
  def fit(key):
    frames, _ = sim.batch(key, 2)
    x, _, _ = normalize.model_input(frames, sim.camera)
    return model.spot_features(x)[0]
  return model, fit


def _tiny_model_and_fit(seed):
  model, fit = _tiny_model_and_fit_fn()
  return model, fit(jax.random.key(seed))


def test_locformer_gradient_is_finite_with_a_non_finite_fit_in_the_batch():
  model, fit = _tiny_model_and_fit(0)
  fit = dict(fit, se=fit["se"].at[0, 3].set(jnp.inf), valid=fit["valid"].at[0, 3].set(False))
  g = jax.jit(jax.grad(lambda f: model.track_posterior(fit, f)[1].sum()))(
      jnp.zeros(fit["valid"].shape))
  assert np.isfinite(np.asarray(g)).all()
  assert np.abs(np.asarray(g)).sum() > 0      # the valid frames do carry a gradient


def test_track_posterior_stays_finite_when_a_frame_factor_runs_away():
  """The learned per-frame variance factor is bounded (a frame is never worth less than a
  lost one): at step 743 of the default CPU run one frame's log factor reached 20
  (var ~ 1e8 px^2), float32 cancellation in the LDL recursion gave a negative pivot and
  the loss NaN. With the bound, a runaway factor acts like a lost frame."""
  model, fit = _tiny_model_and_fit(1)
  fit = dict(fit, valid=jnp.ones_like(fit["valid"]))
  g = jnp.zeros(fit["valid"].shape).at[:, 5].set(20.0).at[:, 6].set(100.0)
  posterior = jax.jit(model.track_posterior)       # as in training (and far faster)
  ll, m0, v0 = posterior(fit, g)
  assert np.isfinite(np.asarray(ll)).all() and np.isfinite(np.asarray(m0)).all()
  lost = dict(fit, valid=fit["valid"].at[:, 5:7].set(False))
  _, m_lost, _ = posterior(lost, jnp.zeros_like(g))
  np.testing.assert_allclose(np.asarray(m0), np.asarray(m_lost), atol=0.02)
  grad = jax.jit(jax.grad(lambda f: posterior(fit, f)[1].sum()))(g)
  assert np.isfinite(np.asarray(grad)).all()
