"""The toy task of the trainer tests: fit y = a x + b. Its config and host rows, shared by
test_trainer (in-process runs) and test_multihost (``python -m smlm_jax.train``
subprocesses, whose config module must import no jax)."""
import ml_collections
import numpy as np

TRUE_A, TRUE_B = 2.5, -1.0


def toy_config(**overrides):
  c = ml_collections.ConfigDict()
  c.seed = 3
  c.num_train_steps = 6
  c.batch_size = 8
  c.learning_rate = 0.3
  c.warmup_steps = 1
  c.weight_decay = 0.0
  c.grad_clip_norm = 10.0
  c.schedule = "constant"
  c.log_every_steps = 1
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.max_to_keep = 5
  c.eval_batch_size = 8
  c.update(overrides)
  return c


def line_rows(step: int, batch_size: int):
  """The host batch of `step`: x ~ N(0, 1), y = a x + b + 0.1 noise (float32 numpy)."""
  rng = np.random.default_rng(step)
  x = rng.normal(size=batch_size).astype(np.float32)
  y = (TRUE_A * x + TRUE_B + 0.1 * rng.normal(size=x.shape)).astype(np.float32)
  return {"x": x, "y": y}
