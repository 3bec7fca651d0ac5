"""Ca2+ release event segmentation as a trainer task: simulate, normalize, segment.

One step (inside the trainer's jitted step):
  per-movie keys fold_in(step_key, i), i < B, sharded on 'data'
  -> simulator.from_keys: resting cell + sparks / puffs / waves, exact Poisson + camera
     (ADU [B, T, H, W]), labels [B, T, H, W] in {0..4} (4 = ignore)
  -> model_input: ADU -> photons -> [photons / movie mean (times a per-movie gain drawn
     log-uniformly from config.input_scale: augmentation), dF/F0 estimate]
  -> model: logits [B, T, H, W, 4] (background, spark, wave, puff)
  -> loss (config.loss.name): weighted cross-entropy 'ce', softmax 'focal',
     Lovasz-softmax 'lovasz', or 'sum' = ce_weight CE + focal_weight focal +
     lovasz_weight Lovasz; the ignore label is excluded from every term.
Evaluation: a fixed, seeded validation set simulated once; probabilities ->
events (smlm_jax.sparks.events) -> IoMin matching -> per-class precision, recall, F1,
plus voxel IoU per class.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from smlm_jax.core import trainer
from smlm_jax.core.noise import Camera
from smlm_jax.core.task import Task
from smlm_jax.nn import losses
from smlm_jax.nn.ensemble import mirror_ensemble
from smlm_jax.sparks import events as events_lib
from smlm_jax.sparks import model as model_lib
from smlm_jax.sparks import simulator as sim_lib

LOSSES = ("ce", "focal", "lovasz", "sum")
INPUT_CHANNELS = 2
F0_QUANTILE = 0.3   # temporal quantile of the smoothed movie used as F0 (channel 1)


# Longer movies may take F0 from sliding windows (config.infer.f0_window_frames); 0, the
# default, is one F0 over the whole movie (the behaviour every saved run was scored with).
F0_WINDOW_FRAMES = 0


def f0_baseline(smooth, window: int | None = F0_WINDOW_FRAMES):
  """Per-pixel resting fluorescence [..., T or 1, H, W] of a smoothed movie [..., T, H, W]:
  its temporal ``F0_QUANTILE`` quantile. A movie of at most ``window`` frames (every
  training crop) gets one value per pixel over all its frames; a longer one gets the
  quantile over ``window`` frames centred every ``window // 4`` frames, linearly
  interpolated in time, so that F0 follows photobleaching (a whole-movie F0 of a
  bleaching movie reads its early frames as a lasting dF/F0 > 0: false puffs / waves).
  ``window`` None or 0: the whole movie."""
  T = smooth.shape[-3]
  if not window or T <= window:
    k = int(round(F0_QUANTILE * (T - 1)))
    return jnp.sort(smooth, axis=-3)[..., k:k + 1, :, :]
  step = max(window // 4, 1)
  starts = sorted({int(min(max(round(c - window / 2), 0), T - window))
                   for c in np.arange(step / 2.0, T, step)})
  k = int(round(F0_QUANTILE * (window - 1)))
  levels = jnp.stack([jnp.sort(smooth[..., lo:lo + window, :, :], axis=-3)[..., k, :, :]
                      for lo in starts], axis=-3)                     # [..., J, H, W]
  # Each level belongs to its window's centre; linear in between and, over the half
  # windows at the movie's ends, extrapolated from the nearest two levels.
  centres = np.asarray(starts, np.float64) + window / 2.0
  t = np.arange(T, dtype=np.float64)
  seg = np.clip(np.searchsorted(centres, t) - 1, 0, len(centres) - 2)
  frac = (t - centres[seg]) / (centres[seg + 1] - centres[seg])
  weights = np.zeros((T, len(centres)), np.float32)
  weights[np.arange(T), seg] = 1.0 - frac
  weights[np.arange(T), seg + 1] = frac
  return jnp.einsum("tj,...jhw->...thw", jnp.asarray(weights), levels)


def f0_window_frames(config) -> int:
  """``config.infer.f0_window_frames`` (runs saved without it: the module default)."""
  return int(config.get("infer", {}).get("f0_window_frames", F0_WINDOW_FRAMES) or 0)


def model_input(adu, camera: Camera, eps: float = 1e-3,
                f0_window_frames: int | None = F0_WINDOW_FRAMES):
  """ADU [..., T, H, W] -> network input [..., T, H, W, 2], computed over the whole
  movie (a long movie is normalized before it is cut into chunks). Both channels are
  ratios of photons, so they do not depend on the camera's gain or the dye's brightness
  (only the offset must be right):

  * channel 0: photons divided by the movie's mean photons (cell, striations, events);
  * channel 1: a dF/F0 estimate, photons / F0 - 1, with F0 the per-pixel temporal
    ``F0_QUANTILE`` quantile of the photons smoothed over 3 x 3 pixels (over sliding
    windows of ``f0_window_frames`` in movies longer than that: :func:`f0_baseline`),
    floored at a quarter of the movie's mean (out-of-cell pixels then stay near -1
    instead of exploding), clipped to [-1, 4]. A low quantile rather than the median:
    events only raise the fluorescence, and a puff or wave can last more than half of a
    short movie (the median would absorb it). The quantile of the smoothed noisy trace
    sits about 0.5 sigma below F0 (sigma = sqrt(F0 / 9) photons: -8% at F0 = 5, -3% at
    F0 = 40), a small offset the network learns.
  """
  photons = (adu - camera.offset_adu) / camera.adu_per_photon
  mean = jnp.maximum(jnp.mean(photons, axis=(-3, -2, -1), keepdims=True), eps)
  pad = [(0, 0)] * (photons.ndim - 2) + [(1, 1), (1, 1)]
  pp = jnp.pad(photons, pad, mode="edge")
  h, w = photons.shape[-2:]
  smooth = sum(pp[..., i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
  f0 = f0_baseline(smooth, f0_window_frames)
  dff = jnp.clip(photons / jnp.maximum(f0, 0.25 * mean) - 1.0, -1.0, 4.0)
  return jnp.stack([photons / mean, dff], axis=-1)


def segmentation_loss(logits, labels, loss_cfg, key=None):
  """(loss, measurements) of logits [..., 4] against labels [...] (4 = ignore)."""
  name = loss_cfg.name
  if name not in LOSSES:
    raise ValueError(f"config.loss.name must be one of {LOSSES}, got {name!r}")
  ignore = sim_lib.IGNORE
  terms = {}
  if name in ("ce", "sum"):
    terms["ce"] = losses.softmax_cross_entropy(
        logits, labels, class_weights=jnp.asarray(loss_cfg.class_weights, jnp.float32),
        ignore_label=ignore)
  if name == "focal" or (name == "sum" and loss_cfg.focal_weight > 0):
    terms["focal"] = losses.softmax_focal_loss(
        logits, labels, gamma=float(loss_cfg.focal_gamma), ignore_label=ignore)
  if name == "lovasz" or (name == "sum" and loss_cfg.lovasz_weight > 0):
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    n = int(loss_cfg.get("lovasz_voxels", 0) or 0)
    if 0 < n < flat_labels.shape[0]:
      if key is None:
        key = jax.random.key(0)
      idx = jax.random.randint(key, (n,), 0, flat_labels.shape[0])
      flat_logits, flat_labels = flat_logits[idx], flat_labels[idx]
    terms["lovasz"] = losses.lovasz_softmax(flat_logits, flat_labels, ignore_label=ignore)
  if name == "sum":
    weights = {"ce": loss_cfg.ce_weight, "focal": loss_cfg.focal_weight,
               "lovasz": loss_cfg.lovasz_weight}
    total = sum(float(weights[k]) * v for k, v in terms.items())
  else:
    total = terms[name]
  valid = labels != ignore
  correct = (jnp.argmax(logits, -1) == labels) & valid
  terms["voxel_accuracy"] = jnp.sum(correct) / jnp.maximum(jnp.sum(valid), 1)
  return total, terms


class SparksTask(Task):

  def __init__(self, config):
    super().__init__(config)
    self.simulator = sim_lib.simulator_from_config(config.sim)
    self.model = model_lib.build_model(config.model, sim_lib.NUM_CLASSES)
    if config.loss.name not in LOSSES:
      raise ValueError(f"config.loss.name must be one of {LOSSES}, got {config.loss.name!r}")
    events_lib.spec_from_config(config)          # bad event settings fail here, not at the end
    self.init_from = trainer.load_init_from(config.get("init_from", ""))

  @property
  def camera(self) -> Camera:
    return self.simulator.camera

  def init_variables(self, key):
    """Fresh variables, or with ``config.init_from`` (a run folder) that run's latest
    parameters (fine-tuning; the model must have the same shapes)."""
    x = jnp.zeros((1,) + self.simulator.geometry.shape + (INPUT_CHANNELS,), jnp.float32)
    if self.init_from is None:
      return self.model.init(key, x, train=False)
    return trainer.init_from_variables(
        self.init_from, lambda: self.model.init(key, x, train=False), self.config.init_from)

  def make_batch(self, key, host_batch, shard):
    keys = shard(sim_lib.movie_keys(key, jnp.arange(self.config.batch_size)))
    out = self.simulator.from_keys(keys)
    x = model_input(out["adu"], self.camera)
    lo, hi = (float(v) for v in self.config.get("input_scale", (1.0, 1.0)))
    if (lo, hi) != (1.0, 1.0):
      # Per-movie gain jitter of the normalized input: on long real movies the whole-movie
      # mean differs from a 64-frame crop's (bleaching, events, cell coverage).
      u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), ()))(keys)
      gain = jnp.exp(math.log(lo) + u * math.log(hi / lo))[:, None, None, None]
      x = x.at[..., 0].multiply(gain)
    return shard({"x": x, "labels": out["labels"]})

  def loss(self, params, batch_stats, batch, step, key):
    logits, stats = trainer.model_apply(self.model, params, batch_stats, batch["x"],
                                        train=True)
    total, terms = segmentation_loss(logits, batch["labels"], self.config.loss, key)
    return total, terms, stats

  # ------------------------------------------------------------------- evaluation
  def predict_fn(self, mesh, tta: bool | None = None):
    """Jitted (state, x [B, T, H, W, 2]) -> class probabilities [B, T, H, W, 4].

    ``tta`` (default ``config.infer.tta``; off for runs saved without it): average the
    probabilities of the 4 mirror images in y and x (each un-mirrored), a symmetry of
    the simulated cells (striations rotated by +-angle, edges at both sides) and of a
    confocal frame. Flips in space only, so chunked inference in time stays exact; 4x
    the network's cost."""
    data = NamedSharding(mesh, P("data"))
    if tta is None:
      tta = bool(self.config.get("infer", {}).get("tta", False))

    def predict(state, x):
      x = jax.lax.with_sharding_constraint(x, data)

      def probs(xi):
        logits, _ = trainer.model_apply(self.model, state["params"], state["batch_stats"],
                                        xi, train=False)
        return jax.nn.softmax(logits, axis=-1)

      return mirror_ensemble(probs, x, (2, 3)) if tta else probs(x)   # H, W axes

    return jax.jit(predict)

  def simulate_set(self, num_movies: int, seed: int, mesh):
    """A fixed, seeded set: dict of numpy arrays (x [N, T, H, W, 2], labels,
    instances [N, T, H, W], kind / active / amplitude [N, E])."""
    data = NamedSharding(mesh, P("data"))
    bs = trainer.divisible_batch(self.config.eval_batch_size, mesh)
    simulator, camera = self.simulator, self.camera
    window = f0_window_frames(self.config)

    @jax.jit
    def make(idx):
      keys = jax.lax.with_sharding_constraint(
          sim_lib.movie_keys(jax.random.key(seed), idx), data)
      out = simulator.from_keys(keys)
      return {"x": model_input(out["adu"], camera, f0_window_frames=window),
              "labels": out["labels"],
              "instances": out["instances"], "kind": out["kind"], "active": out["active"],
              "amplitude": out["amplitude"]}

    parts = [jax.device_get(make(jnp.arange(s, s + bs))) for s in range(0, num_movies, bs)]
    return {k: np.concatenate([p[k] for p in parts])[:num_movies] for k in parts[0]}

  def predict(self, state, x, mesh):
    """Class probabilities (numpy) of normalized movies x [N, T, H, W, 2]."""
    fn = self.predict_fn(mesh)
    return trainer.batched(lambda chunk: fn(state, chunk), x, self.config.eval_batch_size,
                           mesh)

  def score_set(self, probs, data, tune: bool = False) -> dict:
    """Event metrics of probabilities [N, T, H, W, 4] on a simulated set. ``tune``:
    first choose the confidence filter on this set (``events_lib.choose_filter``) and
    score with it (from the same extraction of each movie); the choice is returned
    under 'filter'."""
    scorer = events_lib.simulated_scorer(probs, data, events_lib.spec_from_config(self.config))
    if not tune:
      return scorer.metrics()
    chosen = events_lib.choose_filter(scorer.records,
                                      **events_lib.choice_options(self.config.events))
    metrics = scorer.metrics(chosen)
    metrics["filter"] = chosen
    return metrics

  def make_evaluator(self, mesh):
    """Validation on ``eval_num_movies`` movies of ``eval_seed``; with
    ``config.events.tune`` it also chooses the confidence filter there, which
    :meth:`export` saves for evaluate / predict (the test seed is never used)."""
    data = self.simulate_set(self.config.eval_num_movies, self.config.eval_seed, mesh)
    fn = self.predict_fn(mesh)
    tune = bool(self.config.events.get("tune", False))

    def evaluate(state):
      probs = trainer.batched(lambda chunk: fn(state, chunk), data["x"],
                              self.config.eval_batch_size, mesh)
      metrics = self.score_set(probs, data, tune=tune)
      if "filter" in metrics:
        self._last_filter = (metrics["filter"], int(jax.device_get(state["step"])))
      return metrics

    return evaluate

  _last_filter = None

  def export(self, state, workdir, step):
    """Writes the confidence filter chosen at the latest validation (FILTER_FILE)."""
    if self._last_filter is not None:
      chosen, at_step = self._last_filter
      events_lib.save_filter(workdir, chosen, at_step, self.config.eval_seed,
                             self.config.eval_num_movies)

  def flat_metrics(self, metrics):
    return events_lib.flat_metrics(metrics)

  def summary(self, metrics, step):
    title = f"validation ({self.config.eval_num_movies} movies) after step {step}"
    if "filter" in metrics:
      f = metrics["filter"]
      title += (f", confidence filter chosen on it: mean probability >= "
                f"{f['min_probability']}, volume >= {f['min_volume_um2_ms']} um^2 ms, "
                f"estimated peak dF/F0 >= {f['min_amplitude_dff']}, peak / noise >= "
                f"{f['min_snr']} (spark, wave, puff)")
    return events_lib.summary_table(metrics, title=title)
