"""analyze (whole movies): detection false-positive rate and positions, linking, the
combination of windows, bad inputs and a tiny end-to-end run on a simulated movie."""
import csv
import os
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest
import tifffile

from smlm_jax.core import tiff_io
from smlm_jax.core.noise import Camera
from smlm_jax.diffusion import analyze, detect, fullmovie, tracks
from smlm_jax.diffusion.simulator import pixel_integrated_gaussian

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QE, READ_E = 0.9, 1.6


def _noise_frames(key, n, shape, bg_photons):
  """Photons of noise-only frames: Poisson electrons + read noise, referred to input."""
  k_p, k_n = jax.random.split(key)
  e = jax.random.poisson(k_p, QE * bg_photons, (n,) + shape).astype(np.float32)
  read = jax.random.normal(k_n, (n,) + shape) * READ_E
  return np.asarray((e + read) / QE)


@pytest.mark.parametrize("bg_photons", [2.0, 20.0])
def test_detection_false_positive_rate_on_noise(bg_photons):
  det = detect.make_detector(225.0, 100.0, (128, 128), 2.0, QE, READ_E)
  frames = _noise_frames(jax.random.key(int(bg_photons)), 60, (128, 128), bg_photons)
  n = sum(len(det(f)[0]) for f in frames)
  # 120 expected; the Gaussian-field tail fitted on white noise holds within ~40% for
  # Poisson backgrounds of 2-30 photons (measured 0.93-1.41 x the set rate).
  assert 60 <= n <= 200, n
  # A 10x lower rate gives a higher threshold and ~10x fewer noise spots.
  det10 = detect.make_detector(225.0, 100.0, (128, 128), 0.2, QE, READ_E)
  assert det10.threshold > det.threshold + 0.3
  assert sum(len(det10(f)[0]) for f in frames) < n / 4


def test_detection_finds_spots_at_known_positions():
  true_xy = np.array([[20.3, 30.7], [70.5, 64.2], [100.8, 15.1], [40.0, 110.4]])
  sigma_px = 225.0 / 2.3548 / 100.0
  img = np.zeros((128, 128), np.float32)
  for x, y in true_xy:
    px = np.asarray(pixel_integrated_gaussian(np.array([x]), np.array([sigma_px]), 128, 1.0))[0]
    py = np.asarray(pixel_integrated_gaussian(np.array([y]), np.array([sigma_px]), 128, 1.0))[0]
    img += 600.0 * py[:, None] * px[None, :]
  k_p, k_n = jax.random.split(jax.random.key(3))
  det = detect.make_detector(225.0, 100.0, (128, 128), 0.1, QE, READ_E)
  for i in range(5):
    e = jax.random.poisson(jax.random.fold_in(k_p, i), QE * (10.0 + img)).astype(np.float32)
    frame = np.asarray(e + jax.random.normal(jax.random.fold_in(k_n, i), img.shape)
                       * READ_E) / QE
    x, y, _ = det(frame)
    found = np.stack([x, y], -1)
    d = np.hypot(*(found[:, None] - true_xy[None]).transpose(2, 0, 1))
    assert np.all(d.min(0) < 0.5), d.min(0)          # every spot, centroid within 0.5 px
    assert len(found) <= len(true_xy) + 1            # at most a rare noise spot


def test_linking_reproduces_known_tracks():
  key = jax.random.key(0)
  starts = np.array([[20.0, 20.0], [60.0, 25.0], [40.0, 70.0]])
  rows = []
  for k, s in enumerate(starts):
    steps = np.asarray(jax.random.normal(jax.random.fold_in(key, k), (30, 2))) * 1.0
    path = s + np.cumsum(steps, 0)
    for t in range(30):
      if k == 1 and t in (10, 11):        # two missed frames: closed by memory=2
        continue
      rows.append(dict(frame=t + 5 * k, x=path[t, 0], y=path[t, 1], ok=True,
                       photons=1000.0, background=10.0, truth=k))
  df = pd.DataFrame(rows).sample(frac=1.0, random_state=0)     # order must not matter
  got = tracks.link(df.drop(columns="truth"), search_range_px=5.0, memory=2, min_frames=5)
  assert len(got) == 3
  for tr, k in zip(sorted(got, key=lambda t: t.t_start), range(3)):
    assert (tr.t_start, tr.t_end) == (5 * k, 5 * k + 29)
    want = df[df.truth == k].sort_values("frame")
    np.testing.assert_allclose(tr.xy_px[tr.valid], want[["x", "y"]].to_numpy(), atol=1e-9)
    assert tr.valid.sum() == (28 if k == 1 else 30)


