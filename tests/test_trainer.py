"""The shared trainer on toy tasks: fit y = a x + b from data made in the step or fed
from the host; device-count invariance, resume without duplicated steps, NaN guard (a
lone bad step skipped, persistent ones stop the run),
gradient accumulation."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from smlm_jax.core import task as task_lib
from smlm_jax.core import trainer

from toy_line import TRUE_A, TRUE_B, line_rows, toy_config


class SimulatedLine(task_lib.Task):
  """y = a x + b + 0.1 noise, simulated inside the jitted step (per-example keys)."""

  def init_variables(self, key):
    return {"params": {"a": jnp.zeros(()), "b": jnp.zeros(())}}

  def make_batch(self, key, host_batch, shard):
    keys = shard(jax.vmap(lambda i: jax.random.fold_in(key, i))(
        jnp.arange(self.config.batch_size)))
    xn = jax.vmap(lambda k: jax.random.normal(k, (2,)))(keys)
    x = xn[:, 0]
    return {"x": x, "y": TRUE_A * x + TRUE_B + 0.1 * xn[:, 1]}

  def loss(self, params, batch_stats, batch, step, key):
    err = params["a"] * batch["x"] + params["b"] - batch["y"]
    mse = jnp.mean(err ** 2)
    return mse, {"mse": mse}, batch_stats

  def make_evaluator(self, mesh):
    def evaluate(state):
      p = jax.device_get(state["params"])
      return {"error": {"a": abs(float(p["a"]) - TRUE_A), "b": abs(float(p["b"]) - TRUE_B)}}
    return evaluate


class HostFedLine(SimulatedLine):
  """The same line, but the data come from the host (numpy) each step."""

  def host_batch(self, step):
    return line_rows(step, self.config.batch_size)

  def make_batch(self, key, host_batch, shard):
    return shard(host_batch)


def _run_steps(task, devices, steps):
  cfg = task.config
  tx, sched = task.make_optimizer()
  mesh = trainer.make_mesh(devices)
  state = trainer.fresh_state(task, tx, cfg.seed, NamedSharding(mesh, P()))
  step_fn = trainer.make_train_step(task, tx, sched, mesh, cfg.seed)
  losses = []
  for i in range(steps):
    host = trainer.put_host_batch(task.host_batch(i), mesh)
    state, meas = step_fn(state, host)
    losses.append(float(meas["loss"]))
  return losses, jax.device_get(state["params"])


@pytest.mark.parametrize("cls", [SimulatedLine, HostFedLine])
def test_same_losses_on_1_and_4_devices(cls):
  assert len(jax.devices()) >= 4
  l1, p1 = _run_steps(cls(toy_config()), jax.devices()[:1], 4)
  l4, p4 = _run_steps(cls(toy_config()), jax.devices()[:4], 4)
  # 1 and 4 devices reduce the batch in another order: a few ulps per step, which Adam's
  # first steps (g / sqrt(v)) pass on unamplified. rtol 1e-5 (~80 ulps) holds on any CPU;
  # a device that saw the wrong examples changes the losses by > 1e-2.
  np.testing.assert_allclose(l1, l4, rtol=1e-5)
  for k in p1:
    np.testing.assert_allclose(p1[k], p4[k], rtol=1e-5)
  assert 0.15 < float(p1["a"]) < TRUE_A and TRUE_B < float(p1["b"]) < -0.15  # learning


def _metric_steps(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["step"] for r in rows if "loss" in r], [r["step"] for r in rows
                                                    if "eval/error/a" in r]


def test_checkpoint_resume_continues_without_duplicates(tmp_path):
  workdir = str(tmp_path / "run")
  cfg = toy_config()
  final = trainer.train_and_evaluate(cfg, workdir, task=SimulatedLine(cfg))
  assert set(final["error"]) == {"a", "b"}
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))) == [3, 6]
  # A run that was killed after logging steps 7-8 but before its next checkpoint:
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    f.write(json.dumps({"step": 8, "loss": 1.0}) + "\n" + '{"step": 9, "lo')   # torn line
  cfg.num_train_steps = 12
  trainer.train_and_evaluate(cfg, workdir, task=SimulatedLine(cfg))
  train_steps, eval_steps = _metric_steps(workdir)
  assert train_steps == list(range(1, 13))
  assert eval_steps == [3, 6, 9, 12]
  # Resumed training equals an uninterrupted 12-step run, parameter for parameter.
  straight = str(tmp_path / "straight")
  cfg12 = toy_config(num_train_steps=12)
  trainer.train_and_evaluate(cfg12, straight, task=SimulatedLine(cfg12))
  a = _restore_params(workdir, cfg12)
  b = _restore_params(straight, cfg12)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6)
  assert abs(float(a["a"]) - TRUE_A) < 0.5     # and it fits the line


def _restore_params(workdir, cfg):
  task = SimulatedLine(cfg)
  tx, _ = task.make_optimizer()
  mngr = trainer.checkpoint_manager(workdir, cfg)
  shapes = jax.eval_shape(lambda: trainer.init_state(task, tx, cfg.seed))
  state = trainer.restore_state(mngr, trainer.abstract_state(
      shapes, NamedSharding(trainer.make_mesh(), P())))
  mngr.close()
  assert int(state["step"]) == cfg.num_train_steps
  return jax.device_get(state["params"])


def test_nan_loss_stops_loudly(tmp_path):
  class Exploding(SimulatedLine):
    def loss(self, params, batch_stats, batch, step, key):
      loss, meas, stats = super().loss(params, batch_stats, batch, step, key)
      return jnp.where(step >= 2, jnp.nan, loss), meas, stats
  cfg = toy_config()
  with pytest.raises(trainer.TrainingError, match="loss became nan at step 5 .*3 steps in a row"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "nan"), task=Exploding(cfg))


def test_nan_gradient_under_a_finite_loss_stops_loudly(tmp_path):
  class MaskedInf(SimulatedLine):
    def loss(self, params, batch_stats, batch, step, key):
      loss, meas, stats = super().loss(params, batch_stats, batch, step, key)
      # the inf sits in the discarded branch: the loss stays finite, its gradient not
      bad = jnp.where(step >= 2, jnp.inf, 1.0) * params["a"] ** 2
      return jnp.where(step >= 2, loss, loss + 0.0 * bad), meas, stats
  cfg = toy_config()
  with pytest.raises(trainer.TrainingError, match="gradient became nan at step 5"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "nan"), task=MaskedInf(cfg))


def test_one_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path):
  """A single bad step (here a NaN loss at the third step; in the default diffusion run
  once a runaway variance) leaves the parameters as they were and is counted; the run
  finishes and still fits the line."""
  class OneBadStep(SimulatedLine):
    def loss(self, params, batch_stats, batch, step, key):
      loss, meas, stats = super().loss(params, batch_stats, batch, step, key)
      return jnp.where(step == 2, jnp.nan, loss), meas, stats
  cfg = toy_config(num_train_steps=12)
  final = trainer.train_and_evaluate(cfg, str(tmp_path / "run"), task=OneBadStep(cfg))
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, "run", "metrics.jsonl"))]
  rows = [r for r in rows if "loss" in r]
  assert [r["skipped_steps"] for r in rows] == [0, 0] + [1] * 10
  assert [r["step"] for r in rows if not np.isfinite(r["loss"])] == [3]
  straight = toy_config(num_train_steps=12)
  ok = trainer.train_and_evaluate(straight, str(tmp_path / "ok"), task=SimulatedLine(straight))
  for k in ("a", "b"):      # as good as a run without the bad step, give or take a step
    assert np.isfinite(final["error"][k]) and final["error"][k] < ok["error"][k] + 0.25, k
  assert final["error"] != ok["error"]          # the skipped step did change the path


def test_frequent_non_finite_steps_stop_the_run(tmp_path):
  """Every other step bad (never 3 in a row): the run stops once more than 10 were."""
  class EveryOther(SimulatedLine):
    def loss(self, params, batch_stats, batch, step, key):
      loss, meas, stats = super().loss(params, batch_stats, batch, step, key)
      return jnp.where(step % 2 == 0, jnp.nan, loss), meas, stats
  cfg = toy_config(num_train_steps=40, log_every_steps=2)
  with pytest.raises(trainer.TrainingError, match="11 of the last 22 steps had a non-fin"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "run"), task=EveryOther(cfg))


def test_gradient_accumulation_updates_every_k_steps():
  cfg = toy_config(accumulate_steps=2)
  task = SimulatedLine(cfg)
  tx, sched = task.make_optimizer()
  mesh = trainer.make_mesh(jax.devices()[:1])
  state = trainer.fresh_state(task, tx, cfg.seed)
  step_fn = trainer.make_train_step(task, tx, sched, mesh, cfg.seed)
  seen = [0.0]
  for _ in range(8):
    state, _ = step_fn(state, None)
    seen.append(float(jax.device_get(state["params"]["a"])))
  changed = [i for i in range(1, len(seen)) if seen[i] != seen[i - 1]]
  # Parameters move only after every 2nd step (the first real update has lr = 0 at the
  # start of warm-up), and they do move.
  assert changed == [4, 6, 8], seen


def test_unknown_task_name_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown config.task 'nope'"):
    task_lib.build_task(ml_collections.ConfigDict({"task": "nope"}))


def test_host_batches_are_sharded_over_devices():
  mesh = trainer.make_mesh(jax.devices()[:4])
  arr = trainer.put_host_batch({"x": np.arange(8.0)}, mesh)["x"]
  assert len(arr.sharding.device_set) == 4
  np.testing.assert_array_equal(np.asarray(arr), np.arange(8.0))


def test_cpu_steps_finish_before_host_work_with_several_devices():
  """XLA:CPU with several host devices: each step is waited for (a step's all-reduce
  deadlocked when other work held the shared thread pool); one device keeps async
  dispatch, and so do accelerators."""
  if jax.devices()[0].platform != "cpu":
    pytest.skip("CPU-only behaviour")
  assert trainer.cpu_step_sync(trainer.make_mesh(jax.devices()[:4]))
  assert not trainer.cpu_step_sync(trainer.make_mesh(jax.devices()[:1]))
