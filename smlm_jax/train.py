"""Trains any smlm_jax system; the config names its task.

  python -m smlm_jax.train --config=configs/diffusion.py --workdir=runs/default
  python -m smlm_jax.train --config=configs/diffusion.py:gpu --workdir=runs/gpu \
      --config.model.name=cnn3d
  python -m smlm_jax.train --config=configs/<system>.py --print_config

Every field of the config can be overridden with ``--config.<field>=VALUE``. The loop
(mesh, sharded jitted step, orbax checkpoints with resume, evaluation, logs) is
:mod:`smlm_jax.core.trainer`; what a step simulates and optimizes is the task's
(``config.task``: see :mod:`smlm_jax.core.task`). Re-running with the same workdir
resumes from its latest checkpoint; a second run on a workdir in use stops at once
(exit code 2, naming the holder's PID and host).

Several processes or hosts (:mod:`smlm_jax.core.distributed`): add
``--jax_distributed`` to every process's command; on SLURM, Open MPI and Cloud TPU
the coordinator, process count and id are detected, elsewhere give
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``. A process whose
peer dies exits within ``--peer_timeout_s`` with one line and exit code 3.
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

import contextlib
import os
import sys

from absl import flags

from smlm_jax.core import cli

_CONFIG = None
_WORKDIR = None


def _define_flags():
  global _CONFIG, _WORKDIR
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", cli.config_path("diffusion"),
                                            "Training config (file[:variant]).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and logs.")
  flags.DEFINE_bool("print_config", False, "Print the resolved config and exit.")
  flags.DEFINE_bool("jax_distributed", False,
                    "Call jax.distributed.initialize() first (several processes/hosts).")
  flags.DEFINE_string("coordinator_address", None,
                      "HOST:PORT of process 0 (with --jax_distributed; auto-detected on "
                      "SLURM, Open MPI and Cloud TPU).")
  flags.DEFINE_integer("num_processes", None, "Number of processes (--jax_distributed).")
  flags.DEFINE_integer("process_id", None, "This process's id, 0..N-1 (--jax_distributed).")
  flags.DEFINE_list("local_device_ids", None,
                    "Devices of this process, e.g. 0,1 (--jax_distributed; default all).")
  flags.DEFINE_float("peer_timeout_s", 60.0,
                     "A peer process silent this long counts as dead: this one exits "
                     "(code 3) instead of waiting forever (--jax_distributed).")


def _distributed_flags_or_fail(f):
  given = [n for n in ("coordinator_address", "num_processes", "process_id",
                       "local_device_ids") if f[n].present]
  if given and not f.jax_distributed:
    cli.fail(f"--{given[0]} needs --jax_distributed")
  if f.num_processes is not None and f.num_processes < 1:
    cli.fail("--num_processes must be >= 1")
  if f.process_id is not None and not (
      0 <= f.process_id < (f.num_processes or sys.maxsize)):
    cli.fail(f"--process_id must be in 0..{(f.num_processes or 1) - 1}")
  if f.peer_timeout_s <= 0:
    cli.fail("--peer_timeout_s must be > 0")
  try:
    return [int(i) for i in f.local_device_ids] if f.local_device_ids else None
  except ValueError:
    cli.fail(f"--local_device_ids must be integers, got {','.join(f.local_device_ids)}")


def main(argv):
  cli.quiet_logs()
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if flags.FLAGS.print_config:
    print(_CONFIG.value)
    return
  if _WORKDIR.value is None:
    cli.fail("--workdir is required")
  f = flags.FLAGS
  local_device_ids = _distributed_flags_or_fail(f)
  from smlm_jax.core import workdir_lock
  if not f.jax_distributed:
    with contextlib.ExitStack() as stack:
      try:   # before importing JAX: a busy workdir is refused within a second
        stack.enter_context(workdir_lock.hold(_WORKDIR.value))
      except workdir_lock.WorkdirBusy as e:
        cli.fail(str(e))
      except (FileExistsError, NotADirectoryError):
        cli.fail(f"--workdir={_WORKDIR.value} is (or lies under) a file; give a folder")
      except OSError as e:
        cli.fail(f"cannot use --workdir={_WORKDIR.value}: {e.strerror or e}")
      _train()
    return
  from smlm_jax.core import distributed
  try:
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                           local_device_ids, peer_timeout_s=f.peer_timeout_s)
  except (ValueError, RuntimeError) as e:
    cli.fail(f"jax.distributed.initialize failed: {str(e).strip().splitlines()[0]}")
  _train(distributed)


def _train(distributed=None):
  import jax
  from smlm_jax.core import trainer, workdir_lock
  try:
    trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, trainer.TrainingError, workdir_lock.WorkdirBusy) as e:
    if distributed:
      _fail_distributed(distributed, str(e), 2)
    cli.fail(str(e))
  except jax.errors.JaxRuntimeError as e:
    if not distributed:
      raise
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    _fail_distributed(distributed, "a cross-process operation failed (did a peer process "
                      f"die?): {first[:300]}", distributed.EXIT_PEER_LOST)
  except Exception as e:  # noqa: BLE001  (a bug: show it, and do not leave peers waiting)
    if not distributed:
      raise
    import traceback
    traceback.print_exc()
    _fail_distributed(distributed, f"{type(e).__name__}: {e}", 1)


def _fail_distributed(distributed, message: str, code: int):
  """One line, the peers told why, and out without JAX's shutdown barrier (which would
  wait minutes for peers that now wait for this process)."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  distributed.report_failure(message)
  sys.stdout.flush()
  os._exit(code)


if __name__ == "__main__":
  cli.run_app(main, _define_flags)
