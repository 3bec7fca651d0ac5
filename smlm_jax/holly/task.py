"""HOLLy as a trainer task: images simulated on device (or read from a folder), a pose
CNN, a learned point cloud, and a render-and-compare loss.

One training step (inside the trainer's jitted step; B = batch, M = learned points,
K = pose hypotheses, N = image size):
  host_batch(step): the curriculum's sigma for this step, [B] (and, for folder data,
      B images drawn from the folder with their native sigma)
  make_batch: per-image keys fold_in(step_key, i), sharded on 'data' ->
      simulated: structure sites -> pose, dropout, fluorophores, wobble (+ SMLM
      localizations, camera) -> unit-mass image [B, N, N] at sigma (render.py)
      folder: a random in-plane rotation (a pose change that keeps the structure's
      handedness) and a blur from the image's sigma up to the curriculum's
  loss: CNN(image / max) -> K rotations (6D -> Gram-Schmidt), translation ->
      render the learned cloud (params["points"], [M, 3]) at each hypothesis ->
      per-image loss, minimum over the K hypotheses, mean over the batch.

Loss (``config.loss.name``): ``l1`` is HOLLy's (sum of absolute differences of
unit-mass images, in [0, 2]); ``l2`` is the sum of squared differences scaled by
4 pi sigma^2 (so that it does not grow as sigma shrinks); ``multiscale`` (default)
adds to ``l2`` the same at the images blurred by ``config.loss.scales`` x sigma. For
unit-mass Gaussian splats, the L2 distance between two renders is a maximum mean
discrepancy with a Gaussian kernel of width sqrt(2) sigma between the two point sets,
whose gradient pulls every point towards the target's mass within a few sigma; the
wider scales keep that pull alive for points that are still far (the sigma
curriculum does the same over time, the scales do it within a step). L1's gradient
is a sign pattern, constant in magnitude, which is robust but less informative.

Sigma curriculum (``config.sigma``): stages (px) from wide to narrow, HOLLy's bunny
schedule 10 -> 1.41 px at 128 px (x 0.9 per stage), interpolated geometrically per
step over the first ``anneal_fraction`` of training, then held at the last value.

Evaluation (simulated data): the learned cloud aligned to the normalized truth
(similarity + reflection, :mod:`smlm_jax.holly.align`), its symmetric Chamfer
distance in units of the truth's bounding-box diagonal, and the angular pose error of
the CNN on a fixed, seeded set of images at the current sigma (after alignment; the
best hypothesis by render loss). Folder data: the loss on the folder's images.
``export`` writes DIR/shape.ply and DIR/shape.obj (latest) and
DIR/shapes/shape_<step>.ply/.obj at every checkpoint, in normalized units.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from smlm_jax.core import cli
from smlm_jax.core import trainer
from smlm_jax.core.task import Task
from smlm_jax.holly import align as align_lib
from smlm_jax.holly import diagnose
from smlm_jax.holly import images as images_lib
from smlm_jax.holly import models
from smlm_jax.holly import moments as moments_lib
from smlm_jax.holly import polish as polish_lib
from smlm_jax.holly import pose_search
from smlm_jax.holly.prng import fast_prng
from smlm_jax.holly import render
from smlm_jax.holly import rotations
from smlm_jax.holly import shapes
from smlm_jax.holly import symmetry as symmetry_lib


# ------------------------------------------------------------------------- curriculum
def sigma_schedule(config):
  """step -> sigma (px), numpy- and jax-compatible (geometric interpolation)."""
  stages = np.asarray(config.sigma.stages, np.float64)
  if stages.ndim != 1 or len(stages) < 1 or np.any(stages <= 0):
    raise ValueError("config.sigma.stages must be positive sigma values (px)")
  anneal = max(1.0, float(config.sigma.anneal_fraction) * int(config.num_train_steps))
  pos = np.linspace(0.0, anneal, len(stages)) if len(stages) > 1 else np.zeros(1)
  logs = np.log(stages)

  def sigma(step):
    if isinstance(step, (int, float, np.integer, np.floating)):
      return float(np.exp(np.interp(float(step), pos, logs)))
    return jnp.exp(jnp.interp(jnp.asarray(step, jnp.float32), pos, logs))
  return sigma


# ----------------------------------------------------------------------------- losses
def image_loss(pred, target, sigma_px, name: str, scales=(2.0, 4.0)):
  """Per-image loss between unit-mass images [..., N, N] (see the module doc)."""
  if name == "l1":
    return jnp.sum(jnp.abs(pred - target), axis=(-2, -1))
  sig = jnp.asarray(sigma_px)[..., None, None]
  l2 = 4 * math.pi * sig[..., 0, 0] ** 2 * jnp.sum((pred - target) ** 2, axis=(-2, -1))
  if name == "l2":
    return l2
  if name != "multiscale":
    raise ValueError(f"unknown config.loss.name {name!r}; use l1, l2 or multiscale")
  total = l2
  size = pred.shape[-1]
  for s in scales:
    extra = jnp.sqrt(s * s - 1.0) * jnp.asarray(sigma_px)
    blur = lambda im, e: render.gaussian_blur(im, e, size)
    diff = pred - target
    flat = diff.reshape((-1,) + diff.shape[-2:])
    e = jnp.broadcast_to(extra, diff.shape[:-2]).reshape(-1)
    bd = jax.vmap(blur)(flat, e).reshape(diff.shape)
    total = total + 4 * math.pi * (s * jnp.asarray(sigma_px)) ** 2 * jnp.sum(
        bd ** 2, axis=(-2, -1))
  return total / (1 + len(scales))


def rotate_image(image, angle):
  """In-plane rotation of [N, N] about its centre by angle (rad), bilinear, zero fill."""
  n = image.shape[-1]
  c = 0.5 * (n - 1)
  yy, xx = jnp.meshgrid(jnp.arange(n, dtype=jnp.float32), jnp.arange(n, dtype=jnp.float32),
                        indexing="ij")
  ca, sa = jnp.cos(angle), jnp.sin(angle)
  xs = ca * (xx - c) + sa * (yy - c) + c
  ys = -sa * (xx - c) + ca * (yy - c) + c
  return jax.scipy.ndimage.map_coordinates(image, [ys, xs], order=1, mode="constant")


# ------------------------------------------------------------------------------ task
class HollyTask(Task):

  def __init__(self, config):
    super().__init__(config)
    self._t0 = time.time()
    data = config.data
    self.image_set = None
    self.sites = None
    for name in ("obj", "images"):      # absolute, so evaluate works from anywhere
      if data.get(name, ""):
        data[name] = os.path.abspath(data[name])
    if data.get("images", ""):
      channel = data.get("channel", None)
      if channel is not None and int(channel) < 0:
        raise ValueError(f"--config.data.channel must be >= 0, got {channel}")
      self.image_set = images_lib.load_folder(data.images, float(data.get("image_sigma", 0)),
                                              channel=channel)
      self.image_set = images_lib.bin_to(self.image_set, int(data.size))
      if int(data.size) != self.image_set.size:
        print(f"holly: using the folder's image size {self.image_set.size} px "
              f"(config.data.size {int(data.size)} does not divide it)")
      self.size = self.image_set.size
    else:
      if not data.get("obj", ""):
        raise ValueError("give --config.data.obj=FILE (.obj/.ply/.stl/.off to simulate "
                         "images from) or --config.data.images=DIR (FITS/TIFF images)")
      try:
        every = shapes.load_normalized(data.obj)
      except shapes.ShapeError as e:
        raise ValueError(str(e)) from None
      total = len(every)
      self.sites = shapes.subsample(every, int(data.get("max_sites", 0)))
      if total > len(self.sites):
        print(f"holly: {data.obj} has {total} vertices; simulating from a fixed random "
              f"{len(self.sites)} of them (config.data.max_sites; 0 = all)")
      self.size = int(data.size)
    self.fov = float(data.fov)
    self.sim = render.SimParams.from_config(data, self.size)
    self.sigma = sigma_schedule(config)
    m = config.model
    self.model = models.PoseNet(widths=tuple(m.widths), dense=int(m.dense),
                                hypotheses=int(m.hypotheses), pool=int(m.pool),
                                max_shift=max(float(data.max_shift), 1e-3),
                                predict_sigma=bool(m.predict_sigma))
    if int(config.num_points) < 1:
      raise ValueError("config.num_points must be >= 1")
    if config.convergence.get("one_view_depth", "flatten") not in ("flatten", "keep"):
      raise ValueError(f"config.convergence.one_view_depth="
                       f"{config.convergence.one_view_depth!r}: use flatten or keep")
    if float(config.loss.get("moments_weight", 0.0)) > 0:
      self.moment_target()           # eagerly: the loss uses it while being traced

  def symmetry(self):
    """The truth's symmetry (config.data.symmetry: "auto" = declared OBJ.symmetry.json
    or detected, "none" = the identity only, or a JSON file); pose errors are modulo it."""
    if getattr(self, "_symmetry", None) is None:
      how = str(self.config.data.get("symmetry", "auto"))
      if self.sites is None or how == "none":
        self._symmetry = symmetry_lib.trivial()
      elif how == "auto":
        self._symmetry = symmetry_lib.for_shape(self.config.data.obj, self.sites)
      else:
        self._symmetry = symmetry_lib.load(how)
    return self._symmetry

  # --------------------------------------------------------------------- variables
  @fast_prng
  def init_variables(self, key):
    k_net, k_pts = jax.random.split(key)
    x = jnp.zeros((2, self.size, self.size), jnp.float32)
    net = self.model.init(k_net, x, train=False)["params"]
    m = int(self.config.num_points)
    k_dir, k_rad = jax.random.split(k_pts)
    d = jax.random.normal(k_dir, (m, 3))
    d = d / jnp.linalg.norm(d, axis=1, keepdims=True)
    how = str(self.config.get("init_shape", "ball"))
    if how == "ball":        # uniform in the ball of init_radius
      r = float(self.config.init_radius) * jax.random.uniform(k_rad, (m, 1)) ** (1 / 3)
    elif how == "sphere":    # uniform on its surface (a closed hollow start)
      r = jnp.full((m, 1), float(self.config.init_radius))
    else:
      raise ValueError(f"config.init_shape={how!r}: use ball or sphere")
    return {"params": {"net": net, "points": d * r}}

  def make_optimizer(self):
    """AdamW on the CNN (trainer default) and Adam on the points, each with its own
    learning rate, warm-up and cosine decay."""
    net_tx, schedule = trainer.default_optimizer(self.config)
    pcfg = self.config.copy_and_resolve_references()
    pcfg.learning_rate = float(self.config.points_learning_rate)
    pcfg.weight_decay = 0.0
    pcfg.accumulate_steps = 1
    pts_tx, _ = trainer.default_optimizer(pcfg)
    tx = optax.multi_transform({"net": net_tx, "points": pts_tx},
                               {"net": "net", "points": "points"})
    accumulate = int(self.config.get("accumulate_steps", 1))
    if accumulate > 1:
      tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
    return tx, schedule

  # ------------------------------------------------------------------------ batches
  def host_batch(self, step):
    b = int(self.config.batch_size)
    sigma = self.sigma(step)
    out = {"sigma": np.full((b,), sigma, np.float32)}
    if self.image_set is not None:
      rng = np.random.default_rng([int(self.config.seed), int(step)])
      g = self.image_set.group_for(sigma)
      imgs = self.image_set.images[g]
      out["image"] = imgs[rng.integers(0, len(imgs), size=b)]
      out["native_sigma"] = np.full((b,), self.image_set.sigmas[g], np.float32)
    return out

  @fast_prng
  def make_batch(self, key, host_batch, shard):
    b = int(self.config.batch_size)
    keys = shard(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b)))
    sigma = host_batch["sigma"]
    if self.image_set is None:
      sites = jnp.asarray(self.sites)
      image, R, t = jax.vmap(lambda k, s: render.simulate_image(k, sites, s, self.sim))(
          keys, sigma)
      return shard({"image": image, "sigma": sigma, "R": R, "t": t})
    native = host_batch["native_sigma"]
    image = host_batch["image"]
    if bool(self.config.data.augment_rotation):
      angle = jax.vmap(lambda k: jax.random.uniform(k, (), maxval=2 * math.pi))(keys)
      image = jax.vmap(rotate_image)(image, angle)
    extra = jnp.sqrt(jnp.maximum(sigma ** 2 - native ** 2, 0.0))
    image = jax.vmap(lambda im, e: jnp.where(
        e > 1e-3, render.gaussian_blur(im, e, self.size), im))(image, extra)
    image = image / jnp.maximum(jnp.sum(image, axis=(-2, -1), keepdims=True), 1e-12)
    return shard({"image": image, "sigma": jnp.maximum(sigma, native)})

  # --------------------------------------------------------------------------- loss
  def predict(self, net_params, image):
    """CNN outputs for unit-mass images [B, N, N] (see models.PoseNet)."""
    x = image / jnp.maximum(jnp.max(image, axis=(-2, -1), keepdims=True), 1e-12)
    return self.model.apply({"params": net_params}, x, train=False)

  def render_losses(self, points, R, t, sigma, image, name=None):
    """Per-image, per-hypothesis losses [B, H] of the cloud rendered at R [B, H, 3, 3],
    t [B, H, 2] or [B, 2], sigma [B] against the images [B, N, N] (``name``: the loss,
    default config.loss.name)."""
    h = R.shape[1]
    t = jnp.broadcast_to(t[:, None] if t.ndim == 2 else t, R.shape[:2] + (2,))

    def one(Rk, tk, s):
      return jax.vmap(lambda r, tt: render.render(points, r, tt, s, self.size, self.fov))(
          Rk, tk)
    pred = jax.vmap(one)(R, t, sigma)                             # [B, H, N, N]
    target = jnp.broadcast_to(image[:, None], pred.shape)
    lcfg = self.config.loss
    return image_loss(pred, target, jnp.broadcast_to(sigma[:, None], (sigma.shape[0], h)),
                      name or lcfg.name, tuple(lcfg.scales))

  def search(self, points, image, sigma, key):
    """The pose search of config.search (pose_search.search): (R [B, 3, 3], score [B])."""
    c = self.config.search
    return pose_search.search(points, image, sigma, key, int(c.num_rotations), int(c.factor),
                              float(c.sigma_coarse_px), self.fov, str(c.get("grid", "random")),
                              int(c.get("top", 1)), int(c.get("local", 0)),
                              int(c.get("levels", 0)))

  def hypothesis_losses(self, params, batch, key=None):
    """(per-image, per-hypothesis losses [B, H], rotations [B, H, 3, 3], CNN outputs).

    H = K CNN hypotheses (at the CNN's translation), plus the pose search's best
    rotation when ``key`` is given and ``config.search.num_rotations > 0`` (last)."""
    out = self.predict(params["net"], batch["image"])
    R = rotations.matrix_from_6d(out["r6"])                       # [B, K, 3, 3]
    sigma = batch["sigma"]
    if "log_sigma_scale" in out:
      sigma = sigma * jnp.exp(out["log_sigma_scale"])
    scfg = self.config.search
    if key is not None and int(scfg.num_rotations) > 0:
      R_s, _ = self.search(params["points"], batch["image"], batch["sigma"], key)
      R = jnp.concatenate([R, jax.lax.stop_gradient(R_s)[:, None]], axis=1)
    return self.render_losses(params["points"], R, out["t"], sigma, batch["image"]), R, out

  def refined_poses(self, params, batch, key):
    """Search + Gauss-Newton: (R [B, 3, 3], t [B, 2], index of the winning candidate
    [B] (K = the search's), CNN outputs, CNN rotations [B, K, 3, 3]); no gradient flows
    into the poses."""
    sg = jax.lax.stop_gradient
    out = self.predict(params["net"], batch["image"])
    R_cnn = rotations.matrix_from_6d(out["r6"])
    pts = sg(params["points"])
    image, sigma = batch["image"], batch["sigma"]
    R = sg(R_cnn)
    scfg = self.config.search
    if int(scfg.num_rotations) > 0:
      R_s, _ = self.search(pts, image, sigma, key)
      R = jnp.concatenate([R, R_s[:, None]], axis=1)
    t = jax.vmap(lambda r, im: pose_search.centroid_translation(pts, r, im[None], self.size,
                                                                self.fov))(R, image)
    losses = self.render_losses(pts, R, t, sigma, image, name="l2")
    margin = float(scfg.get("cnn_margin", 0.0))
    if margin > 0 and int(scfg.num_rotations) > 0:
      # the search's pose replaces the CNN's only when it is better by the margin: the
      # CNN maps similar images to similar poses, so among near-equal symmetric
      # alternatives it keeps choosing the same one, which the search does not
      losses = losses.at[:, -1].multiply(1.0 + margin)
    i = jnp.argmin(losses, axis=1)
    R0 = jnp.take_along_axis(R, i[:, None, None, None], axis=1)[:, 0]
    t0 = jnp.take_along_axis(t, i[:, None, None], axis=1)[:, 0]
    extra = tuple(float(e) for e in self.config.refine.extra_sigmas_px)
    R_ref, t_ref = jax.vmap(lambda im, r, tt, s: pose_search.refine(
        pts, im, r, tt, s, self.size, self.fov, extra, float(self.config.refine.damping)))(
            image, R0, t0, sigma)
    return sg(R_ref), sg(t_ref), i, out, R_cnn

  def moment_target(self):
    """(e1, e2, e3) of the structure from the images alone (moments.py): 2048 simulated
    images at the last curriculum sigma, or every folder image at its own sigma."""
    if getattr(self, "_moment_target", None) is None:
      if self.image_set is not None:
        imgs = np.concatenate(self.image_set.images)
        sig = np.concatenate([np.full(len(a), s) for a, s in
                              zip(self.image_set.images, self.image_set.sigmas)])
      else:
        b = self.eval_batch(float(self.config.sigma.stages[-1]), 2048,
                            int(self.config.seed) + 7919)
        imgs, sig = b["image"], b["sigma"]
      tr, det = moments_lib.image_moments(imgs, sig, self.size, self.fov)
      self._moment_target = moments_lib.invariants_from_images(tr, det)
    return self._moment_target

  def _with_moments(self, loss, meas, points):
    w = float(self.config.loss.get("moments_weight", 0.0))
    if w <= 0:
      return loss, meas
    m = moments_lib.moment_loss(points, self.moment_target())
    return loss + w * m, {**meas, "moment_loss": m}

  @fast_prng
  def loss(self, params, batch_stats, batch, step, key):
    if len(self.config.refine.extra_sigmas_px) == 0:
      loss, meas = self._holly_loss(params, batch, key)
      loss, meas = self._with_moments(loss, meas, params["points"])
      return loss, meas, batch_stats
    k = int(self.config.model.hypotheses)
    R_ref, t_ref, i, out, R_cnn = self.refined_poses(params, batch, key)
    img = jax.vmap(lambda r, t, s: render.render(params["points"], r, t, s, self.size,
                                                 self.fov))(R_ref, t_ref, batch["sigma"])
    lcfg = self.config.loss
    shape_loss = jnp.mean(image_loss(img, batch["image"], batch["sigma"], lcfg.name,
                                     tuple(lcfg.scales)))
    # the CNN learns the refined poses: its closest hypothesis (squared Frobenius
    # distance = 4 (1 - cos angle)) and the translation (polish.pose_loss)
    pose_loss, closest = polish_lib.pose_loss(R_cnn, out["t"], R_ref, t_ref,
                                              float(lcfg.hypothesis_weight),
                                              float(self.config.data.max_shift))
    loss = shape_loss + float(lcfg.distill_weight) * pose_loss
    angle = polish_lib.frobenius_to_deg(closest)
    meas = {"image_loss": shape_loss, "sigma_px": jnp.mean(batch["sigma"]),
            "cnn_to_refined_deg": jnp.mean(angle), "search_wins": jnp.mean(i >= k)}
    loss, meas = self._with_moments(loss, meas, params["points"])
    return loss, meas, batch_stats

  def _holly_loss(self, params, batch, key):
    """HOLLy's training (no refinement): render loss at the CNN's hypotheses (+ the
    search's best), the minimum per image; the CNN is pulled towards the search's
    pose where that explains the image better."""
    losses, R, _ = self.hypothesis_losses(params, batch, key)
    k = int(self.config.model.hypotheses)
    best = jnp.min(losses, axis=1)
    loss = jnp.mean(best)
    meas = {"image_loss": loss, "sigma_px": jnp.mean(batch["sigma"])}
    cnn = losses[:, :k]
    i_cnn = jnp.argmin(cnn, axis=1)
    if losses.shape[1] > k:
      won = (losses[:, k] < jnp.min(cnn, axis=1)).astype(jnp.float32)
      R_cnn = jnp.take_along_axis(R, i_cnn[:, None, None, None], axis=1)[:, 0]
      frob = jnp.sum((R_cnn - R[:, k]) ** 2, axis=(-2, -1))
      loss = loss + float(self.config.loss.distill_weight) * jnp.mean(won * frob)
      meas["search_wins"] = jnp.mean(won)
      meas["cnn_loss"] = jnp.mean(jnp.min(cnn, axis=1))
    if k > 1:
      loss = loss + float(self.config.loss.hypothesis_weight) * jnp.mean(cnn)
      meas["hypothesis_entropy"] = _entropy(jnp.bincount(i_cnn, length=k) / i_cnn.shape[0])
    return loss, meas

  # --------------------------------------------------------------------- evaluation
  @fast_prng
  def eval_batch(self, sigma_px: float, num: int, seed: int):
    """A seeded set of simulated images at sigma (host numpy): image, R, t."""
    if getattr(self, "_sim_fn", None) is None:
      sites = jnp.asarray(self.sites)
      self._sim_fn = jax.jit(fast_prng(lambda seed_, idx, sig_: jax.vmap(
          lambda i, s: render.simulate_image(jax.random.fold_in(jax.random.key(seed_), i),
                                             sites, s, self.sim))(idx, sig_)))
    sig = jnp.full((num,), sigma_px, jnp.float32)
    image, R, t = self._sim_fn(seed, jnp.arange(num), sig)
    return {"image": np.asarray(image), "sigma": np.asarray(sig), "R": np.asarray(R),
            "t": np.asarray(t)}

  def best_poses_fn(self):
    """jitted (params, batch) -> (best rotation [B, 3, 3], its loss [B], t [B, 2])."""
    def fn(params, batch):
      losses, R, out = self.hypothesis_losses(params, batch)
      i = jnp.argmin(losses, axis=1)
      take = lambda a: jnp.take_along_axis(a, i[:, None], axis=1)[:, 0]
      return (jnp.take_along_axis(R, i[:, None, None, None], axis=1)[:, 0], take(losses),
              out["t"])
    return jax.jit(fn)

  def refined_poses_fn(self):
    """jitted (params, batch, seed) -> refined rotations [B, 3, 3] (search + GN) or the
    CNN's best when refinement is off."""
    if len(self.config.refine.extra_sigmas_px) == 0:
      best = self.best_poses_fn()
      return lambda params, batch, seed: best(params, batch)[0]

    @jax.jit
    @fast_prng
    def fn(params, batch, seed):
      return self.refined_poses(params, batch, jax.random.key(seed))[0]
    return fn

  def make_evaluator(self, mesh):
    cfg = self.config
    fn = self.best_poses_fn()
    refined_fn = self.refined_poses_fn()
    bs = int(cfg.eval_batch_size)

    def poses(params, batch):
      return trainer.batched(lambda chunk: fn(params, chunk), batch, bs, mesh)

    if self.image_set is not None:
      imgs, sig = self.folder_images()

      def evaluate_folder(state):
        params = jax.device_get(state["params"])
        _, loss, _ = poses(params, {"image": imgs, "sigma": sig})
        self._diagnose(state, params, imgs, sig,
                       particles=self.image_set.particles)
        return {"image_loss": float(np.mean(loss)), "seconds": self.elapsed()}
      return evaluate_folder

    def evaluate(state):
      params = jax.device_get(state["params"])
      step = int(state["step"])
      sigma = self.sigma(step)
      batch = self.eval_batch(sigma, int(cfg.eval_num_images), int(cfg.eval_seed))
      R_best, loss, _ = poses(params, {"image": batch["image"], "sigma": batch["sigma"]})
      pts = np.asarray(params["points"])
      al = align_lib.align(pts, self.sites, num_starts=int(cfg.eval_align_starts),
                           screen=int(cfg.get("eval_align_screen", 2048)))
      sym = self.symmetry()
      err = symmetry_lib.pose_errors_deg(R_best, batch["R"], al, sym)
      extra = {}
      if bool(cfg.get("eval_refined_poses", True)):
        R_ref = trainer.batched(lambda c: refined_fn(params, c, int(cfg.eval_seed)),
                                {"image": batch["image"], "sigma": batch["sigma"]}, bs, mesh)
        err_ref = symmetry_lib.pose_errors_deg(R_ref, batch["R"], al, sym)
        extra["refined_pose_error_deg"] = {"median": float(np.median(err_ref)),
                                           "frac_below_2": float(np.mean(err_ref < 2))}
      self._diagnose(state, params, batch["image"], batch["sigma"])
      return {"chamfer": al.chamfer_rel, "pose_error_deg": {
                  "median": float(np.median(err)), "mean": float(np.mean(err)),
                  "frac_below_10": float(np.mean(err < 10))}, **extra,
              "image_loss": float(np.mean(loss)), "sigma_px": sigma,
              "seconds": self.elapsed()}
    return evaluate

  def _diagnose(self, state, params, images, sigma, particles=None):
    """At the last step: the convergence report (diagnose.py), kept for export
    (``particles``: distinct structures among the images, for folder data)."""
    step = int(state["step"])
    if step >= int(self.config.num_train_steps):
      self._convergence = (step, diagnose.report(self, params, images, sigma,
                                                 int(self.config.eval_seed),
                                                 particles=particles))

  _convergence = None

  def finish_training(self, state, mesh):
    """The pose-CNN polish (polish.py, ``config.polish.steps`` > 0): only for runs on
    simulated images whose poses converged (the report of diagnose.py on the
    evaluation images, before the polish; a wrong cloud is not polished)."""
    cfg = self.config
    p = cfg.get("polish", None)
    steps = int(p.get("steps", 0)) if p is not None else 0
    if steps <= 0:
      return state
    if self.image_set is not None:
      print("holly: pose-CNN polish skipped: folder images (the distribution of their "
            "views is not known)", flush=True)
      return state
    params = jax.device_get(trainer.inference_state(state)["params"])
    batch = self.eval_batch(self.sigma(int(state["step"])), int(cfg.eval_num_images),
                            int(cfg.eval_seed))
    rep = diagnose.report(self, params, batch["image"], batch["sigma"], int(cfg.eval_seed))
    if not rep["converged"]:
      print("holly: pose-CNN polish skipped: the poses did not converge (report below)",
            flush=True)
      return state
    net, info = polish_lib.polish(self, params["net"], params["points"], mesh, steps,
                                  float(p.learning_rate), int(p.batch_size), int(cfg.seed))
    print(f"holly: pose CNN polished on its learned cloud: {steps} steps of "
          f"{int(p.batch_size)} images, {info['seconds']:.0f} s (cloud unchanged)",
          flush=True)
    out = dict(state)
    out["params"] = {**state["params"], "net": net}
    if "ema" in state:
      out["ema"] = {**state["ema"], "net": net}
    return out

  def folder_images(self):
    """Every image of the folder data [B, N, N] and its native sigma [B] (px)."""
    imgs = np.concatenate(self.image_set.images)
    sig = np.concatenate([np.full(len(a), s, np.float32)
                          for a, s in zip(self.image_set.images, self.image_set.sigmas)])
    return imgs, sig

  def restart_score(self, state, mesh):
    """The median image residual of the convergence report (diagnose.py: how badly the
    cloud at its refined poses explains the images, no ground truth) at the current
    sigma, on the evaluation images: lower is better; picks among ``config.restarts``."""
    params = jax.device_get(state["params"])
    if self.image_set is not None:
      imgs, sig = self.folder_images()
    else:
      batch = self.eval_batch(self.sigma(int(state["step"])),
                              int(self.config.eval_num_images), int(self.config.eval_seed))
      imgs, sig = batch["image"], batch["sigma"]
    rep = diagnose.report(self, params, imgs, sig, int(self.config.eval_seed))
    return float(rep["residual"])

  def elapsed(self) -> float:
    """Training wall time (s) of this run, added to that of earlier (resumed) sessions."""
    return self._previous_seconds + time.time() - self._t0

  _previous_seconds = 0.0

  def summary(self, metrics, step):
    flat = self.flat_metrics(metrics)
    lines = [f"holly after step {step}:"]
    lines += [f"  {k:<28} {v:.5g}" for k, v in flat.items()]
    return "\n".join(lines)

  # ------------------------------------------------------------------------- export
  def export(self, state, workdir, step):
    pts = np.asarray(jax.device_get(state["params"]["points"]))
    px = render.pixels_per_unit(self.size, self.fov)
    comment = (f"learned point cloud, step {step}: renderer units (1 unit = {px:.4g} px of "
               f"the {self.size}x{self.size} training images; the image spans "
               f"[-{self.fov:g}, {self.fov:g}])")

    def write(stem, x, text):                     # STEM.ply and STEM.obj
      shapes.write_ply(stem + ".ply", x, comment=text)
      shapes.write_obj(stem + ".obj", x, comment=text)

    final = self._convergence is not None and self._convergence[0] == int(step)
    axis = (diagnose.undetermined_depth_axis(self._convergence[1])
            if final and self.config.convergence.get("one_view_depth", "flatten") == "flatten"
            else None)
    if axis is not None:
      # Every image was explained from one viewing direction: the images do not
      # determine the depth along it, so the cloud written is flat along it (what the
      # images determine); the cloud as trained, with its arbitrary depth, beside it.
      write(os.path.join(workdir, "shape_with_depth"), pts, comment)
      write(os.path.join(workdir, "shape"), diagnose.flatten_along(pts, axis),
            comment + "; flattened along the one viewing axis (depth not determined)")
    else:
      write(os.path.join(workdir, "shape"), pts, comment)
      for stale in ("shape_with_depth.ply", "shape_with_depth.obj"):
        if os.path.exists(os.path.join(workdir, stale)):
          os.remove(os.path.join(workdir, stale))
    write(os.path.join(workdir, "shapes", f"shape_{step:06d}"), pts, comment)
    path = os.path.join(workdir, "train_seconds.json")
    log = {}
    if os.path.exists(path):
      try:
        log = {int(k): float(v) for k, v in json.load(open(path)).items()}
      except (ValueError, AttributeError):
        log = {}
    if not self._exported:
      # A resumed session continues the clock of the checkpoint it resumed from.
      ckpts = trainer.checkpoint_dir(workdir)
      earlier = [s for s in log if s < int(step)
                 and os.path.isdir(os.path.join(ckpts, str(s)))]
      if earlier:
        self._previous_seconds = log[max(earlier)]
      elif os.path.exists(os.path.join(workdir, trainer.RESTARTS_FILE)):
        # continuing the best of several starts: the clock includes every start's
        with open(os.path.join(workdir, trainer.RESTARTS_FILE)) as f:
          self._previous_seconds = float(json.load(f).get("seconds", 0.0))
      log = {s: v for s, v in log.items() if s < int(step)}
      self._exported = True
    log[int(step)] = round(self.elapsed(), 2)
    if self._convergence is not None and self._convergence[0] == int(step):
      diagnose.write(workdir, self._convergence[1], step)
      print(diagnose.message(self._convergence[1]), flush=True)
    cli.atomic_write_text(path, json.dumps({str(k): v for k, v in sorted(log.items())},
                                           indent=1))

  _exported = False


def _entropy(p):
  p = jnp.clip(p, 1e-12, 1.0)
  return -jnp.sum(p * jnp.log(p))
