"""Tests of smlm_jax.nn: the 2D/3D U-Net and the losses/metrics.

Reference values are written out (by hand, in comments) or computed with plain
math/numpy in the test, never with the function under test. Models are tiny. Compiling
flax's random initialisers of a whole U-Net takes many seconds on CPU, so most tests
trace ``init`` (``jax.eval_shape``, which runs the module's setup code) and fill the
parameters with scaled numpy noise; ``test_real_init_and_count_params_by_hand`` runs
the real ``init`` (with a fast-compiling ``rbg`` key). Checks convert to numpy, as an
eager jnp op compiles once per shape.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smlm_jax import nn as snn
from smlm_jax.nn import losses


def _key(seed=0):
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _init(model, x):
  """Variables of ``model`` for input ``x``: real tree structure, numpy-filled values."""
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":  # He-like scale, fan-in = all but the output dim
      scale = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(size=leaf.shape) * scale, leaf.dtype)
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)  # bias, running mean

  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(model.init, _key(), x))


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def _maxabs(a):
  return float(np.abs(np.asarray(a)).max())


def _all_finite(tree):
  return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(tree))


# ------------------------------------------------------------------------------ U-Net
def _out_and_grad(model, variables, x):
  """(output, grads of a scalar loss w.r.t. params), one compiled function."""
  def loss(params):
    out = model.apply({**variables, "params": params}, x)
    return jnp.mean(out ** 2), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  return out, grads


def test_unet_2d_keeps_odd_and_even_sizes():
  # Norms are covered by test_unet_norm_and_upsample_options; none compiles fastest.
  model = snn.UNet(out_channels=3, depth=3, base_width=4, convs_per_level=1,
                   first_kernel_size=5, norm="none")
  variables = _init(model, jnp.zeros((1, 32, 32, 2)))
  x = _normal(1, (2, 37, 40, 2))
  out, grads = _out_and_grad(model, variables, x)
  assert out.shape == (2, 37, 40, 3)
  assert _all_finite(out) and _all_finite(grads)
  assert all(_maxabs(g) > 0 for g in jax.tree_util.tree_leaves(grads))
  # Even size (no padding), and where padding goes: height 37 is reflect-padded to 40,
  # one row before and two after, so the 37x40 output is rows 1..37 of the output for
  # the explicitly padded 40x40 input.
  padded = np.pad(np.asarray(x), ((0, 0), (1, 2), (0, 0), (0, 0)), mode="reflect")
  out40 = jax.jit(model.apply)(variables, jnp.asarray(padded))
  assert out40.shape == (2, 40, 40, 3)
  np.testing.assert_allclose(out, np.asarray(out40)[:, 1:38], rtol=1e-5, atol=1e-5)
  # The first conv has the 5x5 kernel, the others 3x3.
  assert variables["params"]["enc0"]["conv0"]["kernel"].shape == (5, 5, 2, 4)
  assert variables["params"]["dec0"]["conv0"]["kernel"].shape == (3, 3, 8, 4)


def test_unet_3d_with_anisotropic_pool_factors():
  factors = ((1, 2, 2), (1, 2, 2), (2, 2, 2))
  model = snn.UNet(out_channels=2, spatial_dims=3, depth=3, base_width=2,
                   convs_per_level=1, pool_factors=factors, norm="none")
  x = _normal(2, (1, 9, 17, 20, 1))
  variables = _init(model, x)
  out, grads = _out_and_grad(model, variables, x)
  assert out.shape == (1, 9, 17, 20, 2)
  assert _all_finite(out) and _all_finite(grads)
  # Transposed convs invert exactly the pooling of their level.
  assert variables["params"]["up0"]["kernel"].shape == (1, 2, 2, 4, 2)
  assert variables["params"]["up2"]["kernel"].shape == (2, 2, 2, 16, 8)


@pytest.mark.parametrize("norm, upsample, residual", [
    ("batch", "transpose", False),
    ("group", "nearest", True),
    ("instance", "linear", False),
    ("layer", "transpose", True),
    ("none", "linear", False),
])
def test_unet_norm_and_upsample_options(norm, upsample, residual):
  model = snn.UNet(out_channels=2, depth=2, base_width=4, convs_per_level=1, norm=norm,
                   upsample=upsample, residual=residual)
  x = _normal(3, (2, 7, 10, 1))
  variables = _init(model, x)
  out = jax.jit(model.apply)(variables, x)
  assert out.shape == (2, 7, 10, 2)
  assert _all_finite(out)
  assert ("batch_stats" in variables) == (norm == "batch")
  assert ("shortcut" in variables["params"]["enc0"]) == residual


def test_unet_batch_norm_train_and_eval():
  model = snn.UNet(out_channels=1, depth=1, base_width=4, convs_per_level=1, norm="batch")
  x = 3.0 + _normal(4, (2, 8, 8, 1))
  variables = _init(model, x)
  out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, x)
  assert out.shape == (2, 8, 8, 1)
  old_mean = variables["batch_stats"]["enc0"]["norm0"]["mean"]
  new_mean = updates["batch_stats"]["enc0"]["norm0"]["mean"]
  assert _maxabs(old_mean) == 0.0 and _maxabs(new_mean) > 0.0
  trained = {**variables, "batch_stats": updates["batch_stats"]}
  apply_eval = jax.jit(model.apply)
  both = apply_eval(trained, x)
  other = apply_eval(trained, x * jnp.array([1.0, -2.0])[:, None, None, None])
  # Running averages: an example's output does not depend on the rest of the batch
  # (with batch statistics it would) ...
  np.testing.assert_allclose(both[0], other[0], rtol=1e-5, atol=1e-5)
  assert _maxabs(both[1] - other[1]) > 1e-3
  # ... and they are used: other statistics give another output.
  assert _maxabs(apply_eval(variables, x) - both) > 1e-3


def test_unet_dropout_uses_rng_only_in_training():
  model = snn.UNet(out_channels=1, depth=1, base_width=4, convs_per_level=1, dropout=0.5)
  x = _normal(5, (1, 8, 8, 1))
  variables = _init(model, x)
  apply = jax.jit(lambda v, x, k: model.apply(v, x, train=True, rngs={"dropout": k}))
  a, b = apply(variables, x, _key(1)), apply(variables, x, _key(1))
  c = apply(variables, x, _key(2))
  np.testing.assert_array_equal(a, b)
  assert _maxabs(a - c) > 0
  ev = jax.jit(model.apply)(variables, x)
  assert _maxabs(ev - a) > 0


def test_real_init_and_count_params_by_hand():
  model = snn.UNet(out_channels=1, depth=1, base_width=2, convs_per_level=1, norm="none",
                   out_bias_init=-2.0)
  x = jnp.ones((1, 5, 4, 1))
  out, variables = jax.jit(model.init_with_output)(_key(), x)
  assert out.shape == (1, 5, 4, 1) and _all_finite(out)
  np.testing.assert_array_equal(variables["params"]["head"]["bias"], [-2.0])
  # enc0 3x3 conv 1->2: 9*2+2 = 20; bottleneck 3x3 2->4: 72+4 = 76; up0 2x2 transpose
  # 4->2: 32+2 = 34; dec0 3x3 conv on concat (2+2)->2: 72+2 = 74; head 1x1 2->1: 3.
  assert snn.count_params(variables) == 20 + 76 + 34 + 74 + 3
  assert snn.count_params(jax.eval_shape(model.init, _key(), x)) == 207


def test_unet_rejects_bad_configs():
  with pytest.raises(ValueError, match="pool_factors"):
    snn.UNet(out_channels=1, depth=2, pool_factors=((2, 2),)).init(
        _key(), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="spatial"):
    snn.UNet(out_channels=1, spatial_dims=3).init(_key(), jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="norm"):
    snn.UNet(out_channels=1, norm="weight").init(_key(), jnp.zeros((1, 8, 8, 1)))


# ------------------------------------------------------------------------------ regression
def test_gaussian_nll_matches_formula_bit_for_bit():
  mean = jnp.array([0.0, 1.0, -2.0, 0.5])
  log_var = jnp.array([0.0, -20.0, 20.0, 1.3])
  target = jnp.array([0.0, 1.5, 0.0, -0.7])
  clipped = jnp.clip(log_var, -12.0, 8.0)
  expected = 0.5 * (clipped + (target - mean) ** 2 * jnp.exp(-clipped) + math.log(2 * math.pi))
  got = losses.gaussian_nll(mean, log_var, target)
  np.testing.assert_array_equal(got, expected)
  assert got.shape == (4,)
  # mean == target, log_var == 0: 0.5 log(2 pi) = 0.9189385.
  assert abs(float(got[0]) - 0.9189385) < 1e-6
  # The clip applies: log_var 20 acts as 8.
  assert abs(float(got[2]) - 0.5 * (8.0 + 4.0 * math.exp(-8.0) + math.log(2 * math.pi))) < 1e-5


def test_l1_and_psnr():
  pred = jnp.array([1.0, 2.0, 4.0])
  target = jnp.array([1.5, 2.0, 1.0])
  assert abs(float(losses.l1_loss(pred, target)) - 3.5 / 3) < 1e-6
  # Mask drops the last element: (0.5 + 0) / 2.
  assert abs(float(losses.l1_loss(pred, target, mask=jnp.array([1, 1, 0]))) - 0.25) < 1e-6
  # MSE 0.01 at data range 1: 10 log10(1 / 0.01) = 20 dB.
  x = jnp.zeros((2, 4, 4))
  np.testing.assert_allclose(losses.psnr(x, x + 0.1), [20.0, 20.0], rtol=1e-5)


# ------------------------------------------------------------------------------ binary
def test_bce_soft_target_and_pos_weight():
  logits = jnp.array([0.5, -1.0])
  targets = jnp.array([0.3, 1.0])
  # sigmoid(0.5) = 0.6224593: -(0.3 log 0.6224593 + 0.7 log 0.3775407) = 0.8240770;
  # sigmoid(-1) = 0.2689414: -log 0.2689414 = 1.3132617. Mean 1.0686693.
  assert abs(float(losses.binary_cross_entropy(logits, targets)) - 1.0686693) < 1e-6
  # pos_weight 2 doubles the t log p terms: (0.9663000 + 2.6265234) / 2 = 1.7964117.
  assert abs(float(losses.binary_cross_entropy(logits, targets, pos_weight=2.0))
             - 1.7964117) < 1e-6
  # Masking the second element leaves the first.
  assert abs(float(losses.binary_cross_entropy(logits, targets, mask=jnp.array([1.0, 0.0])))
             - 0.8240770) < 1e-6
  # Stable for huge logits.
  big = losses.binary_cross_entropy(jnp.array([200.0, -200.0]), jnp.array([0.0, 1.0]))
  assert abs(float(big) - 200.0) < 1e-3


def test_focal_gamma0_alpha_half_is_half_bce():
  logits = jnp.array([0.5, -1.0, 2.0, -3.0])
  targets = jnp.array([0.3, 1.0, 0.0, 0.8])
  focal = losses.soft_focal_loss(logits, targets, alpha=0.5, gamma=0.0)
  bce = losses.binary_cross_entropy(logits, targets)
  np.testing.assert_allclose(focal, 0.5 * bce, rtol=1e-6)


def test_focal_hard_targets_match_standard_formula():
  xs, ts, alpha, gamma = [2.0, -1.0, 0.5], [1, 0, 0], 0.25, 2.0
  expected = 0.0
  for x, t in zip(xs, ts):
    p = _sigmoid(x)
    p_t = p if t == 1 else 1 - p
    alpha_t = alpha if t == 1 else 1 - alpha
    expected += -alpha_t * (1 - p_t) ** gamma * math.log(p_t) / len(xs)
  got = losses.soft_focal_loss(jnp.array(xs), jnp.array(ts, jnp.float32), alpha, gamma)
  assert abs(float(got) - expected) < 1e-6


def test_focal_soft_target_formula():
  x, t, alpha, gamma = 0.7, 0.4, 0.25, 2.0
  p = _sigmoid(x)
  p_t = t * p + (1 - t) * (1 - p)
  alpha_t = t * alpha + (1 - t) * (1 - alpha)
  expected = -alpha_t * (1 - p_t) ** gamma * (t * math.log(p) + (1 - t) * math.log(1 - p))
  got = losses.soft_focal_loss(jnp.array([x]), jnp.array([t]), alpha, gamma)
  assert abs(float(got) - expected) < 1e-6


def test_dice_2x2():
  probs = jnp.array([[0.9, 0.2], [0.6, 0.1]])
  targets = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  # sum p t = 0.9 + 0.6 + 0.1 = 1.6, sum p = 1.8, sum t = 3, eps = 1:
  # 1 - (3.2 + 1) / (4.8 + 1) = 1.6 / 5.8 = 0.2758621.
  got = losses.dice_loss(probs, targets, from_logits=False)
  assert abs(float(got) - 1.6 / 5.8) < 1e-6
  # From logits: sigmoid(logit(p)) = p.
  logits = jnp.log(probs / (1 - probs))
  assert abs(float(losses.dice_loss(logits, targets)) - 1.6 / 5.8) < 1e-5
  # Mask out the 0.2/0 pixel: sum p = 1.6, sum pt = 1.6, sum t = 3: 1 - 4.2/5.6 = 0.25.
  mask = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  got = losses.dice_loss(probs, targets, mask=mask, from_logits=False)
  assert abs(float(got) - 0.25) < 1e-6


def test_multiclass_dice_with_ignore():
  probs = jnp.array([[0.8, 0.2], [0.4, 0.6], [0.5, 0.5]])
  labels = jnp.array([0, 1, 255])
  # Class 0: sum pt = 0.8, sum p = 1.2, sum t = 1: 1 - 2.6/3.2 = 0.1875.
  # Class 1: sum pt = 0.6, sum p = 0.8, sum t = 1: 1 - 2.2/2.8 = 0.2142857. Mean 0.2008929.
  got = losses.multiclass_dice_loss(probs, labels, 2, ignore_label=255, from_logits=False)
  assert abs(float(got) - 0.2008929) < 1e-6


# ------------------------------------------------------------------------------ multi-class
def test_weighted_cross_entropy_with_ignore():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
  labels = jnp.array([0, 1, 255])
  # CE_0 = log(1 + e^-2) = 0.1269280, CE_1 = log(1 + e^-1) = 0.3132617, third ignored;
  # weights 1 and 3: (0.1269280 + 3 * 0.3132617) / 4 = 0.2666783.
  got = losses.softmax_cross_entropy(logits, labels, class_weights=jnp.array([1.0, 3.0]),
                                     ignore_label=255)
  assert abs(float(got) - 0.2666783) < 1e-6
  assert abs(float(losses.softmax_cross_entropy(logits[:2], labels[:2]))
             - (0.1269280 + 0.3132617) / 2) < 1e-6


def test_softmax_focal_loss_by_hand():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
  labels = jnp.array([0, 1, 255])
  p0, p1 = _sigmoid(2.0), _sigmoid(1.0)  # softmax prob of the true class
  expected = (-0.25 * (1 - p0) ** 2 * math.log(p0) - 0.75 * (1 - p1) ** 2 * math.log(p1)) / 2
  got = losses.softmax_focal_loss(logits, labels, gamma=2.0, alpha=jnp.array([0.25, 0.75]),
                                  ignore_label=255)
  assert abs(float(got) - expected) < 1e-6
  # gamma 0 without alpha is the plain cross-entropy.
  np.testing.assert_allclose(
      losses.softmax_focal_loss(logits, labels, gamma=0.0, ignore_label=255),
      losses.softmax_cross_entropy(logits, labels, ignore_label=255), rtol=1e-6)


def test_lovasz_softmax_by_hand():
  # Two classes, four pixels; p(class 1) = [0.9, 0.6, 0.3, 0.2], labels [1, 0, 1, 0].
  p1 = jnp.array([0.9, 0.6, 0.3, 0.2])
  probs = jnp.stack([1 - p1, p1], axis=-1)
  labels = jnp.array([1, 0, 1, 0])
  # Class 0: fg = [0, 1, 0, 1], p0 = [0.1, 0.4, 0.7, 0.8], errors = [0.1, 0.6, 0.7, 0.2].
  #   Sorted descending: 0.7 (fg 0), 0.6 (fg 1), 0.2 (fg 1), 0.1 (fg 0); gts = 2.
  #   cumsum fg = [0, 1, 2, 2], cumsum(1 - fg) = [1, 1, 1, 2];
  #   jaccard = 1 - [2, 1, 0, 0] / [3, 3, 3, 4] = [1/3, 2/3, 1, 1];
  #   grad = [1/3, 1/3, 1/3, 0]; loss_0 = (0.7 + 0.6 + 0.2) / 3 = 0.5.
  # Class 1: fg = [1, 0, 1, 0], errors = [0.1, 0.6, 0.7, 0.2].
  #   Sorted: 0.7 (fg 1), 0.6 (fg 0), 0.2 (fg 0), 0.1 (fg 1); gts = 2.
  #   cumsum fg = [1, 1, 1, 2], cumsum(1 - fg) = [0, 1, 2, 2];
  #   jaccard = 1 - [1, 1, 1, 0] / [2, 3, 4, 4] = [1/2, 2/3, 3/4, 1];
  #   grad = [1/2, 1/6, 1/12, 1/4];
  #   loss_1 = 0.35 + 0.1 + 0.2/12 + 0.025 = 0.4916667.
  # Mean over the two present classes: 0.4958333 (= 119/240).
  got = losses.lovasz_softmax(probs, labels, from_logits=False)
  assert abs(float(got) - 119 / 240) < 1e-6
  # A given class list: class 1 alone.
  assert abs(float(losses.lovasz_softmax(probs, labels, from_logits=False, classes=[1]))
             - 0.4916667) < 1e-6
  # From logits: log-probabilities are logits of the same softmax.
  assert abs(float(losses.lovasz_softmax(jnp.log(probs), labels)) - 119 / 240) < 1e-6
  # Only class 1 present: loss_1 alone; "all" averages over both classes anyway.
  only1 = jnp.array([1, 1, 1, 1])
  # Class 1 all fg: errors = 1 - p1 = [0.1, 0.4, 0.7, 0.8], sorted [0.8, 0.7, 0.4, 0.1],
  # gts = 4, jaccard = 1 - [3, 2, 1, 0] / 4 = [1/4, 1/2, 3/4, 1], grad = 1/4 each:
  # loss_1 = 2.0 / 4 = 0.5. Class 0 absent: errors p0 = [0.1, 0.4, 0.7, 0.8], all bg,
  # jaccard = 1 - 0 / k = 1 from the first: grad = [1, 0, 0, 0], loss_0 = max = 0.8.
  assert abs(float(losses.lovasz_softmax(probs, only1, from_logits=False)) - 0.5) < 1e-6
  assert abs(float(losses.lovasz_softmax(probs, only1, from_logits=False, classes="all"))
             - 0.65) < 1e-6


def _numpy_lovasz(probs, labels):
  """Berman et al.'s flat Lovasz-softmax (classes='present'), plain numpy, no ignore."""
  losses_c = []
  for c in range(probs.shape[-1]):
    fg = (labels == c).astype(np.float64)
    if fg.sum() == 0:
      continue
    errors = np.abs(fg - probs[:, c])
    order = np.argsort(-errors, kind="stable")
    e, f = errors[order], fg[order]
    inter = f.sum() - np.cumsum(f)
    union = f.sum() + np.cumsum(1 - f)
    jac = 1 - inter / union
    jac[1:] = jac[1:] - jac[:-1]
    losses_c.append(float(np.dot(e, jac)))
  return np.mean(losses_c)


