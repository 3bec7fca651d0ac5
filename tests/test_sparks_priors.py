"""Domain randomization of the sparks training simulator (smlm_jax/sparks/scene.py) and the
bleaching-robust F0 of the model input: the randomized quantities really vary within
their ranges, old configs rebuild the un-randomized simulator, and the new physics
(raster timing, detector noise, sympathetic sparks, sliding-window F0) do what they say."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sparks as sparks_config
from smlm_jax.sparks import simulator as sim
from smlm_jax.sparks import task as task_lib


def _scenes(priors, geom, n=256, seed=3):
  draw = jax.jit(jax.vmap(lambda k: sim.draw_scene(k, priors, geom)))
  return jax.tree.map(np.asarray, draw(jax.random.split(jax.random.key(seed), n)))


@pytest.fixture(scope="module")
def default_draws():
  simulator = sim.simulator_from_config(sparks_config.get_config("randomized").sim)
  return simulator, _scenes(simulator.priors, simulator.geometry)


def test_randomized_priors_vary_within_their_ranges(default_draws):
  simulator, s = default_draws
  p = simulator.priors
  # Dye brightness: log-uniform over more than a decade, both ends reached.
  lo, hi = p.f0_photons
  assert lo <= s.f0_photons.min() < 1.5 * lo and hi / 1.5 < s.f0_photons.max() <= hi
  assert hi / lo >= 10
  # Raster timing, dye saturation, bleaching: spread over their ranges.
  assert s.line_delay_fraction.min() < 0.1 and s.line_delay_fraction.max() > 0.9
  sat = 1 / s.dye_saturation_inv
  assert p.dye_max_dff[0] <= sat.min() and sat.max() <= p.dye_max_dff[1]
  assert np.ptp(s.bleach_rate_per_s) > 0.5 * (p.bleach_rate_per_s[1] - p.bleach_rate_per_s[0])
  # Cell shape: a nucleus / a cell end in about their fraction of movies.
  assert np.mean(s.nucleus_half_length_px > 0) == pytest.approx(p.nucleus_probability, abs=0.1)
  assert np.mean(np.abs(s.end_x_px) < 1e5) == pytest.approx(p.cell_end_probability, abs=0.1)
  contrast = s.nucleus_contrast
  assert contrast.min() < 0.8 and contrast.max() > 1.3      # darker and brighter nuclei
  assert np.ptp(s.texture.std(axis=(1, 2))) > 0.05
  # Sparks: log-uniform amplitudes (median near the geometric mean, not the midpoint),
  # kinetics inside Cheng & Lederer's ranges widened as configured.
  e = s.events
  sp = e.kind[0] == sim.SPARK
  amp = e.amplitude[:, sp]
  a_lo, a_hi = p.spark_amplitude
  assert a_lo <= amp.min() and amp.max() <= a_hi
  assert np.median(amp) == pytest.approx(np.sqrt(a_lo * a_hi), rel=0.15)
  for field, rng in (("tau_ms", p.spark_tau_ms), ("rise_ms", p.spark_rise_ms),
                     ("fwhm_um", p.spark_fwhm_um), ("widening", p.spark_widening)):
    v = getattr(e, field)[:, sp]
    assert rng[0] <= v.min() and v.max() <= rng[1] and np.ptp(v) > 0.8 * (rng[1] - rng[0])
  pf = e.kind[0] == sim.PUFF
  assert e.flicker[:, pf].max() > 0.2 and e.flicker[:, sp].max() == 0
  wv = e.kind[0] == sim.WAVE
  assert e.curvature[:, wv].max() > 0.8 * p.wave_curvature[1]


def test_sympathetic_sparks_follow_their_trigger():
  geom = sim.Geometry(num_frames=64, height_px=32, width_px=64)
  base = sim.simulator_from_config(sparks_config.get_config("randomized").sim).priors
  priors = dataclasses.replace(base, sympathetic_probability=1.0, cell_end_probability=0.0,
                               cell_top_px=(-1.0, -1.0), cell_bottom_px=(2.0, 2.0))
  e = _scenes(priors, geom, n=64).events
  sp = np.flatnonzero(e.kind[0] == sim.SPARK)
  i, j = sp[1:], sp[:-1]
  dist_um = np.hypot(e.y_px[:, i] - e.y_px[:, j], e.x_px[:, i] - e.x_px[:, j]) * geom.pixel_size_um
  delay = (e.t0_ms[:, i] + e.rise_ms[:, i]) - (e.t0_ms[:, j] + e.rise_ms[:, j])
  inside = (dist_um <= priors.sympathetic_distance_um[1] + 1e-3)
  assert inside.mean() > 0.9          # (a few clipped at the field's edge are closer)
  assert np.all((delay >= priors.sympathetic_delay_ms[0] - 1e-3)
                & (delay <= priors.sympathetic_delay_ms[1] + 1e-3))
  # Without sympathy, neighbours are independent draws: mostly farther apart.
  e0 = _scenes(dataclasses.replace(priors, sympathetic_probability=0.0), geom, n=64).events
  d0 = np.hypot(e0.y_px[:, i] - e0.y_px[:, j], e0.x_px[:, i] - e0.x_px[:, j]) * geom.pixel_size_um
  assert (d0 <= priors.sympathetic_distance_um[1]).mean() < 0.4


def test_config_without_randomization_keys_rebuilds_the_plain_simulator():
  cfg = sparks_config.get_config("randomized").sim
  del cfg.acquisition
  for group, key, _ in sim._RANDOMIZATION:
    if group in cfg and key in cfg[group]:
      del cfg[group][key]
  p = sim.simulator_from_config(cfg).priors
  assert p == dataclasses.replace(sim.Priors(), **{
      f.name: getattr(p, f.name) for f in dataclasses.fields(sim.Priors)
      if f.name not in {field for _, _, field in sim._RANDOMIZATION}})
  assert p.nucleus_probability == 0 and p.line_delay_fraction == (0.0, 0.0)
  assert not p.log_uniform_amplitudes


def test_raster_line_timing_delays_lower_rows():
  """Row y is sampled line_delay * dt * y / H after row 0: in a spark's decay two rows at
  the same distance from its centre differ by exp(-delay / tau)."""
  geom = sim.Geometry(num_frames=30, height_px=32, width_px=32)
  dt, tau = geom.frame_interval_ms, 20.0
  ev = sim.Events(kind=jnp.asarray([sim.SPARK]), active=jnp.asarray([True]),
                  **{k: jnp.asarray([v], jnp.float32) for k, v in dict(
                      t0_ms=3 * dt, y_px=16.0, x_px=16.0, fwhm_um=2.0, rise_ms=1.0,
                      plateau_ms=0.0, tau_ms=tau, speed_um_per_s=0.0, amplitude=1.0).items()})
  rel = np.asarray(jax.jit(sim.event_rel, static_argnums=1)(ev, geom, 1.0))[0]
  lo, hi = 16 - 6, 16 + 6
  ratio = rel[8:14, hi, 16] / rel[8:14, lo, 16]
  np.testing.assert_allclose(ratio, np.exp(-(hi - lo) / 32 * dt / tau), rtol=1e-4)
  flat = np.asarray(jax.jit(sim.event_rel, static_argnums=1)(ev, geom, 0.0))[0]
  np.testing.assert_allclose(flat[8:14, hi, 16] / flat[8:14, lo, 16], 1.0, rtol=1e-5)


def test_extra_read_and_excess_noise_set_the_variance():
  camera = sim.simulator_from_config(sparks_config.get_config("tiny").sim).camera
  priors = sim.Priors(extra_read_noise_e=(1.5, 1.5), excess_noise_factor=(2.0, 2.0))
  lam = jnp.full((40, 32, 32), 20.0)
  adu = np.asarray(jax.jit(lambda k: sim.detect(k, lam, camera, priors))(jax.random.key(0)))
  e = (adu - camera.offset_adu) / camera.gain_adu_per_e
  want = 2.0 * 20.0 * camera.qe + camera.read_noise_e ** 2 + 1.5 ** 2
  assert e.mean() == pytest.approx(20.0 * camera.qe, rel=0.01)
  assert e.var() == pytest.approx(want, rel=0.03)


def test_sliding_window_f0_follows_bleaching():
  """A resting cell bleaching by 60% over 400 frames: the whole-movie F0 reads the early
  frames as dF/F0 ~ +0.6, the sliding-window F0 keeps every frame within 0.2 (the low
  quantile of a falling trace lies ~0.2 windows later: the same bias as in a bleaching
  training crop) and the inner frames within 0.1; a movie no longer than the window gets
  the whole-movie F0 (training crops are unchanged)."""
  camera = sim.simulator_from_config(sparks_config.get_config("tiny").sim).camera
  T = 400
  photons = 30.0 * np.exp(-np.arange(T) / T * np.log(2.5))[:, None, None] * np.ones((T, 8, 8))
  adu = jnp.asarray(photons * camera.adu_per_photon + camera.offset_adu, jnp.float32)
  whole = np.asarray(task_lib.model_input(adu, camera, f0_window_frames=0))[..., 1]
  window = np.asarray(task_lib.model_input(adu, camera, f0_window_frames=128))[..., 1]
  assert whole[:20].mean() > 0.4
  assert np.abs(window[64:-64]).max() < 0.1 and np.abs(window).max() < 0.2
  short = adu[:100]
  np.testing.assert_allclose(task_lib.model_input(short, camera, f0_window_frames=128),
                             task_lib.model_input(short, camera, f0_window_frames=0))


def test_randomization_groups_widen_only_their_own_priors():
  base = sim.simulator_from_config(sparks_config.get_config().sim).priors
  everything = sim.simulator_from_config(sparks_config.get_config("randomized").sim).priors
  changed = {}
  for g in sparks_config.RANDOMIZATION_GROUPS:
    p = sim.simulator_from_config(sparks_config.get_config(f"randomized_{g}").sim).priors
    changed[g] = {f.name for f in dataclasses.fields(p)
                  if getattr(p, f.name) != getattr(base, f.name)}
    assert changed[g], g
    for name in changed[g]:               # each change is the full randomization's value
      assert getattr(p, name) == getattr(everything, name), (g, name)
  # The groups are disjoint and together make the full randomization.
  union = set().union(*changed.values())
  assert sum(len(v) for v in changed.values()) == len(union)
  assert union == {f.name for f in dataclasses.fields(everything)
                   if getattr(everything, f.name) != getattr(base, f.name)}
  assert "f0_photons" in changed["photons"] and "excess_noise_factor" in changed["noise"]
  two = sparks_config.get_config("randomized_photons+raster")
  assert two.infer.f0_window_frames == 0 and two.sim.acquisition.line_delay_fraction[1] == 1.0
  with pytest.raises(ValueError, match="unknown randomization groups"):
    sparks_config.get_config("randomized_lighting")


def test_every_default_movie_has_a_cell_and_labelled_sparks():
  # Regression: without a cell end, a movie whose end side was -1 had an empty cell mask
  # (half of all movies: no labels at all).
  simulator = sim.simulator_from_config(sparks_config.get_config().sim)
  keys = sim.movie_keys(jax.random.key(777), jnp.arange(12))
  scenes = jax.vmap(lambda k: sim.draw_scene(k, simulator.priors, simulator.geometry))(keys)
  cells = jax.vmap(lambda sc: sim.resting_f0(sc, simulator.geometry)[1])(scenes)
  coverage = np.asarray((cells >= 0.5).mean(axis=(1, 2)))
  assert coverage.min() > 0.2, coverage
  out = simulator.from_keys(keys)
  active = np.asarray(out["active"] & (out["kind"] == sim.SPARK))
  inst = np.asarray(out["instances"])
  labelled = sum(int(np.any(inst[i] == j + 1)) for i, j in zip(*np.nonzero(active)))
  assert labelled >= 0.75 * active.sum(), (labelled, active.sum())


def test_faint_fluctuations_add_dff_but_no_labels():
  """Sub-threshold fluctuations (sim.faint): the slots (kind background) raise dF/F0 by at most
  their amplitude range, leave labels and instances exactly as without them (same
  key), and their amplitudes stay below the smallest puff."""
  plain = sparks_config.get_config("tiny")
  plain.sim.faint.max_per_movie = 0
  base = sim.simulator_from_config(plain.sim)
  cfg = sparks_config.get_config("tiny")
  cfg.sim.faint.max_per_movie = 2
  cfg.sim.faint.probability = 1.0
  faint = sim.simulator_from_config(cfg.sim)
  p = faint.priors
  assert p.slot_classes()[-2:] == (sim.BACKGROUND,) * 2
  assert p.faint_amplitude[1] < p.puff_amplitude[0]
  keys = jax.random.split(jax.random.key(5), 16)
  a = jax.tree.map(np.asarray, jax.jit(jax.vmap(base.simulate))(keys))
  b = jax.tree.map(np.asarray, jax.jit(jax.vmap(faint.simulate))(keys))
  np.testing.assert_array_equal(a["labels"], b["labels"])
  np.testing.assert_array_equal(a["instances"], b["instances"])
  extra = b["dff"] - a["dff"]
  amp = b["amplitude"][:, -2:]
  assert np.all(b["kind"][:, -2:] == sim.BACKGROUND) and np.all(b["active"][:, -2:])
  assert np.all((p.faint_amplitude[0] <= amp) & (amp <= p.faint_amplitude[1]))
  assert extra.min() > -1e-5 and extra.max() <= 2 * p.faint_amplitude[1] + 1e-5
  # Most movies show them (a fluctuation may fall before or after the frames).
  assert np.mean(extra.max(axis=(1, 2, 3)) > 0.5 * p.faint_amplitude[0]) > 0.7


def test_default_spark_amplitudes_are_log_uniform_and_the_switch_restores_uniform():
  """Default spark dF/F0: log-uniform over sim.sparks.amplitude_dff (median near the
  geometric mean, over a third of sparks below 0.4); sparks.log_uniform=False (or a run's
  config without the key) draws them uniformly again (median near the midpoint)."""
  geom = sim.Geometry(num_frames=24, height_px=16, width_px=24)
  cfg = sparks_config.get_config()
  lo, hi = cfg.sim.sparks.amplitude_dff
  amps = {}
  for log in (True, False):
    cfg.sim.sparks.log_uniform = log
    p = sim.simulator_from_config(cfg.sim).priors
    assert p.spark_log_amplitude is log and not p.log_uniform_amplitudes
    e = _scenes(p, geom, n=256).events
    amps[log] = e.amplitude[:, e.kind[0] == sim.SPARK].ravel()
    assert lo <= amps[log].min() and amps[log].max() <= hi
  assert np.median(amps[True]) == pytest.approx(np.sqrt(lo * hi), rel=0.1)
  assert np.median(amps[False]) == pytest.approx((lo + hi) / 2, rel=0.1)
  faint = {k: np.mean(v < 0.4) for k, v in amps.items()}     # expected 0.38 and 0.14
  assert faint[True] > 0.3 and faint[True] > 2 * faint[False]
  del cfg.sim.sparks.log_uniform
  assert not sim.simulator_from_config(cfg.sim).priors.spark_log_amplitude
