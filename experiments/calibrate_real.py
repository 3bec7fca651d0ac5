"""Calibrates the simulator on the real blocks, then (optionally) trains and predicts.

  python experiments/calibrate_real.py [--camera_model=emccd] [--train_workdir=runs/cal]

1. ``smlm_jax.diffusion.calibrate.calibrate`` on every block in ../shared/real-data (the camera
   model is a choice: the photon-transfer plot and the read-variance warning tell
   whether it fits; these blocks have ~70 ADU^2 of variance per ADU of background,
   which only an EMCCD explains). Prints the fitted values, the distance between real
   and simulated statistics before (training defaults) and after, and the time; writes
   the JSON and the plot next to --output.
2. With --train_workdir: trains the default model on the calibrated simulator
   (``--config.sim.calibration``), predicts D on the same blocks with the calibrated
   camera, and reports the D distribution and its Spearman correlation with the
   per-window (Y) and per-track (X) values in the file names.

Last line: RESULT distance_before=<float> distance_after=<float> seconds=<float>
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import subprocess  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from configs import diffusion  # noqa: E402
from smlm_jax.diffusion import calibrate, metrics  # noqa: E402
from smlm_jax.core import cli  # noqa: E402

_INPUT = flags.DEFINE_string(
    "input", os.path.join(ROOT, "..", "shared", "real-data", "blocks_64x64x16_104_01"),
    "Folder of real movies.")
_MODEL = flags.DEFINE_enum("camera_model", "emccd", ["emccd", "scmos"], "Camera model.")
_OUTPUT = flags.DEFINE_string("output", "runs/calibration_real.json", "Calibration JSON.")
_STEPS = flags.DEFINE_integer("steps", 120, "optax steps.")
_FIT_D = flags.DEFINE_bool("fit_D", True, "Also fit the range of D.")
_TRAIN = flags.DEFINE_string("train_workdir", "", "If set: train there with the calibration.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 1000, "Training steps for step 2.")


def main(argv):
  del argv
  cli.quiet_logs()
  if not os.path.isdir(_INPUT.value):
    cli.fail(f"--input={_INPUT.value}: no such folder")
  cfg = diffusion.get_config()
  cfg.sim.camera.model = _MODEL.value
  frames, skipped = calibrate.load_movies([_INPUT.value], cfg.sim)
  if frames.shape[0] < 8:
    cli.fail(f"only {frames.shape[0]} usable movies in {_INPUT.value}")
  t0 = time.perf_counter()
  result = calibrate.calibrate(frames, cfg.sim, fit_D=_FIT_D.value, steps=_STEPS.value)
  seconds = time.perf_counter() - t0
  cli.atomic_write_text(_OUTPUT.value, calibrate.json_text(result))
  plot = os.path.splitext(_OUTPUT.value)[0] + ".png"
  calibrate.plot_calibration(result, plot)
  print(f"\ncalibration of {frames.shape[0]} real blocks ({_MODEL.value} camera model)")
  print(calibrate.summary_table(result))
  print(f"wrote {_OUTPUT.value} and {plot}")

  if _TRAIN.value:
    py = sys.executable
    subprocess.run([py, "-m", "smlm_jax.train", "--config=configs/diffusion.py",
                    f"--workdir={_TRAIN.value}", f"--config.sim.calibration={_OUTPUT.value}",
                    f"--config.num_train_steps={_TRAIN_STEPS.value}"], cwd=ROOT, check=True)
    out_csv = os.path.join(_TRAIN.value, "real_blocks.csv")
    subprocess.run([py, "-m", "smlm_jax.diffusion.predict", f"--workdir={_TRAIN.value}",
                    f"--input={_INPUT.value}", f"--output={out_csv}",
                    f"--calibration={_OUTPUT.value}",
                    f"--plot={os.path.join(_TRAIN.value, 'real_blocks.png')}"], cwd=ROOT)
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    from bench_predict import name_values, read_rows
    rows = [r for r in read_rows(out_csv) if not r["flag"].startswith("error")]
    D = np.array([float(r["D_um2_per_s"]) for r in rows])
    X, Y = name_values(rows)
    q = np.quantile(D, [0.1, 0.25, 0.5, 0.75, 0.9])
    print("\n| calibrated model on the real blocks | value |\n|---|---|")
    print(f"| D quantiles 10/25/50/75/90% (um^2/s) | {' / '.join(f'{v:.3g}' for v in q)} |")
    print(f"| Spearman(D, per-window Y) | {metrics.spearman(D, Y):.3f} |")
    print(f"| Spearman(D, per-track X) | {metrics.spearman(D, X):.3f} |")
    print(f"| rows flagged | {sum(r['flag'] != 'ok' for r in rows)} of {len(rows)} |")
  print(f"RESULT distance_before={result['distance_before']:.4g} "
        f"distance_after={result['distance_after']:.4g} seconds={seconds:.1f}")


if __name__ == "__main__":
  app.run(main)
