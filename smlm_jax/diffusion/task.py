"""Diffusion from motion blur as a trainer task: simulate, normalize, Gaussian NLL on ln D.

One step (inside the trainer's jitted step):
  per-movie keys fold_in(step_key, i), i < B, sharded on 'data'
  -> simulator.from_keys: Brownian sub-steps, blurred pixel-integrated PSF, background,
     exact Poisson + camera  (frames [B, T, H, W] ADU, truth)
  -> normalize.model_input: ADU -> photons -> background-subtracted asinh scale
  -> model: (mean, log-variance) of ln D
  -> loss: Gaussian NLL (+ MSE on ln D during warm-up, so the mean learns before the
     variance can explain errors away).
Evaluation: a fixed, seeded validation set simulated once; metrics of
:mod:`smlm_jax.diffusion.metrics` (relative RMSE per decade, coverage of the 68%
interval, ...).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from smlm_jax.core import distributed, trainer
from smlm_jax.core.task import Task
from smlm_jax.diffusion import metrics as metrics_lib
from smlm_jax.diffusion import models
from smlm_jax.diffusion import normalize
from smlm_jax.diffusion import simulator as sim_lib
from smlm_jax.nn import losses


class DiffusionTask(Task):

  def __init__(self, config):
    super().__init__(config)
    self.simulator = sim_lib.simulator_from_config(config.sim)   # applies a calibration
    # Physics-aware models (locformer) take the geometry, D prior and camera noise of
    # the simulator they are trained on.
    self.model = models.build_model(config.model, **models.physics_context(self.simulator))

  def init_variables(self, key):
    x = jnp.zeros((2,) + self.simulator.geometry.shape, jnp.float32)
    return self.model.init(key, x, train=False)

  def make_batch(self, key, host_batch, shard):
    keys = shard(sim_lib.movie_keys(key, jnp.arange(self.config.batch_size)))
    frames, truth = self.simulator.from_keys(keys)
    x, _, _ = normalize.model_input(frames, self.simulator.camera)
    return {"x": shard(x), "target": jnp.log(truth["D_um2_per_s"])}

  def loss(self, params, batch_stats, batch, step, key):
    (mean, log_var), stats = trainer.model_apply(self.model, params, batch_stats,
                                                 batch["x"], train=True)
    target = batch["target"]
    nll = losses.gaussian_nll(mean, log_var, target)
    sq = (mean - target) ** 2
    warmup = max(1, int(self.config.warmup_steps))
    w = float(self.config.mse_weight) * jnp.clip(1.0 - step / (2.0 * warmup), 0.0, 1.0)
    loss = jnp.mean(nll + w * sq)
    return loss, {"nll": jnp.mean(nll), "mse_lnD": jnp.mean(sq)}, stats

  # ------------------------------------------------------------------- evaluation
  def predict_fn(self, mesh):
    """Jitted (state, x [B,T,H,W]) -> (mean ln D, log var), batch sharded on 'data'."""
    data = NamedSharding(mesh, P("data"))

    def predict(state, x):
      x = jax.lax.with_sharding_constraint(x, data)
      (mean, log_var), _ = trainer.model_apply(self.model, state["params"],
                                               state["batch_stats"], x, train=False)
      return mean, log_var

    return jax.jit(predict)

  def simulate_set(self, num_movies: int, seed: int, mesh):
    """A fixed, seeded set of normalized movies and their D (simulated once)."""
    data = NamedSharding(mesh, P("data"))
    bs = trainer.divisible_batch(self.config.eval_batch_size, mesh)
    simulator = self.simulator

    @jax.jit
    def make(idx):
      keys = jax.lax.with_sharding_constraint(
          sim_lib.movie_keys(jax.random.key(seed), idx), data)
      frames, truth = simulator.from_keys(keys)
      x, _, _ = normalize.model_input(frames, simulator.camera)
      return x, truth["D_um2_per_s"]

    xs, ds = [], []
    for start in range(0, num_movies, bs):
      x, d = distributed.to_host(make(jnp.arange(start, start + bs)))
      xs.append(x)
      ds.append(d)
    return np.concatenate(xs)[:num_movies], np.concatenate(ds)[:num_movies]

  def predict(self, state, x, mesh):
    """(mean ln D, log var) as numpy for normalized movies [N, T, H, W]."""
    fn = self.predict_fn(mesh)
    return trainer.batched(lambda chunk: fn(state, chunk), x, self.config.eval_batch_size,
                           mesh)

  def make_evaluator(self, mesh):
    x, D = self.simulate_set(self.config.eval_num_movies, self.config.eval_seed, mesh)
    fn = self.predict_fn(mesh)

    def evaluate(state):
      mean, log_var = trainer.batched(lambda chunk: fn(state, chunk), x,
                                      self.config.eval_batch_size, mesh)
      return metrics_lib.d_metrics(D, mean, log_var)

    return evaluate

  def flat_metrics(self, metrics):
    return metrics_lib.flat(metrics)

  def summary(self, metrics, step):
    return metrics_lib.summary_table(
        metrics, title=f"validation ({self.config.eval_num_movies} movies) after step {step}")
