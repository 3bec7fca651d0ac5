"""End-to-end prediction speed on real movies, and what the model says about them.

  python experiments/bench_predict.py --workdir=runs/default \
      [--input=../shared/real-data/blocks_64x64x16_104_01] [--calibration=cal.json]

1. Runs ``python -m smlm_jax.diffusion.predict`` as a user would (a fresh process: start-up,
   checkpoint restore, compile, read, normalize, model, CSV) and times the wall clock.
2. In this process, times the steady state (read + normalize + model, compiled) over
   all windows: movies/s on the current backend.
3. Summarizes the predicted D distribution and, for files named
   ``block-AAA-X-Y-F.tif`` (see ../shared/real-data/README.md), the Spearman rank
   correlation of D with the per-window value Y and the per-track value X.

Last line: RESULT seconds=<end-to-end> movies_per_s=<steady state>
spearman_window=<D vs Y> spearman_track=<D vs X> median_D_um2_per_s=<...> backend=<...>
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import csv  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from smlm_jax.diffusion import camera_setup, metrics, predict  # noqa: E402
from smlm_jax.core import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Trained run folder.")
_INPUT = flags.DEFINE_string(
    "input", os.path.join(ROOT, "..", "shared", "real-data", "blocks_64x64x16_104_01"),
    "Folder of movies.")
_CALIBRATION = flags.DEFINE_string("calibration", None, "Optional calibration JSON.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Steady-state passes over all windows.")

NAME = re.compile(r"block-(\d+)-([0-9.]+)-([0-9.]+)-(\d+)\.tiff?$")


def read_rows(path):
  with open(path) as f:
    return list(csv.DictReader(line for line in f if not line.startswith("#")))


def name_values(rows):
  """(X per track, Y per window) parsed from block-AAA-X-Y-F file names (NaN if absent)."""
  xs, ys = [], []
  for r in rows:
    m = NAME.search(os.path.basename(r["file"]))
    xs.append(float(m.group(2)) if m else np.nan)
    ys.append(float(m.group(3)) if m else np.nan)
  return np.array(xs), np.array(ys)


def main(argv):
  del argv
  cli.quiet_logs()
  if not os.path.isdir(_INPUT.value):
    cli.fail(f"--input={_INPUT.value}: no such folder")
  if not os.path.isdir(os.path.join(_WORKDIR.value, "checkpoints")):
    cli.fail(f"--workdir={_WORKDIR.value}: no trained run there; train one first")
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "D.csv")
    cmd = [sys.executable, "-m", "smlm_jax.diffusion.predict", f"--workdir={_WORKDIR.value}",
           f"--input={_INPUT.value}", f"--output={out}"]
    if _CALIBRATION.value:
      cmd.append(f"--calibration={_CALIBRATION.value}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
      cli.fail(f"predict failed:\n{proc.stderr}")
    rows = read_rows(out)

  import jax
  predictor = predict.Predictor(_WORKDIR.value)
  cal = camera_setup.read_calibration(_CALIBRATION.value) if _CALIBRATION.value else None
  predictor.camera, _ = camera_setup.data_camera(predictor.config.sim.camera,
                                                 calibration=cal)
  quiet = lambda *a, **k: None  # noqa: E731
  predict.predict_files(predictor, [_INPUT.value], log=quiet)     # compile
  t0 = time.perf_counter()
  for _ in range(_REPEATS.value):
    again, _, _ = predict.predict_files(predictor, [_INPUT.value], log=quiet)
  steady = (time.perf_counter() - t0) / _REPEATS.value
  n = sum(1 for r in again if not r.error)

  done = [r for r in rows if not r["flag"].startswith("error")]
  D = np.array([float(r["D_um2_per_s"]) for r in done])
  X, Y = name_values(done)
  q = np.quantile(D, [0.1, 0.25, 0.5, 0.75, 0.9]) if D.size else [np.nan] * 5
  named = np.isfinite(Y)
  rho_y = metrics.spearman(D[named], Y[named]) if named.sum() > 2 else float("nan")
  rho_x = metrics.spearman(D[named], X[named]) if named.sum() > 2 else float("nan")
  flags_count = {}
  for r in rows:
    for f in r["flag"].split(";"):
      flags_count[f] = flags_count.get(f, 0) + 1
  backend = jax.default_backend()
  print(f"\nprediction benchmark ({backend}, {len(jax.devices())} device(s))")
  print("| measure | value |\n|---|---|")
  print(f"| windows predicted | {len(done)} of {len(rows)} rows |")
  print(f"| end-to-end CLI wall time (incl. start-up) | {seconds:.1f} s |")
  print(f"| steady state (read + normalize + model) | {steady:.2f} s = "
        f"{n / steady:.0f} movies/s |")
  print(f"| D quantiles 10/25/50/75/90% (um^2/s) | "
        f"{' / '.join(f'{v:.3g}' for v in q)} |")
  print(f"| Spearman(D, per-window Y) | {rho_y:.3f} (n={named.sum()}) |")
  print(f"| Spearman(D, per-track X) | {rho_x:.3f} |")
  print(f"| flags | {', '.join(f'{k}: {v}' for k, v in sorted(flags_count.items()))} |")
  print(f"RESULT seconds={seconds:.2f} movies_per_s={n / steady:.1f} "
        f"spearman_window={rho_y:.3f} spearman_track={rho_x:.3f} "
        f"median_D_um2_per_s={q[2]:.4g} backend={backend}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