def test_tracks_cut_at_jumps_and_outlier_windows_dropped():
  steps = np.asarray(jax.random.normal(jax.random.key(7), (300, 2))) * 0.5
  path = np.cumsum(steps, 0)
  assert tracks.jump_steps(path[:, 0], path[:, 1], np.arange(300)) == []
  jumped = path.copy()
  jumped[40:] += 8.0                     # another molecule appears 11 px away
  assert tracks.jump_steps(jumped[:, 0], jumped[:, 1], np.arange(300)) == [40]
  lv = np.log(np.full(5, 0.2 ** 2))
  assert tracks.consistent_windows([0.0, 0.1, -0.1, 4.0, 4.1], lv) == [0, 1, 2]
  assert tracks.consistent_windows([0.0, 0.1, -0.1, 0.2], lv[:4]) == [0, 1, 2, 3]
  # Two confident overlapping bad windows at the end (starts 32 and 34, T = 16) vote once.
  lv2 = np.log([0.2 ** 2, 0.2 ** 2, 0.05 ** 2, 0.05 ** 2])
  assert tracks.consistent_windows([0.0, 0.1, 3.6, 3.6], lv2, [0, 16, 32, 34], 16) == [0, 1]


def test_combining_windows_narrows_as_one_over_sqrt_windows():
  T, sd = 16, 0.3
  for n in (1, 2, 4, 9):
    means = np.log(0.5) + np.linspace(-0.1, 0.1, n)
    m, s = tracks.combine(means, np.full(n, np.log(sd ** 2)), np.arange(n) * T, T)
    assert s == pytest.approx(sd / np.sqrt(n), rel=1e-6)
    assert m == pytest.approx(means.mean(), abs=1e-9)
  # Overlapping windows (stride T/2) over the same 4 T frames carry about the same
  # information as the 4 disjoint ones, not 7 windows' worth.
  _, s_overlap = tracks.combine(np.zeros(7), np.full(7, np.log(sd ** 2)),
                                np.arange(7) * T // 2, T)
  assert sd / np.sqrt(4) * 0.85 < s_overlap < sd / np.sqrt(4) * 1.15
  # Unequal variances: inverse-variance weights.
  m, s = tracks.combine([0.0, 1.0], np.log([0.1 ** 2, 0.2 ** 2]), [0, T], T)
  assert m == pytest.approx(0.2) and s == pytest.approx((1 / 0.01 + 1 / 0.04) ** -0.5)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "smlm_jax.diffusion.analyze", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_cli_flag_errors(tmp_path):
  movie = tmp_path / "m.tif"
  movie.write_bytes(b"")
  for args, text in [((f"--input={movie}", f"--output={tmp_path}/o"), "--workdir"),
                     (("--workdir=x", f"--output={tmp_path}/o"), "--input"),
                     (("--workdir=x", f"--input={movie}", f"--output={movie}"), "is a file"),
                     (("--workdir=x", f"--input={movie}", f"--output={tmp_path}/o",
                       "--stride=0"), "--stride"),
                     (("--workdir=x", f"--input={movie}", f"--output={tmp_path}/o",
                       "--false_positives_per_frame=0"), "false_positives")]:
    r = _cli(*args)
    assert r.returncode == 2 and r.stderr.startswith("error:") and text in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_end_to_end_tiny_movie_and_bad_inputs(tiny_run, tmp_path):
  """A small simulated full movie (tiny model: 8 frames of 32x32 windows) plus unusable
  files: molecules recovered as tracks with D, error rows for the bad files, exit 1."""
  from configs import diffusion
  cam = diffusion.get_config("tiny").sim.camera
  camera = Camera(model=cam.model, qe=cam.qe, gain_adu_per_e=cam.gain_adu_per_e,
                  offset_adu=cam.offset_adu, read_noise_e=cam.read_noise_e)
  spec = fullmovie.FieldSpec(num_frames=40, height_px=80, width_px=80, molecules_per_frame=3,
                             lifetime_frames=(20, 40), D_um2_per_s=(0.05, 1.0),
                             photons=(1500.0, 3000.0), background_photons=(5.0, 10.0),
                             min_start_distance_px=25.0, edge_margin_px=12.0)
  good = tmp_path / "in" / "field.tif"
  good.parent.mkdir()
  truth = fullmovie.simulate_to_tiff(jax.random.key(5), spec, camera, str(good),
                                     chunk_frames=20)
  (tmp_path / "in" / "broken.tif").write_bytes(b"not a tiff")
  tifffile.imwrite(tmp_path / "in" / "single.tif", np.zeros((80, 80), np.uint16))
  tiff_io.write_movie(str(tmp_path / "in" / "short.tif"), np.zeros((4, 80, 80)), 100, 0.01)
  tiff_io.write_movie(str(tmp_path / "in" / "small.tif"), np.zeros((20, 16, 16)), 100, 0.01)
  out = tmp_path / "out"
  r = _cli(f"--workdir={tiny_run}", f"--input={tmp_path / 'in'}",
           f"--input={tmp_path / 'missing'}", f"--output={out}")
  assert r.returncode == 1, r.stderr
  assert "Traceback" not in r.stderr
  df = pd.read_csv(out / "tracks.csv", comment="#")
  assert tuple(df.columns) == analyze.TRACK_COLUMNS
  errors = dict(zip(df.file.map(os.path.basename), df.flag))
  assert errors["broken.tif"] == "error:unreadable"
  assert errors["single.tif"] == "error:single_frame"
  assert errors["short.tif"] == "error:too_few_frames"
  assert errors["small.tif"] == "error:too_small"
  assert errors["missing"] == "error:not_found"
  mol = df[df.file.str.endswith("field.tif")]
  n_true = len(truth["t0"])
  assert n_true >= 4
  # Every true molecule is found: a track whose mean position is within 3 px of the
  # molecule's mean position and whose frames overlap its life.
  found = 0
  for t0, pos in zip(truth["t0"], truth["positions_px"]):
    mx, my = pos.mean(0)
    near = mol[(np.hypot(mol.x_px - mx, mol.y_px - my) < 3)
               & (mol.t_start <= t0 + len(pos) - 1) & (mol.t_end >= t0)]
    found += len(near) > 0
  assert found >= n_true - 1, (found, n_true)
  assert len(mol) <= n_true + 2
  ok = mol.D_um2_per_s.notna()
  assert ok.all()
  assert (mol.D_low_um2_per_s[ok] < mol.D_um2_per_s[ok]).all()
  assert (mol.D_um2_per_s[ok] < mol.D_high_um2_per_s[ok]).all()
  assert mol.D_cve_um2_per_s.notna().mean() > 0.8
  win = pd.read_csv(out / "windows.csv", comment="#")
  assert list(win.columns)[:3] == ["file", "track_id", "first_frame"]
  assert set(win.track_id) == set(mol.track_id)
  header = open(out / "tracks.csv").read()
  assert "offset_adu=100 (training default, ASSUMED)" in header
  assert "pixel_size_nm=100 ASSUMED" not in header          # read from the metadata
  assert os.path.getsize(out / "field_D_map.png") > 1000
  assert os.path.getsize(out / "D_histogram.png") > 1000