def test_lovasz_ignore_equals_explicit_filtering():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 5, 6))
  labels[rng.random(labels.shape) < 0.3] = 255
  labels[1, 0, :] = 255  # a whole row ignored, including the first pixels of image 2
  valid = labels != 255
  lovasz = jax.jit(losses.lovasz_softmax, static_argnames=("ignore_label", "per_image"))
  got = lovasz(jnp.asarray(logits), jnp.asarray(labels), ignore_label=255)
  filtered = lovasz(jnp.asarray(logits[valid]), jnp.asarray(labels[valid]))
  np.testing.assert_allclose(got, filtered, rtol=1e-6)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1), np.float64)
  np.testing.assert_allclose(got, _numpy_lovasz(probs[valid], labels[valid]), rtol=1e-5)
  # Per image: the mean of the per-image losses on the filtered pixels.
  per_image = lovasz(jnp.asarray(logits), jnp.asarray(labels), ignore_label=255,
                     per_image=True)
  expected = np.mean([_numpy_lovasz(probs[i][valid[i]], labels[i][valid[i]])
                      for i in range(2)])
  np.testing.assert_allclose(per_image, expected, rtol=1e-5)


@pytest.mark.parametrize("name", ["lovasz", "focal", "ce"])
def test_ignored_logits_do_not_change_the_loss(name):
  fn = {
      "lovasz": lambda lg, lb: losses.lovasz_softmax(lg, lb, ignore_label=255),
      "focal": lambda lg, lb: losses.softmax_focal_loss(
          lg, lb, alpha=jnp.array([0.2, 0.3, 0.5]), ignore_label=255),
      "ce": lambda lg, lb: losses.softmax_cross_entropy(
          lg, lb, class_weights=jnp.array([1.0, 2.0, 0.5]), ignore_label=255),
  }[name]
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(2, 4, 5))
  labels[rng.random(labels.shape) < 0.4] = 255
  ignored = labels == 255
  changed = logits.copy()
  changed[ignored] = rng.normal(size=changed[ignored].shape) * 50.0
  jfn = jax.jit(jax.value_and_grad(fn))
  value, grad = jfn(jnp.asarray(logits), jnp.asarray(labels))
  value2, _ = jfn(jnp.asarray(changed), jnp.asarray(labels))
  assert float(value) == float(value2)
  assert float(value) > 0
  assert _maxabs(np.asarray(grad)[ignored]) == 0.0
  assert _all_finite(grad)


