"""Third, independent simulator of confocal Ca2+ movies with sparks, puffs and waves (test data).

Contract: writes, for i in 0..num-1, NAME = f"{prefix}_{i:04d}" in --out:
  NAME.tif            uint16 ADU (T, Y, X), offset 100 ADU, 200 nm pixels, 6.8 ms frames
  NAME_labels.tif     uint8 (T, Y, X): 0 background, 1 spark, 2 wave, 3 puff, 4 ignore
  NAME_instances.tif  int32 (T, Y, X): 0 none, 1..N one id per event (single class each)
  NAME.json           camera/physics parameters, per-event metadata, the label rule in words
Deterministic: movie i uses np.random.default_rng([seed, i]). Physics in sim3_model.py,
modelling choices and sources in README.md. Bad flag values: one line "error: ..." and exit 2.
Last stdout line: "RESULT movies=.. sparks=.. puffs=.. waves=.." (events with labelled voxels).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from absl import app, flags  # noqa: E402

from smlm_jax.core import cli  # noqa: E402

import sim3_model  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "output folder")
flags.DEFINE_integer("num", 24, "number of movies")
flags.DEFINE_integer("seed", 0, "base seed")
flags.DEFINE_integer("frames", 256, "frames per movie")
flags.DEFINE_integer("height", 64, "movie height (px)")
flags.DEFINE_integer("width", 256, "movie width (px)")
flags.DEFINE_string("prefix", "sparks3", "movie name prefix")


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  if not FLAGS.out:
    cli.fail("--out is required")
  checks = [(FLAGS.num >= 1, "--num must be >= 1"), (16 <= FLAGS.frames <= 100000, "--frames must be in 16..100000"),
            (16 <= FLAGS.height <= 4096, "--height must be in 16..4096"),
            (16 <= FLAGS.width <= 4096, "--width must be in 16..4096"), (FLAGS.seed >= 0, "--seed must be >= 0"),
            (FLAGS.prefix.replace("_", "").replace("-", "").isalnum(), "--prefix must be alphanumeric")]
  for ok, msg in checks:
    if not ok:
      cli.fail(msg)
  try:
    os.makedirs(FLAGS.out, exist_ok=True)
  except OSError as e:
    cli.fail(f"cannot create {FLAGS.out}: {e}")
  totals = {"spark": 0, "puff": 0, "wave": 0}
  faint = {"spark": 0, "puff": 0, "wave": 0}
  peaks = {"spark": [], "puff": [], "wave": []}
  for i in range(FLAGS.num):
    rng = np.random.default_rng([FLAGS.seed, i])
    res = sim3_model.simulate_movie(rng, FLAGS.frames, FLAGS.height, FLAGS.width)
    name = f"{FLAGS.prefix}_{i:04d}"
    base = os.path.join(FLAGS.out, name)
    tifffile.imwrite(base + ".tif", res["movie_adu"], metadata={"axes": "TYX"})
    tifffile.imwrite(base + "_labels.tif", res["labels"], metadata={"axes": "TYX"})
    tifffile.imwrite(base + "_instances.tif", res["instances"], metadata={"axes": "TYX"})
    meta = {"name": name, "pixel_size_nm": 1000 * sim3_model.PIXEL_UM,
            "frame_interval_s": sim3_model.FRAME_MS / 1000.0,
            "camera_offset_adu": sim3_model.CAMERA_OFFSET_ADU,
            "simulator": "experiments/third_sim/sparks_sim3.py", "seed": FLAGS.seed, "movie_index": i,
            "rng": f"np.random.default_rng([{FLAGS.seed}, {i}])", "shape_tyx": list(res["movie_adu"].shape),
            "classes": {"0": "background", "1": "spark", "2": "wave", "3": "puff", "4": "ignore"}}
    meta.update(res["meta"])
    with open(base + ".json", "w") as f:
      json.dump(meta, f, indent=1)
    counts = {c: 0 for c in totals}
    for ev in meta["events"]:
      if ev["ignored"] or ev["n_voxels"] == 0:
        faint[ev["class"]] += 1
      else:
        counts[ev["class"]] += 1
        peaks[ev["class"]].append(ev["peak_dff"])
    for c in totals:
      totals[c] += counts[c]
    print(f"{name}: sparks={counts['spark']} puffs={counts['puff']} waves={counts['wave']}", flush=True)
  for c in totals:
    med = f"{np.median(peaks[c]):.2f}" if peaks[c] else "n/a"
    print(f"{c}s: {totals[c]} labelled (median peak dF/F0 {med}), {faint[c]} too faint or hidden by overlaps")
  print(f"RESULT movies={FLAGS.num} sparks={totals['spark']} puffs={totals['puff']} waves={totals['wave']}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
