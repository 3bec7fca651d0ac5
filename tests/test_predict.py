"""predict: simulated movies through the CLI, camera flags, bad inputs, windows."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import tifffile

from smlm_jax.diffusion import metrics, predict
from smlm_jax.core import tiff_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)


def _tiny_movies(seed: int, n: int) -> np.ndarray:
  """[n, T, H, W] ADU movies from the tiny config's simulator (key ``seed``)."""
  import jax
  from configs import diffusion
  from smlm_jax.diffusion import simulator as sim_lib
  sim = sim_lib.simulator_from_config(diffusion.get_config("tiny").sim)
  return np.asarray(sim.batch(jax.random.key(seed), n)[0])


def _read(path):
  with open(path) as f:
    header = [l for l in f if l.startswith("#")]
  with open(path) as f:
    rows = list(csv.DictReader(l for l in f if not l.startswith("#")))
  return header, rows


def test_predict_simulated_movies_cli(tiny_run, tmp_path):
  sim_dir = tmp_path / "sim"
  r = _cli("smlm_jax.diffusion.simulate", "--config=configs/diffusion.py:tiny", "--num_movies=64",
           f"--output_dir={sim_dir}", "--seed=11")
  assert r.returncode == 0, r.stderr
  out = tmp_path / "pred.csv"
  plot = tmp_path / "hist.png"
  r = _cli("smlm_jax.diffusion.predict", f"--workdir={tiny_run}", f"--input={sim_dir}",
           f"--output={out}", f"--plot={plot}")
  assert r.returncode == 0, r.stderr
  header, rows = _read(out)
  assert list(rows[0]) == list(predict.COLUMNS)
  with open(sim_dir / "truth.csv") as f:
    truth = {t["file"]: float(t["D_um2_per_s"]) for t in csv.DictReader(f)}
  assert sorted(os.path.basename(r["file"]) for r in rows) == sorted(truth)
  assert all(r["first_frame"] == "0" for r in rows)
  D = np.array([float(r["D_um2_per_s"]) for r in rows])
  lo = np.array([float(r["D_low_um2_per_s"]) for r in rows])
  hi = np.array([float(r["D_high_um2_per_s"]) for r in rows])
  assert np.all((lo < D) & (D < hi))
  D_true = np.array([truth[os.path.basename(r["file"])] for r in rows])
  assert metrics.spearman(D_true, D) > 0.5
  # Simulated data match the training camera and geometry: flags are about D, or a
  # rare dim fast spot that is hard to see (no_spot).
  other = [r for r in rows if not set(r["flag"].split(";")) <= {
      "ok", "D_below_trained_range", "D_above_trained_range"}]
  assert len(other) <= 3, other
  assert all(r["flag"] == "no_spot" for r in other)
  # Metadata pixel size and interval are read, so nothing was assumed except the camera.
  text = "".join(header)
  assert "pixel_size_nm=100 ASSUMED" not in text and "offset_adu=100 (training default" in text
  assert os.path.getsize(plot) > 1000


