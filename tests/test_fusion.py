"""Fusion from one view: simulator physics, N_SSIM, tiled prediction, CLIs, training."""
import dataclasses
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from configs import fusion as fusion_config
from smlm_jax.core import tiff_io
from smlm_jax.fusion import evaluate, metrics, predict, tiling
from smlm_jax.fusion import simulator as sim_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- simulator
def _conditions(sc, **overrides):
  cond = sim_lib.draw_conditions(jax.random.key(0), sc)
  cond.update({k: jnp.asarray(v) for k, v in overrides.items()})
  return cond


def _moments(img, voxel):
  """Centroid and variance (um^2) of an image along each axis."""
  img = np.asarray(img, np.float64)
  out = []
  for axis, d in enumerate(voxel):
    prof = img.sum(axis=tuple(a for a in range(3) if a != axis))
    r = np.arange(prof.size)
    mean = np.sum(r * prof) / prof.sum()
    out.append((mean, np.sum((r - mean) ** 2 * prof) / prof.sum() * d * d))
  return out


def _integrated_variance(sigma_vox):
  """Variance (voxel^2) of a Gaussian integrated over unit voxels (scipy, independent)."""
  from scipy.special import ndtr
  k = np.arange(-30, 31)
  p = ndtr((k + 0.5) / sigma_vox) - ndtr((k - 0.5) / sigma_vox)
  return np.sum(k * k * p) / np.sum(p)


def test_single_view_psf_is_elongated_and_grows_with_depth_as_configured():
  sc = sim_lib.SimConfig(shape=(40, 24, 24), depth_offset_um=(0.0, 20.0))
  dz, dy, dx = sc.voxel_size_um
  mz, my, mx = sc.margins
  base = dict(view_fwhm_xy_um=0.45, view_fwhm_z_um=2.8, blur_growth_length_um=60.0,
              detection_attenuation_um=1e9, illumination_attenuation_um=1e9,
              view_photons=1.0, view_background_photons=0.0)
  for offset, k in ((0.0, 8), (20.0, 30)):        # two depths of the emitter
    cond = _conditions(sc, depth_offset_um=offset, **base)
    obj = jnp.zeros(sc.padded_shape).at[mz + k, my + 12, mx + 12].set(1.0)
    img = sim_lib.single_view_photons(obj, sc, cond)
    depth = offset + k * dz
    growth = 1.0 + depth / 60.0
    (cz, vz), (cy, vy), (cx, vx) = _moments(img, sc.voxel_size_um)
    assert abs(cz - k) < 1e-3 and abs(cy - 12) < 1e-3
    sz = 2.8 * growth / sim_lib.FWHM_PER_SIGMA
    sxy = 0.45 * growth / sim_lib.FWHM_PER_SIGMA
    # pixel-integrated Gaussian: variance sigma^2 + voxel^2 / 12
    np.testing.assert_allclose(vz, sz ** 2 + dz ** 2 / 12, rtol=0.01)
    # laterally sigma < 1 voxel: the exact variance of pixel-integrated samples
    np.testing.assert_allclose(vy, _integrated_variance(sxy / dy) * dy * dy, rtol=0.01)
    np.testing.assert_allclose(vx, vy, rtol=1e-4)
    np.testing.assert_allclose(float(img.sum()), 1.0, rtol=1e-3)   # flux conserved
    assert math.sqrt(vz) / math.sqrt(vy) > 4.0                     # elongated along z
  # The fused PSF is near-isotropic: axial/lateral FWHM as configured (< 2.5).
  cond = _conditions(sc, fused_fwhm_xy_um=0.45, fused_fwhm_z_um=0.9, fused_photons=1.0,
                     fused_background_photons=0.0)
  obj = jnp.zeros(sc.padded_shape).at[mz + 20, my + 12, mx + 12].set(1.0)
  (_, vz), (_, vy), _ = _moments(sim_lib.fused_photons(obj, sc, cond), sc.voxel_size_um)
  np.testing.assert_allclose(vz, _integrated_variance(0.9 / sim_lib.FWHM_PER_SIGMA / dz)
                             * dz * dz, rtol=0.01)
  assert math.sqrt(vz) / math.sqrt(vy) < 2.5


