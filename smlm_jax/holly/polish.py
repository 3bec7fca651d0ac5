"""Pose-CNN polish: after training, the CNN learns exact poses of its own learned cloud.

During training the pose CNN learns the refined poses (search + Gauss-Newton against
the cloud as it is being learned), a moving, noisy target: on some shapes (the panel's
rod) it ends up much less precise than the refined poses themselves. Once the cloud
has converged, exact training pairs cost nothing: images simulated from the learned
cloud (the training data's image model, :func:`render.simulate_image` with the learned
points as the sites, at the curriculum's final sigma) at random known poses. The polish
fine-tunes only the CNN on such pairs (the cloud is frozen, so the shape written does
not change), with the training's own pose loss: the closest of the K hypotheses
(squared Frobenius distance) + ``loss.hypothesis_weight`` x the mean over hypotheses
+ 0.1 x the squared translation error in units of ``data.max_shift``.

The batch is split over the devices of the mesh (data parallel, as training). Only for
runs on simulated images (``config.data.obj``): with folder images the distribution of
views is not known (the CEP152 renders show one), so uniform random poses would train
the CNN on views the data never shows.

Off by default (``config.polish.steps`` = 0), and harmful on dense shapes (README):
on the panel's rod it left the CNN's median error where it was (23.07 -> 23.12 deg) and
sharpened the refined poses (6.46 -> 3.83); on the bunny it made the CNN worse (6.19 ->
15.66 deg): images of the 350 learned points at the final sigma are sparse dots where
the bunny's thousands of sites make a dense surface, so the CNN learns on images unlike
the data.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from smlm_jax.core import cli
from smlm_jax.holly import render, rotations
from smlm_jax.holly.prng import fast_prng


def pose_loss(R_cnn, t_cnn, R, t, hypothesis_weight: float, max_shift: float):
  """(loss, closest-hypothesis squared Frobenius distance per image [B]): the pose loss
  of CNN outputs (R_cnn [B, K, 3, 3], t_cnn [B, 2]) towards poses (R [B, 3, 3], t [B, 2])
  that training (towards the refined poses) and the polish (towards known ones) use."""
  frob = jnp.sum((R_cnn - R[:, None]) ** 2, axis=(-2, -1))           # [B, K]
  closest = jnp.min(frob, axis=1)
  loss = jnp.mean(closest)
  if R_cnn.shape[1] > 1:
    loss = loss + hypothesis_weight * jnp.mean(frob)
  shift = max(float(max_shift), 1e-3)
  trans = jnp.mean(jnp.sum((t_cnn - t) ** 2, axis=-1)) / shift ** 2
  return loss + 0.1 * trans, closest


def frobenius_to_deg(frob):
  """Rotation angle (deg) from the squared Frobenius distance between two rotations
  (= 4 (1 - cos angle))."""
  return 2 * jnp.degrees(jnp.arcsin(jnp.clip(0.5 * jnp.sqrt(frob / 2), 0, 1)))


def polish(task, net_params, points, mesh, steps: int, learning_rate: float,
           batch_size: int, seed: int, progress: bool = True):
  """Fine-tuned CNN parameters (replicated over ``mesh``) after ``steps`` steps of Adam
  (warm-up over 5% of the steps, cosine decay to 0, gradient clipped at norm 1) on
  batches of ``batch_size`` images simulated from ``points`` [M, 3] at the final sigma."""
  from smlm_jax.core import trainer
  cfg = task.config
  pts = jnp.asarray(points, jnp.float32)
  sigma = float(task.sigma(int(cfg.num_train_steps)))
  hw = float(cfg.loss.hypothesis_weight)
  max_shift = float(cfg.data.max_shift)
  bs = trainer.divisible_batch(int(batch_size), mesh)
  replicated = NamedSharding(mesh, P())
  per_example = NamedSharding(mesh, P("data"))

  def loss_fn(net, keys):
    image, R, t = jax.vmap(lambda k: render.simulate_image(k, pts, sigma, task.sim))(keys)
    out = task.predict(net, image)
    return pose_loss(rotations.matrix_from_6d(out["r6"]), out["t"], R, t, hw, max_shift)

  schedule = optax.warmup_cosine_decay_schedule(0.0, float(learning_rate),
                                                max(1, steps // 20), max(steps, 1), 0.0)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  net = jax.device_put(net_params, replicated)
  opt = jax.device_put(tx.init(net), replicated)

  base = jax.random.fold_in(jax.random.key(int(seed)), 0x9011)

  @jax.jit
  @fast_prng
  def step_fn(net, opt, i):
    # the keys are made inside the step and split over the devices (every process
    # computes the same ones), so the batch is data parallel as in training
    keys = jax.lax.with_sharding_constraint(
        jax.random.split(jax.random.fold_in(base, i), bs), per_example)
    (loss, closest), grads = jax.value_and_grad(loss_fn, has_aux=True)(net, keys)
    updates, opt = tx.update(grads, opt, net)
    return optax.apply_updates(net, updates), opt, loss, jnp.mean(closest)

  sync = trainer.cpu_step_sync(mesh)
  t0 = time.perf_counter()
  bar = cli.progress(total=steps, desc="polish", unit="step") if progress else None
  closest = jnp.nan
  for i in range(steps):
    net, opt, _, closest = step_fn(net, opt, jnp.int32(i))
    if sync:
      jax.block_until_ready(net)
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  return net, {"steps": steps, "seconds": time.perf_counter() - t0,
               "last_closest_deg": float(frobenius_to_deg(closest))}