def test_losses_jit_and_grad_are_finite():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 6, 6)) * 30, jnp.float32)  # large logits
  t = jnp.asarray(rng.random((2, 6, 6)), jnp.float32)
  logits = jnp.asarray(rng.normal(size=(2, 6, 6, 3)) * 30, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, size=(2, 6, 6)))
  fns = {
      "bce": lambda x, lg: losses.binary_cross_entropy(x, t),
      "focal": lambda x, lg: losses.soft_focal_loss(x, t),
      # Saturated logits make 1 - p_t exactly 0, where d/db b**gamma is NaN or inf.
      "focal_saturated": lambda x, lg: losses.soft_focal_loss(10 * x, t > 0.5, gamma=0.5),
      "softmax_focal_saturated": lambda x, lg: losses.softmax_focal_loss(
          10 * lg, labels, gamma=0.0),
      "dice": lambda x, lg: losses.dice_loss(x, t),
      "l1": lambda x, lg: losses.l1_loss(x, t),
      "ce": lambda x, lg: losses.softmax_cross_entropy(lg, labels),
      "softmax_focal": lambda x, lg: losses.softmax_focal_loss(lg, labels),
      "lovasz": lambda x, lg: losses.lovasz_softmax(lg, labels),
      "mc_dice": lambda x, lg: losses.multiclass_dice_loss(lg, labels, 3),
      "ssim": lambda x, lg: losses.ssim_loss(jax.nn.sigmoid(x), t, win_size=5),
  }

  def total(x, lg):  # one compile; a NaN/inf in any term's gradient reaches the sum's
    values = {k: fn(x, lg) for k, fn in fns.items()}
    return sum(values.values()), values

  (_, values), grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(
      x, logits)
  for name, value in values.items():
    assert np.isfinite(float(value)), name
  assert _all_finite(grads)
  assert _maxabs(grads[0]) > 0 and _maxabs(grads[1]) > 0