def test_attenuation_along_detection_and_illumination_matches_lengths():
  sc = sim_lib.SimConfig(shape=(30, 16, 40))
  cond = _conditions(sc, depth_offset_um=10.0, illumination_offset_um=5.0,
                     detection_attenuation_um=50.0, illumination_attenuation_um=80.0,
                     view_fwhm_xy_um=0.4, view_fwhm_z_um=2.0, blur_growth_length_um=80.0,
                     view_photons=100.0, view_background_photons=0.0)
  img = np.asarray(sim_lib.single_view_photons(jnp.ones(sc.padded_shape), sc, cond))
  dz, _, dx = sc.voxel_size_um
  z_profile = img.mean(axis=(1, 2))
  slope_z = np.polyfit(np.arange(30) * dz, np.log(z_profile), 1)[0]
  x_profile = img.mean(axis=(0, 1))
  slope_x = np.polyfit(np.arange(40) * dx, np.log(x_profile), 1)[0]
  np.testing.assert_allclose(-1.0 / slope_z, 50.0, rtol=0.02)
  np.testing.assert_allclose(-1.0 / slope_x, 80.0, rtol=0.02)
  # Absolute level at the first slice: photons x exp(-depth/L_det) x mean over x.
  expected = 100.0 * math.exp(-10.0 / 50.0) * np.mean(
      np.exp(-(5.0 + np.arange(40) * dx) / 80.0))
  np.testing.assert_allclose(z_profile[0], expected, rtol=0.02)


def test_randomized_effects_are_off_by_default_and_act_as_specified():
  """Domain randomization (configs/fusion.py randomize_sim): no effect draws anything by
  default; the axial side lobe widens a point's z profile, the halo spreads light
  laterally more at depth, stripes and shadows modulate the sheet along x only."""
  base = sim_lib.SimConfig(shape=(24, 24, 24))
  assert sim_lib.draw_randomized(jax.random.key(0), base) == {}
  sc = dataclasses.replace(base, axial_lobe_weight=(0.3, 0.3), axial_lobe_scale=(2.0, 2.0),
                           halo_fraction=(0.5, 0.5), halo_sigma_um=(2.0, 2.0),
                           scatter_length_um=(20.0, 20.0))
  cond0 = _conditions(base, depth_offset_um=0.0, view_photons=1.0,
                      view_background_photons=0.0, detection_attenuation_um=1e9,
                      illumination_attenuation_um=1e9)
  cond = sim_lib.draw_conditions(jax.random.key(0), sc)
  for k in ("membrane", "view_fwhm_z_um", "view_photons"):    # the other draws unchanged
    assert float(cond[k]) == float(sim_lib.draw_conditions(jax.random.key(0), base)[k])
  cond.update({k: v for k, v in cond0.items() if k not in sim_lib.RANDOMIZED})
  def points(c):                                   # a shallow and a deep point
    mz, my, mx = c.margins
    return jnp.zeros(c.padded_shape).at[mz + 2, my + 12, mx + 12].set(1.0).at[
        mz + 20, my + 12, mx + 12].set(1.0)
  plain = np.asarray(sim_lib.single_view_photons(points(base), base, cond0))
  both = np.asarray(sim_lib.single_view_photons(points(sc), sc, cond))
  # lateral spread beyond 2 voxels, shallow vs deep slice: the halo grows with depth
  far = lambda img, z: 1.0 - img[z, 10:15, 10:15].sum() / img[z].sum()
  assert far(both, 20) > far(plain, 20) + 0.15 and far(both, 20) > far(both, 2) + 0.1
  # the side lobe: more of the light in slices > 4 voxels from the emitter
  tail = lambda img: img[8:16].sum() / img.sum()
  assert tail(both) > 1.5 * tail(plain)
  np.testing.assert_allclose(both.sum(), plain.sum(), rtol=0.05)     # flux kept
  # stripes / shadows: on a uniform specimen only x-dependent losses along each row
  sc2 = dataclasses.replace(base, shadow_strength=(0.02, 0.02))
  cond2 = sim_lib.draw_conditions(jax.random.key(1), sc2)
  cond2.update({k: v for k, v in cond0.items() if k not in sim_lib.RANDOMIZED})
  flat = np.asarray(sim_lib.single_view_photons(jnp.ones(sc2.padded_shape), sc2, cond2))
  ref = np.asarray(sim_lib.single_view_photons(jnp.ones(base.padded_shape), base, cond0))
  ratio = (flat / ref).mean(axis=(0, 1))
  assert np.all(np.diff(ratio) < 0) and ratio[-1] < 0.9 * ratio[0]
  sc3 = dataclasses.replace(base, stripe_amplitude=(0.3, 0.3))
  cond3 = sim_lib.draw_conditions(jax.random.key(1), sc3)
  cond3.update({k: v for k, v in cond0.items() if k not in sim_lib.RANDOMIZED})
  striped = np.asarray(sim_lib.single_view_photons(jnp.ones(sc3.padded_shape), sc3, cond3,
                                                   jax.random.key(5)))
  rel = np.log(striped / ref)
  # stripes run along x: far more variation across y than along x
  assert rel.std(axis=1).mean() > 3.0 * rel.std(axis=2).mean()


