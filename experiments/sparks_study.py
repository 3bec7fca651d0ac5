"""Sparks study: train the default config, then score it on unseen simulated movies.

  flock /tmp/smlm_cpu.lock python experiments/sparks_study.py [--workdir=/tmp/sparks_study] \
      [--config=configs/sparks.py] [--num_movies=96] [--seed=777] [--skip_training]

1. Trains ``--config`` (default: the CPU default) in ``--workdir`` with the shared
   trainer and times it (wall clock, compilation and validation included; a finished
   run in the workdir is reused unless --retrain).
2. Simulates ``--num_movies`` test movies from ``--seed`` (training uses the keys
   fold_in(key(config.seed), step), validation key(config.eval_seed), where the
   confidence filter is chosen: the test seed is never seen) and segments them with
   the run's event extraction; events are matched by IoMin >= 0.5.
3. Prints per-class precision / recall / F1, the confusion matrix of matched classes,
   F1 against the true peak dF/F0 (where detection fails), and ends with
   RESULT f1_sparks=.. f1_waves=.. f1_puffs=.. seconds=..
   (seconds = training wall-clock time; the process CPU time is printed too, since on a
   shared host the wall clock includes waiting for other processes). Writes metrics.json and f1_vs_amplitude.png
   to WORKDIR/study.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from smlm_jax.core import cli, trainer  # noqa: E402
from smlm_jax.sparks import evaluate as evaluate_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sparks.py", "Training config.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/sparks_study", "Run folder.")
_NUM = flags.DEFINE_integer("num_movies", 96, "Test movies.")
_SEED = flags.DEFINE_integer("seed", evaluate_lib.TEST_SEED, "Test seed.")
_SKIP = flags.DEFINE_bool("skip_training", False, "Only evaluate the run in --workdir.")
_RETRAIN = flags.DEFINE_bool("retrain", False, "Delete --workdir and train from scratch.")


def main(argv):
  del argv
  cli.quiet_logs()
  config = _CONFIG.value
  workdir = _WORKDIR.value
  timing = os.path.join(workdir, "train_seconds.json")
  if _RETRAIN.value and os.path.isdir(workdir):
    import shutil
    shutil.rmtree(workdir)
  print(f"backend={jax.default_backend()} devices={len(jax.devices())} cpus={os.cpu_count()} "
        f"movie={config.sim.num_frames}x{config.sim.height_px}x{config.sim.width_px} "
        f"model={config.model.name} depth={config.model.depth} base={config.model.base_width} "
        f"steps={config.num_train_steps} batch={config.batch_size} loss={config.loss.name}")
  if not _SKIP.value and not os.path.exists(timing):
    t0, c0 = time.time(), time.process_time()
    trainer.train_and_evaluate(config, workdir)
    seconds, cpu = time.time() - t0, time.process_time() - c0
    cli.atomic_write_text(timing, json.dumps({"seconds": seconds, "cpu_seconds": cpu}))
  t = json.load(open(timing)) if os.path.exists(timing) else {}
  seconds = t.get("seconds", float("nan"))
  cpu = t.get("cpu_seconds", float("nan"))
  # CPU time of this process (all threads) / 2 cores: what the training costs on 2 free
  # cores; the wall clock includes waiting for other users' processes on a shared host.
  print(f"training wall-clock: {seconds:.0f} s; process CPU time: {cpu:.0f} s "
        f"(= {cpu / 2:.0f} s on 2 fully used cores)")
  t0 = time.time()
  # The run's own event extraction, with the confidence filter that training chose on
  # its validation movies (WORKDIR/events_filter.json; evaluate_simulated prints it).
  m = evaluate_lib.evaluate_simulated(workdir, _NUM.value, _SEED.value,
                                      os.path.join(workdir, "study"))
  print(f"test evaluation: {time.time() - t0:.0f} s")
  print(f"RESULT f1_sparks={m['spark']['f1']:.3f} f1_waves={m['wave']['f1']:.3f} "
        f"f1_puffs={m['puff']['f1']:.3f} seconds={seconds:.0f}")


if __name__ == "__main__":
  app.run(main)