# ------------------------------------------------------------------------------ SSIM
def _gauss_taps():
  k = np.arange(-5, 6)
  g = np.exp(-0.5 * (k / 1.5) ** 2)
  return g / g.sum()


def _numpy_ssim(x, y, window, data_range=1.0, cov_norm=1.0):
  """Direct SSIM: loop over all windows fully inside the image."""
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  k = window.shape[0]
  values = []
  for i in range(x.shape[0] - k + 1):
    for j in range(x.shape[1] - k + 1):
      px, py = x[i:i + k, j:j + k], y[i:i + k, j:j + k]
      mx, my = np.sum(window * px), np.sum(window * py)
      vx = cov_norm * np.sum(window * (px - mx) ** 2)
      vy = cov_norm * np.sum(window * (py - my) ** 2)
      vxy = cov_norm * np.sum(window * (px - mx) * (py - my))
      values.append((2 * mx * my + c1) * (2 * vxy + c2)
                    / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
  return np.mean(values)


def test_ssim_matches_direct_numpy_implementation():
  rng = np.random.default_rng(3)
  x = rng.random((13, 14))
  y = np.clip(x + 0.2 * rng.normal(size=x.shape), 0, 1)
  gauss = np.outer(_gauss_taps(), _gauss_taps())
  uniform = np.full((7, 7), 1 / 49)
  expected = [_numpy_ssim(x, y, gauss),
              _numpy_ssim(x, y, gauss, cov_norm=121 / 120),
              _numpy_ssim(x, y, uniform, data_range=2.0)]
  variants = jax.jit(lambda a, b: (
      losses.ssim(a, b),
      losses.ssim(a, b, use_sample_covariance=True),
      losses.ssim(a, b, gaussian_weights=False, data_range=2.0)))
  # Batch dims lead; each image gets its own value:
  # [[ssim(x, y), ssim(y, y)], [ssim(y, y), ssim(x, y)]] (SSIM is symmetric).
  first = jnp.asarray(np.stack([np.stack([x, y]), np.stack([y, x])]), jnp.float32)
  second = jnp.asarray(np.stack([np.stack([y, y])] * 2), jnp.float32)
  for got, want in zip(variants(first, second), expected):
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got[0, 0], want, rtol=1e-4)
    np.testing.assert_allclose(got[1, 1], want, rtol=1e-4)
    np.testing.assert_allclose([got[0, 1], got[1, 0]], 1.0, rtol=1e-6)
  assert expected[0] < 0.9


