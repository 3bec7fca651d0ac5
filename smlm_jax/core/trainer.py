"""The one training loop of smlm_jax: drives any :class:`smlm_jax.core.task.Task`.

Sections of :func:`train_and_evaluate` (big_vision style):
  mesh        1D data-parallel mesh over every device of every host, Auto axes
  task        built from the config (``config.task``); it simulates or augments batches
  state       a plain pytree {"step", "params", "batch_stats", "opt"}, replicated;
              with ``config.ema_decay`` > 0 also "ema", a moving average of the
              parameters that evaluation, export and inference use (load_run)
  update      one jitted function: batch (on device) -> loss -> grads -> optax;
              state donated, batch sharded on 'data', per-step key fold_in(seed, step)
  checkpoints orbax CheckpointManager (async; the config saved as JSON); re-running in
              the same workdir resumes from the latest complete checkpoint
  evaluation  the task's evaluator every ``eval_every_steps`` and at the end
  loop        tqdm progress, metrics.jsonl + TensorBoard, stops loudly on NaN/inf
  lock        one run per workdir (:mod:`smlm_jax.core.workdir_lock`): a second run on
              a busy workdir stops at once with WorkdirBusy, before touching anything
  restarts    optional (``config.restarts.num`` > 1, tasks with a ``restart_score``):
              several starts (seeds seed, seed+1, ...) train the first
              ``restarts.fraction`` of the steps in WORKDIR/restarts/seed_<s>; the one
              with the lowest label-free score continues in WORKDIR (restarts.json);
              ``restarts.vary`` (a dotted field, or several separated by commas)
              with ``restarts.values`` (one per start; "v1,v2" for several fields)
              also varies those fields between the starts, and the run continues
              with the chosen start's values

Several processes (``jax.distributed``, see :mod:`smlm_jax.core.distributed`): the
mesh spans every process's devices; each process simulates (or, for host-fed tasks,
feeds) only its slice of the global batch, so the batches, losses and checkpoints are
those of one process with the same total device count. Process 0 holds the workdir
lock and alone writes metrics.jsonl, TensorBoard, config.json and exports; every
process takes part in orbax checkpoints (a shared file system is assumed), which
restore onto any other process or device count.

Config fields read here (top level): seed, num_train_steps, batch_size, learning_rate,
warmup_steps, weight_decay, grad_clip_norm, log_every_steps, eval_every_steps,
checkpoint_every_steps, max_to_keep, eval_batch_size; optional accumulate_steps, ema_decay
(gradient accumulation with optax.MultiSteps), schedule ('cosine' | 'constant').
Workdir: checkpoints/, metrics.jsonl, config.json, TensorBoard events.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from smlm_jax.core import cli
from smlm_jax.core import distributed
from smlm_jax.core import workdir_lock
from smlm_jax.core.task import LOSS_KEY_SALT, Task, build_task


class TrainingError(RuntimeError):
  """Training cannot continue (e.g. the loss became NaN); the message says why."""


# ----------------------------------------------------------------------------- mesh
def make_mesh(devices=None) -> jax.sharding.Mesh:
  """1D data-parallel mesh over every device (all hosts), with Auto axes."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def data_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def shard_fn(mesh):
  """tree -> tree with every leaf's leading axis constrained to 'data' (inside jit)."""
  data = data_sharding(mesh)
  return lambda tree: jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, data), tree)


def divisible_batch(batch_size: int, mesh) -> int:
  """The batch size rounded up to a multiple of the number of devices."""
  n = mesh.devices.size
  return max(n, int(math.ceil(batch_size / n)) * n)


def put_host_batch(tree, mesh):
  """A host (numpy) batch as global arrays sharded on 'data'. With several processes
  each one puts only the rows of its own devices (whatever their order in the mesh)."""
  if tree is None:
    return None
  data = data_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, data)

  def local(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, data, lambda index: a[index])
  return jax.tree.map(local, tree)


