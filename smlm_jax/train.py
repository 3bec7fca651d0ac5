"""Trains any smlm_jax system; the config names its task.

  python -m smlm_jax.train --config=configs/diffusion.py --workdir=runs/default
  python -m smlm_jax.train --config=configs/diffusion.py:gpu --workdir=runs/gpu \
      --config.model.name=cnn3d
  python -m smlm_jax.train --config=configs/<system>.py --print_config

Every field of the config can be overridden with ``--config.<field>=VALUE``. The loop
(mesh, sharded jitted step, orbax checkpoints with resume, evaluation, logs) is
:mod:`smlm_jax.core.trainer`; what a step simulates and optimizes is the task's
(``config.task``: see :mod:`smlm_jax.core.task`). Re-running with the same workdir
resumes from its latest checkpoint. ``--jax_distributed`` initializes multi-host JAX.
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

from absl import app, flags

from smlm_jax.core import cli

_CONFIG = None
_WORKDIR = None


def _define_flags():
  global _CONFIG, _WORKDIR
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/diffusion.py",
                                            "Training config (file[:variant]).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and logs.")
  flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
  flags.DEFINE_bool("jax_distributed", False,
                    "Call jax.distributed.initialize() first (multi-host runs).")


def main(argv):
  cli.quiet_logs()
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if flags.FLAGS.print_config:
    print(_CONFIG.value)
    return
  if _WORKDIR.value is None:
    cli.fail("--workdir is required")
  import jax
  from smlm_jax.core import trainer
  if flags.FLAGS.jax_distributed:
    jax.distributed.initialize()
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, trainer.TrainingError) as e:
    cli.fail(str(e))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
