"""The second (independent) simulators in experiments/second_sim (issue 23): file
conventions, label/instance consistency and physics sanity, on tiny samples."""
import json

import numpy as np
import pytest
import tifffile

from experiments.second_sim import fusion_sim, sparks_sim
from smlm_jax.core import tiff_io


def test_sparks_files_follow_the_conventions(tmp_path):
  assert sparks_sim.main(["--out", str(tmp_path), "--num", "1", "--seed", "3",
                          "--tiny"]) == 0
  base = tmp_path / "sparks_0003"
  movie = tiff_io.read_image(str(base) + ".tif")
  assert movie.data.dtype == np.uint16 and movie.data.shape == (64, 48, 128)
  assert movie.axes == "TYX"
  assert movie.pixel_size_nm == pytest.approx(200.0, rel=1e-3)
  assert movie.frame_interval_s == pytest.approx(6.8e-3)
  labels = tifffile.imread(str(base) + "_labels.tif")
  instances = tifffile.imread(str(base) + "_instances.tif")
  assert labels.dtype == np.uint8 and labels.shape == movie.data.shape
  assert instances.dtype == np.uint16 and instances.shape == movie.data.shape
  assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
  meta = json.loads((tmp_path / "sparks_0003.json").read_text())
  assert meta["pixel_size_nm"] == 200.0 and meta["frame_interval_s"] == 6.8e-3
  assert meta["camera_offset_adu"] == 100.0 and meta["camera_gain_adu_per_e"] == 1.0
  assert meta["seed"] == 3
  for key in ("id", "class", "t_peak_frame", "y_px", "x_px", "peak_dF_F0",
              "duration_ms", "width_um"):
    assert all(key in e for e in meta["events"])
  # outside the cell the camera reads offset + a few e- of background, not 0 or 1000
  dark = np.percentile(movie.data, 1)
  assert 90 <= dark <= 110


def test_sparks_labels_and_instances_are_consistent():
  seen = set()
  for seed in (0, 3, 6):
    sim = sparks_sim.simulate_movie(seed, tiny=True)
    labels, inst, events = sim["labels"], sim["instances"], sim["meta"]["events"]
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids))
    cls = {e["id"]: e["label"] for e in events}
    assert set(np.unique(inst)) - {0} <= set(ids)
    for i in np.unique(inst[inst > 0]):
      assert set(np.unique(labels[inst == i])) == {cls[int(i)]}
    assert np.all(np.isin(labels[inst == 0], (0, 4)))        # no unowned class voxels
    assert np.all(labels[inst > 0] > 0)
    for e in events:                                         # voxel counts match
      assert e["n_voxels"] == int((inst == e["id"]).sum())
    seen |= set(np.unique(labels).tolist())
    # every labelled event has a sensible size: sparks ~1-3 um, waves much wider
    for e in events:
      if e["class"] == "spark":
        assert 0.6 < e["width_um"] < 4.0 and 5 < e["duration_ms"] < 120
      if e["class"] == "wave":
        assert e["width_um"] > 4.0 and e["duration_ms"] > 60
  assert {1, 2, 3, 4} <= seen


def test_spark_peak_df_f0_in_the_movie_matches_the_event_list():
  checked = 0
  for seed in (0, 1, 4):                        # hold isolated sparks (0.45 - 1.6)
    sim = sparks_sim.simulate_movie(seed, tiny=True, photons_scale=30.0)
    checked += _check_isolated_spark_peaks(sim)
  assert checked >= 4


def _check_isolated_spark_peaks(sim):
  """Single-pixel dF/F0 at each isolated spark's peak frame vs the JSON value, with F0
  from frames just before its release (camera offset, gain and background removed)."""
  meta = sim["meta"]
  frames_e = (sim["movie"].astype(float) - meta["camera_offset_adu"]) / meta[
      "camera_gain_adu_per_e"]
  bg = meta["background_e_per_px_frame"]
  checked = 0
  for e in meta["events"]:
    if e["class"] != "spark" or e["peak_dF_F0"] < 0.4 or e["t0_ms"] < 60:
      continue
    others = [o for o in meta["events"] if o["id"] != e["id"] and abs(
        o["t_peak_frame"] - e["t_peak_frame"]) < 25 and np.hypot(
            o["y_px"] - e["y_px"], o["x_px"] - e["x_px"]) < 25]
    if others:
      continue
    y, x = int(round(e["y_px"])), int(round(e["x_px"]))
    start = int(e["t0_ms"] / 6.8) - 8
    f0 = frames_e[start:start + 6, y, x].mean() - bg
    peak = frames_e[e["t_peak_frame"], y, x] - bg
    assert (peak - f0) / f0 == pytest.approx(e["peak_dF_F0"], rel=0.2, abs=0.08), e
    checked += 1
  return checked