# ---------------------------------------------------------------------- optimizer
def default_optimizer(config):
  """Clip -> AdamW with linear warm-up and cosine (or constant) decay [-> MultiSteps]."""
  steps = int(config.num_train_steps)
  warmup = max(1, min(int(config.warmup_steps), steps))
  if config.get("schedule", "cosine") == "constant":
    schedule = optax.linear_schedule(0.0, config.learning_rate, warmup)
    schedule = optax.join_schedules(
        [schedule, optax.constant_schedule(config.learning_rate)], [warmup])
  else:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(steps, int(config.warmup_steps) + 1),
        end_value=config.learning_rate * 0.01)
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm),
                   optax.adamw(schedule, weight_decay=config.weight_decay))
  accumulate = int(config.get("accumulate_steps", 1))
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
  return tx, schedule


# ---------------------------------------------------------------------------- state
def ema_decay(config) -> float:
  """``config.ema_decay`` (0 = off, the default): the decay of an exponential moving
  average of the parameters kept beside them (Polyak averaging)."""
  return float(config.get("ema_decay", 0.0)) if config is not None else 0.0


def init_state(task: Task, tx, seed: int) -> dict:
  """{"step", "params", "batch_stats", "opt"} of a fresh model (key(seed) initializes),
  plus "ema" (a copy of the parameters) when ``config.ema_decay`` > 0."""
  variables = dict(task.init_variables(jax.random.key(seed)))
  params = variables.pop("params")
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "batch_stats": variables.get("batch_stats", {}), "opt": tx.init(params)}
  if ema_decay(getattr(task, "config", None)) > 0:
    state["ema"] = jax.tree.map(jnp.array, params)
  return state


def fresh_state(task: Task, tx, seed: int, sharding=None) -> dict:
  """:func:`init_state` compiled as one program (placed by ``sharding``). Run eagerly,
  flax's and optax's initialization compiles each operation on its own: ~1000 small
  programs (~40 s on a CPU core) for the locformer."""
  return jax.jit(lambda: init_state(task, tx, seed), out_shardings=sharding)()


def inference_state(state: dict) -> dict:
  """The state that evaluation, export and inference use: the parameters' moving
  average in place of the parameters when the run keeps one (``config.ema_decay``),
  else the state itself. Training always continues from the raw parameters."""
  if "ema" not in state:
    return state
  return {**state, "params": state["ema"]}


def model_apply(model, params, batch_stats, *args, train: bool, rngs=None, **kwargs):
  """(outputs, new batch_stats): flax apply with BatchNorm statistics handled."""
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
    if train:
      out, updates = model.apply(variables, *args, train=True, mutable=["batch_stats"],
                                 rngs=rngs, **kwargs)
      return out, updates["batch_stats"]
  return model.apply(variables, *args, train=train, rngs=rngs, **kwargs), batch_stats


# ---------------------------------------------------------------------------- update
def step_key(seed: int, step):
  """The key of training step ``step``: fold_in(key(seed), step)."""
  return jax.random.fold_in(jax.random.key(seed), step)


def make_update_fn(task: Task, tx, schedule):
  """(state, batch, step_key) -> (new state, measurements): loss, gradients, optax."""

  def update(state, batch, key):
    step = state["step"]
    loss_key = jax.random.fold_in(key, LOSS_KEY_SALT)

    def loss_fn(params):
      loss, meas, stats = task.loss(params, state["batch_stats"], batch, step, loss_key)
      return loss, (meas, stats)

    (loss, (meas, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"])
    grad_norm = optax.tree.norm(grads)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # A step whose loss or gradient is not finite leaves parameters, optimizer state
    # and batch statistics as they were (the data still move on): one bad draw must
    # not spoil a run. The loop counts such steps and stops when they persist.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {"step": step + 1, "params": keep(params, state["params"]),
                 "batch_stats": keep(stats, state["batch_stats"]),
                 "opt": keep(opt, state["opt"])}
    if "ema" in state:
      d = ema_decay(task.config)
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], params)
      new_state["ema"] = keep(ema, state["ema"])
    measurements = {"loss": loss, **meas, "grad_norm": grad_norm,
                    "learning_rate": schedule(step),
                    "skipped": 1.0 - finite.astype(jnp.float32)}
    return new_state, measurements

  return update


