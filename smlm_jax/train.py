"""Trains a D-from-motion-blur model on movies simulated inside the jitted train step.

  python -m smlm_jax.train --config=configs/diffusion.py --workdir=runs/default
  python -m smlm_jax.train --config=configs/diffusion.py:gpu --workdir=runs/gpu \
      --config.model.name=cnn3d

Sections of ``train_and_evaluate``: mesh -> simulator and model -> state (params,
batch stats, optimizer) -> sharded jitted update (simulate, normalize, loss, AdamW) ->
checkpoints (orbax, async) -> evaluation on a fixed seeded validation set -> loop with
progress bar, JSON-lines + TensorBoard logs, and a final summary table.

No data is stored: step ``s`` simulates its batch from ``fold_in(key(seed), s)`` and
example ``i`` of it from ``fold_in(step_key, i)``, so a batch is the same whatever the
number of devices or hosts, and a resumed run continues the exact sequence.
Workdir: checkpoints/ (orbax), metrics.jsonl, TensorBoard events, eval/.
"""
from __future__ import annotations

import smlm_jax.host_devices  # noqa: F401  (before jax: one CPU device per core)

import json
import math
import os
import time
from typing import Any

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from smlm_jax import cli
from smlm_jax import metrics as metrics_lib
from smlm_jax import models
from smlm_jax import normalize
from smlm_jax import simulator as sim_lib

LN10 = math.log(10.0)


class TrainingError(RuntimeError):
  """Training cannot continue (e.g. the loss became NaN); the message says why."""


# ----------------------------------------------------------------------------- mesh
def make_mesh(devices=None) -> jax.sharding.Mesh:
  """1D data-parallel mesh over every device (all hosts), with Auto axes."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


# ------------------------------------------------------------------------ model + state
def build(config: ml_collections.ConfigDict):
  """Simulator, model and optimizer from a config (validated)."""
  simulator = sim_lib.simulator_from_config(config.sim)
  model = models.build_model(config.model)
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=max(1, min(config.warmup_steps, config.num_train_steps)),
      decay_steps=max(config.num_train_steps, config.warmup_steps + 1),
      end_value=config.learning_rate * 0.01)
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                   optax.adamw(schedule, weight_decay=config.weight_decay))
  return simulator, model, tx, schedule


def init_state(model, tx, geometry: sim_lib.Geometry, seed: int):
  x = jnp.zeros((2,) + geometry.shape, jnp.float32)
  variables = model.init(jax.random.key(seed), x, train=False)
  params = variables["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params,
          "batch_stats": variables.get("batch_stats", {}), "opt": tx.init(params)}


def apply_model(model, state, x, train: bool):
  variables = {"params": state["params"]}
  if state["batch_stats"]:
    variables["batch_stats"] = state["batch_stats"]
    if train:
      (mean, log_var), updates = model.apply(variables, x, train=True,
                                             mutable=["batch_stats"])
      return mean, log_var, updates["batch_stats"]
  mean, log_var = model.apply(variables, x, train=train)
  return mean, log_var, state["batch_stats"]


def gaussian_nll(mean, log_var, target):
  log_var = jnp.clip(log_var, -12.0, 8.0)
  return 0.5 * (log_var + (target - mean) ** 2 * jnp.exp(-log_var) + math.log(2 * math.pi))


# ---------------------------------------------------------------------------- update
def batch_keys(seed: int, step, batch_size: int):
  """Per-example keys fold_in(fold_in(key(seed), step), i)."""
  step_key = jax.random.fold_in(jax.random.key(seed), step)
  return sim_lib.movie_keys(step_key, jnp.arange(batch_size))


def make_batch_fn(config, simulator, mesh):
  """(step) -> (model input x [B,T,H,W], target ln D [B]), simulated and sharded."""
  data = NamedSharding(mesh, P("data"))

  def batch(step):
    keys = jax.lax.with_sharding_constraint(
        batch_keys(config.seed, step, config.batch_size), data)
    frames, truth = simulator.from_keys(keys)
    x, _, _ = normalize.model_input(frames, simulator.camera)
    return jax.lax.with_sharding_constraint(x, data), jnp.log(truth["D_um2_per_s"])

  return batch


def make_update_fn(config, model, tx, schedule):
  """(state, x, target) -> (new state, measurements): loss, gradients and AdamW."""
  mse_weight = float(config.mse_weight)
  warmup = max(1, int(config.warmup_steps))

  def loss_fn(params, state, x, target, step):
    mean, log_var, new_stats = apply_model(model, {**state, "params": params}, x, True)
    nll = gaussian_nll(mean, log_var, target)
    sq = (mean - target) ** 2
    w = mse_weight * jnp.clip(1.0 - step / (2.0 * warmup), 0.0, 1.0)
    loss = jnp.mean(nll + w * sq)
    return loss, (new_stats, jnp.mean(nll), jnp.mean(sq))

  def update(state, x, target):
    step = state["step"]
    (loss, (stats, nll, sq)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], state, x, target, step)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"step": step + 1, "params": params, "batch_stats": stats, "opt": opt}
    measurements = {"loss": loss, "nll": nll, "mse_lnD": sq,
                    "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(step)}
    return new_state, measurements

  return update


def make_train_step(config, simulator, model, tx, schedule, mesh):
  """The jitted train step: simulate the step's batch, then update (state donated)."""
  replicated = NamedSharding(mesh, P())
  batch = make_batch_fn(config, simulator, mesh)
  update = make_update_fn(config, model, tx, schedule)

  def train_step(state):
    return update(state, *batch(state["step"]))

  return jax.jit(train_step, out_shardings=(replicated, replicated), donate_argnums=0)


