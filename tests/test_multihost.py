"""Training on several processes through jax.distributed, on this CPU.

Two local processes with 2 CPU devices each (Gloo collectives over TCP) against one
process with 4 devices: the same global batches, so the same losses; a checkpoint of the
2-process run resumes in 1 process and continues the 1-process sequence; a killed peer
makes the survivor exit with one clear line instead of hanging.

Every run is a real `python -m smlm_jax.train` subprocess. The diffusion runs share a
persistent compilation cache (the resume run reuses the reference's executables). This
file is also the config (``get_config``) and task (``Line``) of the fast toy runs:
``--config=tests/test_multihost.py``.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from toy_line import line_rows, toy_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------- toy config + task
def get_config():
  """A line fit fed from the host (numpy rows per step): compiles in about a second."""
  return toy_config(task="test_multihost:Line", num_train_steps=4,
                    eval_every_steps=1000000, checkpoint_every_steps=1000000,
                    max_to_keep=2)


def _line_task():
  import jax.numpy as jnp
  from smlm_jax.core import task as task_lib

  class Line(task_lib.Task):
    """y = a x + b + noise; rows made on the host (numpy), fed sharded on 'data'."""

    def init_variables(self, key):
      return {"params": {"a": jnp.zeros(()), "b": jnp.zeros(())}}

    def host_batch(self, step):
      return line_rows(step, self.config.batch_size)

    def make_batch(self, key, host_batch, shard):
      return shard(host_batch)

    def loss(self, params, batch_stats, batch, step, key):
      mse = jnp.mean((params["a"] * batch["x"] + params["b"] - batch["y"]) ** 2)
      return mse, {}, batch_stats
  return Line


def __getattr__(name):           # `Line` is built on first use (the module imports no jax)
  if name == "Line":
    return _line_task()
  raise AttributeError(name)


# --------------------------------------------------------------------------- runs
def _env(devices: int, cache_dir: str):
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests"),
                                         env.get("PYTHONPATH", "")]),
             JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _args(config, workdir, steps, extra=()):
  return [sys.executable, "-m", "smlm_jax.train", f"--config={config}",
          f"--workdir={workdir}", f"--config.num_train_steps={steps}", *extra]


DIFFUSION = ("configs/diffusion.py:tiny",
             ("--config.model.name=park_cnn", "--config.eval_num_movies=8",
              "--config.checkpoint_every_steps=2"))


def _start(config, workdir, steps, cache_dir, processes=1, extra=(), **kw):
  """Popen(s) of one run: a single process with 4 devices, or `processes` x 2."""
  if processes == 1:
    return [subprocess.Popen(_args(config, workdir, steps, extra), cwd=ROOT,
                             env=_env(4, cache_dir), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, **kw)]
  port = _free_port()
  return [subprocess.Popen(
      _args(config, workdir, steps, extra) + [
          "--jax_distributed", f"--coordinator_address=127.0.0.1:{port}",
          f"--num_processes={processes}", f"--process_id={i}"],
      cwd=ROOT, env=_env(2, cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, **kw) for i in range(processes)]


def _finish(procs, timeout=240):
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      outs.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for code, _, err in outs:
    assert code == 0, err[-3000:]
  return outs


def _train_rows(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r for r in rows if "loss" in r}, [r for r in rows if "loss" not in r]


@pytest.fixture(scope="module")
def diffusion_runs(tmp_path_factory):
  """One process x 4 devices for 4 steps; 2 processes x 2 devices for 2 steps, then
  the same workdir resumed in one process to step 4."""
  root = tmp_path_factory.mktemp("multihost")
  # the session's cache (conftest) when there is one: other tests' subprocesses compile
  # some of the same programs
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(root / "jax_cache")
  config, extra = DIFFUSION
  one, two = str(root / "one"), str(root / "two")
  _finish(_start(config, one, 4, cache, extra=extra))
  two_out = _finish(_start(config, two, 2, cache, processes=2, extra=extra))
  two_rows = _train_rows(two)
  two_files = sorted(os.listdir(two))
  _finish(_start(config, two, 4, cache, extra=extra))            # resume: 1 process
  return {"one": one, "two": two, "two_rows": two_rows, "two_files": two_files,
          "two_out": two_out}


def test_two_processes_give_the_losses_of_one(diffusion_runs):
  one, _ = _train_rows(diffusion_runs["one"])
  two, two_eval = diffusion_runs["two_rows"]
  assert sorted(two) == [1, 2]                  # process 0 alone logged, once per step
  for step in (1, 2):
    # The same batches; only the cross-device sums run in another order (Gloo).
    for key in ("loss", "grad_norm", "nll"):
      assert two[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)
  assert two_eval and two_eval[-1]["eval/relative_rmse"] == pytest.approx(
      _train_rows(diffusion_runs["one"])[1][0]["eval/relative_rmse"], rel=1e-3)
  files = diffusion_runs["two_files"]
  assert sum(f.startswith("events.out.tfevents") for f in files) == 1
  assert {"config.json", "metrics.jsonl", "checkpoints"} <= set(files)
  (_, out0, _), (_, out1, _) = diffusion_runs["two_out"]
  assert "validation" in out0 and "validation" not in out1     # summary: process 0


def test_two_process_checkpoint_resumes_in_one_process(diffusion_runs):
  one, _ = _train_rows(diffusion_runs["one"])
  resumed, _ = _train_rows(diffusion_runs["two"])
  assert sorted(resumed) == [1, 2, 3, 4]
  for step in (3, 4):
    assert resumed[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-4), step
  assert sorted(int(d) for d in os.listdir(os.path.join(diffusion_runs["two"],
                                                        "checkpoints"))
                if d.isdigit())[-1] == 4


def test_host_fed_batches_split_over_processes(tmp_path):
  """Each process puts only its own rows of a host batch; the run equals 1 process."""
  cache = str(tmp_path / "cache")
  _finish(_start("tests/test_multihost.py", str(tmp_path / "one"), 10, cache))
  _finish(_start("tests/test_multihost.py", str(tmp_path / "two"), 10, cache, processes=2))
  one, _ = _train_rows(str(tmp_path / "one"))
  two, _ = _train_rows(str(tmp_path / "two"))
  assert sorted(two) == list(range(1, 11))
  losses = [two[s]["loss"] for s in sorted(two)]
  np.testing.assert_allclose(losses, [one[s]["loss"] for s in sorted(two)], rtol=1e-6)
  assert np.mean(losses[-3:]) < 0.3 * np.mean(losses[:3])          # and it learns


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_lost_peer_stops_the_run_with_a_clear_message(tmp_path, how):
  """kill -9 of process 1 mid-run: the survivor's collective fails at once. SIGSTOP
  (a frozen host): no socket closes, the watchdog notices the silent heartbeat."""
  workdir = str(tmp_path / how)
  procs = _start("tests/test_multihost.py", workdir, 10 ** 7, str(tmp_path / "cache"),
                 processes=2, extra=("--peer_timeout_s=8",))
  try:
    deadline = time.monotonic() + 120
    metrics = os.path.join(workdir, "metrics.jsonl")
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 500):
      assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    lost = time.monotonic()
    _, err = procs[0].communicate(timeout=90)
    waited = time.monotonic() - lost
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert procs[0].returncode == 3, err[-2000:]
  lines = [l for l in err.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
  if how == "killed":
    assert "did a peer process die?" in lines[0] or "process 1 of 2" in lines[0], lines
  else:
    assert "process 1 of 2 stopped responding" in lines[0], lines
    assert waited > 5
  assert waited < 60, waited
