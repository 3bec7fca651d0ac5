"""Rotations: uniform sampling on SO(3), quaternions, and the continuous 6D representation.

Conventions: a rotation acts on column vectors, ``p' = R @ p``; point clouds are rows
``[N, 3]`` so the code writes ``p @ R.T``. Quaternions are ``(w, x, y, z)``, unit norm.

Why 6D for the network (Zhou, Barnes, Lu, Yang & Li, "On the continuity of rotation
representations in neural networks", CVPR 2019): every representation of SO(3) in
<= 4 real numbers (Euler angles, axis-angle, quaternions) is discontinuous somewhere
as a function *from* rotations, so a network regressing it must learn a jump (for
quaternions, q and -q are the same rotation and any continuous choice of sign fails
on a great circle). The first two columns of R (6 numbers) are continuous; any 6
numbers map back to a rotation by Gram-Schmidt (:func:`matrix_from_6d`), a smooth
map, so gradients through it are well behaved everywhere but on a measure-zero set
(parallel columns) that a small epsilon guards.

Uniform sampling: a 4D standard normal vector normalized to unit length is a uniform
(Haar) random unit quaternion (Shoemake 1992, "Uniform random rotations", Graphics
Gems III); its rotation matrix is Haar-distributed on SO(3).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from smlm_jax.holly.prng import fast_prng

_EPS = 1e-8


@fast_prng
def random_quaternion(key, shape=()) -> jax.Array:
  """Uniform random unit quaternions (w, x, y, z), [*shape, 4], w >= 0."""
  q = jax.random.normal(key, tuple(shape) + (4,))
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  return q * jnp.where(q[..., :1] < 0, -1.0, 1.0)


def matrix_from_quaternion(q) -> jax.Array:
  """[..., 4] (w, x, y, z) (any norm > 0) -> rotation matrices [..., 3, 3]."""
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
  rows = [
      [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
      [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
      [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
  ]
  return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def quaternion_from_matrix(R) -> jax.Array:
  """Rotation matrices [..., 3, 3] -> unit quaternions [..., 4] with w >= 0.

  Uses the largest of the four diagonal combinations (Shepperd's method), so it is
  accurate for every rotation including 180 degrees."""
  R = jnp.asarray(R)
  m00, m11, m22 = R[..., 0, 0], R[..., 1, 1], R[..., 2, 2]
  t = jnp.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22,
                 1 - m00 - m11 + m22], axis=-1)
  k = jnp.argmax(t, axis=-1)
  s = lambda i, j: R[..., i, j]
  cand = jnp.stack([
      jnp.stack([t[..., 0], s(2, 1) - s(1, 2), s(0, 2) - s(2, 0), s(1, 0) - s(0, 1)], -1),
      jnp.stack([s(2, 1) - s(1, 2), t[..., 1], s(0, 1) + s(1, 0), s(0, 2) + s(2, 0)], -1),
      jnp.stack([s(0, 2) - s(2, 0), s(0, 1) + s(1, 0), t[..., 2], s(1, 2) + s(2, 1)], -1),
      jnp.stack([s(1, 0) - s(0, 1), s(0, 2) + s(2, 0), s(1, 2) + s(2, 1), t[..., 3]], -1),
  ], axis=-2)
  q = jnp.take_along_axis(cand, k[..., None, None], axis=-2)[..., 0, :]
  q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  return q * jnp.where(q[..., :1] < 0, -1.0, 1.0)


@fast_prng
def random_rotation(key, shape=()) -> jax.Array:
  """Haar-uniform rotation matrices [*shape, 3, 3]."""
  return matrix_from_quaternion(random_quaternion(key, shape))


def matrix_from_6d(x) -> jax.Array:
  """[..., 6] (two 3-vectors a1, a2) -> rotation [..., 3, 3] with columns
  b1 = a1/|a1|, b2 = normalized a2 - (b1.a2) b1, b3 = b1 x b2 (Zhou et al. 2019)."""
  a1, a2 = x[..., 0:3], x[..., 3:6]
  b1 = a1 / jnp.sqrt(jnp.sum(a1 * a1, -1, keepdims=True) + _EPS)
  a2 = a2 - jnp.sum(b1 * a2, -1, keepdims=True) * b1
  b2 = a2 / jnp.sqrt(jnp.sum(a2 * a2, -1, keepdims=True) + _EPS)
  b3 = jnp.cross(b1, b2)
  return jnp.stack([b1, b2, b3], axis=-1)


def sixd_from_matrix(R) -> jax.Array:
  """Rotation [..., 3, 3] -> its 6D representation (first two columns), [..., 6]."""
  return jnp.concatenate([R[..., :, 0], R[..., :, 1]], axis=-1)


def matrix_from_axis_angle(axis, angle) -> jax.Array:
  """Rodrigues' formula: unit axis [..., 3], angle (rad) [...] -> [..., 3, 3]."""
  axis = axis / jnp.linalg.norm(axis, axis=-1, keepdims=True)
  half = 0.5 * jnp.asarray(angle)[..., None]
  return matrix_from_quaternion(jnp.concatenate([jnp.cos(half), jnp.sin(half) * axis], -1))


def geodesic_angle(R1, R2) -> jax.Array:
  """Angle (rad, in [0, pi]) of the rotation R1 R2^T: the geodesic distance on SO(3)."""
  tr = jnp.trace(R1 @ jnp.swapaxes(R2, -1, -2), axis1=-2, axis2=-1)
  return jnp.arccos(jnp.clip(0.5 * (tr - 1.0), -1.0, 1.0))


def exp_map(omega) -> jax.Array:
  """Rotation vector [..., 3] (axis * angle, rad) -> rotation [..., 3, 3]; smooth at 0
  (so Gauss-Newton can linearize about the identity)."""
  theta = jnp.sqrt(jnp.sum(omega * omega, -1, keepdims=True) + 1e-24)
  w = jnp.cos(0.5 * theta)
  v = 0.5 * jnp.sinc(theta / (2 * jnp.pi)) * omega     # sin(theta/2) / theta * omega
  return matrix_from_quaternion(jnp.concatenate([w, v], -1))


def super_fibonacci_quaternions(n: int):
  """A deterministic, low-discrepancy set of ``n`` unit quaternions [n, 4] (w, x, y, z)
  covering SO(3) near-uniformly: the super-Fibonacci spiral (Alexa, "Super-Fibonacci
  spirals: fast, low-discrepancy sampling of SO(3)", CVPR 2022). Nearest-neighbour
  spacing ~ (6 pi / n)^(1/3) rad (19 deg for 512 rotations)."""
  import numpy as np
  phi = math.sqrt(2.0)
  psi = 1.533751168755204288118041
  s = np.arange(n, dtype=np.float64) + 0.5
  r = np.sqrt(s / n)
  big = np.sqrt(1.0 - s / n)
  alpha = 2 * math.pi * s / phi
  beta = 2 * math.pi * s / psi
  q = np.stack([r * np.sin(alpha), r * np.cos(alpha), big * np.sin(beta),
                big * np.cos(beta)], -1)
  return q * np.where(q[:, :1] < 0, -1.0, 1.0)


def grid_spacing_rad(n: int) -> float:
  """Covering-radius estimate (rad) of ``n`` near-uniform rotations: the angle r whose
  geodesic ball holds 1/n of SO(3)'s volume, (r - sin r) / pi = 1/n (small r)."""
  return (6 * math.pi / max(n, 1)) ** (1.0 / 3.0)