def make_predict_fn(model, mesh):
  """Jitted (state, x [B,T,H,W]) -> (mean ln D, log var), batch sharded on 'data'."""
  data = NamedSharding(mesh, P("data"))

  def predict(state, x):
    x = jax.lax.with_sharding_constraint(x, data)
    mean, log_var, _ = apply_model(model, state, x, train=False)
    return mean, log_var

  return jax.jit(predict)


# ---------------------------------------------------------------------------- eval
def simulate_eval_set(config, simulator, num_movies: int, seed: int, mesh):
  """A fixed, seeded set of normalized movies and truths (simulated once)."""
  data = NamedSharding(mesh, P("data"))
  bs = _divisible_batch(config.eval_batch_size, mesh)

  @jax.jit
  def make(idx):
    keys = jax.lax.with_sharding_constraint(
        sim_lib.movie_keys(jax.random.key(seed), idx), data)
    frames, truth = simulator.from_keys(keys)
    x, _, _ = normalize.model_input(frames, simulator.camera)
    return x, truth["D_um2_per_s"]

  xs, ds = [], []
  for start in range(0, num_movies, bs):
    x, d = make(jnp.arange(start, start + bs))
    xs.append(x)
    ds.append(d)
  return jnp.concatenate(xs)[:num_movies], np.concatenate([np.asarray(d) for d in ds])[:num_movies]


