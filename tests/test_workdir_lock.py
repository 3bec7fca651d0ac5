"""One training run per workdir: a second `smlm_jax.train` on a busy workdir stops at
once with one line naming the holder; a run killed with -9 (during or after a
checkpoint) leaves no lock behind and resumes cleanly."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from smlm_jax.core import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8


def _holder_script(workdir):
  return ("import sys, time\nfrom smlm_jax.core import workdir_lock\n"
          f"with workdir_lock.hold({workdir!r}):\n"
          "  print('held', flush=True)\n  time.sleep(600)\n")


def test_lock_is_exclusive_reentrant_and_dies_with_its_holder(tmp_path):
  workdir = str(tmp_path / "w")
  holder = subprocess.Popen([sys.executable, "-c", _holder_script(workdir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.WorkdirBusy) as e:
      with workdir_lock.hold(workdir):
        pass
    msg = str(e.value)
    assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and "\n" not in msg
    holder.send_signal(signal.SIGKILL)       # a stale .lock file stays, the flock does not
    holder.wait(timeout=30)
  finally:
    holder.kill()
  assert os.path.exists(os.path.join(workdir, ".lock"))
  with workdir_lock.hold(workdir):
    with workdir_lock.hold(workdir):         # re-entrant in one process (CLI + trainer)
      assert workdir_lock.holder(workdir) == f"pid {os.getpid()} on host {socket.gethostname()}"
    assert workdir_lock.holder(workdir).startswith(f"pid {os.getpid()}")
  assert workdir_lock.holder(workdir) == "unknown"       # emptied on release


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _train(workdir, cache_dir, steps=STEPS):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.Popen(
      [sys.executable, "-m", "smlm_jax.train", "--config=configs/diffusion.py:tiny",
       f"--workdir={workdir}", f"--config.num_train_steps={steps}",
       "--config.model.name=park_cnn", "--config.eval_num_movies=8",
       "--config.eval_every_steps=1000"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=240):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.monotonic() < deadline
    time.sleep(0.05)


def _loss_steps(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["step"] for r in rows if "loss" in r]


def test_second_run_on_a_busy_workdir_stops_at_once(tmp_path, cache_dir):
  workdir = str(tmp_path / "busy")
  first = _train(workdir, cache_dir)
  try:
    _wait_for(lambda: "pid" in workdir_lock.holder(workdir), first)
    t0 = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "smlm_jax.train", "--config=configs/diffusion.py:tiny",
         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT))
    took = time.monotonic() - t0
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1 and second.stderr.startswith("error: workdir ")
    assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr
    assert took < 5, took
    assert workdir_lock.holder(workdir) == f"pid {first.pid} on host {socket.gethostname()}"
    out, err = first.communicate(timeout=300)
  finally:
    first.kill()
  assert first.returncode == 0, err[-3000:]
  assert _loss_steps(workdir) == list(range(1, STEPS + 1))     # not clobbered
  assert sum(f.startswith("events.out.tfevents") for f in os.listdir(workdir)) == 1


@pytest.mark.parametrize("moment", ["during", "after"])
def test_kill_9_during_or_after_a_checkpoint_then_resume(tmp_path, cache_dir, moment):
  workdir = str(tmp_path / moment)
  ckpt = os.path.join(workdir, "checkpoints")
  run = _train(workdir, cache_dir)
  try:
    if moment == "during":       # as soon as orbax starts step 3 (temporary folder)
      _wait_for(lambda: os.path.isdir(ckpt) and any(d.startswith("3")
                                                    for d in os.listdir(ckpt)), run)
    else:                        # checkpoint 3 committed (renamed to its final name)
      _wait_for(lambda: os.path.isdir(os.path.join(ckpt, "3")), run)
    assert run.poll() is None
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
  finally:
    run.kill()
  assert "pid" in open(os.path.join(workdir, ".lock")).read()    # a stale lock file
  again = _train(workdir, cache_dir)
  out, err = again.communicate(timeout=300)
  assert again.returncode == 0, err[-3000:]
  assert _loss_steps(workdir) == list(range(1, STEPS + 1))
  assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())[-1] == STEPS


def test_workdir_that_is_a_file_is_a_one_line_error(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  for workdir in (path, path / "sub"):
    r = subprocess.run([sys.executable, "-m", "smlm_jax.train",
                        "--config=configs/diffusion.py:tiny", f"--workdir={workdir}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and r.stderr == (
        f"error: --workdir={workdir} is (or lies under) a file; give a folder\n")
  assert path.read_text() == "x"
