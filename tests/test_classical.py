"""Classical baselines: Richardson-Lucy and depth correction (fusion), the classical
Ca2+ event detector (sparks), and their grid tuning."""
import math

import numpy as np
from scipy import ndimage

from smlm_jax.fusion import baselines as fb
from smlm_jax.sparks import classical, events as events_lib
from smlm_jax.sparks.simulator import PUFF, SPARK, WAVE

VOXEL = (1.0, 0.5, 0.5)


def _object(shape=(16, 32, 32), seed=0):
  """Sparse bright blobs on a dim floor (a known specimen)."""
  rng = np.random.default_rng(seed)
  obj = np.full(shape, 0.05, np.float32)
  for _ in range(12):
    c = [rng.integers(3, n - 3) for n in shape]
    obj[c[0], c[1]:c[1] + 2, c[2]:c[2] + 2] += 1.0
  return ndimage.gaussian_filter(obj, (0.3, 0.6, 0.6))


def test_richardson_lucy_recovers_a_blurred_object_better_than_the_blur():
  obj = _object()
  sig = (1.2, 1.5, 1.5)
  h = fb.otf(sig, obj.shape)
  blurred = np.asarray(fb._conv(obj, h))
  photons = 2000.0
  rng = np.random.default_rng(1)
  noisy = rng.poisson(photons * blurred + 2.0).astype(np.float32)
  est = np.asarray(fb.richardson_lucy(noisy, h, 2.0, 0.0, checkpoints=(30,))[0]) / photons
  mse = lambda a: float(np.mean((a - obj) ** 2))
  # Closer to the object than the noisy image and than the noiseless blur itself.
  assert mse(est) < 0.8 * mse(blurred) < 0.9 * mse((noisy - 2.0) / photons), (
      mse(est), mse(blurred))
  # TV-regularized RL also beats the blur.
  est_tv = np.asarray(fb.richardson_lucy(noisy, h, 2.0, 0.003, checkpoints=(30,))[0])
  assert mse(est_tv / photons) < 0.8 * mse(blurred)


def test_depth_correction_flattens_an_exponential_decay():
  rng = np.random.default_rng(2)
  tex = 1.0 + 0.3 * rng.random((24, 20, 20)).astype(np.float32)
  z_um = np.arange(24) * VOXEL[0]
  decayed = tex * np.exp(-z_um / 30.0)[:, None, None]
  profile, length = fb.decay_profile(decayed, 0, VOXEL[0])
  assert abs(length / 30.0 - 1) < 0.05, length
  flat = fb.depth_correct(decayed, VOXEL, "z")
  m = flat.mean(axis=(1, 2))
  assert abs(m[-1] / m[0] - 1) < 0.05 and decayed[-1].mean() / decayed[0].mean() < 0.5
  # A rising volume is left alone.
  rising = tex * np.exp(z_um / 30.0)[:, None, None]
  assert np.allclose(fb.depth_correct(rising, VOXEL, "z"), rising)


def test_tuning_picks_from_the_grid_on_the_given_data():
  # Gaussian: a noisy view of a smooth target is best matched by some smoothing.
  rng = np.random.default_rng(3)
  target = ndimage.gaussian_filter(rng.random((12, 16, 16)).astype(np.float32), 1.5)
  view = (target + 0.05 * rng.standard_normal(target.shape)).astype(np.float32)
  (sz, sxy), score = fb.tune_gaussian([view], [target], (0.0, 1.5), (0.0, 1.5))
  assert (sz, sxy) == (1.5, 1.5) and score > 0.2
  # RL: the grid's best on the data is returned, with every grid point scored.
  adu = 100.0 + 2.0 * (500.0 * ndimage.gaussian_filter(target, (2.0, 1.0, 1.0)) + 3.0)
  best, s, scores = fb.tune_restore([adu], [target], VOXEL, fb.PSF(), [10.0], 100.0, 2.0,
                                    iterations=(2, 10), prefilters_fwhm_um=(0.0,),
                                    tvs=(0.0,), corrections=("none",))
  assert len(scores) == 2 and best in scores and s == max(scores.values())


