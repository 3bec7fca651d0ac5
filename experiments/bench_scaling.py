"""Training throughput on one process vs two processes (jax.distributed), same devices.

  python experiments/bench_scaling.py [--config=configs/diffusion.py] [--per_device_batch=8]
      [--devices=4] [--steps=10] [--config.model.name=...]

Weak scaling at the same per-device batch: one process with ``--devices`` CPU devices,
then ``2`` processes with ``devices / 2`` each (Gloo collectives over local TCP), both
on the global batch ``per_device_batch * devices``. Each run is fresh subprocesses
that compile, warm up two steps and then time ``--steps`` full jitted train steps
(simulate + normalize + forward/backward + all-reduce + AdamW). On one machine both
layouts share the same cores, so the ideal efficiency is 1.0 and the shortfall is the
cost of splitting the run over processes (cross-process all-reduce, two runtimes).
On real hosts each process brings its own cores or accelerators; this measures only
the overhead. Last line:
RESULT one_process_examples_per_s=... two_process_examples_per_s=... efficiency=...
"""
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from smlm_jax.core import cli  # noqa: E402

with cli.config_override_errors():
  _CONFIG = config_flags.DEFINE_config_file("config", os.path.join(ROOT, "configs/diffusion.py"),
                                            "Training config.")
_PER_DEVICE = flags.DEFINE_integer("per_device_batch", 8, "Examples per device per step.")
_DEVICES = flags.DEFINE_integer("devices", 4, "Total CPU devices (even).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per run.")
_WORKER = flags.DEFINE_list("worker", None, "Internal: COORDINATOR,N,ID of one process.")


def _worker(coordinator, n, i):
  """One process of a run: prints 'RATE examples_per_s seconds' on process 0."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from smlm_jax.core import distributed, task as task_lib, trainer
  if n > 1:
    distributed.initialize(coordinator, n, i, peer_timeout_s=120)
  config = _CONFIG.value
  mesh = trainer.make_mesh()
  config.batch_size = _PER_DEVICE.value * len(jax.devices())
  task = task_lib.build_task(config)
  tx, sched = task.make_optimizer()
  state = trainer.fresh_state(task, tx, config.seed, NamedSharding(mesh, P()))
  step = trainer.make_train_step(task, tx, sched, mesh, config.seed)
  t0 = time.perf_counter()
  host = lambda i: trainer.put_host_batch(task.host_batch(i), mesh)  # noqa: E731
  step = step.lower(state, host(0)).compile()
  compile_s = time.perf_counter() - t0
  distributed.barrier("bench_compiled")
  for i in range(2):                                   # warm-up
    state, meas = step(state, host(i))
  jax.block_until_ready(meas)
  t0 = time.perf_counter()
  for i in range(2, 2 + _STEPS.value):
    state, meas = step(state, host(i))
  jax.block_until_ready(meas)
  seconds = time.perf_counter() - t0
  if jax.process_index() == 0:
    print(f"RATE {_STEPS.value * config.batch_size / seconds:.3f} {seconds:.3f} "
          f"{compile_s:.1f}", flush=True)
  distributed.finish()


def _run(processes: int, argv_flags):
  devices = _DEVICES.value // processes
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), *argv_flags,
       f"--worker=127.0.0.1:{port},{processes},{i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(processes)]
  outs = [p.communicate() for p in procs]
  for p, (_, err) in zip(procs, outs):
    if p.returncode != 0:
      sys.exit(f"error: a {processes}-process run failed:\n{err[-2000:]}")
  rate, seconds, compile_s = next(l.split()[1:] for l in outs[0][0].splitlines()
                                  if l.startswith("RATE "))
  return float(rate), float(seconds), float(compile_s), devices


def main(argv):
  if _WORKER.value:
    coordinator, n, i = _WORKER.value
    _worker(coordinator, int(n), int(i))
    return
  if _DEVICES.value < 2 or _DEVICES.value % 2:
    sys.exit("error: --devices must be even and >= 2")
  passed = [a for a in sys.argv[1:] if not a.startswith("--worker")]
  config = _CONFIG.value
  batch = _PER_DEVICE.value * _DEVICES.value
  model = config.model.name if "model" in config else "-"
  print(f"task {config.get('task', 'diffusion')} model={model} "
        f"global batch {batch} ({_PER_DEVICE.value} per device), {_STEPS.value} timed "
        f"steps, {os.cpu_count()} CPU cores")
  print(f"{'layout':<28} {'examples/s':>11} {'timed s':>8} {'compile s':>10}")
  results = {}
  for processes in (1, 2):
    rate, seconds, compile_s, devices = _run(processes, passed)
    results[processes] = rate
    print(f"{f'{processes} process(es) x {devices} devices':<28} {rate:>11.2f} "
          f"{seconds:>8.2f} {compile_s:>10.1f}")
  print(f"RESULT one_process_examples_per_s={results[1]:.3f} "
        f"two_process_examples_per_s={results[2]:.3f} "
        f"efficiency={results[2] / results[1]:.3f}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