def make_batch_fn(task: Task, mesh, seed: int):
  """(step, host_batch) -> the step's batch (what the train step computes first)."""
  shard = shard_fn(mesh)
  return lambda step, host_batch=None: task.make_batch(step_key(seed, step), host_batch,
                                                       shard)


def make_train_step(task: Task, tx, schedule, mesh, seed: int):
  """jit((state, host_batch) -> (state, measurements)), state donated and replicated."""
  replicated = NamedSharding(mesh, P())
  shard = shard_fn(mesh)
  update = make_update_fn(task, tx, schedule)

  def train_step(state, host_batch):
    key = step_key(seed, state["step"])
    batch = task.make_batch(key, host_batch, shard)
    return update(state, batch, key)

  return jax.jit(train_step, out_shardings=(replicated, replicated), donate_argnums=0)


def batched(fn, inputs, batch_size: int, mesh, pad: str = "zeros"):
  """Applies fn to [N, ...] host inputs (a pytree) in device batches of a multiple of the
  device count; the last batch is padded (zeros, or copies of the first row with
  pad='edge') and the padding dropped. Returns fn's output pytree as numpy [N, ...]."""
  bs = divisible_batch(batch_size, mesh)
  several = jax.process_count() > 1
  leaves = jax.tree.leaves(inputs)
  n = leaves[0].shape[0]
  outs = []
  for start in range(0, n, bs):
    chunk = jax.tree.map(lambda a: a[start:start + bs], inputs)
    k = jax.tree.leaves(chunk)[0].shape[0]
    if k < bs:
      def padded(a):
        a = np.asarray(a)
        fill = (np.repeat(a[:1], bs - k, axis=0) if pad == "edge"
                else np.zeros((bs - k,) + a.shape[1:], a.dtype))
        return np.concatenate([a, fill])
      chunk = jax.tree.map(padded, chunk)
    if several:                   # jit takes global arrays: each process its rows
      chunk = put_host_batch(chunk, mesh)
    out = distributed.to_host(fn(chunk))
    outs.append(jax.tree.map(lambda a: np.asarray(a)[:k], out))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


# ---------------------------------------------------------------------- checkpoints
def checkpoint_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  # XLA:CPU: no background saving thread (see cpu_step_sync); the save is a copy of a
  # small state to a local disk, so little is lost.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.max_to_keep, save_interval_steps=1,
      enable_async_checkpointing=jax.default_backend() != "cpu")
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "config"))


def abstract_state(tree, sharding):
  """Shape/dtype/sharding of a state pytree: the restore target."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                      tree)


def save_checkpoint(mngr, state, config, step: int):
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config.to_dict())))


def restore_state(mngr, target, step=None):
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target)))
  return restored["state"]


def _state_metadata(workdir: str, step: int):
  """The tree of array metadata (shape, dtype) of the state saved at ``step``."""
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)      # "metadata file does not exist" is harmless
  try:
    meta = ocp.StandardCheckpointer().metadata(
        os.path.join(checkpoint_dir(workdir), str(step), "state"))
  finally:
    logging.set_verbosity(verbosity)
  tree = getattr(meta, "item_metadata", meta)
  return getattr(tree, "tree", tree)


def _saved_state_keys(workdir: str, step: int) -> set:
  """Top-level keys of the state saved at ``step``."""
  return set(_state_metadata(workdir, step).keys())


def _resume(mngr, state, sharding, step: int, workdir: str) -> dict:
  """The state saved at ``step``, restored onto ``state``'s structure. A run resumed
  with ``config.ema_decay`` switched on (or off) since its checkpoint starts (or drops)
  the weights' average there instead of failing on the missing (or extra) entry."""
  saved = _saved_state_keys(workdir, step)
  target = dict(state)
  if "ema" in target and "ema" not in saved:
    del target["ema"]
    restored = dict(restore_state(mngr, abstract_state(target, sharding), step))
    restored["ema"] = jax.tree.map(jnp.array, restored["params"])
    logging.warning("step %d was saved without an average of the weights: the average "
                    "(config.ema_decay) starts from the weights there", step)
    return restored
  if "ema" in saved and "ema" not in target:
    target["ema"] = target["params"]
    restored = dict(restore_state(mngr, abstract_state(target, sharding), step))
    del restored["ema"]
    logging.warning("step %d holds an average of the weights, which config.ema_decay = 0 "
                    "drops: training, validation and exports use the weights", step)
    return restored
  return restore_state(mngr, abstract_state(target, sharding), step)