# --------------------------------------------------------------------------- sparks
PX_UM, DT_MS = 0.2, 6.8
SHAPE = (64, 32, 64)


def _movie(events, seed=0, f0=20.0):
  """Photons [T, H, W]: F0 * (1 + dF/F0) with Poisson noise."""
  t = np.arange(SHAPE[0])[:, None, None] * DT_MS
  y = np.arange(SHAPE[1])[None, :, None]
  x = np.arange(SHAPE[2])[None, None, :]
  dff = np.zeros(SHAPE)
  for kind, (t0, cy, cx, amp) in events:
    if kind == "spark":
      u = t - t0
      time_profile = np.where(u < 0, 0, np.where(u < 10, u / 10, np.exp(-(u - 10) / 25)))
      s = 2.0 / 2.355 / PX_UM
      dff += amp * time_profile * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))
    else:                                   # wave front from column cx, 100 um/s
      u = t - t0 - np.abs(x - cx) * PX_UM / 0.1
      dff += amp * np.where(u < 0, 0, np.where(u < 15, u / 15, np.exp(-(u - 15) / 100)))
  rng = np.random.default_rng(seed)
  return rng.poisson(f0 * (1 + dff)).astype(np.float32)


def test_classical_detector_finds_a_clean_spark():
  movie = _movie([("spark", (150.0, 16, 32, 1.0))])
  classes, comp, cls_of, dff = classical.detect(movie, PX_UM, DT_MS)
  # One component at the spark (noise may leave a few specks elsewhere: the minimum
  # sizes of the events extraction remove them when scored).
  k = comp[24, 16, 32]                       # the peak: 160 ms
  assert k > 0 and cls_of[k] == SPARK
  sizes = np.bincount(comp.ravel())
  assert all(sizes[i] < 0.1 * sizes[k] for i in range(1, len(sizes)) if i != k)
  ts, ys, xs = np.nonzero(comp == k)
  assert abs(np.mean(ys) - 16) < 1.5 and abs(np.mean(xs) - 32) < 1.5
  assert 135 <= ts.min() * DT_MS <= 165
  duration_ms = (ts.max() - ts.min() + 1) * DT_MS
  assert 25 <= duration_ms <= 100, duration_ms
  assert 0.4 < dff[comp == k].max() < 1.2          # smoothed peak of dF/F0 = 1


def test_classical_detector_calls_a_propagating_front_a_wave():
  movie = _movie([("wave", (50.0, 16, 10, 0.8))], seed=1)
  classes, comp, cls_of, _ = classical.detect(movie, PX_UM, DT_MS)
  assert len(cls_of) >= 2 and cls_of[1:].tolist().count(WAVE) >= 1
  wave_voxels = np.sum(classes == WAVE)
  assert wave_voxels > 0.9 * np.sum(classes > 0)
  assert PUFF not in cls_of[1:].tolist() or wave_voxels > 0.95 * np.sum(classes > 0)


def test_classical_tune_picks_the_grid_point_that_scores_best():
  movie = _movie([("spark", (150.0, 16, 32, 1.0))], seed=4)
  truth = _movie([("spark", (150.0, 16, 32, 1.0))], seed=4, f0=1e6) / 1e6 - 1
  labels = np.where(truth >= 0.3, SPARK, 0).astype(np.int32)
  inst = (labels > 0).astype(np.int32)
  data = {"x": movie[None, ..., None], "labels": labels[None], "instances": inst[None], "kind": np.array([[SPARK]]),
          "amplitude": np.array([[1.0]])}
  spec = events_lib.EventSpec()
  # A spark shorter than 1 ms is impossible: that grid point calls it a puff (F1 0).
  grid = {"spark_max_ms": (1.0, 130.0)}
  best, m, results = classical.tune(movie[None], data, spec, grid=grid)
  assert best.spark_max_ms == 130.0 and m["spark"]["f1"] == 1.0
  assert len(results) == 2 and math.isclose(max(s for _, s in results), classical.mean_f1(m))