def predict_batches(predict_fn, state, x, batch_size: int, mesh):
  """Predictions for [N, T, H, W] inputs in device batches (padded to a full batch)."""
  bs = _divisible_batch(batch_size, mesh)
  n = x.shape[0]
  means, log_vars = [], []
  for start in range(0, n, bs):
    chunk = x[start:start + bs]
    pad = bs - chunk.shape[0]
    if pad:
      chunk = jnp.concatenate([chunk, jnp.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    m, lv = predict_fn(state, chunk)
    means.append(np.asarray(m)[:bs - pad])
    log_vars.append(np.asarray(lv)[:bs - pad])
  return np.concatenate(means), np.concatenate(log_vars)


def evaluate_state(predict_fn, state, eval_x, eval_D, batch_size, mesh) -> dict[str, Any]:
  mean, log_var = predict_batches(predict_fn, state, eval_x, batch_size, mesh)
  return metrics_lib.d_metrics(eval_D, mean, log_var)


def _divisible_batch(batch_size: int, mesh) -> int:
  n = mesh.devices.size
  return max(n, int(math.ceil(batch_size / n)) * n)


# ---------------------------------------------------------------------- checkpoints
def _checkpoint_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.max_to_keep, save_interval_steps=1,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(_checkpoint_dir(workdir), options=options,
                               item_names=("state", "config"))


def _abstract(tree, sharding):
  """Shape/dtype/sharding of a state pytree: the restore target."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      tree)


def save_checkpoint(mngr, state, config, step: int):
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())))


def restore_state(mngr, abstract_state, step=None):
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"]


def load_run(workdir: str, mesh=None):
  """(config, model, state, simulator) of the latest checkpoint in a workdir."""
  ckpt_dir = _checkpoint_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{workdir}: no checkpoints/ folder; train a model there first")
  mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "config"))
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir}: checkpoints/ holds no complete checkpoint")
  cfg_dict = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  config = ml_collections.ConfigDict(_tuplify(cfg_dict))
  simulator, model, tx, _ = build(config)
  mesh = mesh or make_mesh()
  abstract = jax.eval_shape(lambda: init_state(model, tx, simulator.geometry, config.seed))
  state = restore_state(mngr, _abstract(abstract, NamedSharding(mesh, P())), step)
  mngr.close()
  return config, model, state, simulator


def _tuplify(d):
  if isinstance(d, dict):
    return {k: _tuplify(v) for k, v in d.items()}
  if isinstance(d, list):
    return tuple(_tuplify(v) for v in d)
  return d


# ----------------------------------------------------------------------------- loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) in ``workdir``; returns the final validation metrics."""
  config = ml_collections.ConfigDict(config.to_dict())
  _validate(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh()
  config.batch_size = _divisible_batch(config.batch_size, mesh)
  simulator, model, tx, schedule = build(config)
  replicated = NamedSharding(mesh, P())
  state = jax.jit(lambda: init_state(model, tx, simulator.geometry, config.seed),
                  out_shardings=replicated)()

  mngr = checkpoint_manager(workdir, config)
  start = mngr.latest_step()
  if start is not None:
    state = restore_state(mngr, _abstract(state, replicated), start)
    logging.info("resumed from step %d", start)
  start = int(state["step"])
  is_main = jax.process_index() == 0

  train_step = make_train_step(config, simulator, model, tx, schedule, mesh)
  predict_fn = make_predict_fn(model, mesh)
  eval_x, eval_D = simulate_eval_set(config, simulator, config.eval_num_movies,
                                     config.eval_seed, mesh)
  writer = _Writer(workdir, config) if is_main else None
  try:
    final = _loop(config, state, start, train_step, predict_fn, eval_x, eval_D, mngr,
                  writer, mesh)
    mngr.wait_until_finished()
  finally:
    mngr.close()
    if writer:
      writer.close()
  if is_main:
    print(metrics_lib.summary_table(final, title=f"validation ({config.eval_num_movies} "
                                    f"movies) after step {config.num_train_steps}"))
  return final


def _loop(config, state, start, train_step, predict_fn, eval_x, eval_D, mngr, writer, mesh):
  final = {}
  t0, steps_done = time.perf_counter(), 0
  with cli.progress(total=config.num_train_steps, desc="train", unit="step") as bar:
    bar.update(start)
    for step in range(start + 1, config.num_train_steps + 1):
      state, meas = train_step(state)
      steps_done += 1
      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        meas = jax.device_get(meas)
        loss = float(meas["loss"])
        if not math.isfinite(loss):
          raise TrainingError(
              f"loss became {loss} at step {step} (grad_norm {float(meas['grad_norm'])}); "
              "lower --config.learning_rate or check the sim config")
        rate = steps_done / (time.perf_counter() - t0)
        row = {"step": step, **{k: float(v) for k, v in meas.items()},
               "steps_per_s": rate, "examples_per_s": rate * config.batch_size}
        if writer:
          writer.write(row)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
      if step % config.eval_every_steps == 0 or step == config.num_train_steps:
        final = evaluate_state(predict_fn, state, eval_x, eval_D, config.eval_batch_size,
                               mesh)
        if writer:
          writer.write({"step": step, **{f"eval/{k}": v for k, v in
                                         metrics_lib.flat(final).items()}})
      if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
        save_checkpoint(mngr, state, config, step)
      bar.update(1)
  if not final:  # resumed a finished run: evaluate once for the summary
    final = evaluate_state(predict_fn, state, eval_x, eval_D, config.eval_batch_size, mesh)
  return final


def _validate(config):
  for name in ("num_train_steps", "batch_size", "eval_every_steps",
               "checkpoint_every_steps", "log_every_steps", "eval_num_movies"):
    if int(config[name]) < 1:
      raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
  if not config.learning_rate > 0:
    raise ValueError(f"config.learning_rate must be > 0, got {config.learning_rate}")


class _Writer:
  """metrics.jsonl + TensorBoard event files in the workdir."""

  def __init__(self, workdir, config):
    from tensorboardX import SummaryWriter
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self.tb = SummaryWriter(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=1)

  def write(self, row):
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, row["step"])

  def close(self):
    self.jsonl.close()
    self.tb.close()


# ----------------------------------------------------------------------------- main
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
  if flags.FLAGS.jax_distributed:
    jax.distributed.initialize()
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, TrainingError) as e:
    cli.fail(str(e))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
