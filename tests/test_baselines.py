"""Classical baselines: localization vs its CRLB, CVE statistics, the track CRLB, flags,
the baselines command and the accuracy study."""
import csv
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smlm_jax.diffusion import baselines, simulator as sim_lib
from smlm_jax.core import noise, tiff_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAMERA = noise.Camera(qe=0.9, gain_adu_per_e=2.0, offset_adu=100.0, read_noise_e=1.6)


def _static_frames(key, n, photons=1000.0, bg=10.0, sigma=1.0, size=16):
  k1, k2 = jax.random.split(key)
  centre = size / 2 + jax.random.uniform(k1, (n, 2), minval=-0.5, maxval=0.5)
  lam = jax.vmap(lambda c: baselines.gaussian_spot(
      jnp.array([c[0], c[1], photons, bg, sigma]), size, size))(centre)
  adu = noise.apply_camera(k2, lam, CAMERA)
  return noise.adu_to_photons(adu, CAMERA), centre


def test_localization_unbiased_and_at_its_crlb():
  photons, centre = _static_frames(jax.random.key(0), 1500, size=32)
  theta, se, ok = baselines.localize_frames(photons, 1.0, 0.9, 1.6)
  assert bool(np.all(ok))
  err = np.asarray(theta[:, :2] - centre)
  assert np.all(np.abs(err.mean(0)) < 0.01)                    # < 1% of a pixel
  crlb = np.asarray(se[:, :2]).mean(0)
  assert np.all(np.abs(err.std(0) / crlb - 1) < 0.15), (err.std(0), crlb)
  assert abs(float(theta[:, 2].mean()) / 1000 - 1) < 0.02       # photons
  assert abs(float(theta[:, 3].mean()) / 10 - 1) < 0.02         # background


def _blurred_tracks(n, D, sigma_nm, T=16, exposure_s=0.01, seed=0):
  geo = sim_lib.Geometry(num_frames=T, substeps=20, height_px=64, width_px=64,
                         pixel_size_nm=100.0, frame_interval_s=0.01, exposure_s=exposure_s)
  keys = jax.random.split(jax.random.key(seed), n)
  sub = jax.vmap(lambda k: sim_lib.brownian_substeps_nm(k, D, jnp.zeros(2), geo))(keys)
  frames = baselines.frame_positions_nm(sub, T)
  return frames + sigma_nm * jax.random.normal(jax.random.key(seed + 1), frames.shape)


@pytest.mark.parametrize("D,exposure_s", [(0.5, 0.01), (2.0, 0.005)])
def test_cve_mean_and_published_variance(D, exposure_s):
  sigma = 30.0
  pos = _blurred_tracks(10_000, D, sigma, exposure_s=exposure_s)
  R = exposure_s / (6 * 0.01)
  valid = jnp.ones(pos.shape[:2], bool)
  Dh, s2, ok = jax.vmap(lambda p, v: baselines.cve(p, v, 0.01, R))(pos, valid)
  Dh = np.asarray(Dh)
  assert abs(Dh.mean() / D - 1) < 0.02
  predicted = np.sqrt(baselines.cve_variance(D, sigma ** 2, 0.01, R, 15))
  assert abs(Dh.std() / predicted - 1) < 0.10, (Dh.std(), predicted)
  assert abs(np.sqrt(np.mean(np.asarray(s2))) / sigma - 1) < 0.05
  # The CVE's D does not depend on R, but its localization variance does: without the
  # blur correction (R = 0) sigma^2 comes out as sigma^2 - 2 R D dt.
  _, s2_0, _ = jax.vmap(lambda p, v: baselines.cve(p, v, 0.01, 0.0))(pos, valid)
  expected = sigma ** 2 - 2 * R * D * 1e6 * 0.01
  assert abs(float(np.mean(s2_0)) - expected) < 0.05 * abs(expected) + 30
  Dm, _, _ = jax.vmap(lambda p, v: baselines.msd_fit(p, v, 0.01, R))(pos, valid)
  assert abs(float(np.nanmean(Dm)) / D - 1) < 0.03
  # The bound is below both estimators' spread.
  assert float(baselines.crlb_D(jnp.array(D), jnp.array(sigma), 0.01, R, 16)) < Dh.std()


