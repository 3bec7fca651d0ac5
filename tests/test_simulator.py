"""Physics of the movie simulator: diffusion, photometry, PSF moments, motion blur."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import diffusion
from smlm_jax.core import noise
from smlm_jax.diffusion import simulator as sim

GEOM = sim.Geometry()
UNIT_CAMERA = noise.Camera(qe=1.0, gain_adu_per_e=1.0, offset_adu=0.0, read_noise_e=0.0)


def _emitter(D=0.0, photons=1000.0, bg=0.0, fwhm=220.0, start=(3200.0, 3200.0)):
  return sim.Emitter(D_um2_per_s=jnp.float32(D), photons=jnp.float32(photons),
                     background_photons=jnp.float32(bg),
                     background_gradient=jnp.zeros(2), psf_fwhm_nm=jnp.float32(fwhm),
                     start_nm=jnp.array(start, jnp.float32))


@pytest.mark.parametrize("exposure_s", [0.01, 0.004])
@pytest.mark.parametrize("D", [0.05, 0.5, 5.0])
def test_msd_is_4Dt(D, exposure_s):
  g = sim.Geometry(exposure_s=exposure_s)
  n = 40_000
  keys = jax.random.split(jax.random.key(0), n)
  pos = jax.jit(jax.vmap(lambda k: sim.brownian_substeps_nm(k, D, jnp.zeros(2), g)))(keys)
  pos = np.asarray(pos, np.float64).reshape(n, g.num_frames, g.substeps, 2)
  for lag in (1, 5, 15):
    msd_nm2 = np.mean(np.sum((pos[:, lag, 0] - pos[:, 0, 0]) ** 2, axis=-1))
    theory_nm2 = 4 * D * 1e6 * lag * g.frame_interval_s
    assert msd_nm2 / theory_nm2 == pytest.approx(1.0, abs=0.02), (lag, msd_nm2, theory_nm2)
  # Between consecutive sub-steps inside one exposure.
  msd_sub = np.mean(np.sum((pos[:, :, 1] - pos[:, :, 0]) ** 2, axis=-1))
  assert msd_sub / (4 * D * 1e6 * g.substep_dt_s) == pytest.approx(1.0, abs=0.02)


def test_static_emitter_photometry_and_moments():
  a = GEOM.pixel_size_nm
  for start in [(3210.0, 3190.0), (1234.5, 4321.0), (3250.0, 3250.0)]:
    e = _emitter(photons=1000.0, fwhm=230.0, start=start)
    frames, truth = sim.simulate_movie(jax.random.key(0), e, UNIT_CAMERA, GEOM, noise=False)
    frame = np.asarray(frames[0], np.float64)
    assert float(truth["in_field_fraction"]) == 1.0
    assert frame.sum() / 1000.0 == pytest.approx(1.0, rel=1e-4)
    xc = (np.arange(GEOM.width_px) + 0.5) * a
    yc = (np.arange(GEOM.height_px) + 0.5) * a
    w = frame / frame.sum()
    mx, my = (w.sum(0) * xc).sum(), (w.sum(1) * yc).sum()
    assert mx == pytest.approx(start[0], abs=0.05)
    assert my == pytest.approx(start[1], abs=0.05)
    var_x = (w.sum(0) * (xc - mx) ** 2).sum()
    sigma = 230.0 / (2 * math.sqrt(2 * math.log(2)))
    # Pixel integration adds a^2/12 to the variance (Sheppard's correction).
    assert var_x == pytest.approx(sigma**2 + a**2 / 12, rel=2e-3)
    assert var_x != pytest.approx(sigma**2, rel=2e-3)


def test_emitter_outside_field():
  e = _emitter(start=(-2000.0, 3200.0))
  frames, truth = sim.simulate_movie(jax.random.key(0), e, UNIT_CAMERA, GEOM, noise=False)
  assert float(truth["in_field_fraction"]) == 0.0
  assert float(jnp.sum(frames[0])) < 1e-3


def test_partially_in_field_fraction():
  """A fast molecule starting at the edge spends a measurable part outside."""
  e = _emitter(D=5.0, start=(50.0, 3200.0))
  keys = jax.random.split(jax.random.key(1), 200)
  frac = jax.vmap(lambda k: sim.simulate_movie(k, e, UNIT_CAMERA, GEOM, False)[1]
                  ["in_field_fraction"])(keys)
  assert 0.2 < float(frac.mean()) < 0.8


@pytest.mark.parametrize("D", [0.2, 1.0])
def test_motion_blur_second_moment(D):
  """E[second moment of a frame about its centroid] = sigma^2 + a^2/12 + blur, where
  for S sub-steps dt apart, blur = E[(1/S) sum_s (x_s - xbar)^2] = 2 D dt (S^2-1)/(6S)
  per axis (-> 2 D t_exp / 6 as S -> inf)."""
  a, fwhm = GEOM.pixel_size_nm, 220.0
  e = _emitter(D=D, photons=1000.0, fwhm=fwhm)
  keys = jax.random.split(jax.random.key(2), 1000)
  frames = jax.jit(jax.vmap(
      lambda k: sim.simulate_movie(k, e, UNIT_CAMERA, GEOM, noise=False)[0]))(keys)
  f = np.asarray(frames, np.float64).reshape(-1, GEOM.height_px, GEOM.width_px)
  xc = (np.arange(GEOM.width_px) + 0.5) * a
  yc = (np.arange(GEOM.height_px) + 0.5) * a
  w = f / f.sum(axis=(1, 2), keepdims=True)
  wx, wy = w.sum(1), w.sum(2)
  mx = (wx * xc).sum(1, keepdims=True)
  my = (wy * yc).sum(1, keepdims=True)
  m2 = 0.5 * ((wx * (xc - mx) ** 2).sum(1) + (wy * (yc - my) ** 2).sum(1))
  sigma2 = (fwhm / (2 * math.sqrt(2 * math.log(2)))) ** 2
  S, dt = GEOM.substeps, GEOM.substep_dt_s
  blur_theory = 2 * D * 1e6 * dt * (S**2 - 1) / (6 * S)
  blur_measured = m2.mean() - sigma2 - a**2 / 12
  se = m2.std() / np.sqrt(len(m2))
  assert abs(blur_measured - blur_theory) < max(4 * se, 0.01 * blur_theory), (
      blur_measured, blur_theory, se)


def test_same_key_batched_and_jit_consistency():
  cfg = diffusion.get_config().sim
  cfg.num_frames, cfg.height_px, cfg.width_px = 4, 24, 24  # eager mode is slow
  s = sim.simulator_from_config(cfg)
  key = jax.random.key(42)
  f1, t1 = s.batch(key, 4)  # eager (no jit)
  f2, _ = s.batch(key, 4)
  np.testing.assert_array_equal(np.asarray(f1), np.asarray(f2))
  single = jax.jit(sim.simulate_random_movie, static_argnums=(1, 3, 4))
  stacked = np.stack([np.asarray(single(jax.random.fold_in(key, b), s.priors, s.camera,
                                        s.geometry, True)[0]) for b in range(4)])
  # Eager, jitted and vmapped code round differently (fused multiply-adds); the
  # read-noise normal comes from the inversion's residual uniform (u - F(k-1)) / p(k),
  # which amplifies a last-bit difference by 1 / p(k) in the Poisson tail. So a few
  # pixels may differ by ~0.01 ADU (the read-noise sd is 3.2 ADU); all others match.
  # How many depends on the CPU's instruction set (0.35% on the CI machine, 0.1% here).
  jitted = jax.jit(lambda k: s.batch(k, 4))(key)[0]
  for other_way in (stacked, np.asarray(jitted)):
    np.testing.assert_allclose(np.asarray(f1), other_way, rtol=1e-5, atol=0.05)
    assert np.mean(np.isclose(np.asarray(f1), other_way, rtol=1e-6, atol=1e-4)) > 0.98
  other = s.batch(jax.random.key(43), 4)[0]
  assert not np.allclose(np.asarray(other), np.asarray(f1))
  assert f1.shape == (4, 4, 24, 24) and f1.dtype == jnp.float32
  assert t1["positions_nm"].shape == (4, 40, 2)
  for name in ("D_um2_per_s", "photons", "background_photons", "in_field_fraction"):
    assert t1[name].shape == (4,)


def test_priors_cover_configured_ranges():
  s = sim.simulator_from_config(diffusion.get_config().sim)
  keys = jax.random.split(jax.random.key(0), 20000)
  e = jax.vmap(lambda k: sim.sample_emitter(k, s.priors, s.geometry))(keys)
  logd = np.log10(np.asarray(e.D_um2_per_s))
  assert logd.min() >= -2 - 1e-6 and logd.max() <= 1 + 1e-6
  # log-uniform: each decade holds a third of the draws.
  counts = np.histogram(logd, bins=[-2, -1, 0, 1])[0] / len(logd)
  np.testing.assert_allclose(counts, 1 / 3, atol=0.02)
  fwhm = np.asarray(e.psf_fwhm_nm)
  assert fwhm.min() >= 200 and fwhm.max() <= 250
  start = np.asarray(e.start_nm)
  assert np.all(np.abs(start - 3200) <= 800 + 1e-3)


def test_noiseless_image_gradients():
  def loss(params, positions):
    e = _emitter(photons=params[0], bg=params[1], fwhm=params[2])
    img = sim.expected_photons(positions, e, GEOM)
    return jnp.sum(jnp.sqrt(img + 1.0))

  pos = jnp.full((160, 2), 3210.0)
  g_params, g_pos = jax.grad(loss, argnums=(0, 1))(jnp.array([800.0, 10.0, 230.0]), pos)
  assert np.all(np.isfinite(np.asarray(g_params)))
  assert np.all(np.asarray(g_params) != 0)
  assert np.all(np.isfinite(np.asarray(g_pos)))
  assert float(jnp.abs(g_pos).sum()) > 0


def test_invalid_geometry_and_priors_are_rejected():
  with pytest.raises(ValueError, match="exposure_s"):
    sim.Geometry(exposure_s=0.02, frame_interval_s=0.01)
  with pytest.raises(ValueError, match="D_um2_per_s"):
    sim.Priors(D_um2_per_s=(1.0, 0.1))
  with pytest.raises(ValueError, match="camera model"):
    noise.Camera(model="ccd")
