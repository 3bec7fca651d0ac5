"""Calibration: parameter recovery, a differentiable loss with the right FWHM gradient,
bad inputs skipped, and training/prediction reading the calibration file."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import diffusion
from smlm_jax.diffusion import calibrate, simulator as sim_lib
from smlm_jax.core import noise as noise_lib, tiff_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_config():
  """32x32 px, 16 frames: quick, and 16 values per pixel for photon transfer."""
  cfg = diffusion.get_config("tiny")
  cfg.sim.num_frames = 16
  return cfg


def _truth_config():
  """Non-default microscope: wider PSF, another camera, other photon ranges."""
  cfg = _small_config()
  sim = cfg.sim
  sim.psf_fwhm_nm = (280.0, 280.0)
  sim.photons = (500.0, 1500.0)
  sim.background_photons = (5.0, 20.0)
  sim.camera.offset_adu = 250.0
  sim.camera.gain_adu_per_e = 3.0
  sim.camera.read_noise_e = 2.0
  return cfg


@pytest.fixture(scope="module")
def recorded():
  sim = sim_lib.simulator_from_config(_truth_config().sim)
  frames, truth = sim.batch(jax.random.key(42), 200)
  return np.asarray(frames), jax.tree.map(np.asarray, truth)


def test_parameter_recovery(recorded):
  frames, truth = recorded
  result = calibrate.calibrate(frames, _small_config().sim, steps=100, num_sim=128,
                               progress=False)
  assert abs(result["psf_fwhm_nm"] / 280.0 - 1) < 0.05
  assert abs(result["photons"]["mean"] / truth["photons"].mean() - 1) < 0.10
  assert abs(result["background_photons"]["mean"] / truth["background_photons"].mean()
             - 1) < 0.05
  assert abs(result["camera_gain_adu_per_e"] / 3.0 - 1) < 0.10
  assert abs(result["camera_offset_adu"] / 250.0 - 1) < 0.02
  assert abs(result["read_noise_e"] / 2.0 - 1) < 0.25
  assert result["distance_after"] < 0.1 * result["distance_before"]
  saved = json.loads(calibrate.json_text(result))
  for key in calibrate.JSON_KEYS:
    assert key in saved
  for key in ("photons", "background_photons"):
    assert set(saved[key]) >= {"mean", "std", "low", "high"}


def test_loss_gradient_points_to_true_fwhm(recorded):
  frames, truth = recorded
  cfg = _small_config()
  camera = noise_lib.Camera(qe=0.9, gain_adu_per_e=3.0, offset_adu=250.0, read_noise_e=2.0)
  real = calibrate.movie_statistics(noise_lib.adu_to_photons(jnp.asarray(frames), camera))
  real_q = calibrate.quantiles(real)
  scale = jnp.asarray(calibrate._robust_scale(np.asarray(real)))
  simulator = sim_lib.simulator_from_config(cfg.sim)
  stats = calibrate.make_sim_statistics(
      simulator, 96, seed=3, noise=calibrate.Noise(qe=0.9, excess=1.0, read_e=2.0))
  loss = lambda p: calibrate.stat_distance(calibrate.quantiles(stats(p)), real_q, scale)
  grads = []
  for fwhm in (0.85 * 280.0, 280.0, 1.15 * 280.0):
    p = calibrate.params_from_ranges(fwhm, (500.0, 1500.0), (5.0, 20.0), (0.01, 10.0))
    value, g = jax.value_and_grad(loss)(p)
    assert np.isfinite(value)
    grads.append(float(g["log_fwhm"]))
  assert grads[0] < 0 < grads[2], grads        # downhill towards 280 nm from both sides
  assert abs(grads[1]) < 0.5 * min(abs(grads[0]), abs(grads[2]))


def test_photon_transfer_emccd():
  """EMCCD: k2 = 2 g u + s^2 and k3 = 6 g^2 u recover gain and offset."""
  cfg = _small_config()
  cfg.sim.camera.model = "emccd"
  cfg.sim.camera.em_gain = 100.0
  cfg.sim.camera.gain_adu_per_e = 0.2     # 20 ADU per photo-electron in total
  cfg.sim.camera.offset_adu = 500.0
  sim = sim_lib.simulator_from_config(cfg.sim)
  frames, _ = sim.batch(jax.random.key(1), 100)
  pt = calibrate.photon_transfer(np.asarray(frames), "emccd")
  assert abs(pt["gain_adu_per_e"] / 20.0 - 1) < 0.10
  assert abs(pt["offset_adu"] / 500.0 - 1) < 0.02


def test_cli_skips_bad_files_and_training_uses_the_file(tmp_path, recorded):
  frames, _ = recorded
  d = tmp_path / "data"
  d.mkdir()
  for i in range(24):
    tiff_io.write_movie(str(d / f"m{i:02d}.tif"), frames[i], 100.0, 0.01)
  (d / "corrupt.tif").write_bytes(b"II*\x00garbage")
  np.save(d / "not_a_movie.npy", frames[0])
  out, plot = tmp_path / "cal.json", tmp_path / "cal.png"
  r = subprocess.run(
      [sys.executable, "-m", "smlm_jax.diffusion.calibrate", f"--input={d}",
       f"--input={tmp_path / 'missing'}", "--config=configs/diffusion.py:tiny",
       "--config.sim.num_frames=16", f"--output={out}", f"--plot={plot}", "--steps=3",
       "--num_sim=16"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr
  assert "Traceback" not in r.stderr
  assert "corrupt.tif" in r.stderr and "missing" in r.stderr
  assert "24 movie window(s)" in r.stderr
  cal = json.loads(out.read_text())
  assert cal["num_movies"] == 24 and os.path.getsize(plot) > 1000
  # Training reads the file: the simulator's priors and camera become the fitted ones.
  cfg = _small_config()
  cfg.sim.calibration = str(out)
  simulator = sim_lib.simulator_from_config(cfg.sim)
  assert simulator.priors.photons == (cal["photons"]["low"], cal["photons"]["high"])
  assert simulator.priors.psf_fwhm_nm == pytest.approx(
      (0.95 * cal["psf_fwhm_nm"], 1.05 * cal["psf_fwhm_nm"]))
  assert float(simulator.camera.offset_adu) == pytest.approx(cal["camera_offset_adu"])
  assert float(simulator.camera.gain_adu_per_e) == pytest.approx(cal["camera_gain_adu_per_e"])
  assert cfg.sim.calibration == "" and cfg.sim.calibration_applied == str(out)
  # Too few usable movies: one clear line, no traceback.
  r = subprocess.run(
      [sys.executable, "-m", "smlm_jax.diffusion.calibrate", f"--input={d / 'corrupt.tif'}",
       "--config=configs/diffusion.py:tiny", f"--output={tmp_path / 'x.json'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode != 0 and "Traceback" not in r.stderr and "usable" in r.stderr
