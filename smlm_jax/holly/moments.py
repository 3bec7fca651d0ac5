"""Pose-free shape moments: what the projections say about the structure's 3D
covariance, whatever the poses (the method of moments of single-particle
reconstruction, after Kam, Ultramicroscopy 1980).

Let C be the 3D covariance of the structure (equal-weight sites) with eigenvalues
l1, l2, l3 and invariants e1 = l1 + l2 + l3 = tr C, e2 = l1 l2 + l1 l3 + l2 l3,
e3 = l1 l2 l3 = det C. A projection along a uniformly random direction n has the 2D
covariance S (C compressed onto the plane normal to n), with tr S = e1 - n'Cn and
det S = n' adj(C) n, so that over uniform poses

  E[tr S] = 2 e1 / 3,   E[det S] = e2 / 3,   E[(det S)^2] = (3 e2^2 - 4 e1 e3) / 15

(E[(n'An)^2] = (2 tr A^2 + (tr A)^2) / 15 for a uniform unit n, and
tr adj(C)^2 = e2^2 - 2 e1 e3). The image's own covariance is S plus the splat
(sigma^2 + 1/12 px^2, pixel-integrated Gaussian) on the diagonal; its centroid takes
out the shift. So a set of images gives (e1, e2, e3) of the structure before any pose
is known, and a cloud whose invariants differ cannot be the structure, however well
its renders match the images at the poses chosen for it. The failure this guards
against: a hollow ellipsoidal shell whose cloud collapsed into a flat disc (every
projection of the shell is a similar ellipse, and a disc seen face-on is one too);
(e1, e2) of the shell admit no flat cloud.

``moment_loss`` compares the cloud's invariants with the images', each scaled by its
value for an isotropic structure of the images' e1 (e1, e1^2 / 3, e1^3 / 27), so that
a flat cloud (e3 = 0) costs 1 and the loss is smooth in the points (eigenvalues are
not where two are equal).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def image_moments(images, sigma_px, size: int, fov: float):
  """Per image (unit-mass [B, N, N], widths sigma_px [B]): (tr S, det S) [B] of the
  projected structure's 2D covariance in normalized units (splat and pixel box
  removed), numpy float64."""
  im = np.asarray(images, np.float64)
  sig = np.broadcast_to(np.asarray(sigma_px, np.float64), im.shape[:1])
  ppu = size / (2.0 * fov)
  c = (np.arange(size) + 0.5) / ppu - fov             # pixel centres, normalized units
  mass = im.sum(axis=(1, 2))
  mass = np.where(np.abs(mass) > 1e-12, mass, 1e-12)
  wy = im.sum(axis=2) / mass[:, None]                 # [B, N] marginal over x: rows (y)
  wx = im.sum(axis=1) / mass[:, None]
  my, mx = wy @ c, wx @ c
  dy, dx = c[None] - my[:, None], c[None] - mx[:, None]
  syy = np.sum(wy * dy ** 2, 1)
  sxx = np.sum(wx * dx ** 2, 1)
  sxy = np.einsum("bij,bi,bj->b", im, dy, dx) / mass
  blur = (sig ** 2 + 1.0 / 12.0) / ppu ** 2
  syy, sxx = syy - blur, sxx - blur
  return syy + sxx, syy * sxx - sxy ** 2


def invariants_from_images(tr, det) -> np.ndarray:
  """(e1, e2, e3) of the structure from per-image (tr S, det S) of uniform poses."""
  tr, det = np.asarray(tr, np.float64), np.asarray(det, np.float64)
  e1 = 1.5 * float(np.mean(tr))
  e2 = 3.0 * float(np.mean(det))
  e3 = (3.0 * e2 ** 2 - 15.0 * float(np.mean(det ** 2))) / (4.0 * e1)
  return np.array([e1, e2, max(e3, 0.0)])


def cloud_invariants(points):
  """(e1, e2, e3) [3] of the covariance of equal-weight points [M, 3] (jax)."""
  p = points - jnp.mean(points, axis=0)
  C = p.T @ p / p.shape[0]
  e1 = jnp.trace(C)
  e2 = 0.5 * (e1 ** 2 - jnp.sum(C * C))
  return jnp.stack([e1, e2, jnp.linalg.det(C)])


def moment_loss(points, target):
  """Sum over k of ((e_k(cloud) - e_k(target)) / s_k)^2, s = (e1, e1^2 / 3, e1^3 / 27)
  of the target (the isotropic structure's invariants)."""
  target = jnp.asarray(target, jnp.float32)
  iso = target[0] / 3.0
  scale = jnp.stack([3.0 * iso, 3.0 * iso ** 2, iso ** 3])
  return jnp.sum(((cloud_invariants(points) - target) / scale) ** 2)