def _open_checkpoints(workdir: str, step: int | None):
  """(manager, step, config) of the latest (or given) complete checkpoint of a run."""
  ckpt_dir = checkpoint_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{workdir}: no checkpoints/ folder; train a model there first")
  mngr = ocp.CheckpointManager(ckpt_dir, item_names=("state", "config"))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{workdir}: checkpoints/ holds no complete checkpoint")
  cfg_dict = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  return mngr, step, ml_collections.ConfigDict(_tuplify(cfg_dict))


def load_run(workdir: str, mesh=None, step: int | None = None):
  """(config, task, state) of the latest (or given) checkpoint in a workdir."""
  mngr, step, config = _open_checkpoints(workdir, step)
  task = build_task(config)
  tx, _ = task.make_optimizer()
  mesh = mesh or make_mesh()
  shapes = jax.eval_shape(lambda: init_state(task, tx, config.seed))
  state = restore_state(mngr, abstract_state(shapes, NamedSharding(mesh, P())), step)
  mngr.close()
  return config, task, inference_state(state)


def load_variables(workdir: str, step: int | None = None):
  """(config, params, batch_stats) of the latest (or given) checkpoint, as numpy,
  without building the run's task (for tasks whose construction needs data, e.g. an
  event database, and for warm starts). Shapes come from the checkpoint's own
  metadata and are restored onto one local device, so a run saved on 4 devices loads
  on 1 (orbax refuses the saved sharding then)."""
  mngr, step, config = _open_checkpoints(workdir, step)
  tree = _state_metadata(workdir, step)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        tree)
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  mngr.close()
  state = inference_state(jax.device_get(restored["state"]))
  return config, state["params"], state.get("batch_stats") or {}


def load_init_from(init_from: str):
  """Another run's variables ``{"params", ["batch_stats"]}`` (numpy) for a warm start
  (``config.init_from``, a run folder), or None when it is empty. Call it outside any
  trace (a task's ``__init__``: ``init_variables`` runs under eval_shape / jit)."""
  if not init_from:
    return None
  try:
    _, params, stats = load_variables(init_from)
  except FileNotFoundError as e:
    raise ValueError(f"config.init_from: {e}") from None
  return {"params": params, **({"batch_stats": stats} if stats else {})}


def init_from_variables(loaded, init_fn, init_from: str, model_fields: str = "config.model"):
  """``loaded`` (from :func:`load_init_from`) as jax arrays, after checking that its
  shapes and dtypes are those ``init_fn()`` (the model's fresh init) would make."""
  fresh = jax.eval_shape(init_fn)
  describe = lambda t: jax.tree.map(lambda a: (a.shape, str(a.dtype)), t)
  if describe(dict(fresh)) != describe(loaded):
    raise ValueError(f"config.init_from={init_from}: its model differs from {model_fields}")
  return jax.tree.map(jnp.asarray, loaded)


def _tuplify(d):
  if isinstance(d, dict):
    return {k: _tuplify(v) for k, v in d.items()}
  if isinstance(d, list):
    return tuple(_tuplify(v) for v in d)
  return d


