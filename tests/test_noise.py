"""Statistics of the exact Poisson sampler and the camera models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from scipy import stats

from smlm_jax.core import noise

N = 100_000


def _chi2_pvalue(samples, pmf_counts_fn):
  lo, hi = int(samples.min()), int(samples.max())
  ks = np.arange(lo, hi + 1)
  observed = np.bincount((samples - lo).astype(np.int64), minlength=len(ks))
  expected = pmf_counts_fn(ks)
  # Pool bins with < 5 expected counts into their neighbours (standard practice).
  obs_b, exp_b, o_acc, e_acc = [], [], 0.0, 0.0
  for o, e in zip(observed, expected):
    o_acc += o
    e_acc += e
    if e_acc >= 5:
      obs_b.append(o_acc)
      exp_b.append(e_acc)
      o_acc = e_acc = 0.0
  obs_b[-1] += o_acc
  exp_b[-1] += e_acc
  obs_b, exp_b = np.array(obs_b), np.array(exp_b)
  exp_b *= obs_b.sum() / exp_b.sum()
  chi2 = ((obs_b - exp_b) ** 2 / exp_b).sum()
  return stats.chi2.sf(chi2, len(obs_b) - 1)


@pytest.mark.parametrize("lam", [0.1, 3.0, 29.9, 30.0, 300.0, 3000.0])
def test_poisson_matches_numpy_and_theory(lam):
  ours = np.asarray(jax.jit(noise.poisson)(jax.random.key(7), jnp.full((N,), lam)))
  ref = np.random.default_rng(7).poisson(lam, N)
  assert np.all(ours == np.round(ours)) and ours.min() >= 0
  # Mean and variance within 5 standard errors of the theory (and of numpy's draws).
  se_mean = np.sqrt(lam / N)
  se_var = lam * np.sqrt(2.0 / N + 1.0 / (lam * N))
  assert abs(ours.mean() - lam) < 5 * se_mean
  assert abs(ours.var() - lam) < 5 * se_var
  assert abs(ours.mean() - ref.mean()) < 5 * np.sqrt(2) * se_mean
  # Histogram against the exact pmf, and against numpy's sample (homogeneity).
  p_theory = _chi2_pvalue(ours, lambda ks: stats.poisson.pmf(ks, lam) * N)
  assert p_theory > 1e-3, p_theory
  lo = int(min(ours.min(), ref.min()))
  hi = int(max(ours.max(), ref.max()))
  table = np.stack([np.bincount((ours - lo).astype(int), minlength=hi - lo + 1),
                    np.bincount(ref - lo, minlength=hi - lo + 1)])
  table = table[:, table.sum(0) >= 10]
  assert stats.chi2_contingency(table)[1] > 1e-3


def test_poisson_detects_a_wrong_distribution():
  """The chi-square check used above rejects a Gaussian approximation at lam=3."""
  fake = np.maximum(np.round(np.random.default_rng(0).normal(3.0, np.sqrt(3.0), N)), 0)
  assert _chi2_pvalue(fake, lambda ks: stats.poisson.pmf(ks, 3.0) * N) < 1e-3


def test_poisson_mixed_means_and_edge_values():
  lam = jnp.array([0.0, 0.0, 9.999, 10.0, 1e4] * 20000)
  x = np.asarray(noise.poisson(jax.random.key(1), lam)).reshape(-1, 5)
  assert np.all(x[:, :2] == 0)
  for j, m in [(2, 9.999), (3, 10.0), (4, 1e4)]:
    assert abs(x[:, j].mean() - m) < 5 * np.sqrt(m / len(x))


def test_bright_elements_beyond_one_compaction_round():
  """Bright elements (lam >= 30, drawn by compacted PTRS) in every tile and far more of
  them than one round's buffer holds: still exact, and the dim ones untouched."""
  n = 32_768
  lam = jnp.where(jnp.arange(n) % 3 == 0, 2.0, 120.0)          # 2/3 bright
  x = np.asarray(jax.jit(noise.poisson)(jax.random.key(5), lam))
  bright, dim = x[np.asarray(lam) == 120.0], x[np.asarray(lam) == 2.0]
  assert np.all(bright == np.round(bright)) and bright.min() > 0
  for sample, m in ((bright, 120.0), (dim, 2.0)):
    assert abs(sample.mean() - m) < 5 * np.sqrt(m / sample.size)
    assert abs(sample.var() / m - 1) < 5 * np.sqrt(2.0 / sample.size)
  assert _chi2_pvalue(bright, lambda ks: stats.poisson.pmf(ks, 120.0) * bright.size) > 1e-3
  assert _chi2_pvalue(dim, lambda ks: stats.poisson.pmf(ks, 2.0) * dim.size) > 1e-3


