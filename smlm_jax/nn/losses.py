"""Losses and image-quality metrics as pure, jit-able, differentiable functions.

Conventions:

* Class scores are channels-last: ``logits`` ``[..., K]`` with integer ``labels``
  ``[...]`` (same leading shape); binary maps are ``logits``/``targets`` of equal
  shape (or broadcastable).
* ``mask`` (bool or float weights, broadcastable to the elementwise loss) and
  ``ignore_label`` select the valid elements. Unless a docstring says otherwise a
  loss reduces to the weighted mean ``sum_i w_i l_i / sum_i w_i`` over the valid
  elements, where ``w_i = 0`` at masked/ignored ones; if no element is valid the
  result is 0. Ignored elements are excluded with ``jnp.where`` (and their labels
  replaced by a safe index), so their logits cannot change the loss or its gradient
  elsewhere, not even by a rounding error.
* Probabilities are computed from logits in log space (``softplus``,
  ``log_softmax``), so no loss overflows or takes ``log(0)`` for large logits.
* ``gaussian_nll`` is elementwise (no reduction); ``ssim`` and ``psnr`` are per image
  (``reduce=True`` gives a scalar mean).

References: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017; Milletari
et al., "V-Net", 3DV 2016 (soft Dice); Berman, Rannen Triki & Blaschko, "The
Lovasz-Softmax loss", CVPR 2018; Wang, Bovik, Sheikh & Simoncelli, "Image Quality
Assessment: From Error Visibility to Structural Similarity", IEEE TIP 2004 (SSIM, with
the defaults of ``skimage.metrics.structural_similarity``).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax


# ---------------------------------------------------------------------------- helpers
def _weighted_mean(values, weights=None):
  """``sum(w * v) / sum(w)`` over elements with ``w != 0`` (0 if none); mean if no w."""
  values = jnp.asarray(values)
  if weights is None:
    return jnp.mean(values)
  w = jnp.broadcast_to(jnp.asarray(weights, values.dtype), values.shape)
  total = jnp.sum(w)
  num = jnp.sum(jnp.where(w != 0, values * w, 0.0))
  return num / jnp.where(total != 0, total, 1.0)


def _combine(a, b):
  """Product of two optional weight arrays."""
  if a is None:
    return b
  if b is None:
    return a
  return jnp.asarray(a, jnp.float32) * jnp.asarray(b, jnp.float32)


def _focal_factor(base, gamma):
  """``base**gamma`` for ``base`` in [0, 1] with finite gradients at ``base == 0``.

  Confident predictions make ``base = 1 - p_t`` exactly 0, where the derivative of
  ``x**gamma`` is NaN (``gamma = 0``) or inf (``gamma < 1``); the value there is the
  limit (``0**gamma``: 1 if ``gamma == 0`` else 0) with zero gradient.
  """
  positive = base > 0
  at_zero = jnp.where(jnp.asarray(gamma) == 0, 1.0, 0.0).astype(base.dtype)
  return jnp.where(positive, jnp.where(positive, base, 1.0) ** gamma, at_zero)


def _valid_labels(labels, ignore_label):
  """(valid mask, labels with ignored entries replaced by class 0)."""
  labels = jnp.asarray(labels)
  if ignore_label is None:
    return jnp.ones(labels.shape, bool), labels
  valid = labels != ignore_label
  return valid, jnp.where(valid, labels, 0)


# ---------------------------------------------------------------------------- regression
def gaussian_nll(mean, log_var, target, clip: tuple[float, float] | None = (-12.0, 8.0)):
  """Elementwise Gaussian negative log-likelihood (no reduction).

  ``0.5 * (log_var + (target - mean)**2 * exp(-log_var) + log(2 pi))`` with
  ``log_var`` first clipped to ``clip`` (``None``: no clipping). With the default
  clip this is bit-for-bit the loss the log-D models are trained with.
  """
  if clip is not None:
    log_var = jnp.clip(log_var, clip[0], clip[1])
  return 0.5 * (log_var + (target - mean) ** 2 * jnp.exp(-log_var) + math.log(2 * math.pi))


def l1_loss(pred, target, mask=None):
  """Mean absolute error ``sum_i w_i |pred_i - target_i| / sum_i w_i``."""
  return _weighted_mean(jnp.abs(pred - target), mask)


# ---------------------------------------------------------------------------- binary maps
def _bce_elementwise(logits, targets, pos_weight=None):
  # -[pw t log p + (1 - t) log(1 - p)], log p = -softplus(-x), log(1 - p) = -softplus(x).
  pos = targets * jax.nn.softplus(-logits)
  if pos_weight is not None:
    pos = pos_weight * pos
  return pos + (1.0 - targets) * jax.nn.softplus(logits)


def binary_cross_entropy(logits, targets, mask=None, pos_weight=None):
  """Binary cross-entropy from logits; soft targets ``t`` in [0, 1] allowed.

  ``l_i = -[pw t_i log sigmoid(x_i) + (1 - t_i) log(1 - sigmoid(x_i))]``, computed as
  ``pw t softplus(-x) + (1 - t) softplus(x)``; ``pos_weight`` ``pw`` (default 1)
  up-weights positives. Reduction: weighted mean over ``mask``.
  """
  return _weighted_mean(_bce_elementwise(logits, targets, pos_weight), mask)


def soft_focal_loss(logits, targets, alpha: float | None = 0.25, gamma: float = 2.0,
                    mask=None):
  """Sigmoid focal loss (Lin et al. 2017) generalized to soft targets ``t`` in [0, 1].

  With ``p = sigmoid(x)``, ``p_t = t p + (1 - t)(1 - p)`` and ``alpha_t = t alpha +
  (1 - t)(1 - alpha)``: ``l = -alpha_t (1 - p_t)**gamma [t log p + (1 - t) log(1 - p)]``.
  For hard targets this is the standard ``-alpha_t (1 - p_t)**gamma log p_t``; with
  ``gamma = 0, alpha = 0.5`` it is half the BCE. ``1 - p_t`` is computed as ``t
  sigmoid(-x) + (1 - t) sigmoid(x)`` (no cancellation), the log terms via softplus.
  ``alpha=None`` disables the class balancing (``alpha_t = 1``). Reduction: weighted
  mean over ``mask`` (normalized by the number of valid elements, not by ``alpha``).
  """
  ce = _bce_elementwise(logits, targets)
  one_minus_pt = targets * jax.nn.sigmoid(-logits) + (1.0 - targets) * jax.nn.sigmoid(logits)
  loss = ce * _focal_factor(one_minus_pt, gamma)
  if alpha is not None:
    loss = (targets * alpha + (1.0 - targets) * (1.0 - alpha)) * loss
  return _weighted_mean(loss, mask)


def dice_loss(inputs, targets, mask=None, eps: float = 1.0, from_logits: bool = True,
              axis: int | Sequence[int] | None = None):
  """Soft Dice loss for binary maps (Milletari et al. 2016).

  ``p = sigmoid(inputs)`` if ``from_logits`` else ``inputs``; with weights ``w``
  (``mask``, default 1): ``1 - (2 sum w p t + eps) / (sum w p + sum w t + eps)``.
  The sums run over ``axis`` (default all axes, i.e. one Dice over the whole batch);
  with e.g. ``axis=(1, 2)`` there is one Dice per image and the result is their mean.
  """
  p = jax.nn.sigmoid(inputs) if from_logits else inputs
  targets = jnp.broadcast_to(jnp.asarray(targets, p.dtype), p.shape)
  w = jnp.ones_like(p) if mask is None else jnp.asarray(mask, p.dtype)
  w = jnp.broadcast_to(w, p.shape)
  p = jnp.where(w != 0, p * w, 0.0)
  t = jnp.where(w != 0, targets * w, 0.0)
  inter = jnp.sum(p * targets, axis=axis)
  dice = (2.0 * inter + eps) / (jnp.sum(p, axis=axis) + jnp.sum(t, axis=axis) + eps)
  return jnp.mean(1.0 - dice)


def multiclass_dice_loss(logits, labels, num_classes: int, ignore_label: int | None = None,
                         eps: float = 1.0, from_logits: bool = True):
  """Soft Dice averaged over classes: ``mean_c [1 - (2 sum p_c t_c + eps) / (sum p_c +
  sum t_c + eps)]`` over the non-ignored elements of the whole batch.

  ``logits`` ``[..., K]`` (softmax is taken if ``from_logits``, else they are class
  probabilities), integer ``labels`` ``[...]``, ``t_c`` = one-hot of the labels,
  ``K == num_classes``.
  """
  if logits.shape[-1] != num_classes:
    raise ValueError(f"logits have {logits.shape[-1]} classes, num_classes={num_classes}.")
  valid, safe = _valid_labels(labels, ignore_label)
  probs = jax.nn.softmax(logits, axis=-1) if from_logits else logits
  onehot = jax.nn.one_hot(safe, num_classes, dtype=probs.dtype)
  v = valid[..., None]
  p = jnp.where(v, probs, 0.0).reshape(-1, num_classes)
  t = jnp.where(v, onehot, 0.0).reshape(-1, num_classes)
  dice = (2.0 * jnp.sum(p * t, axis=0) + eps) / (jnp.sum(p, axis=0) + jnp.sum(t, axis=0) + eps)
  return jnp.mean(1.0 - dice)


# ---------------------------------------------------------------------------- multi-class
def softmax_cross_entropy(logits, labels, class_weights=None, ignore_label: int | None = None,
                          mask=None):
  """Weighted softmax cross-entropy over integer labels.

  ``CE_i = -log softmax(logits_i)[y_i]``, ``w_i = class_weights[y_i] * mask_i`` (each
  default 1) and ``w_i = 0`` where ``y_i == ignore_label``; returns ``sum_i w_i CE_i /
  sum_i w_i`` (ignored elements excluded from numerator and denominator).
  """
  valid, safe = _valid_labels(labels, ignore_label)
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  w = valid.astype(ce.dtype)
  if class_weights is not None:
    w = w * jnp.asarray(class_weights, ce.dtype)[safe]
  return _weighted_mean(ce, _combine(w, mask))


def softmax_focal_loss(logits, labels, gamma: float = 2.0, alpha=None,
                       ignore_label: int | None = None, mask=None):
  """Multi-class focal loss: ``l_i = -alpha[y_i] (1 - p_i)**gamma log p_i`` with
  ``p_i = softmax(logits_i)[y_i]`` and ``alpha`` optional per-class weights ``[K]``.

  Reduction: mean over the valid (non-ignored, ``mask``-weighted) elements; ``alpha``
  scales each term but is not in the denominator (as in Lin et al. 2017). With
  ``gamma = 0`` and no ``alpha`` this is the unweighted ``softmax_cross_entropy``.
  """
  valid, safe = _valid_labels(labels, ignore_label)
  logp = jax.nn.log_softmax(logits, axis=-1)
  logp_y = jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  loss = -_focal_factor(-jnp.expm1(logp_y), gamma) * logp_y
  if alpha is not None:
    loss = jnp.asarray(alpha, loss.dtype)[safe] * loss
  return _weighted_mean(loss, _combine(valid.astype(loss.dtype), mask))


def _lovasz_grad(fg_sorted, valid_sorted):
  """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors.

  Columns are classes. ``jaccard_k = 1 - (gts - cumsum(fg)_k) / (gts + cumsum(bg)_k)``
  with ``bg = valid (1 - fg)``; ``grad = (jaccard_0, diff(jaccard))``. Invalid rows
  (fg = bg = 0) leave both cumulative sums unchanged, hence get gradient 0.
  """
  gts = jnp.sum(fg_sorted, axis=0)
  inter = gts - jnp.cumsum(fg_sorted, axis=0)
  union = gts + jnp.cumsum((1.0 - fg_sorted) * valid_sorted, axis=0)
  jaccard = jnp.where(union > 0, 1.0 - inter / jnp.where(union > 0, union, 1.0), 0.0)
  return jnp.concatenate([jaccard[:1], jnp.diff(jaccard, axis=0)], axis=0)


def _lovasz_flat(probs, labels, valid, classes):
  """Lovasz-softmax of flat ``probs`` [N, C], ``labels`` [N], ``valid`` [N] (bool)."""
  num_classes = probs.shape[-1]
  v = valid[:, None]
  fg = ((labels[:, None] == jnp.arange(num_classes)) & v).astype(probs.dtype)
  vf = jnp.broadcast_to(v, fg.shape).astype(probs.dtype)
  errors = jnp.where(v, jnp.abs(fg - probs), 0.0)
  # Descending errors, ignored pixels last (key -1); argsort is stable.
  key = jnp.where(v, lax.stop_gradient(errors), -1.0)
  perm = jnp.argsort(-key, axis=0)
  errors_sorted = jnp.take_along_axis(errors, perm, axis=0)
  grad = _lovasz_grad(jnp.take_along_axis(fg, perm, axis=0),
                      jnp.take_along_axis(vf, perm, axis=0))
  per_class = jnp.sum(errors_sorted * grad, axis=0)
  if isinstance(classes, str):
    if classes == "present":
      weights = (jnp.sum(fg, axis=0) > 0).astype(probs.dtype)
    elif classes == "all":
      weights = jnp.ones((num_classes,), probs.dtype)
    else:
      raise ValueError(f"classes must be 'present', 'all' or a list, got {classes!r}.")
  else:
    weights = jnp.zeros((num_classes,), probs.dtype).at[jnp.asarray(classes)].set(1.0)
  count = jnp.sum(weights)
  return jnp.sum(per_class * weights) / jnp.where(count > 0, count, 1.0)


def lovasz_softmax(logits, labels, ignore_label: int | None = None, classes="present",
                   per_image: bool = False, from_logits: bool = True):
  """Lovasz-softmax loss (Berman, Rannen Triki & Blaschko, CVPR 2018).

  ``logits`` ``[B, ..., C]`` (class probabilities if ``from_logits=False``), integer
  ``labels`` ``[B, ...]``. For class ``c``: errors ``e_i = |fg_i - p_i(c)|`` sorted
  descending, ``loss_c = <e_sorted, grad>`` with ``grad`` the gradient of the Lovasz
  extension of the Jaccard loss (``jaccard = 1 - (gts - cumsum(fg)) / (gts +
  cumsum(1 - fg))``, ``grad = (jaccard[0], diff(jaccard))``). Result: mean of
  ``loss_c`` over the classes present in the (non-ignored) labels
  (``classes="present"``), over all (``"all"``) or over a given list of class ids.
  Pixels of the whole batch are pooled (``per_image=False``) or the loss is computed
  per image and averaged (``per_image=True``).

  Ignored pixels are removed exactly although shapes are static: they get zero error,
  are sorted after every valid pixel and count neither as foreground nor background,
  so they leave the cumulative sums, hence the Jaccard gradient, unchanged. The result
  equals the loss on the explicitly filtered pixels.
  """
  probs = jax.nn.softmax(logits, axis=-1) if from_logits else logits
  valid, safe = _valid_labels(labels, ignore_label)
  num_classes = probs.shape[-1]
  if per_image:
    b = probs.shape[0]
    losses = jax.vmap(lambda p, l, v: _lovasz_flat(p, l, v, classes))(
        probs.reshape(b, -1, num_classes), safe.reshape(b, -1), valid.reshape(b, -1))
    return jnp.mean(losses)
  return _lovasz_flat(probs.reshape(-1, num_classes), safe.reshape(-1), valid.reshape(-1),
                      classes)


# ---------------------------------------------------------------------------- image quality
def _window_taps(gaussian_weights: bool, sigma: float, win_size: int, dtype):
  if gaussian_weights:
    r = jnp.arange(win_size, dtype=dtype) - (win_size - 1) / 2
    taps = jnp.exp(-0.5 * (r / sigma) ** 2)
  else:
    taps = jnp.ones((win_size,), dtype)
  return taps / jnp.sum(taps)


def _separable_filter_valid(x, taps, spatial_dims: int):
  """Valid (unpadded) filtering of ``x`` [N, *spatial] with ``taps`` along each axis."""
  h = x[:, None]
  k = taps.shape[0]
  for d in range(spatial_dims):
    shape = [1] * spatial_dims
    shape[d] = k
    h = lax.conv_general_dilated(h, taps.reshape(1, 1, *shape), (1,) * spatial_dims,
                                 "VALID", precision=lax.Precision.HIGHEST)
  return h[:, 0]


def ssim(x, y, data_range: float = 1.0, *, spatial_dims: int = 2,
         gaussian_weights: bool = True, sigma: float = 1.5, win_size: int | None = None,
         k1: float = 0.01, k2: float = 0.03, use_sample_covariance: bool = False,
         reduce: bool = False):
  """Mean structural similarity (Wang et al. 2004) of ``x`` and ``y`` ``[..., *spatial]``.

  Local statistics use a separable window, applied by 1D convolutions along each of
  the last ``spatial_dims`` axes without padding (only windows inside the image):
  by default a Gaussian of ``sigma = 1.5`` truncated to 11 taps (``win_size = 2
  int(3.5 sigma + 0.5) + 1`` as ``scipy.ndimage`` with truncate 3.5), else a uniform
  window of ``win_size`` (default 7). With ``mu``/``s`` the windowed means/second
  moments, ``C1 = (k1 R)^2``, ``C2 = (k2 R)^2``, ``R = data_range``:
  ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 +
  C2))``, averaged over the window positions. Variances are the weighted ones of
  Wang et al. (``use_sample_covariance=False``, what skimage recommends to match that
  paper); ``True`` multiplies them by ``NP / (NP - 1)``, ``NP = win_size**spatial_dims``,
  as skimage's default does. This matches ``skimage.metrics.structural_similarity(x, y,
  data_range=R, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` on
  each image (skimage filters with reflection and then crops the border, i.e. the
  same valid windows). Returns one value per image (shape ``x.shape[:-spatial_dims]``)
  or, with ``reduce=True``, their mean. Needs each spatial size >= ``win_size``.
  """
  if win_size is None:
    win_size = 2 * int(3.5 * sigma + 0.5) + 1 if gaussian_weights else 7
  dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
  x = jnp.asarray(x, dtype)
  y = jnp.asarray(y, dtype)
  if x.shape != y.shape:
    raise ValueError(f"x and y differ in shape: {x.shape} vs {y.shape}.")
  spatial = x.shape[x.ndim - spatial_dims:]
  if len(spatial) != spatial_dims or min(spatial) < win_size:
    raise ValueError(f"Need {spatial_dims} spatial dims each >= win_size={win_size}, "
                     f"got shape {x.shape}.")
  batch_shape = x.shape[:x.ndim - spatial_dims]
  x = x.reshape((-1,) + spatial)
  y = y.reshape((-1,) + spatial)
  n = x.shape[0]
  taps = _window_taps(gaussian_weights, sigma, win_size, dtype)
  stats = _separable_filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y]), taps,
                                  spatial_dims)
  ux, uy, uxx, uyy, uxy = (stats[i * n:(i + 1) * n] for i in range(5))
  cov_norm = 1.0
  if use_sample_covariance:
    np_ = win_size ** spatial_dims
    cov_norm = np_ / (np_ - 1.0)
  vx = cov_norm * (uxx - ux * ux)
  vy = cov_norm * (uyy - uy * uy)
  vxy = cov_norm * (uxy - ux * uy)
  c1 = (k1 * data_range) ** 2
  c2 = (k2 * data_range) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
  per_image = jnp.mean(s.reshape(n, -1), axis=-1).reshape(batch_shape)
  return jnp.mean(per_image) if reduce else per_image


def ssim_loss(x, y, data_range: float = 1.0, **kwargs):
  """``1 - ssim(x, y, data_range, reduce=True, **kwargs)`` (a scalar)."""
  return 1.0 - ssim(x, y, data_range, reduce=True, **kwargs)


def psnr(x, y, data_range: float = 1.0, *, spatial_dims: int = 2, reduce: bool = False):
  """Peak signal-to-noise ratio ``10 log10(R^2 / MSE)`` in dB per image.

  The MSE is over the last ``spatial_dims`` axes; returns shape
  ``x.shape[:-spatial_dims]``, or their mean with ``reduce=True``. Identical images
  give ``inf``.
  """
  axes = tuple(range(-spatial_dims, 0))
  mse = jnp.mean((jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)) ** 2, axis=axes)
  value = 10.0 * jnp.log10(data_range ** 2 / mse)
  return jnp.mean(value) if reduce else value