def test_crlb_hand_computed():
  # N = 3 positions, no blur, no error: 2 displacements per axis of variance 2 D dt,
  # I(D) = 2 axes x 2 x (1/2)(1/D)^2 = 2 / D^2, so SE = D / sqrt(2).
  assert float(baselines.crlb_D(jnp.array(1.0), jnp.array(0.0), 0.01, 0.0, 3)) == \
      pytest.approx(1 / np.sqrt(2), rel=1e-5)
  # N = 3, R = 1/6, sigma^2 = D dt / 2 (D = 1 um^2/s, dt = 10 ms: sigma = 70.71 nm).
  # Units of D dt: a = 2(1 - 1/3) + 1 = 7/3, b = 1/3 - 1/2 = -1/6; eigenvalues a + b =
  # 13/6 (derivative 4/3 + 1/3 = 5/3) and a - b = 5/2 (derivative 1). Per axis
  # I = ((5/3)/(13/6))^2 / 2 + ((1)/(5/2))^2 / 2 = 0.375863; two axes 0.751726;
  # SE = 1 / sqrt(0.751726) = 1.153375 um^2/s.
  se = float(baselines.crlb_D(jnp.array(1.0), jnp.array(np.sqrt(5000.0)), 0.01, 1 / 6, 3))
  assert se == pytest.approx(1.153375, rel=1e-4)


def test_spot_leaving_the_field_is_flagged():
  photons, _ = _static_frames(jax.random.key(3), 16, size=32)
  empty = noise.adu_to_photons(noise.apply_camera(
      jax.random.key(4), jnp.full((6, 32, 32), 10.0), CAMERA), CAMERA)
  partly = jnp.concatenate([photons[:10], empty])              # spot gone after frame 10
  gone = jnp.broadcast_to(empty[:1], (16, 32, 32))              # no spot at all
  est = baselines.estimate_movies(jnp.stack([partly, gone]), 100.0, 0.01, 0.01, 235.0,
                                  0.9, 1.6)
  assert est["valid"][0, :10].all() and not est["valid"][0, 10:].any()
  assert est["frames_localized"][0] == 10
  assert np.isfinite(est["D_cve_um2_per_s"][0])                 # from the valid frames
  assert est["frames_localized"][1] <= 2 and not np.isfinite(est["D_cve_um2_per_s"][1])


def test_baselines_command_and_accuracy_study(tiny_run, tmp_path):
  from configs import diffusion
  cfg = diffusion.get_config("tiny")
  sim = sim_lib.simulator_from_config(cfg.sim)
  frames, _ = sim.batch(jax.random.key(6), 2)
  d = tmp_path / "data"
  d.mkdir()
  for i in range(2):
    tiff_io.write_movie(str(d / f"m{i}.tif"), np.asarray(frames[i]), 100.0, 0.01)
  (d / "corrupt.tif").write_bytes(b"II*\x00junk")
  out = tmp_path / "b.csv"
  lines = []
  code = baselines.run([str(d)], str(out), cfg.sim, log=lambda *a, **k: lines.append(a[0]))
  assert code == 1 and any("corrupt.tif" in l for l in lines)
  with open(out) as f:
    rows = list(csv.DictReader(l for l in f if not l.startswith("#")))
  assert list(rows[0]) == list(baselines.COLUMNS)
  by = {os.path.basename(r["file"]): r for r in rows}
  assert by["corrupt.tif"]["flag"] == "error:unreadable"
  for name in ("m0.tif", "m1.tif"):
    assert by[name]["D_um2_per_s"] != "" and int(by[name]["frames_localized"]) > 0

  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import accuracy_study
  rows, data, _ = accuracy_study.run_study(tiny_run, 16, 5, 2, 8)
  text = accuracy_study.write_outputs(rows, str(tmp_path / "acc"), "test")
  with open(tmp_path / "acc" / "accuracy.csv") as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == ["D_low", "D_high", "estimator", "n", "relative_bias",
                            "relative_rmse"]
  assert {r["estimator"] for r in table} == set(accuracy_study.ESTIMATORS)
  assert len(table) == 3 * len(accuracy_study.ESTIMATORS)      # 2 bins + all
  assert sum(int(r["n"]) for r in table if r["estimator"] == "model"
             and float(r["D_high"]) / float(r["D_low"]) < 100) == 16
  assert os.path.getsize(tmp_path / "acc" / "accuracy.png") > 1000 and "| all |" in text
