"""The third light-sheet simulator writes a consistent tiny view/fused pair; its view loses signal and
axial sharpness with depth/detection while the fused target does not."""
import json
import os
import subprocess
import sys

import numpy as np
import tifffile

HERE = os.path.join(os.path.dirname(__file__), "..", "experiments", "third_sim")
SCRIPT = os.path.join(HERE, "fusion_sim3.py")


def test_fusion_sim3_tiny_volumes(tmp_path):
  cmd = [sys.executable, SCRIPT, f"--out={tmp_path}", "--num=2", "--seed=5", "--shape=16,32,32"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  assert res.stdout.strip().splitlines()[-1] == "RESULT volumes=2 nuclei=1 membranes=1"
  for bad in ("--num=0", "--shape=16,32", "--shape=a,b,c"):
    r = subprocess.run(cmd[:2] + [f"--out={tmp_path}", bad], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr, (bad, r.stderr)
  for i, label in enumerate(("nuclei", "membranes")):
    name = f"fusion3_{i:04d}"
    view = tifffile.imread(tmp_path / f"{name}_view.tif")
    fused = tifffile.imread(tmp_path / f"{name}_fused.tif")
    meta = json.loads((tmp_path / f"{name}.json").read_text())
    assert view.shape == fused.shape == (16, 32, 32)
    assert view.dtype == np.uint16 and fused.dtype == np.float32 and np.isfinite(fused).all()
    for key in ("voxel_size_um", "camera_offset_adu", "camera_gain_adu_per_e", "label", "simulator", "seed",
                "index", "shape_zyx", "sample", "optics", "camera_params", "photons"):
      assert key in meta, key
    assert meta["label"] == label and meta["index"] == i and meta["seed"] == 5 and meta["shape_zyx"] == [16, 32, 32]
    dz, dy, dx = meta["voxel_size_um"]
    assert 1.0 <= dz <= 2.0 and 0.3 <= dy == dx <= 0.5
    assert view.mean() > meta["camera_offset_adu"] - 5


def test_view_dims_with_depth_and_is_blurrier_along_z_than_fused():
  sys.path.insert(0, HERE)
  import fusion3_model as fm
  rng = np.random.default_rng(0)
  vox, shape = [2.0, 0.5, 0.5], (16, 32, 32)
  sp = fm.draw_sample_params(rng, "nuclei", shape[0] * vox[0])
  sp.update(field_top_depth_um=20.0, embryo_radius_um=250.0, apex_offset_yx_um=[0.0, 0.0], n_lumens=0,
            dim_cell_fraction=0.0, cell_radius_median_um=3.5)
  op = fm.draw_optics_params(rng)
  op.update(scattering_length_em_um=60.0, sheet_type="gaussian", sheet_waist_um=2.5, na_det=0.6)
  obj, geo = fm.render_sample(rng, sp, shape, vox)
  view, _ = fm.light_sheet_view(obj, geo, op, vox)
  fk, fkz = fm.fused_kernel(op, vox)
  fused = fm.convolve_sum([(obj, fk)], shape, fkz)
  # image contrast (per-plane std) relative to the object's: the ballistic signal decays as exp(-depth/ls)
  per_plane = lambda a: a.std((1, 2)) / obj.std((1, 2))
  v, f = per_plane(view), per_plane(fused)
  view_ratio, fused_ratio = v[-4:].mean() / v[:4].mean(), f[-4:].mean() / f[:4].mean()
  assert view_ratio < 0.75, view_ratio           # exp(-24 um / 60 um) = 0.67 between top and bottom planes
  assert abs(fused_ratio - 1) < 0.15, fused_ratio
  # axial sharpness: energy of plane-to-plane differences relative to the variance (0.47 vs 0.79 here)
  sharp_z = lambda a: (np.diff(a, axis=0) ** 2).mean() / a.var()
  assert sharp_z(view) < 0.75 * sharp_z(fused), (sharp_z(view), sharp_z(fused))