def test_fusion_files_follow_the_conventions(tmp_path):
  assert fusion_sim.main(["--out", str(tmp_path), "--num", "1", "--seed", "2",
                          "--tiny"]) == 0
  view = tiff_io.read_image(str(tmp_path / "fusion_0002_view.tif"))
  fused = tiff_io.read_image(str(tmp_path / "fusion_0002_fused.tif"))
  assert view.data.dtype == np.uint16 and view.data.shape == (16, 48, 48)
  assert fused.data.dtype == np.float32 and fused.data.shape == (16, 48, 48)
  assert view.axes == "ZYX"
  assert view.pixel_size_nm == pytest.approx(500.0, rel=1e-3)
  assert view.z_spacing_nm == pytest.approx(1000.0, rel=1e-3)
  meta = json.loads((tmp_path / "fusion_0002.json").read_text())
  assert meta["voxel_size_um"] == [1.0, 0.5, 0.5]
  assert meta["camera_offset_adu"] == 100.0 and meta["camera_gain_adu_per_e"] == 2.17
  assert meta["label"] in ("nuclei", "membranes") and meta["seed"] == 2
  assert 0.25 < meta["psf"]["detection_fwhm_xy_um"] < 0.45
  assert np.percentile(view.data, 1) >= 95                  # offset 100 ADU + background
  assert np.all(np.isfinite(fused.data))


def _axial_over_lateral(v, depth_um):
  """Mean squared z-difference over mean squared x-difference, inside the sample (depth
  > 2 um, so that the sample surface does not dominate)."""
  v, ok = v.astype(np.float64), depth_um > 2
  dz = np.diff(v, axis=0)[ok[1:] & ok[:-1]]
  dx = np.diff(v, axis=2)[ok[:, :, 1:] & ok[:, :, :-1]]
  return np.mean(dz ** 2) / np.mean(dx ** 2)


@pytest.mark.parametrize("label", ["nuclei", "membranes"])
def test_view_is_blurrier_along_z_than_the_target(label):
  sim = fusion_sim.simulate_volume(4, tiny=True, label=label)
  d = sim["depth_um"]
  # z sampling is 1 um, x 0.5 um: relative to x, the view changes less from plane to
  # plane than the target (light sheet x detection PSF, aberration and halo with depth)
  view = _axial_over_lateral(sim["view_clean_e"], d)
  assert view < 0.8 * _axial_over_lateral(sim["fused"], d)


@pytest.mark.parametrize("seed", [0, 3])
def test_view_signal_falls_with_depth_but_the_target_does_not(seed):
  """A dye-filled phantom: in the view the mean over the sample (above the yolk) falls
  with depth as exp(-depth / absorption length) from the JSON; the target stays flat."""
  sim = fusion_sim.simulate_volume(seed, shape=(32, 40, 40), label="uniform")
  meta, d = sim["meta"], sim["depth_um"]
  ok = (d > 3) & (d < meta["sample"]["yolk_depth_um"] - 2)
  planes = [z for z in range(d.shape[0]) if ok[z].mean() > 0.5]
  n = len(planes) // 4
  assert n >= 4

  def deep_over_shallow(v):
    m = np.array([v[z][ok[z]].mean() for z in planes])
    return m[-n:].mean() / m[:n].mean()

  depth = np.array([d[z][ok[z]].mean() for z in planes])
  expected = np.exp(-(depth[-n:].mean() - depth[:n].mean())
                    / meta["attenuation"]["emission_absorption_length_um"])
  view = deep_over_shallow(sim["view_clean_e"])
  assert view < 0.85 and view == pytest.approx(expected, abs=0.06)
  assert deep_over_shallow(sim["fused"]) == pytest.approx(1.0, abs=0.02)
