"""Test setup: 4 forced host devices so sharded code paths run on CPU."""
import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """A briefly trained tiny model (8 frames of 32x32 px, ~30 s) shared by the tests of
  prediction and the accuracy study; its D ranks correlate with truth (Spearman ~0.7)."""
  from configs import diffusion
  from smlm_jax.core import trainer
  cfg = diffusion.get_config("tiny")
  cfg.num_train_steps = 150
  cfg.batch_size = 16
  cfg.warmup_steps = 10
  cfg.learning_rate = 3e-3
  cfg.log_every_steps = 50
  cfg.eval_every_steps = cfg.checkpoint_every_steps = 150
  cfg.eval_num_movies = 32
  workdir = str(tmp_path_factory.mktemp("tiny_run") / "run")
  trainer.train_and_evaluate(cfg, workdir)
  return workdir
