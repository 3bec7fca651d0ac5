"""Coarse pose search: the learned cloud rendered at many random rotations, compared
with every image of the batch at low resolution; the best rotation per image.

Why: a pose CNN trained only through the render loss (HOLLy) must break the symmetry
of its starting point by itself: early on the cloud is a blob whose renders barely
change with rotation, so the CNN receives almost no signal and training lingers for
thousands of steps, and it can settle on a pose map that is only locally consistent.
Projection-matching methods of cryo-EM avoid this by searching orientations
exhaustively against the current model (e.g. RELION, Scheres 2012; cryoSPARC's
stochastic-gradient ab-initio, Punjani et al. 2017). Here a fresh set of ``num``
Haar-random rotations is drawn every step (no fixed grid, so no grid bias), the cloud
is rendered at each (stop-gradient) at ``1/factor`` resolution with a width of at
least ``sigma_coarse_px`` and scored against each image blurred to the same width:
  score[b, g] = |r_g|^2 - 2 <image_b, r_g>     (the L2 distance up to |image_b|^2),
one matrix product [B, n^2] x [n^2, G]. The best rotation joins the CNN's hypotheses;
when it explains an image better than the CNN does, the CNN is pulled towards it
(``loss.distill_weight``), so the CNN learns the pose map the search finds and then
refines it through the render loss at full resolution.

Sum-pooling a pixel-integrated splat image of width sigma by ``factor`` gives exactly
the pixel-integrated image of width sigma/factor at the coarse size, so the coarse
renders and the pooled images are the same function of the pose.

Hierarchical search (``grid="fibonacci"``, ``top``, ``local``, ``levels``; the default
config): the global candidates are a super-Fibonacci grid on SO(3) (Alexa 2022: a
deterministic low-discrepancy set, no gaps as large as those of a random draw of the
same size), turned by one Haar-random rotation per step (so the grid's own positions
are not favoured); the ``top`` best per image are then refined locally, as in
cryoSPARC's branch-and-bound and cryoDRGN's hierarchical pose search: each is turned
by ``local`` small rotations (fixed axes, angle half the grid spacing, halved at every
one of ``levels``), every image scores its own candidates, and the ``top`` best are
kept. The best of all is returned.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from smlm_jax.holly import render
from smlm_jax.holly import rotations
from smlm_jax.holly.prng import fast_prng


def sum_pool(images, factor: int):
  """[..., N, N] -> [..., N/f, N/f] sums over f x f blocks."""
  if factor == 1:
    return images
  n = images.shape[-1] // factor
  x = images[..., :n * factor, :n * factor]
  x = x.reshape(x.shape[:-2] + (n, factor, n, factor))
  return x.sum(axis=(-3, -1))


def fibonacci_axes(num: int) -> np.ndarray:
  """[num, 3] near-uniform unit vectors on the sphere (Fibonacci lattice)."""
  i = np.arange(num, dtype=np.float64) + 0.5
  z = 1.0 - 2.0 * i / num
  r = np.sqrt(np.maximum(1.0 - z * z, 0.0))
  a = math.pi * (3.0 - math.sqrt(5.0)) * i
  return np.stack([r * np.cos(a), r * np.sin(a), z], -1)


def grid_rotations(num: int) -> np.ndarray:
  """[num, 3, 3] super-Fibonacci rotations (float32 numpy; see rotations.py)."""
  from scipy.spatial.transform import Rotation
  q = rotations.super_fibonacci_quaternions(num)                  # (w, x, y, z)
  return Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix().astype(np.float32)


def _scores(renders, target):
  """|r|^2 - 2 <target, r>: renders [..., G, n, n] against targets [..., n, n]."""
  r = renders.reshape(renders.shape[:-2] + (-1,))
  t = target.reshape(target.shape[:-2] + (-1,))
  return jnp.sum(r * r, -1) - 2.0 * jnp.einsum("...gp,...p->...g", r, t)


@fast_prng
def search(points, images, sigma_px, key, num: int, factor: int, sigma_coarse_px: float,
           fov: float, grid: str = "random", top: int = 1, local: int = 0,
           levels: int = 0):
  """Best rotation for each image [B, N, N] (unit mass, width sigma_px [B] or scalar)
  among ``num`` global candidates (``grid``: "random" Haar draws or "fibonacci"),
  optionally refined locally (``top`` x ``local`` candidates per level, ``levels``
  levels): (R [B, 3, 3], score [B])."""
  n = images.shape[-1] // factor
  if grid == "fibonacci":
    R = jnp.asarray(grid_rotations(num)) @ rotations.random_rotation(key)
  elif grid == "random":
    R = rotations.random_rotation(key, (num,))
  else:
    raise ValueError(f"unknown config.search.grid {grid!r}; use random or fibonacci")
  sigma_c = jnp.maximum(jnp.max(jnp.asarray(sigma_px)) / factor, sigma_coarse_px)
  pts = jax.lax.stop_gradient(points)
  renders = render.render_batch(pts, R, jnp.zeros((num, 2), pts.dtype), sigma_c, n, fov)
  pooled = sum_pool(jax.lax.stop_gradient(images), factor)
  extra = jnp.sqrt(jnp.maximum(sigma_c ** 2 - (jnp.asarray(sigma_px) / factor) ** 2, 0.0))
  extra = jnp.broadcast_to(extra, pooled.shape[:1])
  target = jax.vmap(lambda im, e: render.gaussian_blur(im, e, n))(pooled, extra)
  flat_r = renders.reshape(num, -1)
  score = jnp.sum(flat_r ** 2, axis=1)[None] - 2.0 * target.reshape(target.shape[0], -1) @ flat_r.T
  if levels <= 0 or local <= 0:
    g = jnp.argmin(score, axis=1)
    return R[g], jnp.min(score, axis=1)
  k = max(1, min(int(top), num))
  neg, idx = jax.lax.top_k(-score, k)                               # [B, k]
  cand, cand_score = R[idx], -neg                                   # [B, k, 3, 3]
  axes = jnp.asarray(fibonacci_axes(local), jnp.float32)
  angle = 0.5 * rotations.grid_spacing_rad(num)
  zeros = jnp.zeros((k * local, 2), pts.dtype)
  for _ in range(levels):
    turn = rotations.exp_map(axes * angle)                          # [L, 3, 3]
    new = (turn[None, None] @ cand[:, :, None]).reshape(cand.shape[0], k * local, 3, 3)
    rend = jax.vmap(lambda Rb: render.render_batch(pts, Rb, zeros, sigma_c, n, fov))(new)
    s = _scores(rend, target)                                       # [B, k L]
    all_R = jnp.concatenate([cand, new], axis=1)
    all_s = jnp.concatenate([cand_score, s], axis=1)
    neg, idx = jax.lax.top_k(-all_s, k)
    cand = jnp.take_along_axis(all_R, idx[:, :, None, None], axis=1)
    cand_score = -neg
    angle = 0.5 * angle
  return cand[:, 0], cand_score[:, 0]


def image_centroid(images, size: int, fov: float):
  """Centroids [B, 2] (x, y) of unit-mass images [B, N, N] in normalized units."""
  c = (jnp.arange(size, dtype=jnp.float32) + 0.5) * (2.0 * fov / size) - fov
  m = jnp.maximum(jnp.sum(images, axis=(-2, -1)), 1e-12)
  return jnp.stack([jnp.sum(images * c[None, None, :], axis=(-2, -1)) / m,
                    jnp.sum(images * c[None, :, None], axis=(-2, -1)) / m], -1)


def centroid_translation(points, R, images, size: int, fov: float):
  """Translation [B, 2] that puts the posed cloud's centroid on each image's centroid."""
  c = jnp.mean(points, axis=0)
  return image_centroid(images, size, fov) - (R @ c)[..., :2]


def refine(points, image, R0, t0, sigma_px, size: int, fov: float,
           extra_sigmas_px=(2.0, 1.0, 0.5, 0.0), damping: float = 1e-2,
           coarse_min_sigma_px: float = 0.8):
  """Gauss-Newton (Levenberg-Marquardt) refinement of one image's pose.

  Minimizes the L2 distance between the image and the render of the (fixed) cloud
  over a rotation increment (rotation vector, applied on the left: exp(w) R0) and a
  translation increment, one iteration per entry of ``extra_sigmas_px``: both image
  and render are widened by that extra blur (coarse to fine, so that a start some
  degrees off is still inside the basin). Iterations whose total width stays above
  ``coarse_min_sigma_px`` at half resolution run there (2x2-binned image; 4x cheaper,
  no information lost at that blur). A step that does not lower the loss is not
  taken. Returns (R [3, 3], t [2])."""
  pts = jax.lax.stop_gradient(points)
  image = jax.lax.stop_gradient(image)
  R0 = jax.lax.stop_gradient(R0)
  t0 = jax.lax.stop_gradient(t0)
  theta = jnp.zeros(5, jnp.float32)
  half = sum_pool(image, 2) if size % 2 == 0 else None
  for extra in extra_sigmas_px:
    s = jnp.sqrt(sigma_px ** 2 + extra ** 2)
    coarse = half is not None and extra > 0
    # the binned image has width s / 2: use it only when that is still >= the minimum
    # (decided per step at run time; both branches are traced)
    n = size // 2 if coarse else size

    def make(img, f, n=n, extra=extra, s=s):
      target = render.gaussian_blur(img, extra / f, n) if extra > 0 else img
      scale = jnp.sqrt(4 * jnp.pi) * s / f

      def residual(th):
        R = rotations.exp_map(th[:3]) @ R0
        out = render.render(pts, R, t0 + th[3:], s / f, n, fov)
        return scale * (out - target).reshape(-1)
      return residual

    def gn_step(residual, theta=theta):
      r, jvp = jax.linearize(residual, theta)
      J = jax.vmap(jvp, out_axes=1)(jnp.eye(5, dtype=jnp.float32))      # [n^2, 5]
      H = J.T @ J
      g = J.T @ r
      H = H + damping * (jnp.trace(H) / 5.0 + 1e-12) * jnp.eye(5)
      new = theta - jnp.linalg.solve(H, g)
      better = jnp.sum(residual(new) ** 2) < jnp.sum(r ** 2)
      return jnp.where(better, new, theta)

    if coarse:
      theta = jax.lax.cond(s / 2 >= coarse_min_sigma_px,
                           lambda: gn_step(make(half, 2)),
                           lambda: gn_step(make(image, 1, n=size)))
    else:
      theta = gn_step(make(image, 1))
  return rotations.exp_map(theta[:3]) @ R0, t0 + theta[3:]