def test_ssim_offset_and_scale_single_window():
  rng = np.random.default_rng(4)
  x = 0.2 + 0.5 * rng.random((11, 11))  # one 11x11 Gaussian window covers it
  w = np.outer(_gauss_taps(), _gauss_taps())
  mx = np.sum(w * x)
  vx = np.sum(w * (x - mx) ** 2)
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  # y = x + c: mu_y = mu_x + c, var_y = cov = var_x, so the contrast-structure term is 1.
  c = 0.2
  expected = (2 * mx * (mx + c) + c1) / (mx ** 2 + (mx + c) ** 2 + c1)
  got = losses.ssim(jnp.asarray(x, jnp.float32), jnp.asarray(x + c, jnp.float32))
  assert got.shape == ()
  assert abs(float(got) - expected) < 1e-5 and expected < 0.99
  # y = a x: mu_y = a mu_x, var_y = a^2 var_x, cov = a var_x.
  a = 0.5
  expected = ((2 * a * mx ** 2 + c1) * (2 * a * vx + c2)
              / (((1 + a ** 2) * mx ** 2 + c1) * ((1 + a ** 2) * vx + c2)))
  got = losses.ssim(jnp.asarray(x, jnp.float32), jnp.asarray(a * x, jnp.float32))
  assert abs(float(got) - expected) < 1e-5 and expected < 0.95
  loss = losses.ssim_loss(jnp.asarray(x), jnp.asarray(a * x))
  assert abs(float(loss) - (1 - expected)) < 1e-5


