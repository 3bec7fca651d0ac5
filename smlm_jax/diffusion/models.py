"""Flax (linen) models that predict log D and its uncertainty from a movie.

Every model maps a normalized movie ``x`` [B, T, H, W] (see ``smlm_jax.diffusion.normalize``) to
``(mean, log_var)`` of the natural log of D in um^2/s, each [B], and is trained with the
Gaussian negative log-likelihood. Models are registered by name in ``MODELS`` and
built with ``build_model(config.model, **physics_context(simulator))``; extra fields of
``config.model`` are passed to the constructor, and the physics context (pixel size,
frame timing, D prior, camera noise) fills the fields a model declares for it.

* ``locformer`` (default, issue 11): localizes the spot in every frame with a
  Fisher-scoring Gaussian fit inside the jitted step, evaluates the exact likelihood of
  the blurred track on a grid of ln D, and refines that posterior with a transformer
  over per-frame tokens (position, precision, blur covariance, crop embedding). After
  the default CPU training (1,000 steps) it beats MLE localization + CVE in every D
  bin: relative RMSE 0.27 vs 0.43 overall, model/CVE 0.49-0.69 over six bins, at the
  track CRLB (0.97x) with 68% coverage 0.69 (``experiments/accuracy_study.py``, 1,024
  movies). See :class:`LocFormer` for the design.
* ``resnet2d``: frames stacked as channels, a small pre-activation ResNet.
* ``park_cnn``: Park-style conv-BN-swish blocks with max pooling (frames as channels).
* ``cnn3d``: a genuinely spatio-temporal 3D CNN over (t, y, x); its time axis is
  convolved and pooled, unlike a 2D net with a dummy time axis.
* ``blurformer`` (the default before issue 11): a per-frame CNN encoder followed by a
  transformer over time. D enters a movie in two places: the *shape* of each frame
  (motion blur widens and elongates the spot as 2 D t_exp / 6 per axis) and the
  *displacements between frames* (4 D dt). The shared per-frame encoder with
  coordinate channels (CoordConv) sees the blur and encodes where the spot is;
  self-attention across the 16 frame embeddings can then compare positions at every
  lag. Its strided encoder squeezes 64x64 px into a 4x4 map, too coarse for the
  ~5 nm positions slow molecules need: it loses to CVE below 3 um^2/s.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from smlm_jax.diffusion import normalize


class _Head(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, h):
    h = nn.swish(nn.Dense(self.hidden)(h))
    out = nn.Dense(2, kernel_init=nn.initializers.zeros)(h)
    # Centre the initial prediction on log D = 0 (1 um^2/s), log-var on 0.
    return out[..., 0], out[..., 1]


class ResBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.GroupNorm(num_groups=min(8, self.features))
    h = nn.swish(norm()(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), strides=self.stride)(h)
    h = nn.Conv(self.features, (3, 3), strides=self.stride)(h)
    h = nn.swish(norm()(h))
    h = nn.Conv(self.features, (3, 3))(h)
    return shortcut + h


class ResNet2D(nn.Module):
  """Frames as channels: [B, T, H, W] -> [B, H, W, T] -> ResNet -> head."""
  widths: Sequence[int] = (32, 64, 96)

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = jnp.moveaxis(x, 1, -1)
    h = nn.Conv(self.widths[0], (3, 3), strides=2)(h)
    for i, w in enumerate(self.widths):
      h = ResBlock(w, stride=1 if i == 0 else 2)(h, train)
    h = nn.swish(nn.GroupNorm(num_groups=8)(h))
    return _Head()(jnp.mean(h, axis=(1, 2)))


class ParkCNN(nn.Module):
  """Conv-BatchNorm-swish blocks with max pooling, frames as channels."""
  widths: Sequence[int] = (32, 64, 96, 128)

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = jnp.moveaxis(x, 1, -1)
    for w in self.widths:
      h = nn.Conv(w, (3, 3), use_bias=False)(h)
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
      h = nn.swish(h)
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
    h = jnp.concatenate([jnp.mean(h, axis=(1, 2)), jnp.max(h, axis=(1, 2))], axis=-1)
    return _Head()(h)


class CNN3D(nn.Module):
  """3D convolutions over (t, y, x); time is convolved and pooled like space."""
  widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = x[..., None]  # [B, T, H, W, 1]
    h = nn.Conv(self.widths[0], (3, 4, 4), strides=(1, 4, 4))(h)  # 16x16 spatial
    for w in self.widths:
      h = nn.Conv(w, (3, 3, 3))(h)
      h = nn.swish(nn.GroupNorm(num_groups=8)(h))
      h = nn.Conv(w, (3, 3, 3))(h)
      h = nn.swish(nn.GroupNorm(num_groups=8)(h))
      h = nn.max_pool(h, (2, 2, 2), strides=(2, 2, 2))
    h = jnp.mean(h, axis=(1, 2, 3))
    return _Head()(h)


class FrameEncoder(nn.Module):
  """Per-frame CNN with coordinate channels: [N, H, W] -> [N, E]."""
  widths: Sequence[int] = (16, 32, 64)
  embed: int = 64

  @nn.compact
  def __call__(self, frames):
    n, hgt, wid = frames.shape
    yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, hgt), jnp.linspace(-1, 1, wid),
                          indexing="ij")
    coords = jnp.broadcast_to(jnp.stack([xx, yy], -1), (n, hgt, wid, 2))
    h = jnp.concatenate([frames[..., None], coords], axis=-1)
    h = nn.Conv(self.widths[0], (5, 5), strides=2)(h)
    for w in self.widths:
      h = nn.swish(nn.GroupNorm(num_groups=8)(h))
      h = nn.Conv(w, (3, 3), strides=2)(h)
    h = nn.swish(nn.GroupNorm(num_groups=8)(h))
    # Flatten the small map (keeps where the spot is, which pooling would lose).
    h = h.reshape(n, -1)
    return nn.Dense(self.embed)(h)


class TransformerBlock(nn.Module):
  heads: int = 4
  mlp: int = 128

  @nn.compact
  def __call__(self, h):
    a = nn.LayerNorm()(h)
    h = h + nn.MultiHeadDotProductAttention(num_heads=self.heads)(a, a)
    m = nn.LayerNorm()(h)
    m = nn.Dense(self.mlp)(m)
    return h + nn.Dense(h.shape[-1])(nn.gelu(m))


class BlurFormer(nn.Module):
  """Per-frame encoder (blur + position) and a temporal transformer (displacements)."""
  embed: int = 64
  depth: int = 2
  heads: int = 4
  encoder_widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, t, hgt, wid = x.shape
    e = FrameEncoder(self.encoder_widths, self.embed)(x.reshape(b * t, hgt, wid))
    e = e.reshape(b, t, self.embed)
    pos = self.param("time_embedding", nn.initializers.normal(0.02), (t, self.embed))
    h = e + pos
    for _ in range(self.depth):
      h = TransformerBlock(self.heads, 2 * self.embed)(h)
    h = nn.LayerNorm()(h)
    return _Head()(jnp.concatenate([jnp.mean(h, axis=1), jnp.max(h, axis=1)], -1))


# --------------------------------------------------------------------------------------
# locformer: localize every frame inside the model, exact track likelihood, transformer.
# --------------------------------------------------------------------------------------
FIT_PARAMS = 7       # x_px, y_px, log amplitude, offset, log sx_px, log sy_px, atanh-ish rho
INVALID_VAR_PX2 = 1e3  # variance given to a frame whose spot was not found (~3 um sd)
INVALID_SE_PX = 1e3    # standard error reported where a fit's came out non-finite
# The fit's normal equations in full float32: at default precision XLA may run float32
# products on GPU tensor cores at TF32 (10-bit mantissa), too coarse for a Fisher
# matrix whose entries span several decades.
_FULL = jax.lax.Precision.HIGHEST


def _gaussian_spot(theta, u, v):
  """Elliptical Gaussian + offset at pixel centres (u, v) (point-sampled; the fitted
  covariance absorbs the 1/12 px^2 of pixel integration)."""
  x, y, log_a, b, log_sx, log_sy, r = theta
  sx, sy, rho = jnp.exp(log_sx), jnp.exp(log_sy), 0.9 * jnp.tanh(r)
  du, dv = (u - x) / sx, (v - y) / sy
  q = (du * du - 2.0 * rho * du * dv + dv * dv) / (1.0 - rho * rho)
  return jnp.exp(log_a - 0.5 * q) + b



def _cholesky(a):
  """Lower Cholesky factor of a small SPD matrix [n, n], unrolled into elementwise ops.

  Pure jnp (no LAPACK custom call): jaxlib's batched CPU LU/Cholesky kernels split
  large batches over the intra-op thread pool and can deadlock when several host
  devices share two cores, which a vmapped fit inside a sharded step does.
  """
  n = a.shape[-1]
  L = [[None] * n for _ in range(n)]
  for j in range(n):
    s = a[j, j] - sum((L[j][k] * L[j][k] for k in range(j)), jnp.float32(0.0))
    L[j][j] = jnp.sqrt(jnp.maximum(s, 1e-12))
    for i in range(j + 1, n):
      t = a[i, j] - sum((L[i][k] * L[j][k] for k in range(j)), jnp.float32(0.0))
      L[i][j] = t / L[j][j]
  return L


def spd_solve(a, b):
  """x with a x = b for a small SPD matrix a [n, n] and b [n] (see :func:`_cholesky`)."""
  n = a.shape[-1]
  L = _cholesky(a)
  y = []
  for i in range(n):
    y.append((b[i] - sum((L[i][k] * y[k] for k in range(i)), jnp.float32(0.0))) / L[i][i])
  x = [None] * n
  for i in reversed(range(n)):
    x[i] = (y[i] - sum((L[k][i] * x[k] for k in range(i + 1, n)), jnp.float32(0.0))) / L[i][i]
  return jnp.stack(x)


def spd_inverse_diagonal(a):
  """diag(a^-1) of a small SPD matrix: sum over rows of (L^-1)^2 (see :func:`_cholesky`)."""
  n = a.shape[-1]
  L = _cholesky(a)
  inv = [[None] * n for _ in range(n)]     # inv[i][j] = (L^-1)[i, j], lower triangular
  for j in range(n):
    inv[j][j] = 1.0 / L[j][j]
    for i in range(j + 1, n):
      inv[i][j] = -sum((L[i][k] * inv[k][j] for k in range(j, i)), jnp.float32(0.0)) / L[i][i]
  return jnp.stack([sum(inv[i][j] ** 2 for i in range(j, n)) for j in range(n)])


def fit_spot(signal, noise_var, shot_var_per_signal, roi_px: int, iterations: int):
  """Weighted least-squares fit of one frame's spot: [H, W] signal -> fit dict.

  ``signal`` is background-subtracted photons in units of the background shot-noise
  sd (``sinh`` of the model input). The pixel variance model is
  ``noise_var + shot_var_per_signal * max(model, 0)`` (background + read noise, plus
  the spot's own shot noise), re-weighted every Levenberg-Marquardt iteration: this is
  Fisher scoring of the Gaussian approximation of the Poisson/sCMOS likelihood, so the
  positions reach the precision of the MLE localizer (``baselines.localize``) and the
  inverse Fisher matrix gives their standard errors. The fit runs on a roi_px square
  around the brightest 5x5 box (clamped to the frame).
  Returns theta [7] (position in frame pixels, pixel i spans [i, i+1]), se [7],
  reduced chi^2, the crop [roi_px, roi_px] of the signal, and ``valid``.
  """
  h, w = signal.shape
  py, px, _ = normalize.brightest_box(signal, 5)
  y0 = jnp.clip(py - roi_px // 2, 0, h - roi_px)
  x0 = jnp.clip(px - roi_px // 2, 0, w - roi_px)
  roi = jax.lax.dynamic_slice(signal, (y0, x0), (roi_px, roi_px))
  grid = jnp.arange(roi_px, dtype=jnp.float32) + 0.5
  u = jnp.broadcast_to(grid[None, :], (roi_px, roi_px))
  v = jnp.broadcast_to(grid[:, None], (roi_px, roi_px))
  cy, cx = (py - y0).astype(jnp.float32), (px - x0).astype(jnp.float32)
  near = (jnp.abs(v - 0.5 - cy) <= 2) & (jnp.abs(u - 0.5 - cx) <= 2)
  wgt = jnp.where(near, jnp.maximum(roi, 0.0), 0.0)
  tot = wgt.sum()
  gx = jnp.where(tot > 1e-3, (wgt * u).sum() / jnp.maximum(tot, 1e-3), cx + 0.5)
  gy = jnp.where(tot > 1e-3, (wgt * v).sum() / jnp.maximum(tot, 1e-3), cy + 0.5)
  amp = jnp.maximum(jnp.max(jnp.where(near, roi, 0.0)), 0.5)
  theta0 = jnp.stack([gx, gy, jnp.log(amp), 0.0, math.log(1.1), math.log(1.1), 0.0])
  theta0_safe = jnp.stack([cx + 0.5, cy + 0.5, 0.0, 0.0, math.log(1.1), math.log(1.1), 0.0])
  lower = jnp.array([-1.0, -1.0, -3.0, -5.0, math.log(0.4), math.log(0.4), -3.0])
  upper = jnp.array([roi_px + 1.0, roi_px + 1.0, 12.0, 5.0, math.log(6.0), math.log(6.0),
                     3.0])
  data = roi.reshape(-1)
  model = lambda th: _gaussian_spot(th, u, v).reshape(-1)

  def weights(m):
    return 1.0 / (noise_var + shot_var_per_signal * jnp.maximum(m, 0.0))

  def normal_equations(th):
    m = model(th)
    wts = weights(m)
    jac = jax.jacfwd(model)(th)                        # [P, 7]
    return m, wts, jac, jnp.matmul(jac.T, jac * wts[:, None], precision=_FULL)

  def cost(th, wts):
    r = data - model(th)
    return jnp.sum(wts * r * r)

  def body(_, carry):
    th, lam = carry
    m, wts, jac, fisher = normal_equations(th)
    grad = jnp.matmul(jac.T, wts * (data - m), precision=_FULL)
    step = spd_solve(fisher + lam * jnp.diag(jnp.diag(fisher))
                     + 1e-6 * jnp.eye(FIT_PARAMS), grad)
    new = jnp.clip(th + step, lower, upper)
    better = cost(new, wts) < cost(th, wts)
    return jnp.where(better, new, th), jnp.where(better, lam * 0.3, lam * 10.0)

  th, _ = jax.lax.fori_loop(0, iterations, body, (theta0, jnp.float32(1e-2)))
  _, wts, _, fisher = normal_equations(th)
  se = jnp.sqrt(spd_inverse_diagonal(fisher + 1e-6 * jnp.eye(FIT_PARAMS)))
  chi2 = cost(th, wts) / (roi_px * roi_px - FIT_PARAMS)
  valid = (jnp.all(jnp.isfinite(th)) & jnp.all(jnp.isfinite(se))
           & (th[0] > 0.5) & (th[0] < roi_px - 0.5) & (th[1] > 0.5) & (th[1] < roi_px - 0.5)
           & (se[2] < 0.5) & (se[0] < 2.0) & (se[1] < 2.0))
  # Outputs stay finite whatever the frame (a rare fit's Fisher matrix is singular:
  # se = inf, 1 frame in 4096 of a batch-256 step, seen at step 39 of
  # configs/diffusion.py:gpu); such a frame is not valid, and a non-finite value in it
  # would still turn the gradient NaN through the masked branch of a later where.
  th = jnp.where(jnp.isfinite(th), th, theta0_safe)
  se = jnp.where(jnp.isfinite(se), se, INVALID_SE_PX)
  chi2 = jnp.where(jnp.isfinite(chi2), chi2, 1e2)
  th = th.at[0].add(x0.astype(jnp.float32)).at[1].add(y0.astype(jnp.float32))
  return {"theta": th, "se": se, "chi2": chi2, "crop": roi, "valid": valid}


def background_noise(signal, roi_px: int):
  """Per-movie variance of ``signal`` [B, T, H, W] away from each frame's spot."""
  b, t, h, w = signal.shape
  py, px, _ = normalize.brightest_box(signal, 5)
  away = ~normalize.square_mask(py, px, roi_px // 2 + 2, h, w)
  n = jnp.maximum(away.sum(axis=(1, 2, 3)), 1)
  mean = jnp.sum(jnp.where(away, signal, 0.0), axis=(1, 2, 3)) / n
  dev = jnp.where(away, signal - mean[:, None, None, None], 0.0)
  return jnp.maximum(jnp.sum(dev * dev, axis=(1, 2, 3)) / n, 1e-3)


def track_log_likelihood(pos_px, var_px2, lnD_px2_per_s, frame_interval_s: float,
                         R: float):
  """Exact log-likelihood of a blurred track for each D on a grid.

  pos_px [B, T, 2] frame positions, var_px2 [B, T, 2] their localization variances,
  lnD_px2_per_s [K] -> [B, K]. Per axis the T-1 displacements are Gaussian with a
  tridiagonal covariance (Berglund, PRE 82, 011917, 2010; Michalet & Berglund 2012):
    var(d_n) = 2 D dt (1 - 2R) + s_n^2 + s_{n+1}^2,  cov(d_n, d_{n+1}) = 2 R D dt - s_{n+1}^2,
  R = t_exp / (6 dt). log det and the quadratic form come from the LDL^T recursion
  (T - 1 steps, vectorized over movies, grid and axes). A frame without a spot gets a
  huge variance, which merges its two displacements into one: the exact marginal
  likelihood of a track with a gap.
  """
  ddt = jnp.exp(lnD_px2_per_s)[None, :, None] * frame_interval_s       # [1, K, 1]
  d = (pos_px[:, 1:] - pos_px[:, :-1])[:, None]                         # [B, 1, T-1, 2]
  var = var_px2[:, None]                                                # [B, 1, T, 2]
  logdet = quad = 0.0
  piv = z = None
  for n in range(d.shape[2]):
    a = 2.0 * ddt * (1.0 - 2.0 * R) + var[:, :, n] + var[:, :, n + 1]
    if n == 0:
      piv, z = a, d[:, :, n]
    else:
      off = 2.0 * R * ddt - var[:, :, n]
      # Exact arithmetic keeps the pivot above 2 D dt (1 - 2R) > 0; the floor guards
      # float32 cancellation next to a lost frame (its huge variance is in a and off).
      piv, z = jnp.maximum(a - off * off / piv, 1e-6), d[:, :, n] - off * z / piv
    logdet = logdet + jnp.log(piv)
    quad = quad + z * z / piv
  return -0.5 * jnp.sum(logdet + quad, axis=-1)


class LocFormer(nn.Module):
  """Localize every frame, weigh the track by its exact likelihood, refine by attention.

  Why this design (issue 11: the model must beat MLE localization + CVE at every D):
  D reaches a movie through (a) the displacements between frames, which for slow
  molecules (4 D dt ~ 400 nm^2 at 0.01 um^2/s) are only resolved with the ~5 nm
  precision of a maximum-likelihood localizer, and (b) the motion blur of each frame,
  whose second moments grow by D t_exp / 3 per axis over the PSF's (0.33 px^2 at
  1 um^2/s, 3.3 px^2 at 10 um^2/s), elongated along the path. A strided CNN that
  squeezes 64x64 px to a 4x4 map cannot carry (a). So the network does what a
  physicist would do, in the jitted step and without learnable parameters in the
  physics:
  1. Localization: per frame, a 7-parameter elliptical-Gaussian fit (position,
     amplitude, offset, covariance of the blurred spot) on a roi_px crop around the
     brightest box, by Fisher scoring with the shot + read noise variance model
     (:func:`fit_spot`): positions as precise as the project's MLE localizer, their
     standard errors from the Fisher matrix, and the spot's covariance (the blur).
  2. Track likelihood: the exact Gaussian likelihood of the blurred track
     (:func:`track_log_likelihood`, Berglund 2010) on a grid of grid_size values of
     ln D spanning the training prior, with each frame's localization variance
     (Fisher se^2 times a learned per-frame factor exp(g), g = 0 at init). Its
     normalized posterior under the log-uniform prior gives (m0, v0) of ln D: the
     Bayes estimate from positions alone, already ahead of CVE (which uses only lag-1
     and lag-2 moments) before any training.
  3. Learned refinement: per-frame tokens (position, displacements, localization se,
     fitted covariance eigenvalues and anisotropy, amplitude, chi^2, validity) plus a
     small CNN embedding of the crop, a global token (the log-likelihood curve, m0,
     v0, noise level), and depth transformer blocks over time. The head adds
     (delta mean, delta log var) to (m0, log v0), zero at init. This is where the blur
     (PSF-free anisotropy, excess width over the PSF pooled over 16 frames) sharpens
     fast molecules, lost frames are discounted, and the variance is calibrated.
  Output: (mean, log_var) of ln D (um^2/s); the point estimate reported downstream is
  the posterior median exp(mean) (``metrics.point_and_interval``).
  The physics fields (pixel size, frame timing, D prior, training camera noise) are
  filled from ``config.sim`` by the task (``build_model(..., **physics_context(sim))``).
  """
  pixel_size_nm: float = 100.0
  frame_interval_s: float = 0.01
  exposure_s: float = 0.01
  D_range_um2_per_s: Sequence[float] = (0.01, 10.0)
  qe: float = 0.9
  read_noise_e: float = 1.6       # referred to the input (electrons before EM gain)
  excess_noise: float = 1.0       # 2 behind an EM register
  roi_px: int = 13
  fit_iterations: int = 10
  grid_size: int = 64
  embed: int = 64
  depth: int = 2
  heads: int = 4

  def lnD_grid(self):
    lo, hi = (math.log(float(v)) for v in self.D_range_um2_per_s)
    k = self.grid_size
    return lo + (jnp.arange(k, dtype=jnp.float32) + 0.5) * (hi - lo) / k, (hi - lo) / k

  def spot_features(self, x):
    """Localization of every frame of [B, T, H, W] model input (no parameters)."""
    signal = jnp.sinh(x.astype(jnp.float32))
    noise_var = background_noise(signal, self.roi_px)                      # [B]
    # The background level from the noise of the normalized input (the training
    # camera: var = (F bg / qe + r^2 / qe^2) / (bg + 1)); it sets the spot's shot-noise
    # weight 1 / (qe c), c = sqrt(bg + 1), and the photon scale.
    a, r2 = self.excess_noise / self.qe, (self.read_noise_e / self.qe) ** 2
    bg = jnp.where(noise_var > a + 1e-3,
                   jnp.clip((r2 - noise_var) / jnp.maximum(noise_var - a, 1e-3), 0.5, 300.0),
                   300.0)
    scale = jnp.sqrt(bg + 1.0)
    shot = self.excess_noise / (self.qe * scale)
    fit = jax.vmap(jax.vmap(
        lambda fr, nv, sv: fit_spot(fr, nv, sv, self.roi_px, self.fit_iterations),
        in_axes=(0, None, None)))(signal, noise_var, shot)
    fit = jax.tree.map(jax.lax.stop_gradient, fit)
    return fit, jax.lax.stop_gradient(noise_var), jax.lax.stop_gradient(bg)

  def track_posterior(self, fit, log_var_factor=0.0):
    """(log-likelihood [B, K] on the ln D grid, posterior mean and variance of ln D [B])
    of the localized tracks under the log-uniform prior (no parameters).

    Frame variances: Fisher se^2 x exp(log_var_factor) [B, T] (or a scalar); frames
    whose fit is not valid get INVALID_VAR_PX2 (marginalized out).
    """
    valid, se = fit["valid"], fit["se"]
    # The learned factor is bounded: no frame is less informative than a lost one
    # (var <= INVALID_VAR_PX2). Unbounded, a frame's factor reached exp(20) at step 743
    # of the default CPU run (var ~ 1e8 px^2) and float32 cancellation in the LDL
    # recursion turned the likelihood NaN. The clip keeps exp finite, so the minimum's
    # unused branch cannot send inf * 0 = NaN into the gradient.
    factor = jnp.exp(jnp.clip(jnp.asarray(log_var_factor, jnp.float32), -15.0, 15.0))
    factor = jnp.broadcast_to(factor, valid.shape)[..., None]
    se = jnp.where(valid[..., None], se[..., :2], 1.0)   # no inf in the unused branch
    var = jnp.where(valid[..., None],
                    jnp.minimum(se ** 2 * factor + 1e-5, INVALID_VAR_PX2), INVALID_VAR_PX2)
    grid, cell = self.lnD_grid()
    lnD_px = grid - 2.0 * math.log(self.pixel_size_nm * 1e-3)
    R = self.exposure_s / (6.0 * self.frame_interval_s)
    ll = track_log_likelihood(fit["theta"][..., :2], var, lnD_px, self.frame_interval_s, R)
    post = jax.nn.softmax(ll, axis=-1)
    m0 = jnp.sum(post * grid, -1)
    v0 = jnp.sum(post * (grid - m0[:, None]) ** 2, -1) + cell ** 2 / 12.0
    return ll, m0, v0

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, t, _, _ = x.shape
    fit, noise_var, bg = self.spot_features(x)
    th, se, valid = fit["theta"], fit["se"], fit["valid"]
    pos = th[..., :2]                                                    # [B, T, 2] px
    sx, sy, rho = jnp.exp(th[..., 4]), jnp.exp(th[..., 5]), 0.9 * jnp.tanh(th[..., 6])
    half_tr = 0.5 * (sx * sx + sy * sy)
    det = (sx * sy) ** 2 * (1.0 - rho * rho)
    disc = jnp.sqrt(jnp.maximum(half_tr ** 2 - det, 0.0))
    lam1, lam2 = half_tr + disc, jnp.maximum(half_tr - disc, 1e-3)
    vf = valid.astype(jnp.float32)
    nvalid = jnp.maximum(vf.sum(1, keepdims=True), 1.0)
    centre = jnp.sum(pos * vf[..., None], 1, keepdims=True) / nvalid[..., None]
    rel = jnp.where(valid[..., None], pos - centre, 0.0)
    step_next = jnp.concatenate([rel[:, 1:] - rel[:, :-1], jnp.zeros((b, 1, 2))], 1)
    step_prev = jnp.concatenate([jnp.zeros((b, 1, 2)), rel[:, 1:] - rel[:, :-1]], 1)
    log_se = jnp.log(jnp.clip(se[..., :2], 1e-3, 10.0))
    photons = jnp.exp(th[..., 2]) * 2 * math.pi * jnp.sqrt(det) * jnp.sqrt(bg + 1.0)[:, None]
    frame_feats = jnp.concatenate([
        rel / 8.0, step_next / 4.0, step_prev / 4.0, log_se + 2.0,
        jnp.log(lam1)[..., None], jnp.log(lam2)[..., None],
        (jnp.log(lam1) - jnp.log(lam2))[..., None], rho[..., None],
        (jnp.log(jnp.clip(photons, 1.0, 1e5)) - 7.0)[..., None], th[..., 3:4],
        jnp.log(jnp.clip(fit["chi2"], 1e-2, 1e2))[..., None], vf[..., None] - 0.5], -1)
    frame_feats = jnp.where(valid[..., None], frame_feats, 0.0).at[..., -1].set(vf - 0.5)

    # Per-frame localization variance: Fisher se^2 times a learned factor (1 at init).
    g = nn.Dense(1, kernel_init=nn.initializers.zeros, name="var_factor")(
        nn.swish(nn.Dense(32, name="var_hidden")(frame_feats)))[..., 0]
    ll, m0, v0 = self.track_posterior(fit, g)

    crop = jnp.arcsinh(fit["crop"]).reshape((b * t,) + fit["crop"].shape[2:] + (1,))
    c = nn.swish(nn.Conv(16, (3, 3))(crop))
    c = nn.swish(nn.Conv(32, (3, 3), strides=2)(c))
    c = nn.Dense(self.embed)(c.reshape(b, t, -1))
    tokens = nn.Dense(self.embed)(frame_feats) + c * vf[..., None]
    tokens = tokens + self.param("time_embedding", nn.initializers.normal(0.02),
                                 (t, self.embed))
    curve = jnp.clip(ll - ll.max(-1, keepdims=True), -30.0, 0.0) / 10.0
    glob = jnp.concatenate([curve, m0[:, None], 0.5 * jnp.log(v0)[:, None],
                            jnp.log(noise_var)[:, None], jnp.log(bg)[:, None] / 3.0,
                            nvalid / t], -1)
    cls = nn.Dense(self.embed)(nn.swish(nn.Dense(self.embed)(glob)))
    h = jnp.concatenate([cls[:, None], tokens], 1)
    for _ in range(self.depth):
      h = TransformerBlock(self.heads, 2 * self.embed)(h)
    h = nn.LayerNorm()(h)
    summary = jnp.concatenate([h[:, 0], jnp.mean(h[:, 1:], 1), glob], -1)
    dm, dlv = _Head()(summary)
    return m0 + dm, jnp.log(v0) + dlv


def physics_context(simulator) -> dict:
  """Fields a physics-aware model takes from the simulator (geometry, prior, camera)."""
  geo, cam = simulator.geometry, simulator.camera
  emccd = cam.model == "emccd"
  return {"pixel_size_nm": float(geo.pixel_size_nm),
          "frame_interval_s": float(geo.frame_interval_s),
          "exposure_s": float(geo.exposure_s),
          "D_range_um2_per_s": tuple(float(v) for v in simulator.priors.D_um2_per_s),
          "qe": float(cam.qe),
          "read_noise_e": float(cam.read_noise_e) / (float(cam.em_gain) if emccd else 1.0),
          "excess_noise": 2.0 if emccd else 1.0}


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet2d": ResNet2D,
    "park_cnn": ParkCNN,
    "cnn3d": CNN3D,
    "blurformer": BlurFormer,
    "locformer": LocFormer,
}


def build_model(model_cfg: Any, **context) -> nn.Module:
  """Builds the model named ``model_cfg.name`` with the remaining fields as kwargs.

  ``context`` (e.g. :func:`physics_context`) supplies fields the model class declares
  and ``model_cfg`` does not set; models without such fields ignore it.
  """
  cfg = dict(model_cfg)
  name = cfg.pop("name")
  if name not in MODELS:
    raise ValueError(f"unknown model.name {name!r}; choose one of {sorted(MODELS)}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
  declared = getattr(MODELS[name], "__dataclass_fields__", {})
  for k, v in context.items():
    if k in declared and k not in kwargs:
      kwargs[k] = v
  try:
    return MODELS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"bad fields for model {name!r}: {e}") from None
