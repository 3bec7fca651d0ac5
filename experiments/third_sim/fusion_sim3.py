"""Third, independent light-sheet simulator: one raw view and its fused target (test data only).

Contract: writes, for i in 0..num-1, NAME = f"{prefix}_{i:04d}" in --out:
  NAME_view.tif   uint16 ADU (Z, Y, X): one single-sided light-sheet view, z = detection axis
  NAME_fused.tif  float32 (Z, Y, X): the fused target on the same voxel grid (photon units)
  NAME.json       voxel_size_um [z, y, x], camera_offset_adu, camera_gain_adu_per_e, label
                  ("nuclei" for even i, "membranes" for odd i), simulator, seed, index, shape_zyx,
                  and every drawn parameter
Deterministic: volume i uses np.random.default_rng([seed, i]). Physics in fusion3_model.py,
modelling choices and sources in README.md. Bad flag values: one line "error: ..." and exit 2.
Last stdout line: "RESULT volumes=N nuclei=.. membranes=..".
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from absl import app, flags  # noqa: E402

from smlm_jax.core import cli  # noqa: E402

import fusion3_model  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "output folder")
flags.DEFINE_integer("num", 12, "number of volumes")
flags.DEFINE_integer("seed", 0, "base seed")
flags.DEFINE_string("shape", "32,96,96", "volume shape z,y,x (voxels)")
flags.DEFINE_string("prefix", "fusion3", "volume name prefix")


def _shape():
  try:
    shape = tuple(int(v) for v in FLAGS.shape.split(","))
  except ValueError:
    cli.fail(f"--shape={FLAGS.shape} must be three integers z,y,x")
  if len(shape) != 3:
    cli.fail(f"--shape={FLAGS.shape} must be three integers z,y,x")
  if not (8 <= shape[0] <= 256 and 16 <= shape[1] <= 1024 and 16 <= shape[2] <= 1024):
    cli.fail("--shape: z must be in 8..256, y and x in 16..1024")
  return shape


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  if not FLAGS.out:
    cli.fail("--out is required")
  checks = [(FLAGS.num >= 1, "--num must be >= 1"), (FLAGS.seed >= 0, "--seed must be >= 0"),
            (FLAGS.prefix.replace("_", "").replace("-", "").isalnum(), "--prefix must be alphanumeric")]
  for ok, msg in checks:
    if not ok:
      cli.fail(msg)
  shape = _shape()
  try:
    os.makedirs(FLAGS.out, exist_ok=True)
  except OSError as e:
    cli.fail(f"cannot create {FLAGS.out}: {e}")
  counts = {"nuclei": 0, "membranes": 0}
  for i in range(FLAGS.num):
    t0 = time.time()
    label = "nuclei" if i % 2 == 0 else "membranes"
    rng = np.random.default_rng([FLAGS.seed, i])
    res = fusion3_model.simulate_volume(rng, shape, label)
    name = f"{FLAGS.prefix}_{i:04d}"
    base = os.path.join(FLAGS.out, name)
    tifffile.imwrite(base + "_view.tif", res["view_adu"], metadata={"axes": "ZYX"})
    tifffile.imwrite(base + "_fused.tif", res["fused"], metadata={"axes": "ZYX"})
    m = res["meta"]
    meta = {"name": name, "voxel_size_um": m["voxel_size_um"], "camera_offset_adu": m["camera_offset_adu"],
            "camera_gain_adu_per_e": m["camera_gain_adu_per_e"], "label": label,
            "simulator": "experiments/third_sim/fusion_sim3.py", "seed": FLAGS.seed, "index": i,
            "rng": f"np.random.default_rng([{FLAGS.seed}, {i}])", "shape_zyx": list(shape),
            "axes": "ZYX (z = detection axis = stack axis)"}
    meta.update({k: v for k, v in m.items() if k not in meta})
    with open(base + ".json", "w") as f:
      json.dump(meta, f, indent=1)
    counts[label] += 1
    view = res["view_adu"].astype(np.float64)
    corr = np.corrcoef(view.ravel(), res["fused"].ravel().astype(np.float64))[0, 1]
    print(f"{name}: {label:9s} voxel_um={m['voxel_size_um']} depth0_um={m['sample']['field_top_depth_um']:.0f} "
          f"peak_photons={m['photons']['view_peak_photons']:.0f} {m['optics']['sheet_type']} "
          f"{m['camera_params']['camera']} view_mean_adu={view.mean():.1f} corr_view_fused={corr:.3f} "
          f"time_s={time.time() - t0:.1f}", flush=True)
  print(f"RESULT volumes={FLAGS.num} nuclei={counts['nuclei']} membranes={counts['membranes']}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