def test_ssim_3d():
  rng = np.random.default_rng(5)
  vol = jnp.asarray(rng.random((2, 12, 13, 14)), jnp.float32)
  noisy = vol + 0.3 * jnp.asarray(rng.normal(size=vol.shape), jnp.float32)
  ssim3d = jax.jit(lambda a, b: losses.ssim(a, b, spatial_dims=3))
  same, value = ssim3d(vol, vol), ssim3d(vol, noisy)
  assert same.shape == (2,)
  np.testing.assert_allclose(same, 1.0, rtol=1e-6)
  assert float(value.max()) < 0.9
  # skimage's algorithm (gaussian_weights=True, use_sample_covariance=False): scipy
  # Gaussian filter (sigma 1.5, truncate 3.5 -> 11 taps) with reflection, then drop the
  # 5-pixel border where the window leaves the volume, and average.
  ndi = pytest.importorskip("scipy.ndimage")
  a, b = np.asarray(vol[1], np.float64), np.asarray(noisy[1], np.float64)
  filt = lambda im: ndi.gaussian_filter(im, sigma=1.5, truncate=3.5, mode="reflect")
  ua, ub = filt(a), filt(b)
  va, vb, vab = filt(a * a) - ua * ua, filt(b * b) - ub * ub, filt(a * b) - ua * ub
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  s_map = ((2 * ua * ub + c1) * (2 * vab + c2)) / ((ua ** 2 + ub ** 2 + c1) * (va + vb + c2))
  np.testing.assert_allclose(value[1], s_map[5:-5, 5:-5, 5:-5].mean(), rtol=1e-4)
  grad = jax.jit(jax.grad(lambda v: losses.ssim_loss(v, vol, spatial_dims=3)))(noisy)
  assert _all_finite(grad) and _maxabs(grad) > 0
  with pytest.raises(ValueError, match="win_size"):
    losses.ssim(vol[:, :5], vol[:, :5], spatial_dims=3)
