"""The contract between the shared trainer (:mod:`smlm_jax.core.trainer`) and a system.

A system (diffusion, events, sparks, fusion, holly) is a subclass of :class:`Task`
built from its config (``config.task`` names it; see :data:`TASKS`). The trainer owns
everything that is the same for every system: the mesh, the state pytree, the jitted
and sharded update with donated state, per-step keys, the optimizer, orbax
checkpoints with resume, the evaluation cadence, JSON-lines + TensorBoard logs, the
progress bar and the NaN guard. The task owns the science: how a batch comes to be,
the model, the loss and the evaluation.

Data path of one training step (all inside one ``jax.jit``; ``B`` = global batch):

    step_key = fold_in(key(config.seed), step)
    host     = task.host_batch(step)                 # outside jit: numpy pytree or None,
                                                     #   device_put sharded on 'data'
    batch    = task.make_batch(step_key, host, shard)  # simulate on device / augment
    loss, measurements, new_batch_stats = task.loss(params, batch_stats, batch, step,
                                                    fold_in(step_key, LOSS_KEY_SALT))
    grads -> optax (clip, AdamW, schedule[, MultiSteps]) -> new state

``shard(tree)`` constrains every leaf's leading axis to the mesh's 'data' axis; call it
on per-example keys before simulating so that each device simulates its own slice.
A batch that depends only on (step_key, host) is identical for any device count, and
a resumed run continues the exact sequence.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

# Tasks by config name -> "module:Class" (imported on demand, so a system's
# dependencies are only loaded when it is used).
TASKS = {
    "diffusion": "smlm_jax.diffusion.task:DiffusionTask",
    "events": "smlm_jax.events.task:EventsTask",
    "sparks": "smlm_jax.sparks.task:SparksTask",
    "fusion": "smlm_jax.fusion.task:FusionTask",
    "holly": "smlm_jax.holly.task:HollyTask",
}

# fold_in salt of the key handed to Task.loss (dropout, stochastic layers); per-example
# keys use fold_in(step_key, i) with i < batch size, so this never collides.
LOSS_KEY_SALT = 0x7FFFFFFF


class Task:
  """Base class: override the three required methods, and the optional ones you need."""

  def __init__(self, config):
    self.config = config

  # ----------------------------------------------------------------------- required
  def init_variables(self, key) -> dict:
    """Flax variables ``{"params": ..., ["batch_stats": ...]}`` of a fresh model."""
    raise NotImplementedError

  def make_batch(self, key, host_batch, shard: Callable) -> Any:
    """The step's batch, inside the jitted step (simulate and/or augment on device).

    key: the step key ``fold_in(key(seed), step)``; host_batch: the device-put result
    of :meth:`host_batch` (None when the task feeds nothing from the host).
    """
    raise NotImplementedError

  def loss(self, params, batch_stats, batch, step, key):
    """(scalar loss, dict of scalar measurements, new batch_stats) for one batch."""
    raise NotImplementedError

  # ----------------------------------------------------------------------- optional
  def host_batch(self, step: int):
    """Numpy pytree fed from the host for this step (leading axis = batch), or None."""
    return None

  def make_optimizer(self):
    """(optax transformation, learning-rate schedule); default from the config."""
    from smlm_jax.core import trainer
    return trainer.default_optimizer(self.config)

  def make_evaluator(self, mesh) -> Callable[[dict], dict] | None:
    """A function state -> metrics (nested dicts of numbers), or None (no evaluation)."""
    return None

  def flat_metrics(self, metrics: dict) -> dict:
    """Scalar 'name' -> value pairs for logs (default: nested keys joined by '/')."""
    return flatten(metrics)

  def summary(self, metrics: dict, step: int) -> str:
    """Text printed after training (default: the flat metrics, one per line)."""
    return "\n".join(f"{k:<32} {v:.6g}" for k, v in self.flat_metrics(metrics).items()
                     if isinstance(v, (int, float)))

  def finish_training(self, state, mesh):
    """Called once after the last training step (before its evaluation, checkpoint and
    export); returns the state to keep (default: unchanged). E.g. a post-training
    phase that fine-tunes part of the model."""
    return state

  def export(self, state, workdir: str, step: int) -> None:
    """Called on the main process after each checkpoint (e.g. write a learned shape)."""

  def restart_score(self, state, mesh) -> float | None:
    """A label-free score of a partly trained state, lower is better (e.g. how badly
    the model explains its own training images), used to pick the best of several
    starts (``config.restarts``); None: the task cannot rank starts."""
    return None


def flatten(metrics: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in metrics.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}/"))
    elif isinstance(v, (int, float, bool)) or hasattr(v, "item"):
      try:
        out[f"{prefix}{k}"] = float(v)
      except (TypeError, ValueError):
        pass
  return out


def task_class(name: str):
  """The Task subclass for a config name (or a 'module:Class' path)."""
  target = TASKS.get(name, name)
  if ":" not in target:
    raise ValueError(f"unknown config.task {name!r}; choose one of {sorted(TASKS)}")
  module, cls = target.split(":")
  try:
    mod = importlib.import_module(module)
  except ModuleNotFoundError as e:
    raise ValueError(f"config.task {name!r}: cannot import {module} ({e})") from None
  return getattr(mod, cls)


def build_task(config) -> Task:
  """The task named by ``config.task`` (default 'diffusion', for configs saved before
  tasks had names) built from ``config``."""
  name = config.get("task", "diffusion") if hasattr(config, "get") else "diffusion"
  return task_class(name)(config)