# ----------------------------------------------------------------------------- loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       task: Task | None = None) -> dict[str, Any]:
  """Trains (or resumes) in ``workdir``; returns the final evaluation metrics.

  ``task`` defaults to the one named by ``config.task``; passing one lets tests drive
  a task that is not registered.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  validate(config)
  with run_lock(workdir):
    _restarts(config, workdir, task)
    return _train(config, workdir, task)


RESTARTS_FILE = "restarts.json"


def _restarts(config, workdir, task):
  """Best of several starts (``config.restarts``): each seed trains the first
  ``fraction`` of the schedule in its own folder; the checkpoint of the lowest
  :meth:`Task.restart_score` is copied into ``workdir`` and ``config.seed`` set to its
  seed, so that :func:`_train` continues it. A workdir that already holds checkpoints
  (a resumed run) keeps the seed chosen before (RESTARTS_FILE)."""
  import shutil
  r = config.get("restarts", None)
  path = os.path.join(workdir, RESTARTS_FILE)
  if os.path.exists(path):                         # chosen earlier: resume that start
    with open(path) as f:
      rec = json.load(f)
    config.seed = int(rec["chosen_seed"])
    if rec.get("vary"):
      _set_varied(config, rec["vary"], rec["chosen_value"])
    return
  num = int(r.get("num", 1)) if r is not None else 1
  if num <= 1 or os.path.isdir(checkpoint_dir(workdir)):
    return
  stop = int(round(float(r.fraction) * int(config.num_train_steps)))
  if not 1 <= stop < int(config.num_train_steps):
    raise ValueError(f"config.restarts.fraction={r.fraction} gives {stop} of "
                     f"{config.num_train_steps} steps; use a fraction in (0, 1)")
  vary = str(r.get("vary", "") or "")
  values = list(r.get("values", ()) or ())
  if vary and len(values) != num:
    raise ValueError(f"config.restarts.vary={vary!r} needs one value per start: "
                     f"restarts.values has {len(values)}, restarts.num is {num}; give "
                     f"--config.restarts.values={num} values, or --config.restarts.vary='' "
                     "(every start with the same config)")
  # per start, [(field, value cast to its type)]: the fields must exist, values parse
  plans = [_varied_items(config, vary, v) for v in values] if vary else [[]] * num
  if vary:
    for dotted, first in plans[0]:
      own = _get_field(config, dotted)
      if first != own and jax.process_index() == 0:
        # the user's own value of the field would otherwise be overridden silently
        print(f"note: config.{dotted}={own!r} is replaced per start by restarts.values "
              f"{tuple(values)}; --config.restarts.vary='' trains every start with it",
              flush=True)
  base, rows = int(config.seed), []
  for k in range(num):
    sub_cfg = ml_collections.ConfigDict(config.to_dict())
    sub_cfg.seed, sub_cfg.restarts.num = base + k, 1
    # a start is evaluated once, at its last step (the evaluator does not touch the
    # training state: same trajectory, ~10 s less per skipped evaluation)
    sub_cfg.eval_every_steps = stop
    for dotted, v in plans[k]:
      _set_field(sub_cfg, dotted, v)
    label = "".join(f", {dotted}={v}" for dotted, v in plans[k])
    sub = os.path.join(workdir, "restarts", f"seed_{base + k}")
    if jax.process_index() == 0:
      print(f"restart {k + 1} of {num}: seed {base + k}{label}, steps 1-{stop} in {sub}",
            flush=True)
    t0 = time.time()
    sub_task = None if task is None else type(task)(sub_cfg)
    out = _train(sub_cfg, sub, sub_task, stop_step=stop)
    if out.get("restart_score") is None:
      raise ValueError(f"config.restarts.num={num}: task {config.get('task')!r} cannot "
                       "rank starts (no restart_score); set config.restarts.num=1")
    rows.append({"seed": base + k, "score": float(out["restart_score"]),
                 "seconds": round(time.time() - t0, 2), "folder": sub,
                 **({"value": values[k]} if vary else {})})
  best = min(rows, key=lambda row: row["score"])
  if jax.process_index() == 0:
    shutil.copytree(os.path.join(checkpoint_dir(best["folder"]), str(stop)),
                    os.path.join(checkpoint_dir(workdir), str(stop)))
    record = {"chosen_seed": best["seed"], "steps": stop, "starts": rows,
              "seconds": round(sum(row["seconds"] for row in rows), 2),
              **({"vary": vary, "chosen_value": best["value"]} if vary else {})}
    cli.atomic_write_text(path, json.dumps(record, indent=1))
    for row in rows:
      print(f"  seed {row['seed']}: score {row['score']:.4g}"
            + ("  <- continues" if row is best else ""), flush=True)
  if jax.process_count() > 1:
    distributed.barrier("restarts_chosen")
  config.seed = best["seed"]
  if vary:
    _set_varied(config, vary, best["value"])


def _varied_items(config, vary: str, value) -> list:
  """[(dotted field, value cast to the field's type)] for one start. ``vary`` is one
  dotted field, or several separated by commas; then ``value`` holds one value per
  field: a sequence, or a text with commas ("ball,0.75")."""
  fields = [f.strip() for f in vary.split(",")]
  if len(fields) == 1:
    parts = [value]
  else:
    parts = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
  if len(parts) != len(fields):
    raise ValueError(f"config.restarts.vary={vary!r} varies {len(fields)} fields, so each "
                     f"of restarts.values needs {len(fields)} values; got {value!r}")
  items = []
  for dotted, v in zip(fields, parts):
    old = _get_field(config, dotted)
    try:
      items.append((dotted, _as_type_of(old, v)))
    except ValueError as e:
      raise ValueError(f"config.restarts.values: {dotted} {e}") from None
  return items


def _set_varied(config, vary: str, value):
  for dotted, v in _varied_items(config, vary, value):
    _set_field(config, dotted, v)


def _get_field(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node:
      raise ValueError(f"config.restarts.vary={dotted!r}: the config has no such field")
    node = node[part]
  return node


def _set_field(config, dotted: str, value):
  """Sets a dotted config field (which must exist) to ``value``, cast to the field's
  type for numbers and booleans (:func:`_as_type_of`)."""
  *parents, leaf = dotted.split(".")
  node = _get_field(config, ".".join(parents)) if parents else config
  node[leaf] = _as_type_of(_get_field(config, dotted), value)


def _as_type_of(old, value):
  """``value`` cast to the type of a config field's value ``old`` for numbers and
  booleans (text such as "0.75" or "false" included)."""
  if isinstance(old, bool):
    if isinstance(value, str):
      if value.strip().lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"expected true or false, got {value!r}")
      return value.strip().lower() in ("true", "1")
    return bool(value)
  if isinstance(old, (int, float)):
    try:
      return type(old)(value)
    except (TypeError, ValueError):
      raise ValueError(f"expected {'an integer' if isinstance(old, int) else 'a number'}, "
                       f"got {value!r}") from None
  return value


@contextlib.contextmanager
def run_lock(workdir: str):
  """Holds the workdir lock (process 0) for the block. With several processes all of
  them learn whether process 0 got it, and all raise WorkdirBusy if not."""
  with contextlib.ExitStack() as stack:
    busy = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lock.hold(workdir))
      except workdir_lock.WorkdirBusy as e:
        busy = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      distributed.barrier("workdir_lock")   # all here before the first collective
      got = int(multihost_utils.broadcast_one_to_all(np.int32(busy is None)))
      if not got and busy is None:
        busy = workdir_lock.WorkdirBusy(
            f"workdir {workdir} is in use by another training run (process 0 could not "
            f"lock it; {workdir_lock.holder(workdir)})")
    if busy is not None:
      raise busy
    yield


def _train(config, workdir, task, stop_step: int | None = None):
  mesh = make_mesh()
  config.batch_size = divisible_batch(config.batch_size, mesh)
  if task is None:
    task = build_task(config)        # may complete the config (e.g. a calibration file)
  else:
    task.config = config
  tx, schedule = task.make_optimizer()
  replicated = NamedSharding(mesh, P())
  state = fresh_state(task, tx, config.seed, replicated)

  mngr = checkpoint_manager(workdir, config)
  start = mngr.latest_step()
  if start is not None:
    state = _resume(mngr, state, replicated, start, workdir)
    logging.info("resumed from step %d", start)
  start = int(state["step"])
  is_main = jax.process_index() == 0

  train_step = make_train_step(task, tx, schedule, mesh, config.seed)
  evaluator = task.make_evaluator(mesh)
  if jax.process_count() > 1 and start < config.num_train_steps:
    # Compile ahead, then wait for every process: the first collective must not start
    # while a slower process still compiles (Gloo gives its set-up 30 s on CPU).
    train_step = train_step.lower(state, put_host_batch(task.host_batch(start), mesh)
                                  ).compile()
    distributed.barrier("train_step_compiled")
  writer = MetricWriter(workdir, config, resume_step=start) if is_main else None
  try:
    final, state = _loop(config, task, state, start, train_step, evaluator, mngr, writer,
                         mesh, workdir, is_main, stop_step)
    if stop_step is not None:
      final = dict(final, restart_score=task.restart_score(inference_state(state), mesh))
    mngr.wait_until_finished()
    distributed.finish()                 # before the last barrier (mngr.close)
  finally:
    mngr.close()
    if writer:
      writer.close()
  if is_main and final and stop_step is None:
    print(task.summary(final, config.num_train_steps))
  return final


def cpu_step_sync(mesh) -> bool:
  """Whether each step must finish before the host does anything else: on XLA:CPU
  with several host devices. Their programs share one thread pool (one thread per
  core); a step whose device parts meet at an all-reduce deadlocks when a pool
  thread is held by other work that waits (seen: a 2-core run hung at 0% CPU after
  its first checkpoint, 'waiting for all reduce ... may be stuck'). On CPU, async
  dispatch buys little; GPUs and TPUs keep it."""
  return mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"


def _loop(config, task, state, start, train_step, evaluator, mngr, writer, mesh, workdir,
          is_main, stop_step=None):
  """Steps start+1 .. num_train_steps (or stop_step); returns (metrics, state)."""
  final = {}
  end = int(config.num_train_steps) if stop_step is None else min(
      int(stop_step), int(config.num_train_steps))
  sync = cpu_step_sync(mesh)
  t0, steps_done = time.perf_counter(), 0
  # non-finite steps (their updates skipped): in all, and in a row up to the last step
  skips = streak = jnp.zeros((), jnp.float32)
  skipped, last_log = 0, start           # as of the last log
  bar = (cli.progress(total=config.num_train_steps, desc="train", unit="step") if is_main
         else contextlib.nullcontext(_NoBar()))
  with bar as bar:
    bar.update(start)
    for step in range(start + 1, end + 1):
      host = put_host_batch(task.host_batch(step - 1), mesh)
      state, meas = train_step(state, host)
      skips, streak = skips + meas["skipped"], (streak + 1.0) * meas["skipped"]
      if sync:
        jax.block_until_ready(state)
      steps_done += 1
      last = step == end
      if last and step == int(config.num_train_steps):
        state = task.finish_training(state, mesh)   # a task's post-training phase
      if step % config.log_every_steps == 0 or last:
        meas = jax.device_get(meas)
        loss, grad_norm = float(meas["loss"]), float(meas["grad_norm"])
        total, in_row = (int(round(float(v))) for v in jax.device_get((skips, streak)))
        new_skips, window = total - skipped, step - last_log
        skipped, last_log = total, step
        if in_row >= MAX_SKIPPED_IN_A_ROW or total > max(
            MAX_SKIPPED_STEPS, MAX_SKIPPED_FRACTION * steps_done):
          if math.isfinite(loss) and math.isfinite(grad_norm):
            raise TrainingError(
                f"{total} of the last {steps_done} steps had a non-finite loss or "
                f"gradient (their updates skipped; at most max({MAX_SKIPPED_STEPS}, "
                f"{MAX_SKIPPED_FRACTION:.0%}) are allowed), the last at or before step "
                f"{step}; lower --config.learning_rate or check the config")
          if not math.isfinite(loss):
            raise TrainingError(
                f"loss became {loss} at step {step} (grad_norm {grad_norm}; {in_row} "
                f"steps in a row and {total} of the last {steps_done} not finite, their "
                "updates skipped); lower --config.learning_rate or check the config")
          # A finite loss with a non-finite gradient is a numerical fault (an inf or
          # NaN inside the model or the step's data, even in a masked-out branch of a
          # where), not a learning rate too high.
          raise TrainingError(
              f"the gradient became {grad_norm} at step {step} while the loss was finite "
              f"({loss:.4g}; {in_row} steps in a row not finite): a "
              "non-finite value inside the model or the step's data, not the learning "
              "rate; check the task's loss for inf/NaN (e.g. in a branch a jnp.where "
              "discards)")
        if new_skips and is_main:
          logging.warning("steps %d-%d: %d step(s) with a non-finite loss or gradient; "
                          "their updates were skipped (%d so far)", step - window + 1,
                          step, new_skips, total)
        rate = steps_done / (time.perf_counter() - t0)
        row = {"step": step, **{k: float(v) for k, v in meas.items() if k != "skipped"},
               "skipped_steps": total,
               "steps_per_s": rate, "examples_per_s": rate * config.batch_size}
        if writer:
          writer.write(row)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
      if evaluator is not None and (step % config.eval_every_steps == 0 or last):
        final = evaluator(inference_state(state))
        if writer:
          writer.write({"step": step, **{f"eval/{k}": v for k, v in
                                         task.flat_metrics(final).items()}})
      if step % config.checkpoint_every_steps == 0 or last:
        save_checkpoint(mngr, state, config, step)
        if is_main:
          task.export(inference_state(state), workdir, step)
      bar.update(1)
  if not final and evaluator is not None:   # resumed a finished run: evaluate once
    final = evaluator(inference_state(state))
  return final, state


# Steps with a non-finite loss or gradient leave the state as it was. A run stops (at
# a log step) when the last MAX_SKIPPED_IN_A_ROW steps were such, or more than
# max(MAX_SKIPPED_STEPS, MAX_SKIPPED_FRACTION x steps) of this session's steps.
MAX_SKIPPED_IN_A_ROW = 3
MAX_SKIPPED_STEPS = 10
MAX_SKIPPED_FRACTION = 0.01


class _NoBar:
  """The progress bar of processes other than 0: silent."""

  def update(self, n=1):
    pass

  def set_postfix(self, **kwargs):
    pass


def validate(config):
  for name in ("num_train_steps", "batch_size", "eval_every_steps",
               "checkpoint_every_steps", "log_every_steps", "max_to_keep"):
    if int(config[name]) < 1:
      raise ValueError(f"config.{name} must be >= 1, got {config[name]}")
  if not config.learning_rate > 0:
    raise ValueError(f"config.learning_rate must be > 0, got {config.learning_rate}")
  if int(config.get("accumulate_steps", 1)) < 1:
    raise ValueError("config.accumulate_steps must be >= 1")
  if not 0.0 <= ema_decay(config) < 1.0:
    raise ValueError(f"config.ema_decay must be in [0, 1) (0 = off), got {config.ema_decay}")


class MetricWriter:
  """metrics.jsonl + TensorBoard event files in the workdir.

  On resume from step s, rows of metrics.jsonl logged after s (by a run that was
  stopped before its next checkpoint) are dropped, so no step appears twice.
  """

  def __init__(self, workdir, config, resume_step: int = 0):
    from tensorboardX import SummaryWriter
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step and os.path.exists(path):
      kept = []
      with open(path) as f:
        for line in f:
          try:
            if json.loads(line).get("step", 0) <= resume_step:
              kept.append(line)
          except ValueError:
            pass            # a half-written last line of a killed run
      cli.atomic_write_text(path, "".join(kept))
    elif not resume_step and os.path.exists(path):
      os.remove(path)       # a fresh run in a folder without checkpoints
    self.jsonl = open(path, "a")
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