def test_camera_offset_and_gain_are_undone(tiny_run, tmp_path):
  """The same movies recorded with offset 400 ADU and gain 3 ADU/e- (instead of 100 and
  2) give the same predictions once the camera is given by flags or calibration file."""
  frames = _tiny_movies(4, 24)
  a, b = tmp_path / "a", tmp_path / "b"
  a.mkdir(), b.mkdir()
  for i, f in enumerate(frames):
    tiff_io.write_movie(str(a / f"m{i}.tif"), f, 100.0, 0.01)
    tiff_io.write_movie(str(b / f"m{i}.tif"), (f - 100.0) * 1.5 + 400.0, 100.0, 0.01)
  from smlm_jax.diffusion import camera_setup
  predictor = predict.Predictor(tiny_run)
  train_cam = predictor.config.sim.camera

  def D_of(folder, **kw):
    predictor.camera, _ = camera_setup.data_camera(train_cam, **kw)
    rows, _, _ = predict.predict_files(predictor, [str(folder)], log=lambda *a, **k: None)
    rows.sort(key=lambda r: tiff_io._natural_key(r.file))
    return (np.array([r.D for r in rows]),
            np.array([r.background_photons for r in rows]))

  ref, ref_bg = D_of(a)
  naive, naive_bg = D_of(b)
  fixed, fixed_bg = D_of(b, offset_adu=400.0, gain_adu_per_e=3.0)
  # The photon scale is what the camera sets: background photons are recovered with the
  # right camera and off by the 300 ADU offset / 2 ADU/e- = 150 photons without it.
  np.testing.assert_allclose(fixed_bg, ref_bg, rtol=0.01)   # TIFFs hold whole ADU
  assert np.all(naive_bg - ref_bg > 100.0)
  cal = tmp_path / "cal.json"
  cal.write_text(json.dumps({"camera_offset_adu": 400.0, "camera_gain_adu_per_e": 3.0,
                             "psf_fwhm_nm": {"mean": 225.0, "std": 5.0}}))
  out = tmp_path / "cal.csv"
  assert predict.run(tiny_run, [str(b)], str(out), calibration=str(cal)) == 0
  header, rows = _read(out)
  rows.sort(key=lambda r: tiff_io._natural_key(r["file"]))
  from_file = np.array([float(r["D_um2_per_s"]) for r in rows])
  rel = lambda x: np.abs(np.log(x / ref))
  assert np.median(rel(fixed)) < 0.03 and np.max(rel(fixed)) < 0.15
  np.testing.assert_allclose(from_file, fixed, rtol=1e-4)
  # D itself: the default locformer fits each spot under the camera's noise model, so
  # a wrong camera moves D only slightly (median |ln ratio| 0.004 against 0.001 for the
  # right one on this tiny run); the photon check above is what shows the flags act.
  assert np.median(rel(naive)) > np.median(rel(fixed))
  assert "camera_offset_adu=400 (calibration file)" in "".join(header)


def test_bad_inputs_are_flagged_not_fatal(tiny_run, tmp_path):
  frames = _tiny_movies(5, 3)    # [3, 8, 32, 32]
  d = tmp_path / "data"
  d.mkdir()
  tiff_io.write_movie(str(d / "good1.tif"), frames[0], 100.0, 0.01)
  tiff_io.write_movie(str(d / "good2.tif"), frames[1], 100.0, 0.01)
  tiff_io.write_movie(str(d / "px130.tif"), frames[2], 130.0, 0.01)
  long = np.concatenate([frames[0]] * 7)[:50]                  # 50 frames
  tiff_io.write_movie(str(d / "long50.tif"), long, 100.0, 0.01)
  (d / "corrupt.tif").write_bytes(b"II*\x00" + os.urandom(300))
  tifffile.imwrite(d / "rgb.tif", np.zeros((32, 32, 3), np.uint8), photometric="rgb")
  tifffile.imwrite(d / "rgba.tif", np.zeros((32, 32, 4), np.uint8), photometric="rgb",
                   extrasamples=["unassalpha"])
  tifffile.imwrite(d / "single.tif", frames[0, 0].astype(np.uint16))
  tiff_io.write_movie(str(d / "short.tif"), frames[0, :5], 100.0, 0.01)
  nan = frames[0].astype(np.float32)
  nan[2, 3, 4] = np.nan
  tifffile.imwrite(d / "nan.tif", nan)
  tifffile.imwrite(d / "big.tif", np.full((8, 64, 64), 120, np.uint16))
  empty = tmp_path / "empty"
  empty.mkdir()
  out = tmp_path / "out.csv"
  r = _cli("smlm_jax.diffusion.predict", f"--workdir={tiny_run}", f"--input={d}", f"--input={empty}",
           f"--output={out}", "--stride=16", str(tmp_path / "missing.tif"))
  assert r.returncode == 1
  assert "Traceback" not in r.stderr
  header, rows = _read(out)
  flag = {}
  for row in rows:
    flag.setdefault(os.path.basename(row["file"]), []).append(row["flag"])
  expected = {"corrupt.tif": "error:unreadable", "rgb.tif": "error:rgb",
              "rgba.tif": "error:rgb", "single.tif": "error:single_frame",
              "short.tif": "error:too_few_frames", "nan.tif": "error:nan_or_inf",
              "big.tif": "error:wrong_size", "missing.tif": "error:not_found",
              "empty": "error:empty_folder"}
  for name, f in expected.items():
    assert flag[name] == [f], (name, flag.get(name))
    assert name in r.stderr                       # one line each on stderr
  for name in ("good1.tif", "good2.tif"):
    assert flag[name] and "error" not in flag[name][0]
  assert "pixel_size_mismatch" in flag["px130.tif"][0]
  assert "WARNING" in r.stderr and any("WARNING" in h and "130" in h for h in header)
  # 50 frames, windows of T = 8 every 16 frames: first frames 0, 16, 32.
  assert [row["first_frame"] for row in rows if row["file"].endswith("long50.tif")] == [
      "0", "16", "32"]
  for row in rows:
    if row["flag"].startswith("error"):
      assert row["D_um2_per_s"] == ""
    else:
      assert float(row["D_um2_per_s"]) > 0