def test_specimen_channels_and_config_round_trip():
  cfg = fusion_config.get_config("tiny")
  sc = sim_lib.sim_config(cfg.sim)
  assert sc.shape == (12, 16, 16) and sc.camera.gain_adu_per_e == pytest.approx(2.17)
  render = jax.jit(lambda k, c: sim_lib.render_specimen(k, sc, c))
  for membrane in (False, True):
    cond = _conditions(sc, membrane=membrane, cytoplasm_level=0.05)
    obj = np.asarray(render(jax.random.key(3), cond))
    assert obj.shape == sc.padded_shape and np.isfinite(obj).all()
    assert obj.min() >= 0.05 - 1e-6 and obj.max() > 0.5      # structure above the floor
    if membrane:   # thin sheets: most voxels are near the floor
      assert np.mean(obj < 0.2) > 0.5
  with pytest.raises(ValueError, match="not a simulator parameter"):
    bad = fusion_config.get_config("tiny").sim
    bad.unknown = 1.0
    sim_lib.sim_config(bad)


# ----------------------------------------------------------------------------- metrics
def _reference_ssim(x, y, data_range=1.0, win=7):
  """skimage.metrics.structural_similarity's algorithm (defaults) in plain numpy."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  f = lambda a: ndimage.uniform_filter(a, size=win, mode="reflect")
  n = win ** 3
  cov = n / (n - 1.0)
  ux, uy = f(x), f(y)
  vx = cov * (f(x * x) - ux * ux)
  vy = cov * (f(y * y) - uy * uy)
  vxy = cov * (f(x * y) - ux * uy)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
  p = (win - 1) // 2
  return s[p:-p, p:-p, p:-p].mean()


def test_ssim_matches_skimage_algorithm_and_hand_values():
  rng = np.random.default_rng(0)
  t = ndimage.gaussian_filter(rng.random((20, 18, 17)), 1.5)
  t = metrics.percentile_normalize(t)
  p = t + 0.1 * rng.normal(size=t.shape).astype(np.float32)
  ref = _reference_ssim(p, t)
  np.testing.assert_allclose(metrics.ssim3d(p, t), ref, rtol=1e-5)
  np.testing.assert_allclose(metrics.ssim3d(p, t, slab=4), ref, rtol=1e-5)   # slabs
  from smlm_jax.nn import losses       # the shared convolution-based SSIM agrees
  np.testing.assert_allclose(float(losses.ssim(p, t, 1.0, **metrics.SSIM_KWARGS)), ref,
                             rtol=1e-5)
  # Hand-checked: constant volumes a, b have zero variances, so
  # SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = 1e-4.
  a = np.full((8, 8, 8), 0.5, np.float32)
  b = np.full((8, 8, 8), 0.25, np.float32)
  np.testing.assert_allclose(metrics.ssim3d(a, b), (0.25 + 1e-4) / (0.3125 + 1e-4),
                             rtol=5e-5)     # float32 variances of constants ~1e-8
  assert metrics.n_ssim(0.8, 0.6) == pytest.approx(0.5)   # half the gap closed
  # Percentile normalization: 2nd -> 0, 99.8th -> 1; JAX equals numpy.
  v = rng.gamma(2.0, 50.0, (10, 12, 14)).astype(np.float32)
  n = metrics.percentile_normalize(v)
  lo, hi = np.percentile(v, [2, 99.8])
  np.testing.assert_allclose(n, (v - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(metrics.percentile_normalize_jax(jnp.asarray(v))),
                             n, rtol=1e-4, atol=1e-5)


def test_n_ssim_of_target_is_one_and_of_input_is_zero():
  rng = np.random.default_rng(1)
  fused = 100 + 400 * ndimage.gaussian_filter(rng.random((16, 20, 20)), 1.0)
  view = ndimage.gaussian_filter(fused, (3.0, 0.5, 0.5)) * 0.3 + rng.normal(0, 5, fused.shape)
  m_target = metrics.compare(fused * 7.0 + 3.0, fused, view)   # any affine copy
  assert m_target["n_ssim"] == pytest.approx(1.0, abs=1e-5)
  assert m_target["ssim"] == pytest.approx(1.0, abs=1e-5)
  m_input = metrics.compare(view, fused, view)
  assert m_input["n_ssim"] == pytest.approx(0.0, abs=1e-6)
  assert 0.0 < m_input["input_ssim"] < 0.9
  blurred = metrics.compare(ndimage.gaussian_filter(view, 1.0), fused, view)
  assert blurred["n_ssim"] > 0.0                       # denoising helps


# ------------------------------------------------------------------------------ tiling
def test_tiled_blend_equals_whole_volume_for_a_local_operator():
  rng = np.random.default_rng(2)
  vol = rng.normal(size=(21, 30, 27, 1)).astype(np.float32)
  op = lambda b: np.stack([ndimage.uniform_filter(t[..., 0], 3, mode="constant")
                           for t in b])          # reach 1 voxel, zero padding
  whole = op(vol[None])[0]
  tiled = tiling.predict_tiled(op, vol, tile=(10, 12, 12), overlap=(4, 6, 7),
                               halo=(1, 2, 2), batch_size=3)
  assert tiling.num_tiles(vol.shape[:3], (10, 12, 12), (4, 6, 7), (1, 2, 2)) > 8
  np.testing.assert_allclose(tiled, whole, atol=1e-5)
  # The windows blend smoothly: a constant prediction stays constant (no seams).
  const = tiling.predict_tiled(lambda b: np.ones(b.shape[:4]), vol, (10, 12, 12),
                               (4, 6, 7), (1, 2, 2))
  np.testing.assert_allclose(const, 1.0, rtol=1e-6)
  w = tiling.axis_window(30, 12, 9, 2, 4)
  assert w[0] == 0 and w[1] == 0 and w[-1] == 0 and np.all(np.diff(w[:6]) >= 0)
  with pytest.raises(ValueError, match="twice the halo"):
    tiling.tile_plan((30, 30, 30), (10, 10, 10), (4, 4, 4), (2, 2, 2))
  assert tiling.default_tile((500, 2000, 2000), 8, 2.0, 2) == (160, 160, 160)


# ------------------------------------------------------------------ training and CLIs
@pytest.fixture(scope="module")
def tiny_fusion_run(tmp_path_factory):
  """Two training steps of the tiny config through the shared trainer."""
  from smlm_jax.core import trainer
  cfg = fusion_config.get_config("tiny")
  workdir = str(tmp_path_factory.mktemp("fusion") / "run")
  final = trainer.train_and_evaluate(cfg, workdir)
  return workdir, final


def test_two_training_steps_end_to_end(tiny_fusion_run):
  import json
  workdir, final = tiny_fusion_run
  assert {"n_ssim", "ssim", "input_ssim", "psnr"} <= set(final)
  assert all(np.isfinite(final[k]) for k in ("n_ssim", "ssim", "input_ssim", "psnr"))
  assert 0.0 < final["input_ssim"] < 1.0
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))


def test_tiled_prediction_equals_whole_volume_when_it_fits(tiny_fusion_run):
  workdir, _ = tiny_fusion_run
  p = predict.Predictor(workdir)
  rng = np.random.default_rng(3)
  vol = (100 + 50 * rng.random((12, 16, 16))).astype(np.float32)
  x = p.model_input(vol)
  whole = p.apply_tiles(x[None], 1)[0]
  tiled, n = p.predict(vol, tile=(16, 16, 16))
  assert n == 1
  # A run trained with loss.renormalize (the default) is blind to its output's gain and
  # offset: predict puts the blended volume back in percentile-normalized units.
  assert p.config.loss.renormalize
  np.testing.assert_allclose(metrics.percentiles(tiled), (0.0, 1.0), atol=1e-4)
  np.testing.assert_allclose(tiled, metrics.percentile_normalize(whole), atol=1e-4)
  # A larger volume in several tiles: finite, same shape, close to the whole-volume
  # prediction away from nothing but the per-tile group-norm statistics.
  big = (100 + 50 * rng.random((20, 30, 30))).astype(np.float32)
  tiled, n = p.predict(big, tile=(12, 16, 16), overlap=(6, 8, 8), halo=(1, 2, 2))
  assert n > 4 and tiled.shape == big.shape and np.isfinite(tiled).all()
  # Stacks thinner than the z-as-channels model's 12 slices are mirror-padded.
  thin, _ = p.predict(big[:7])
  assert thin.shape == (7, 30, 30) and np.isfinite(thin).all()


def test_model_kinds_and_depth_channel():
  from smlm_jax.fusion import task as task_lib
  cfg = fusion_config.get_config("tiny")
  cfg.model.kind = "unet3d"
  cfg.model.depth_channel = True
  model = task_lib.build_model(cfg.model, (12, 16, 16))
  view = jnp.ones((2, 10, 16, 14))                 # a 3D U-Net takes any size
  x = task_lib.model_input(view, jnp.stack([jnp.arange(10.0)] * 2), cfg.model)
  assert x.shape == (2, 10, 16, 14, 2)
  np.testing.assert_allclose(x[0, 3, 5, 5, 1], 3.0 / cfg.model.depth_scale_um)
  # shapes only (jax.eval_shape: no slow XLA compile of 3D convolutions on CPU)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  pred = jax.eval_shape(lambda v, x: task_lib.apply_model(model, v["params"], {}, x,
                                                          train=False)[0], variables, x)
  assert pred.shape == (2, 10, 16, 14)
  cfg.model.kind = "unet2d_z"
  model2 = task_lib.build_model(cfg.model, (12, 16, 16))
  with pytest.raises(ValueError, match="stacks of 12 slices"):
    jax.eval_shape(model2.init, jax.random.key(0), x)
  cfg.model.kind = "nope"
  with pytest.raises(ValueError, match="model.kind"):
    task_lib.build_model(cfg.model, (12, 16, 16))


def test_clean_target_and_renormalized_loss_options(monkeypatch):
  from smlm_jax.core import noise
  from smlm_jax.fusion import task as task_lib
  cfg = fusion_config.get_config("tiny")
  cfg.loss.clean_target = True
  task = task_lib.FusionTask(cfg)
  rng = np.random.default_rng(6)
  shape = (2,) + tuple(cfg.sim.shape)
  host = {"view_photons": jnp.asarray(5 + 50 * rng.random(shape), jnp.float32),
          "fused_photons": jnp.asarray(5 + 500 * rng.random(shape), jnp.float32),
          "depth_um": jnp.zeros(shape[:2])}
  make = jax.jit(lambda k: task.make_batch(k, host, lambda t: t))
  b1, b2 = make(jax.random.key(1)), make(jax.random.key(2))
  # Fresh noise on the view, none on the target: the normalized expected ADU.
  assert _maxabs(b1["x"] - b2["x"]) > 0.01
  np.testing.assert_array_equal(b1["target"], b2["target"])
  ref = metrics.percentile_normalize(np.asarray(noise.expected_adu(
      host["fused_photons"][0], task.sim.camera)))
  np.testing.assert_allclose(b1["target"][0], ref, rtol=1e-5, atol=1e-5)
  # loss.renormalize: the loss sees the prediction percentile-normalized, as the metric
  # does, so it is blind to a gain and offset of the prediction. (The model is replaced
  # by one that returns its "params".)
  monkeypatch.setattr(task_lib, "apply_model", lambda model, params, *a, **k: (params, {}))
  pred = jnp.asarray(rng.random(shape), jnp.float32)
  for renormalize in (False, True):
    cfg.loss.renormalize = renormalize
    loss = jax.jit(lambda p: task.loss(p, {}, b1, 0, None)[0])
    a, b = float(loss(pred)), float(loss(3.0 * pred + 1.0))
    if renormalize:
      assert a == pytest.approx(b, abs=1e-5)
    else:
      assert abs(a - b) > 0.1


def test_tta_averages_over_the_yx_symmetries_only():
  from smlm_jax.fusion import task as task_lib
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.random((2, 5, 6, 6, 1)), jnp.float32)
  # An operator that is not flip-equivariant (a cumulative sum along x, plus a ramp
  # along y): its self-ensemble is, and an equivariant one (a 3x3 box filter in y, x)
  # is left unchanged.
  ramp = jnp.arange(6.0)[None, None, :, None]
  odd = lambda c: jnp.cumsum(c[..., 0], axis=3) + ramp
  ens = task_lib.predict_tta(odd, x)
  for op in (lambda a: jnp.flip(a, 2), lambda a: jnp.flip(a, 3),
             lambda a: jnp.swapaxes(a, 2, 3)):
    np.testing.assert_allclose(task_lib.predict_tta(odd, op(x)), op(ens), atol=1e-5)
  assert _maxabs(ens - odd(x)) > 0.5
  box = lambda c: jnp.asarray(ndimage.uniform_filter(np.asarray(c[..., 0]), (1, 1, 3, 3),
                                                     mode="reflect"))
  np.testing.assert_allclose(task_lib.predict_tta(box, x), box(x), atol=1e-5)
  # z is never flipped (depth breaks the symmetry): a z ramp survives unchanged.
  zramp = lambda c: c[..., 0] * jnp.arange(5.0)[None, :, None, None]
  np.testing.assert_allclose(task_lib.predict_tta(zramp, x), zramp(x), atol=1e-5)
  # Non-square tiles: the 4 flips only.
  y = x[:, :, :, :4]
  np.testing.assert_allclose(task_lib.predict_tta(odd, jnp.flip(y, 3)),
                             jnp.flip(task_lib.predict_tta(odd, y), 3), atol=1e-5)


def _maxabs(a):
  return float(np.abs(np.asarray(a)).max())


def test_predict_keeps_voxel_size_metadata_and_reports_bad_inputs(tiny_fusion_run, tmp_path):
  workdir, _ = tiny_fusion_run
  rng = np.random.default_rng(4)
  vol = rng.integers(100, 400, (12, 20, 18)).astype(np.uint16)
  tiff_io.write_image(str(tmp_path / "view.tif"), vol, "ZYX", pixel_size_nm=500.0,
                      z_spacing_nm=1000.0)
  tiff_io.write_image(str(tmp_path / "view2.ome.tif"), vol, "ZYX", pixel_size_nm=400.0,
                      z_spacing_nm=2000.0)
  tiff_io.write_image(str(tmp_path / "flat.tif"), vol[0], "YX", pixel_size_nm=500.0)
  nan = vol.astype(np.float32)
  nan[3, 4, 5] = np.nan
  import tifffile
  tifffile.imwrite(str(tmp_path / "nan.tif"), nan)
  inputs = [str(tmp_path / n) for n in ("view.tif", "view2.ome.tif", "flat.tif", "nan.tif")]
  lines = []
  out = tmp_path / "out"
  code = predict.run(workdir, inputs, str(out),
                     log=lambda *a, **k: lines.append(" ".join(map(str, a))))
  assert code == 1
  img = tiff_io.read_image(str(out / "view_fused.tif"))
  assert img.data.shape == vol.shape and img.data.dtype == np.float32
  assert img.pixel_size_nm == pytest.approx(500.0) and img.z_spacing_nm == pytest.approx(1000.0)
  img2 = tiff_io.read_image(str(out / "view2_fused.ome.tif"))
  assert img2.pixel_size_nm == pytest.approx(400.0) and img2.z_spacing_nm == pytest.approx(2000.0)
  errors = [l for l in lines if l.startswith("error:")]
  assert len(errors) == 2
  assert any("flat.tif" in l and "2D image" in l for l in errors)
  assert any("nan.tif" in l and "NaN" in l for l in errors)
  summary = (out / "predict_summary.csv").read_text()
  assert "error:not_3d" in summary and "error:nan_or_inf" in summary
  assert "voxel_size_mismatch;resampled" in summary  # view2: 2 um z steps vs 1 um trained
  # resampled to the training voxels and back: the input's grid, and not the same as
  # predicting the volume as it is
  assert img2.data.shape == vol.shape
  code = predict.run(workdir, [inputs[1]], str(tmp_path / "plain"), log=lambda *a, **k: None,
                     resample=False)
  plain = tiff_io.read_image(str(tmp_path / "plain" / "view2_fused.ome.tif")).data
  assert code == 0 and plain.shape == vol.shape
  assert np.abs(plain - img2.data).mean() > 1e-3
  assert "voxel_size_mismatch" in (tmp_path / "plain" / "predict_summary.csv").read_text()


def test_predict_takes_the_chosen_channel_of_a_multichannel_stack(tiny_fusion_run, tmp_path):
  """--channel: a (Z, C, Y, X) stack is predicted as its channel alone; without a
  choice it is an error row (bad_channel), not a silent pick."""
  import tifffile
  workdir, _ = tiny_fusion_run
  rng = np.random.default_rng(5)
  two = rng.integers(100, 400, (12, 2, 20, 18)).astype(np.uint16)
  tifffile.imwrite(str(tmp_path / "two.tif"), two, imagej=True, metadata={"axes": "ZCYX"})
  tifffile.imwrite(str(tmp_path / "one.tif"), two[:, 1], imagej=True, metadata={"axes": "ZYX"})
  quiet = lambda *a, **k: None
  assert predict.run(workdir, [str(tmp_path / "two.tif")], str(tmp_path / "none"), log=quiet) == 1
  assert "error:bad_channel" in (tmp_path / "none" / "predict_summary.csv").read_text()
  assert predict.run(workdir, [str(tmp_path / "two.tif")], str(tmp_path / "c1"), log=quiet,
                     channel=1) == 0
  assert predict.run(workdir, [str(tmp_path / "one.tif")], str(tmp_path / "ref"), log=quiet) == 0
  got = tiff_io.read_image(str(tmp_path / "c1" / "two_fused.tif")).data
  ref = tiff_io.read_image(str(tmp_path / "ref" / "one_fused.tif")).data
  assert got.shape == (12, 20, 18)
  np.testing.assert_allclose(got, ref, atol=1e-6)


def test_evaluate_scores_pairs_and_rejects_bad_inputs(tmp_path):
  rng = np.random.default_rng(5)
  fused = (100 + 400 * ndimage.gaussian_filter(rng.random((12, 16, 16)), 1.0)).astype(np.float32)
  view = (ndimage.gaussian_filter(fused, (2.0, 0.5, 0.5)) + rng.normal(0, 5, fused.shape)
          ).astype(np.float32)
  for name, a in (("fused", fused), ("view", view), ("small", fused[:, :10, :10]),
                  ("complex", fused.astype(np.complex64))):
    import tifffile
    tifffile.imwrite(str(tmp_path / f"{name}.tif"), a)
  lines = []
  log = lambda *a, **k: lines.append(" ".join(map(str, a)))
  csv = tmp_path / "scores.csv"
  assert evaluate.run(str(tmp_path / "fused.tif"), str(tmp_path / "fused.tif"),
                      str(tmp_path / "view.tif"), str(csv), log=log) == 0
  assert "N_SSIM 1.0000" in lines[0]
  assert evaluate.run(str(tmp_path / "small.tif"), str(tmp_path / "fused.tif"),
                      log=log) == 1
  assert any("shape" in l and "differs" in l for l in lines if l.startswith("error:"))
  assert evaluate.run(str(tmp_path / "complex.tif"), str(tmp_path / "fused.tif"),
                      log=log) == 1
  assert any("complex" in l for l in lines if l.startswith("error:"))
  # Command-line mistakes end with one line and exit code 2, no traceback.
  env = dict(os.environ, PYTHONPATH=ROOT)
  r = subprocess.run([sys.executable, "-m", "smlm_jax.fusion.evaluate",
                      f"--pred={tmp_path / 'view.tif'}"], capture_output=True, text=True,
                     cwd=ROOT, env=env)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:")
  assert "Traceback" not in r.stderr
