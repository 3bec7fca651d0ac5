"""Event detection as a trainer task: U-Net on n-frame windows, soft focal loss.

One step (inside the trainer's jitted step; ``B`` = batch, ``n`` = frames per window,
``c`` = ``config.crop_px``):

  source 'sim'    per-example keys fold_in(step_key, i), sharded on 'data'
                  -> :func:`.simulate.simulate`: frames [B, n, c, c] ADU, event map [B, c, c]
  source 'db'     host_batch: random windows of the training crops of the database
                  (numpy [B, n, S, S], S >= c) -> :func:`.augment.augment` on device
  source 'mixed'  both, each example real with probability ``data.real_fraction``
  -> :func:`.data.normalize` -> [B, c, c, n] (frames as channels) -> UNet (2D) -> logits
  -> loss: soft focal (alpha, gamma), 'bce', 'dice' or 'focal+dice' on the event map.

Evaluation: a fixed simulated set (``eval.sim_seed``, never a training key), and for
'db'/'mixed' every frame of the validation crops; event- and pixel-level sweeps
(:mod:`.metrics`). :meth:`export` writes ``threshold.json`` (the F-beta-optimal
threshold, on the real validation crops when there are any, else on the simulated set;
``predict`` uses it), ``pr_curve.png`` and ``examples.png`` into the workdir.
``config.data.calibration=FILE`` (from :mod:`.calibrate`) overrides ``config.sim``
with the fitted simulator parameters, for training and the simulated evaluation set.
``config.init_from=WORKDIR`` starts from another run's parameters (e.g. pre-trained on
simulations, fine-tuned on real crops); the architectures must match.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from smlm_jax.core import cli
from smlm_jax.core import trainer
from smlm_jax.core.task import Task
from smlm_jax.events import augment as augment_lib
from smlm_jax.events import data as data_lib
from smlm_jax.events import metrics as metrics_lib
from smlm_jax.events import simulate as sim_lib
from smlm_jax.nn import UNet, losses
from smlm_jax.nn.ensemble import mirror_ensemble

SOURCES = ("sim", "db", "mixed")
LOSSES = ("focal", "bce", "dice", "focal+dice")
THRESHOLD_FILE = "threshold.json"


def build_model(model_config) -> UNet:
  prior = float(model_config.prior)
  return UNet(out_channels=1, spatial_dims=2, depth=int(model_config.depth),
              base_width=int(model_config.base_width),
              first_kernel_size=int(model_config.first_kernel_size),
              kernel_size=int(model_config.kernel_size), norm=model_config.norm,
              upsample=model_config.upsample, dropout=float(model_config.dropout),
              out_bias_init=-math.log((1.0 - prior) / prior))


def pixel_loss(logits, target, loss_config):
  """Scalar loss of logits vs. the soft event map (same shape)."""
  name = loss_config.name
  if name not in LOSSES:
    raise ValueError(f"config.loss.name={name!r}; choose one of {LOSSES}")
  total = 0.0
  if name in ("focal", "focal+dice"):
    total = total + losses.soft_focal_loss(logits, target, alpha=float(loss_config.alpha),
                                           gamma=float(loss_config.gamma))
  if name == "bce":
    total = total + losses.binary_cross_entropy(logits, target)
  if name in ("dice", "focal+dice"):
    total = total + float(loss_config.get("dice_weight", 1.0)) * losses.dice_loss(
        logits, target, axis=tuple(range(1, logits.ndim)))
  return total


def make_predict_fn(model, mesh, tta: bool = False):
  """Jitted (params, batch_stats, frames [B, n, H, W] in camera units) -> event
  probabilities [B, H, W]; the batch is sharded on 'data'. ``tta``: the mean of the
  probabilities over the 8 rotations / reflections of the frames (the dihedral group
  training augments with), each turned back: 8x the compute, and a map that no longer
  depends on how the camera was turned."""
  data = NamedSharding(mesh, P("data"))

  def once(params, batch_stats, x):
    logits, _ = trainer.model_apply(model, params, batch_stats, x, train=False)
    return jax.nn.sigmoid(logits[..., 0])

  def predict(params, batch_stats, frames):
    frames = jax.lax.with_sharding_constraint(frames, data)
    x = jnp.moveaxis(data_lib.normalize(frames), 1, -1)        # [B, H, W, n]
    if not tta:
      return once(params, batch_stats, x)
    # The 4 flips x transpose of (H, W): the 8 elements of the dihedral group.
    return mirror_ensemble(lambda h: once(params, batch_stats, h), x, (1, 2), transpose=True)

  return jax.jit(predict)


class EventsTask(Task):

  def __init__(self, config):
    super().__init__(config)
    d = config.data
    if d.source not in SOURCES:
      raise ValueError(f"config.data.source={d.source!r}; choose one of {SOURCES}")
    if config.loss.name not in LOSSES:
      raise ValueError(f"config.loss.name={config.loss.name!r}; choose one of {LOSSES}")
    self.n = int(d.num_frames)
    self.crop_px = int(config.crop_px)
    if self.n < 1 or self.crop_px < 8:
      raise ValueError(f"config.data.num_frames must be >= 1 and config.crop_px >= 8, got "
                       f"{self.n} and {self.crop_px}")
    sim = config.sim.to_dict()
    if d.get("calibration"):                 # python -m smlm_jax.events.calibrate
      from smlm_jax.events import calibrate as calibrate_lib
      sim = calibrate_lib.apply(config.sim, d.calibration)
    self.sim = sim_lib.SimParams.from_config({**sim, "size_px": self.crop_px})
    self.aug = augment_lib.AugmentParams.from_config(config.augment, self.crop_px)
    self.model = build_model(config.model)
    self.train_crops, self.val_crops, self.sampler = [], [], None
    if d.source != "sim":
      train, val = data_lib.split_records(d)
      self.train_crops = [data_lib.load_crop(r) for r in train]
      self.val_crops = [data_lib.load_crop(r) for r in val]
      self.sampler = data_lib.HostSampler(self.train_crops, self.n, self.crop_px,
                                          int(config.seed), float(d.positive_fraction),
                                          float(d.get("negative_fraction", 0.0)))
    self.init_from = trainer.load_init_from(config.get("init_from", ""))
    self._last_eval = None

  # ---------------------------------------------------------------------- training
  def init_variables(self, key):
    x = jnp.zeros((1, self.crop_px, self.crop_px, self.n), jnp.float32)
    if self.init_from is not None:           # another run's variables, shapes checked
      return trainer.init_from_variables(
          self.init_from, lambda: self.model.init(jax.random.key(0), x, train=False),
          self.config.init_from,
          "config.model (depth, widths, kernel sizes, norm, num_frames)")
    # The initializers draw from an 'rbg' key made from the given key's bits: with
    # threefry keys XLA:CPU needed ~100 s to compile the U-Net's initialization (one
    # unrolled hash per parameter), with RngBitGenerator ~8 s. Still a pure function
    # of the given key.
    key = jax.random.key(jax.random.bits(key, dtype=jnp.uint32), impl="rbg")
    return dict(self.model.init(key, x, train=False))

  def host_batch(self, step):
    if self.sampler is None:
      return None
    return self.sampler(step, int(self.config.batch_size))

  def make_batch(self, key, host_batch, shard):
    b = int(self.config.batch_size)
    keys = shard(jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b)))
    source = self.config.data.source
    if source != "db":
      frames, truth = sim_lib.batch(keys, self.sim, self.n)
      x, y = data_lib.normalize(frames), truth["label"]
    if source != "sim":
      real_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
      frames, label = jax.vmap(lambda k, f, l: augment_lib.augment(k, f, l, self.aug))(
          real_keys, host_batch["frames"], host_batch["label"])
      if source == "db":
        x, y = data_lib.normalize(frames), label
      else:                                  # 'mixed': real with probability real_fraction
        use = jax.random.bernoulli(jax.random.fold_in(key, b + 1),
                                   float(self.config.data.real_fraction), (b,))
        x = jnp.where(use[:, None, None, None], data_lib.normalize(frames), x)
        y = jnp.where(use[:, None, None], label, y)
    return {"x": shard(jnp.moveaxis(x, 1, -1)), "y": shard(y)}

  def loss(self, params, batch_stats, batch, step, key):
    logits, stats = trainer.model_apply(self.model, params, batch_stats, batch["x"],
                                        train=True, rngs={"dropout": key})
    logits = logits[..., 0]
    loss = pixel_loss(logits, batch["y"], self.config.loss)
    prob = jax.nn.sigmoid(logits)
    return loss, {"mean_prob": jnp.mean(prob),
                  "peak_prob": jnp.mean(jnp.max(prob, axis=(1, 2)))}, stats

  # ---------------------------------------------------------------------- inference
  def predict_fn(self, mesh):
    """Jitted (state, frames [B, n, H, W] in camera units) -> probabilities [B, H, W]."""
    fn = make_predict_fn(self.model, mesh)
    return lambda state, frames: fn(state["params"], state["batch_stats"], frames)

  def predict(self, state, windows: np.ndarray, mesh, fn=None) -> np.ndarray:
    """Probabilities [N, H, W] for windows [N, n, H, W] (numpy, camera units)."""
    fn = fn or self.predict_fn(mesh)
    return trainer.batched(lambda chunk: fn(state, chunk), np.asarray(windows, np.float32),
                           int(self.config.eval_batch_size), mesh, pad="edge")

  def simulate_set(self, num: int, seed: int, mesh):
    """A fixed simulated evaluation set, simulated once: (frames [N, n, c, c] ADU,
    labels [N, c, c], sites: per crop [] or [(y, x)])."""
    bs = trainer.divisible_batch(int(self.config.eval_batch_size), mesh)
    data = NamedSharding(mesh, P("data"))
    sim, n = self.sim, self.n

    @jax.jit
    def make(idx):
      keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(idx)
      frames, truth = sim_lib.batch(jax.lax.with_sharding_constraint(keys, data), sim, n)
      return frames, truth["label"], truth["site_yx"], truth["has_event"]

    parts = [jax.device_get(make(jnp.arange(s, s + bs))) for s in range(0, num, bs)]
    frames, labels, sites, has = (np.concatenate(p)[:num] for p in zip(*parts))
    site_list = [[tuple(sites[i])] if has[i] else [] for i in range(num)]
    return frames, labels, site_list

  def real_set(self, crops):
    """Every frame of the given crops (of one size): (per crop: windows [T, n, H, W],
    per crop: truth [T, H, W], per frame: sites, per frame: names)."""
    from smlm_jax.events import crops as crops_lib
    win, truth, sites, names = [], [], [], []
    for c in crops:
      win.append(data_lib.windows(c.frames, self.n))
      truth.append(c.truth)
      for t in range(c.frames.shape[0]):
        sites.append(crops_lib.find_peaks(c.truth[t]))
        names.append(f"{c.event_id[-6:]} t{t}")
    return win, truth, sites, names

  def evaluate_sets(self, state, mesh, sets) -> dict:
    """{name: {sweeps, median_distance_px, examples}} for sets {name: (blocks of
    windows [N_i, n, H_i, W_i], blocks of truth [N_i, H_i, W_i], sites per frame, names
    per frame)}; blocks may differ in frame size."""
    cfg = self.config.eval
    fn = self.predict_fn(mesh)
    out = {}
    for name, (wins, truths, sites, names) in sets.items():
      probs = [self.predict(state, w, mesh, fn) for w in wins]
      prob = [p for block in probs for p in block]
      truth = [t for block in truths for t in block]
      frames = [w[-1] for block in wins for w in block]
      pixel = metrics_lib.PixelCounter()
      summaries = []
      for p, t, s in zip(prob, truth, sites):
        pixel.add(p, t)
        summaries.append(metrics_lib.crop_summary(p, s, float(cfg.radius_px)))
      sweeps = {"event": metrics_lib.event_sweep(summaries, float(cfg.beta)),
                "pixel": pixel.sweep(float(cfg.beta))}
      dist = [metrics_lib.localization_error(p, s) for p, s in zip(prob, sites) if s]
      out[name] = {"sweeps": sweeps, "median_distance_px": float(np.median(dist)) if dist
                   else float("nan"),
                   "examples": _pick_examples(frames, prob, sites, names)}
    return out

  def make_evaluator(self, mesh):
    cfg = self.config.eval
    sets = {}
    if int(cfg.num_sim) > 0:
      frames, labels, sites = self.simulate_set(int(cfg.num_sim), int(cfg.sim_seed), mesh)
      names = [f"sim {i}" for i in range(len(sites))]
      sets["sim"] = ([frames], [labels], sites, names)
    if self.val_crops:
      by_size = {}
      for c in self.val_crops:
        by_size.setdefault(c.frames.shape[1:], []).append(c)
      wins, truths, sites, names = [], [], [], []
      for group in by_size.values():
        w, t, s, nm = self.real_set(group)
        wins.append(np.concatenate(w))
        truths.append(np.concatenate(t))
        sites += s
        names += nm
      sets["real"] = (wins, truths, sites, names)

    def evaluate(state):
      if not sets:
        return {}
      results = self.evaluate_sets(state, mesh, sets)
      select = "real" if "real" in results else "sim"
      threshold = metrics_lib.summarize(results[select]["sweeps"]["event"])["threshold"]
      metrics = {}
      for name, r in results.items():
        metrics[name] = {"event": metrics_lib.summarize(r["sweeps"]["event"], threshold),
                         "pixel": metrics_lib.summarize(r["sweeps"]["pixel"], threshold),
                         "median_distance_px": r["median_distance_px"]}
      metrics["threshold"] = threshold
      metrics["selected_on"] = select
      self._last_eval = {"results": results, "select": select, "threshold": threshold,
                         "metrics": metrics, "step": int(jax.device_get(state["step"]))}
      return metrics

    return evaluate

  def flat_metrics(self, metrics):
    from smlm_jax.core.task import flatten
    return flatten(metrics)

  def summary(self, metrics, step):
    lines = [f"evaluation after step {step} (threshold {metrics.get('threshold', float('nan')):.2f}"
             f" = max event-level F{self.config.eval.beta:g} on {metrics.get('selected_on')})",
             f"{'set':<6}{'level':<7}{'precision':>10}{'recall':>8}{'F1':>7}"
             f"{'F_beta':>8}{'best F1':>9}"]
    for name in ("sim", "real"):
      if name not in metrics:
        continue
      for level in ("event", "pixel"):
        m = metrics[name][level]
        lines.append(f"{name:<6}{level:<7}{m['precision']:>10.3f}{m['recall']:>8.3f}"
                     f"{m['f1']:>7.3f}{m['fbeta']:>8.3f}{m['best_f1']:>9.3f}")
      lines.append(f"{name:<6}median distance of the most probable pixel to the site: "
                   f"{metrics[name]['median_distance_px']:.2f} px")
    return "\n".join(lines)

  def export(self, state, workdir, step):
    if self._last_eval is not None:          # nothing to write before an evaluation
      write_run_outputs(workdir, self._last_eval, self.config)


def _pick_examples(frames, probs, sites, names, k: int = 8):
  """Up to k examples: the first positives and negatives, alternating."""
  pos = [i for i, s in enumerate(sites) if s]
  neg = [i for i, s in enumerate(sites) if not s]
  chosen = []
  for a, b in zip(pos + [None] * k, neg + [None] * k):
    chosen += [i for i in (a, b) if i is not None]
    if len(chosen) >= k or (a is None and b is None):
      break
  chosen = chosen[:k]
  return {"frames": [frames[i] for i in chosen], "probs": [probs[i] for i in chosen],
          "sites": [sites[i] for i in chosen], "names": [names[i] for i in chosen]}


def write_run_outputs(workdir: str, last: dict, config) -> None:
  """threshold.json, pr_curve.png and examples.png of the latest evaluation."""
  cfg = config.eval
  select, threshold = last["select"], last["threshold"]
  results = last["results"]
  record = {"threshold": threshold, "beta": float(cfg.beta), "radius_px": float(cfg.radius_px),
            "selected_on": select, "step": last["step"],
            "num_frames": int(config.data.num_frames),
            "pixel_size_nm": float(config.sim.pixel_size_nm),
            "metrics": last["metrics"]}
  cli.atomic_write_text(os.path.join(workdir, THRESHOLD_FILE),
                        json.dumps(record, indent=1, default=float))
  sweeps = {f"{name} {level}": r["sweeps"][level] for name, r in results.items()
            for level in ("event", "pixel")}
  sweeps = dict(sorted(sweeps.items(), key=lambda kv: not kv[0].startswith(select + " event")))
  metrics_lib.plot_curves(sweeps, threshold, os.path.join(workdir, "pr_curve.png"),
                          f"step {last['step']}: threshold {threshold:.2f} = max event-level "
                          f"F{float(cfg.beta):g} on {select}")
  ex = results[select]["examples"]
  if ex["frames"]:
    metrics_lib.plot_examples(ex["frames"], ex["probs"], ex["sites"], threshold,
                              float(cfg.radius_px), os.path.join(workdir, "examples.png"),
                              ex["names"])


def read_threshold(workdir: str) -> dict:
  """The run's threshold.json (written after its last evaluation)."""
  path = os.path.join(workdir, THRESHOLD_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir}: no {THRESHOLD_FILE} (the run has not been "
                            "evaluated); give --threshold")
  with open(path) as f:
    return json.load(f)