def test_window_starts():
  assert tiff_io.window_starts(50, 16, 16) == [0, 16, 32]
  assert tiff_io.window_starts(16, 16, 16) == [0]
  assert tiff_io.window_starts(15, 16, 16) == []
  assert tiff_io.window_starts(20, 16, 2) == [0, 2, 4]


def test_pure_noise_is_no_spot(tiny_run, tmp_path):
  rng = np.random.default_rng(0)
  d = tmp_path / "noise"
  d.mkdir()
  for i, bg in enumerate([3.0, 25.0]):
    adu = 100 + 2.0 * rng.poisson(0.9 * bg, size=(8, 32, 32))
    tiff_io.write_movie(str(d / f"n{i}.tif"), adu, 100.0, 0.01)
  out = tmp_path / "noise.csv"
  predict.run(tiny_run, [str(d)], str(out))
  _, rows = _read(out)
  assert len(rows) == 2 and all("no_spot" in r["flag"] for r in rows)


def test_channel_of_a_two_channel_movie_predicts_like_that_channel_alone(tiny_run, tmp_path):
  """--channel (predict, baselines, calibrate, analyze): a [T, C, H, W] movie is read as
  the chosen channel; without a choice it is an error row (bad_channel), not a guess."""
  frames = _tiny_movies(5, 2)
  one, two = tmp_path / "one", tmp_path / "two"
  one.mkdir(), two.mkdir()
  for i, f in enumerate(frames):
    meta = {"finterval": 0.01, "unit": "um"}
    tifffile.imwrite(str(one / f"m{i}.tif"), f.astype(np.float32), imagej=True,
                     metadata=dict(meta, axes="TYX"), resolution=(10.0, 10.0))
    other = np.full_like(f, 100.0) + (np.arange(f.size).reshape(f.shape) % 7)
    both = np.stack([other, f], axis=1).astype(np.float32)          # T, C, H, W
    tifffile.imwrite(str(two / f"m{i}.tif"), both, imagej=True,
                     metadata=dict(meta, axes="TCYX"), resolution=(10.0, 10.0))
  from smlm_jax.diffusion import camera_setup
  predictor = predict.Predictor(tiny_run)
  predictor.camera, _ = camera_setup.data_camera(predictor.config.sim.camera)
  quiet = lambda *a, **k: None
  key = lambda r: tiff_io._natural_key(r.file)
  ref = sorted(predict.predict_files(predictor, [str(one)], log=quiet)[0], key=key)
  got = sorted(predict.predict_files(predictor, [str(two)], log=quiet, channel=1)[0], key=key)
  assert not any(r.error for r in ref)
  np.testing.assert_allclose([r.D for r in got], [r.D for r in ref], rtol=1e-5)
  rows = predict.predict_files(predictor, [str(two)], log=quiet)[0]
  assert [r.error for r in rows] == ["bad_channel"] * 2