@pytest.mark.parametrize("lam", [0.5, 8.0, 25.0, 200.0])
def test_normals_are_standard_and_independent_of_the_counts(lam):
  """The read-noise normals (the inversion's residual uniform below 30, separate draws
  above) are N(0, 1) and independent of the Poisson count they come with."""
  k, z = jax.jit(noise.poisson_and_normal)(jax.random.key(11), jnp.full((N,), lam))
  k, z = np.asarray(k), np.asarray(z)
  assert abs(z.mean()) < 5 / np.sqrt(N) and abs(z.var() - 1) < 5 * np.sqrt(2 / N)
  assert stats.kstest(z, "norm").pvalue > 1e-3
  assert abs(np.corrcoef(k, z)[0, 1]) < 5 / np.sqrt(N)
  assert abs(np.corrcoef(k, z ** 2)[0, 1]) < 5 / np.sqrt(N)
  # The normals' distribution is the same below and above the median count.
  low, high = z[k <= np.median(k)], z[k > np.median(k)]
  assert stats.ks_2samp(low, high).pvalue > 1e-3


def test_camera_output_is_always_finite():
  """The residual uniform of the Poisson inversion stays inside (0, 1) at its extremes
  (u = 1.0 is reachable: (2**24 - 1 + 0.5) * 2**-24 rounds to 1 in float32; a clip at
  1 - 2**-25 rounds to 1.0 too, where the read-noise normal is infinite), for every mean
  of the inversion range; and 400,000 draws over means 0-60 (both samplers) give
  finite ADU for both camera models."""
  lam = jnp.linspace(0.0, noise._INVERSION_MAX_LAM - 1e-3, 3000)
  for u in (0.5 * 2.0 ** -24, 1.0 - 2.0 ** -24, 1.0):
    _, v = noise._poisson_inversion(jnp.full_like(lam, u), lam)
    z = np.asarray(jax.scipy.special.ndtri(v))
    assert np.all(np.isfinite(z)) and np.all((np.asarray(v) > 0) & (np.asarray(v) < 1)), u
  lam = jnp.tile(jnp.linspace(0.0, 60.0, 1000), 200)
  for cam in (noise.Camera(), noise.Camera(model="emccd", em_gain=100.0, read_noise_e=30.0)):
    adu = np.asarray(jax.jit(lambda k: noise.apply_camera(k, lam, cam))(jax.random.key(2)))
    assert np.all(np.isfinite(adu)), cam.model


def test_poisson_on_sharded_batch():
  """Camera noise on a batch sharded over 4 devices (Auto mesh) equals unsharded."""
  devices = jax.devices()
  assert len(devices) >= 4, "tests expect 4 forced host devices"
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  lam = jnp.linspace(0.0, 500.0, 8 * 32 * 32).reshape(8, 32, 32)
  keys = jax.random.split(jax.random.key(3), 8)
  f = jax.jit(jax.vmap(noise.poisson))
  plain = f(keys, lam)
  sharded = f(jax.device_put(keys, sharding), jax.device_put(lam, sharding))
  assert sharded.sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(plain), np.asarray(sharded))
  cam = noise.Camera()
  adu = jax.jit(jax.vmap(lambda k, l: noise.apply_camera(k, l, cam)))(
      jax.device_put(keys, sharding), jax.device_put(lam, sharding))
  assert np.all(np.isfinite(np.asarray(adu)))


def test_scmos_mean_and_variance():
  cam = noise.Camera(model="scmos", qe=0.8, gain_adu_per_e=2.0, offset_adu=100.0,
                     read_noise_e=1.5)
  photons = 50.0
  adu = np.asarray(noise.apply_camera(jax.random.key(0), jnp.full((200_000,), photons), cam))
  mean_theory = 2.0 * 0.8 * photons + 100.0
  var_theory = 2.0**2 * (0.8 * photons + 1.5**2)
  assert abs(adu.mean() - mean_theory) < 5 * np.sqrt(var_theory / len(adu))
  assert abs(adu.var() / var_theory - 1) < 0.02
  expected = float(noise.expected_adu(jnp.array(photons), cam))
  assert expected == pytest.approx(mean_theory, rel=1e-6)
  assert float(noise.adu_to_photons(expected, cam)) == pytest.approx(photons, rel=1e-6)


@pytest.mark.parametrize("em_gain", [100.0, 300.0])
def test_emccd_excess_noise_factor(em_gain):
  cam = noise.Camera(model="emccd", qe=0.95, gain_adu_per_e=0.05, offset_adu=500.0,
                     read_noise_e=30.0, em_gain=em_gain)
  photons = 20.0
  adu = np.asarray(noise.apply_camera(jax.random.key(1), jnp.full((200_000,), photons), cam))
  g, e = 0.05, 0.95 * photons
  assert abs(adu.mean() - (g * em_gain * e + 500.0)) < 5 * adu.std() / np.sqrt(len(adu))
  signal_var = adu.var() - (g * 30.0) ** 2
  excess = signal_var / ((g * em_gain) ** 2 * e)  # F^2
  assert excess == pytest.approx(2.0, rel=0.03)
