"""The third simulator writes a consistent tiny movie whose labelled spark is brighter than before it."""
import json
import os
import subprocess
import sys

import numpy as np
import tifffile

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "experiments", "third_sim", "sparks_sim3.py")


def test_third_sim_tiny_movie(tmp_path):
  cmd = [sys.executable, SCRIPT, f"--out={tmp_path}", "--num=1", "--seed=3",
         "--frames=40", "--height=32", "--width=64"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert res.returncode == 0, res.stderr
  assert res.stdout.strip().splitlines()[-1].startswith("RESULT movies=1 ")
  bad = subprocess.run(cmd[:2] + [f"--out={tmp_path}", "--num=0"], capture_output=True, text=True)
  assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr

  name = "sparks3_0000"
  movie = tifffile.imread(tmp_path / f"{name}.tif")
  labels = tifffile.imread(tmp_path / f"{name}_labels.tif")
  inst = tifffile.imread(tmp_path / f"{name}_instances.tif")
  meta = json.loads((tmp_path / f"{name}.json").read_text())
  assert movie.shape == labels.shape == inst.shape == (40, 32, 64)
  assert movie.dtype == np.uint16 and labels.dtype == np.uint8 and inst.dtype in (np.uint16, np.int32)
  assert set(np.unique(labels)) <= {0, 1, 2, 3, 4}
  for key in ("pixel_size_nm", "frame_interval_s", "camera_offset_adu", "camera_gain_adu_per_e",
              "simulator", "seed", "shape_tyx", "events", "label_rule"):
    assert key in meta
  assert meta["pixel_size_nm"] == 200.0 and meta["frame_interval_s"] == 0.0068
  assert meta["shape_tyx"] == [40, 32, 64]
  for i in np.unique(inst[inst > 0]):
    cls = np.unique(labels[inst == i])
    assert len(cls) == 1 and cls[0] in (1, 2, 3), (i, cls)

  sparks = [e for e in meta["events"] if e["class"] == "spark" and e["n_voxels"] > 0 and e["onset_frame"] >= 3]
  assert sparks, meta["events"]
  ev = max(sparks, key=lambda e: e["peak_dff"])
  sel = inst[ev["peak_frame"]] == ev["id"]
  assert sel.sum() > 0
  before = movie[: int(ev["onset_frame"])].astype(float)[:, sel].mean()
  at_peak = movie[ev["peak_frame"]].astype(float)[sel].mean()
  assert at_peak > before + 0.2 * (before - meta["camera_offset_adu"]), (at_peak, before)
