"""HOLLy's pose-CNN polish (smlm_jax/holly/polish.py): the CNN learns exact poses of a
frozen cloud, only in runs on simulated images whose poses converged."""
import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from configs import holly as holly_config
from smlm_jax.core import trainer
from smlm_jax.holly import polish as polish_lib
from smlm_jax.holly import render
from smlm_jax.holly import rotations
from smlm_jax.holly import shapes
from smlm_jax.holly import task as task_lib


def _tiny(tmp_path):
  c = holly_config.get_config("tiny")
  c.data.obj = os.path.join(str(tmp_path), "truth.obj")
  rng = np.random.default_rng(4)
  shapes.write_obj(c.data.obj, rng.uniform(-1, 1, (20, 3)) * [1.0, 0.5, 0.3])
  return c


def _pose_loss(task, net, points, seed):
  """Training's pose loss of the CNN on 64 images of ``points`` at known poses."""
  sigma = float(task.sigma(int(task.config.num_train_steps)))
  keys = jax.random.split(jax.random.key(seed), 64)
  image, R, t = jax.vmap(lambda k: render.simulate_image(k, points, sigma, task.sim))(keys)
  out = task.predict(net, image)
  return float(polish_lib.pose_loss(rotations.matrix_from_6d(out["r6"]), out["t"], R, t,
                                    float(task.config.loss.hypothesis_weight),
                                    float(task.config.data.max_shift))[0])


def test_polish_teaches_the_cnn_the_poses_of_its_cloud(tmp_path):
  """From an untrained CNN, a short polish lowers the pose loss on fresh images of the
  cloud (the loss of the Frobenius distance is 4 (1 - cos) summed: ~6 when random)."""
  cfg = _tiny(tmp_path)
  task = task_lib.HollyTask(cfg)
  params = task.init_variables(jax.random.key(0))["params"]
  points = jnp.asarray(task.sites, jnp.float32)
  before = _pose_loss(task, params["net"], points, 99)
  net, info = polish_lib.polish(task, params["net"], points, trainer.make_mesh(), 150,
                                3e-3, 16, seed=0, progress=False)
  after = _pose_loss(task, jax.device_get(net), points, 99)
  assert after < 0.6 * before, (before, after)
  assert info["steps"] == 150 and info["seconds"] > 0


def test_finish_training_polishes_only_converged_runs_and_keeps_the_cloud(tmp_path):
  cfg = _tiny(tmp_path)
  cfg.polish.steps = 3
  task = task_lib.HollyTask(cfg)
  params = task.init_variables(jax.random.key(0))["params"]
  state = {"params": params, "step": int(cfg.num_train_steps)}
  mesh = trainer.make_mesh()
  for converged in (False, True):
    with mock.patch.object(task_lib.diagnose, "report",
                           return_value={"converged": converged}) as report:
      out = task.finish_training(state, mesh)
    assert report.call_count == 1
    if not converged:
      assert out is state                        # a wrong cloud is not polished
      continue
    np.testing.assert_array_equal(np.asarray(out["params"]["points"]),
                                  np.asarray(params["points"]))
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         jax.device_get(out["params"]["net"]), params["net"])
    assert max(jax.tree.leaves(moved)) > 0
  cfg.polish.steps = 0                           # off: not even a report
  with mock.patch.object(task_lib.diagnose, "report") as report:
    assert task_lib.HollyTask(cfg).finish_training(state, mesh) is state
  assert report.call_count == 0
