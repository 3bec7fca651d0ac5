"""Is the sparks gap on an independent simulator seed variance? (issue 23, diagnostic)

  flock /tmp/smlm_cpu.lock python experiments/sparks_seed_ensemble.py \
      --workdirs=runs/sparks_s0,runs/sparks_s1 --sim_dir=DIR [--out=ensemble.json]

Scores each trained run alone (its own confidence filter) and the mean of the runs'
class probabilities (one deep ensemble, no retraining) under each run's filter, on the
annotated movies of ``--sim_dir`` (NAME.tif, NAME_labels.tif [, NAME_instances.tif],
NAME.json as ``experiments/second_sim`` writes them). Meant for VALIDATION data (the
second simulator); it refuses a folder named like the third simulator's test sets
unless ``--allow_test``. Every movie is segmented once per run; the scorers share the
probabilities. Last line: RESULT f1_sparks_<name>=... f1_puffs_<name>=... per row
(names: run0, run1, ..., mean_filter0, mean_filter1, ...).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import json  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import sparks_study  # noqa: E402
from smlm_jax.core import cli  # noqa: E402
from smlm_jax.sparks import evaluate as evaluate_lib  # noqa: E402
from smlm_jax.sparks import events as events_lib  # noqa: E402
from smlm_jax.sparks import predict as predict_lib  # noqa: E402

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Two or more trained sparks runs.")
_SIM_DIR = flags.DEFINE_string("sim_dir", None, "Annotated simulated movies (validation).")
_OUT = flags.DEFINE_string("out", None, "Write the metrics as JSON here.")
_ALLOW_TEST = flags.DEFINE_bool("allow_test", False, "Score a test folder (once).")

CLASSES = ("spark", "wave", "puff")


def main(argv):
  del argv
  workdirs = _WORKDIRS.value or []
  if len(workdirs) < 2:
    cli.fail("--workdirs: give at least two trained runs (comma-separated)")
  if not _SIM_DIR.value:
    cli.fail("--sim_dir: the folder of annotated movies is required")
  if "third" in os.path.abspath(_SIM_DIR.value) and not _ALLOW_TEST.value:
    cli.fail(f"--sim_dir={_SIM_DIR.value} looks like a test set (third simulator); "
             "choose on validation data, or pass --allow_test to score it once")
  items = sparks_study.second_sim_items(_SIM_DIR.value)
  meta = items[0][4]
  offset = float(meta.get("camera_offset_adu", 100.0))
  segs = [predict_lib.Segmenter(w, camera_offset_adu=offset) for w in workdirs]
  px_um, dt_ms = float(meta["pixel_size_nm"]) / 1000, float(meta["frame_interval_s"]) * 1000
  specs = [events_lib.spec_from_config(s.config, px_um, dt_ms) for s in segs]
  n = len(segs)
  rows = ([(f"run{i}", i, specs[i]) for i in range(n)]
          + [(f"mean_filter{i}", None, specs[i]) for i in range(n)])
  scorers = {name: events_lib.Scorer(spec) for name, _, spec in rows}
  for k, (name, mpath, lpath, ipath, m) in enumerate(items):
    image = predict_lib.read_movie(mpath, offset)
    lab, inst, cls_of, true_amp = evaluate_lib.annotated_truth(
        lpath, ipath, image.data.shape, sparks_study.event_amplitudes(m))
    probs = []
    for s in segs:
      p, x, _ = s.probabilities(image.data, desc=f"{name} ({k + 1}/{len(items)})")
      probs.append(np.asarray(p))
    mean = np.mean(probs, axis=0)
    for row, i, _ in rows:
      scorers[row].add(probs[i] if i is not None else mean, x[..., 0], lab, inst, cls_of,
                       true_amp)
  out, keys = {}, []
  print(f"{len(items)} movies of {_SIM_DIR.value}; runs: " + ", ".join(
      f"run{i} = {w}" for i, w in enumerate(workdirs)))
  print(f"{'':16s}" + "".join(f"{c + ' F1 / P / R / FP':>28s}" for c in CLASSES))
  for row, _, _ in rows:
    m = scorers[row].metrics()
    out[row] = {c: {k: m[c][k] for k in ("f1", "precision", "recall", "fp")}
                for c in CLASSES}
    print(f"{row:16s}" + "".join(
        f"{m[c]['f1']:10.3f} {m[c]['precision']:5.3f} {m[c]['recall']:5.3f} {m[c]['fp']:4d}"
        for c in CLASSES))
    keys += [f"f1_sparks_{row}={m['spark']['f1']:.4f}", f"f1_puffs_{row}={m['puff']['f1']:.4f}"]
  if _OUT.value:
    cli.atomic_write_text(_OUT.value, json.dumps(
        {"workdirs": workdirs, "sim_dir": _SIM_DIR.value, "rows": out}, indent=1,
        default=float))
  print("RESULT " + " ".join(keys))


if __name__ == "__main__":
  app.run(main)
