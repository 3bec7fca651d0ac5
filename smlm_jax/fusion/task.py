"""Fusion from one view as a trainer task: simulate pairs, normalize, 3D U-Net, SSIM + L1.

One step (inside the trainer's jitted step; ``B`` = batch):
  per-volume keys fold_in(step_key, i), sharded on 'data'
  -> simulator.simulate: specimen patch at a random depth, single view (input) and fused
     view (target), both in camera ADU                               [B, Z, Y, X]
     (with ``config.pool_size > 0``: the specimens and their noiseless images come from
     a pool simulated once by the same simulator on the device, fed through
     ``host_batch`` with random y/x flips and transposes, and the shot + camera noise is
     drawn fresh in the step. On 2 CPU cores rendering a specimen costs several times a
     2D U-Net step; the pool gives the same image-formation model at a fraction of the
     cost. pool_size = 0 simulates every example in the step.)
  -> percentile normalization of each volume (2nd / 99.8th, as the metric)
  -> model input [B, Z, Y, X, C]: the normalized view, and with model.depth_channel the
     depth of each slice below the surface / model.depth_scale_um
  -> U-Net (residual: prediction = normalized view + U-Net output): model.kind
     'unet3d' (any size; model.conv 'full' = true 3D convolutions, or 'factorized' =
     (2+1)D convolutions, ~4x faster training steps on CPU, the CPU default) or
     'unet2d_z' (a 2D U-Net over y, x with the Z slices as channels: every layer sees
     the whole z column; cheapest, but it learned far less per example)
  -> loss: loss.l1_weight * L1 + loss.ssim_weight * (1 - SSIM), SSIM as the challenge's
     metric (7^3 uniform window, data_range 1); or loss.kind = 'n_ssim': -N_SSIM per
     volume (the input's SSIM is a constant per volume) + L1.
     loss.renormalize (the default): the prediction is percentile-normalized again
     before the loss, as the metric does (gradients flow through the two order
     statistics), so training optimizes exactly the scored quantity; without it the
     prediction is scored after a gain/offset change the loss never saw (validation
     N_SSIM at 300 steps: 0.38 without, 0.78 with). loss.clean_target: the target is
     the noiseless fused view (expected ADU, normalized), not a noisy realisation: the
     same optimum for an L1/SSIM regression, with less gradient noise per example.
Evaluation: a fixed, seeded set of simulated volumes (eval_seed, never used in
training), predicted whole (with ``predict.tta``: the mean over the 8 y/x flips and
transposes, :func:`predict_tta`); SSIM, N_SSIM and PSNR as in :mod:`smlm_jax.fusion.metrics`,
overall and per channel (nuclei / membranes).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from smlm_jax.core import noise as noise_lib
from smlm_jax.core import trainer
from smlm_jax.core.task import Task
from smlm_jax.fusion import metrics
from smlm_jax.fusion import simulator as sim_lib
from smlm_jax.nn import UNet, losses
from smlm_jax.nn.ensemble import mirror_ensemble


MODEL_KINDS = ("unet3d", "unet2d_z")


class ZAsChannelsUNet(nn.Module):
  """A 2D U-Net over (y, x) that takes the slices of a fixed-depth stack as channels:
  ``[B, Z, Y, X, C] -> [B, Z, Y, X, 1]``. Every layer mixes all Z slices, so z
  deconvolution and depth-dependent corrections cost one 2D convolution; Z is fixed
  (``num_slices``), larger stacks are predicted in overlapping z tiles."""
  num_slices: int
  depth: int = 2
  base_width: int = 32
  max_width: int | None = None
  convs_per_level: int = 2
  norm: str = "group"
  upsample: str = "transpose"

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, z, y, xx, c = x.shape
    if z != self.num_slices:
      raise ValueError(f"this model takes stacks of {self.num_slices} slices, got {z}")
    h = jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b, y, xx, z * c)
    out = UNet(out_channels=z, spatial_dims=2, depth=self.depth, base_width=self.base_width,
               max_width=self.max_width, convs_per_level=self.convs_per_level,
               norm=self.norm, upsample=self.upsample, name="unet")(h, train=train)
    return jnp.transpose(out, (0, 3, 1, 2))[..., None]


def build_model(model_cfg, sim_shape):
  """The network of ``model_cfg.kind``: 'unet3d' (3D U-Net, any input size) or
  'unet2d_z' (2D U-Net with the ``sim_shape[0]`` slices as channels)."""
  kind = model_cfg.get("kind", "unet3d")
  if kind == "unet2d_z":
    return ZAsChannelsUNet(num_slices=int(sim_shape[0]), depth=int(model_cfg.depth),
                           base_width=int(model_cfg.base_width),
                           max_width=model_cfg.get("max_width"),
                           convs_per_level=int(model_cfg.get("convs_per_level", 2)),
                           norm=model_cfg.norm, upsample=model_cfg.get("upsample",
                                                                        "transpose"))
  if kind != "unet3d":
    raise ValueError(f"config.model.kind must be one of {MODEL_KINDS}, got {kind!r}")
  pool = model_cfg.get("pool_factors", None)
  return UNet(out_channels=1, spatial_dims=3, depth=int(model_cfg.depth),
              base_width=int(model_cfg.base_width), max_width=model_cfg.get("max_width"),
              convs_per_level=int(model_cfg.get("convs_per_level", 2)),
              norm=model_cfg.norm, upsample=model_cfg.get("upsample", "transpose"),
              pool_factors=tuple(tuple(p) for p in pool) if pool else None,
              residual=bool(model_cfg.get("residual_blocks", False)),
              conv=model_cfg.get("conv", "full"))


def fixed_slices(model_cfg, sim_shape) -> int | None:
  """Number of slices the model needs per tile (None: any)."""
  return int(sim_shape[0]) if model_cfg.get("kind", "unet3d") == "unet2d_z" else None


def in_channels(model_cfg) -> int:
  return 2 if model_cfg.depth_channel else 1


def model_input(view_n, depth_um, model_cfg):
  """[B, Z, Y, X] normalized views (+ [B, Z] slice depths) -> [B, Z, Y, X, C]."""
  x = view_n[..., None]
  if model_cfg.depth_channel:
    d = jnp.broadcast_to((depth_um / model_cfg.depth_scale_um)[:, :, None, None, None],
                         x.shape)
    x = jnp.concatenate([x, d.astype(x.dtype)], axis=-1)
  return x


def apply_model(model, params, batch_stats, x, train: bool):
  """Prediction [B, Z, Y, X] (normalized units) for inputs [B, Z, Y, X, C]."""
  out, stats = trainer.model_apply(model, params, batch_stats, x, train=train)
  return x[..., 0] + out[..., 0], stats


def predict_tta(fn, x):
  """Self-ensemble over the y/x flips and, for square tiles, the y<->x transposes (the
  symmetries of the training data; never a z flip: depth breaks that symmetry).
  ``fn``: [B, Z, Y, X, C] -> [B, Z, Y, X]; 8 (or 4) calls of ``fn``
  (:func:`smlm_jax.nn.ensemble.mirror_ensemble`), averaging the residual noise."""
  return mirror_ensemble(fn, x, (2, 3), transpose=x.shape[2] == x.shape[3])


POOL_SALT = 0x9001


class FusionTask(Task):

  def __init__(self, config):
    super().__init__(config)
    self.pool = None
    self.sim = sim_lib.sim_config(config.sim)
    self.model = build_model(config.model, self.sim.shape)

  def init_variables(self, key):
    x = jnp.zeros((1,) + self.sim.shape + (in_channels(self.config.model),), jnp.float32)
    return self.model.init(key, x, train=False)

  def simulate_normalized(self, keys, clean_target: bool = False):
    """Keys [B] -> dict of normalized view / fused [B, Z, Y, X], depths, channel; with
    ``clean_target`` also ``target_clean``: the noiseless fused view (expected ADU),
    normalized. The same draws as :func:`simulator.simulate` for the same keys."""
    def one(k):
      k_clean, k_noise = jax.random.split(k)
      ex = sim_lib.simulate_clean(k_clean, self.sim)
      view, fused = sim_lib.add_noise(k_noise, ex["view_photons"], ex["fused_photons"],
                                      self.sim)
      out = {"view": view, "fused": fused, "depth_um": ex["depth_um"],
             "membrane": ex["cond"]["membrane"]}
      if clean_target:
        out["fused_clean"] = noise_lib.expected_adu(ex["fused_photons"], self.sim.camera)
      return out
    ex = jax.vmap(one)(keys)
    norm = jax.vmap(metrics.percentile_normalize_jax)
    out = {"view": norm(ex["view"]), "target": norm(ex["fused"]),
           "depth_um": ex["depth_um"], "membrane": ex["membrane"]}
    if clean_target:
      out["target_clean"] = norm(ex["fused_clean"])
    return out

  def make_batch(self, key, host_batch, shard):
    clean = bool(self.config.loss.get("clean_target", False))
    if host_batch is None:          # everything simulated in the step
      keys = shard(jax.vmap(lambda i: jax.random.fold_in(key, i))(
          jnp.arange(self.config.batch_size)))
      ex = self.simulate_normalized(keys, clean_target=clean)
      view, depth = ex["view"], ex["depth_um"]
      target = ex["target_clean"] if clean else ex["target"]
    else:                           # pool specimens: fresh noise, normalization here
      host_batch = shard(host_batch)
      view, fused = sim_lib.add_noise(jax.random.fold_in(key, 1),
                                      host_batch["view_photons"],
                                      host_batch["fused_photons"], self.sim)
      if clean:
        fused = noise_lib.expected_adu(host_batch["fused_photons"], self.sim.camera)
      norm = jax.vmap(metrics.percentile_normalize_jax)
      view, target, depth = norm(view), norm(fused), host_batch["depth_um"]
    return shard({"x": model_input(view, depth, self.config.model), "target": target})

  # ------------------------------------------------------------------ specimen pool
  def build_pool(self):
    """``config.pool_size`` noiseless simulated examples (numpy, on the host), from
    seed fold_in(key(seed), POOL_SALT): disjoint from the evaluation seeds."""
    from smlm_jax.core import cli
    n = int(self.config.pool_size)
    chunk = 8
    sc = self.sim
    make = jax.jit(lambda keys: jax.lax.map(lambda k: sim_lib.simulate_clean(k, sc), keys))
    base = jax.random.fold_in(jax.random.key(self.config.seed), POOL_SALT)
    parts = []
    with cli.progress(total=n, desc="specimen pool", unit="volume") as bar:
      for start in range(0, n, chunk):
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + chunk))
        ex = jax.device_get(make(keys))
        parts.append({"view_photons": ex["view_photons"], "fused_photons":
                      ex["fused_photons"], "depth_um": ex["depth_um"]})
        bar.update(chunk)
    return {k: np.concatenate([p[k] for p in parts])[:n].astype(np.float32)
            for k in parts[0]}

  def host_batch(self, step):
    """B pool examples with random y/x flips and y<->x transposes (None: no pool).
    The choice depends only on (seed, step), so a resumed run sees the same batches."""
    if int(self.config.get("pool_size", 0)) <= 0:
      return None
    if self.pool is None:
      self.pool = self.build_pool()
    rng = np.random.default_rng((int(self.config.seed), int(step), 0xF05E))
    b = int(self.config.batch_size)
    idx = rng.integers(0, self.pool["view_photons"].shape[0], b)
    flips = rng.integers(0, 2, (b, 3))
    out = {"view_photons": [], "fused_photons": []}
    for i, f in zip(idx, flips):
      for k in out:
        v = self.pool[k][i]
        if f[0]:
          v = v[:, ::-1]
        if f[1]:
          v = v[:, :, ::-1]
        if f[2] and v.shape[1] == v.shape[2]:
          v = v.transpose(0, 2, 1)
        out[k].append(v)
    batch = {k: np.ascontiguousarray(np.stack(v)) for k, v in out.items()}
    batch["depth_um"] = self.pool["depth_um"][idx]
    return batch

  def loss(self, params, batch_stats, batch, step, key):
    pred, stats = apply_model(self.model, params, batch_stats, batch["x"], train=True)
    target = batch["target"]
    lc = self.config.loss
    if lc.get("renormalize", False):    # score what the metric scores (see docstring)
      pred = jax.vmap(metrics.percentile_normalize_jax)(pred)
    l1 = losses.l1_loss(pred, target)
    ssim = metrics.ssim_batch(pred, target)
    meas = {"l1": l1, "ssim": jnp.mean(ssim)}
    if lc.kind == "n_ssim":
      ref = jax.lax.stop_gradient(metrics.ssim_batch(batch["x"][..., 0], target))
      nss = metrics.n_ssim(ssim, ref)
      loss = -jnp.mean(nss) + lc.l1_weight * l1
      meas["n_ssim"] = jnp.mean(nss)
    elif lc.kind == "ssim_l1":
      loss = lc.l1_weight * l1 + lc.ssim_weight * (1.0 - jnp.mean(ssim))
    else:
      raise ValueError(f"config.loss.kind must be 'ssim_l1' or 'n_ssim', got {lc.kind!r}")
    return loss, meas, stats

  # ------------------------------------------------------------------- evaluation
  def predict_fn(self, mesh=None):
    """Jitted (state, x [B, Z, Y, X, C]) -> prediction [B, Z, Y, X] (normalized units)."""
    data = NamedSharding(mesh, P("data")) if mesh is not None else None

    tta = bool(self.config.get("predict", {}).get("tta", False))

    def predict(state, x):
      if data is not None:
        x = jax.lax.with_sharding_constraint(x, data)
      f = lambda c: apply_model(self.model, state["params"], state["batch_stats"], c,
                                train=False)[0]
      return predict_tta(f, x) if tta else f(x)

    return jax.jit(predict)

  def simulate_set(self, num: int, seed: int, mesh):
    """A fixed, seeded set: normalized views, targets, depths, channel (numpy)."""
    data = NamedSharding(mesh, P("data"))
    bs = trainer.divisible_batch(self.config.eval_batch_size, mesh)

    @jax.jit
    def make(idx):
      keys = jax.lax.with_sharding_constraint(
          jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(idx), data)
      return self.simulate_normalized(keys)

    parts = [jax.device_get(make(jnp.arange(s, s + bs))) for s in range(0, num, bs)]
    return {k: np.concatenate([p[k] for p in parts])[:num] for k in parts[0]}

  def make_evaluator(self, mesh):
    data = self.simulate_set(self.config.eval_num_volumes, self.config.eval_seed, mesh)
    fn = self.predict_fn(mesh)
    model_cfg = self.config.model

    @jax.jit
    def scores(view, target, pred):
      pred_n = jax.vmap(metrics.percentile_normalize_jax)(pred)
      s_pred = metrics.ssim_batch(pred_n, target)
      s_in = metrics.ssim_batch(view, target)
      mse = jnp.mean((pred_n - target) ** 2, axis=(1, 2, 3))
      return s_pred, s_in, 10.0 * jnp.log10(1.0 / mse)

    def evaluate(state):
      x = np.asarray(model_input(data["view"], data["depth_um"], model_cfg))
      pred = trainer.batched(lambda c: fn(state, c), x, self.config.eval_batch_size, mesh)
      s_pred, s_in, ps = map(np.asarray, scores(data["view"], data["target"], pred))
      nss = metrics.n_ssim(s_pred, s_in)
      out = {"n_ssim": float(np.mean(nss)), "ssim": float(np.mean(s_pred)),
             "input_ssim": float(np.mean(s_in)), "psnr": float(np.mean(ps))}
      for name, sel in (("nuclei", ~data["membrane"]), ("membranes", data["membrane"])):
        if sel.any():
          out[name] = {"n_ssim": float(np.mean(nss[sel])), "count": int(sel.sum())}
      return out

    return evaluate

  def summary(self, metrics_, step):
    lines = [f"validation ({self.config.eval_num_volumes} simulated volumes, seed "
             f"{self.config.eval_seed}) after step {step}:"]
    lines += [f"  {k:<24} {v:.4f}" for k, v in self.flat_metrics(metrics_).items()]
    return "\n".join(lines)
