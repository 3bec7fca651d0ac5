"""Test setup: 4 forced host devices so sharded code paths run on CPU."""
import contextlib
import os
import shutil
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, shared by the pytest-xdist workers
# (they inherit the environment of the main process, which imports this file first) and
# by every `python -m smlm_jax...` subprocess a test starts: they compile many of the
# same programs (tiny configs' train steps, simulators, eager ops), each process anew.
# Cached executables are the compiled programs themselves, so results do not change.
# Removed at the end of the session; set JAX_COMPILATION_CACHE_DIR yourself to keep one
# (or to "" to switch it off).
_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="smlm_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402


@contextlib.contextmanager
def _exclusive(path):
  """An exclusive lock on a file, held across the pytest-xdist worker processes."""
  try:
    import fcntl
  except ImportError:                     # no POSIX locks: each worker trains its own
    yield
    return
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A briefly trained tiny model (8 frames of 32x32 px, ~30 s) shared by the tests of
  prediction and the accuracy study; its D ranks correlate with truth (Spearman ~0.7).

  Trained once per test session: under pytest-xdist the workers share it through the
  session's common temporary folder (the first one trains, the others wait and reuse).
  Tests only read it."""
  from configs import diffusion
  from smlm_jax.core import trainer
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent                    # the folder shared by this session's workers
    if os.name != "posix":
      root = tmp_path_factory.getbasetemp()
  workdir = root / "tiny_run_shared" / "run"
  done = workdir / "TRAINED"
  with _exclusive(root / "tiny_run_shared.lock"):
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)
      cfg = diffusion.get_config("tiny")
      cfg.num_train_steps = 150
      cfg.batch_size = 16
      cfg.warmup_steps = 10
      cfg.learning_rate = 3e-3
      cfg.log_every_steps = 50
      cfg.eval_every_steps = cfg.checkpoint_every_steps = 150
      cfg.eval_num_movies = 32
      trainer.train_and_evaluate(cfg, str(workdir))
      done.write_text("")
  return str(workdir)


def pytest_unconfigure(config):
  """The session's compilation cache goes with the process that made it."""
  if _XLA_CACHE is not None:
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)
