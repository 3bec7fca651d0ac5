"""Differentiable Gaussian-splat renderer and the on-device image simulators.

Geometry (all in normalized units, see :mod:`smlm_jax.holly.shapes`):
  * a point cloud ``points`` [N, 3] is posed as ``p' = R p + (t_x, t_y, 0)`` with ``R``
    a rotation [3, 3] and ``t`` [2] a translation in the image plane;
  * orthographic projection along z keeps ``(x', y')`` (the microscope's optical axis
    is z; a widefield/TIRF image of a structure much thinner than the depth of field,
    or an SMLM render of 3D localizations, is this projection);
  * the field of view is ``[-fov, fov]`` in x and y, mapped onto ``size`` pixels:
    pixel (row i, column j) covers ``y in [i, i+1)``, ``x in [j, j+1)`` in pixel
    coordinates ``u = (x' + fov) / (2 fov) * size``. The default ``fov = 1.1`` keeps the
    unit ball (any pose of a normalized shape) inside the image with a 10% margin.
  * each point is a 2D isotropic Gaussian of standard deviation ``sigma_px`` pixels,
    *integrated over each pixel* (differences of erf), so a point's mass inside the
    image is exactly its weight, its centroid is its position and its variance is
    ``sigma^2 + 1/12`` px^2 (the pixel box). Separable: image = Gy^T diag(w) Gx, one
    [size, N] x [N, size] matrix product per image, O(N size^2) and differentiable in
    the points, the pose (R, t) and sigma.

Images are *normalized to unit mass*: a clean image of S kept sites sums to 1 (up to
what falls outside the field of view), so the render of a learned cloud of M points
(each of weight 1/M) is directly comparable, whatever M and S are.

Simulation of one training image (``simulate_image``, a pure function of its key):
  pose R ~ Haar-uniform on SO(3) (uniform unit quaternion), t ~ U[-max_shift, max_shift]^2;
  site dropout: each site is missing with probability ``dropout`` (unlabelled or
  bleached); fluorophores: ``fluorophores`` dyes per site, each displaced from the site
  by N(0, fluorophore_spread^2) per axis (linker / antibody size); wobble: every dye
  moves by N(0, wobble^2) per axis in every image (structural heterogeneity); then
  * clean (HOLLy's images): each dye rendered as a unit splat of width sigma;
  * SMLM-faithful (``localizations > 0``): that many localizations drawn from the kept
    dyes (blinking: a random dye per localization), each displaced in the image plane by
    the localization precision N(0, precision^2), rendered as splats of width sigma (the
    usual SMLM render, like the CEP152 FITS images); with ``photons > 0`` the render is
    an expected photon image (``photons`` in total, plus ``background_photons`` per
    pixel) sent through :func:`smlm_jax.core.noise.apply_camera` (Poisson shot noise,
    sCMOS/EMCCD read-out), converted back to photons, background-subtracted and divided
    by ``photons`` (so it stays unit-mass on average).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

from smlm_jax.core import noise
from smlm_jax.holly import rotations
from smlm_jax.holly.prng import fast_prng

_SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------- geometry
def pose_points(points, R, t):
  """[N, 3] points -> posed [N, 3]: R p + (t_x, t_y, 0)."""
  t3 = jnp.concatenate([t, jnp.zeros_like(t[..., :1])], -1)
  return points @ R.T + t3


def to_pixels(xy, size: int, fov: float):
  """Normalized image-plane coordinates [..., 2] -> continuous pixel coordinates."""
  return (xy + fov) * (size / (2.0 * fov))


def pixels_per_unit(size: int, fov: float) -> float:
  return size / (2.0 * fov)


def _profile(u, sigma_px, size: int):
  """[N] pixel coordinates -> [N, size] pixel-integrated 1D Gaussian profiles."""
  edges = jnp.arange(size + 1, dtype=u.dtype)
  cdf = 0.5 * erf((edges[None, :] - u[:, None]) / (_SQRT2 * sigma_px))
  return cdf[:, 1:] - cdf[:, :-1]


def splat(uv, weights, sigma_px, size: int):
  """Splats at pixel coordinates uv [N, 2] (x, y) with weights [N] -> image [size, size]
  (row = y, column = x): sum_n w_n * pixel-integrated Gaussian(sigma_px)."""
  gx = _profile(uv[:, 0], sigma_px, size)
  gy = _profile(uv[:, 1], sigma_px, size)
  return (gy * weights[:, None]).T @ gx


def render(points, R, t, sigma_px, size: int, fov: float, weights=None):
  """Render a point cloud [N, 3] at pose (R [3, 3], t [2]) -> [size, size] image.

  ``weights`` default to 1/N (a unit-mass image). Differentiable in every argument but
  ``size``/``fov``.
  """
  n = points.shape[0]
  if weights is None:
    weights = jnp.full((n,), 1.0 / n, points.dtype)
  posed = pose_points(points, R, t)
  return splat(to_pixels(posed[:, :2], size, fov), weights, sigma_px, size)


def gaussian_blur(images, sigma_px, size: int):
  """Blurs [..., size, size] images by a pixel-integrated Gaussian of sigma_px (>= 0)
  as two matrix products (differentiable; zero boundary, i.e. mass can leave)."""
  centres = jnp.arange(size, dtype=jnp.float32) + 0.5
  s = jnp.maximum(sigma_px, 1e-3)
  k = _profile(centres, s, size)           # [size (source), size (target)]
  return jnp.einsum("ai,...ab,bj->...ij", k, images, k)


# ------------------------------------------------------------------------- simulation
@dataclasses.dataclass(frozen=True)
class SimParams:
  """What the simulator does to a structure (all lengths in normalized units)."""
  size: int = 128
  fov: float = 1.1
  max_shift: float = 0.05
  dropout: float = 0.0
  fluorophores: int = 1
  fluorophore_spread: float = 0.0
  wobble: float = 0.0
  localizations: int = 0           # 0: clean splats of every dye; > 0: SMLM render
  precision: float = 0.0           # localization precision, per axis in the image plane
  photons: float = 0.0             # 0: no camera; > 0: total photons, then apply_camera
  background_photons: float = 0.0  # per pixel
  camera: noise.Camera = dataclasses.field(default_factory=noise.Camera)

  @classmethod
  def from_config(cls, data, size: int):
    cam = data.get("camera", None)
    camera = noise.Camera() if cam is None else noise.Camera(
        qe=float(cam.qe), gain_adu_per_e=float(cam.gain_adu_per_e),
        offset_adu=float(cam.offset_adu), read_noise_e=float(cam.read_noise_e),
        em_gain=float(cam.get("em_gain", 1.0)), model=str(cam.model))
    return cls(size=int(size), fov=float(data.fov), max_shift=float(data.max_shift),
               dropout=float(data.dropout), fluorophores=int(data.fluorophores),
               fluorophore_spread=float(data.fluorophore_spread), wobble=float(data.wobble),
               localizations=int(data.localizations), precision=float(data.precision),
               photons=float(data.photons),
               background_photons=float(data.background_photons), camera=camera)


@fast_prng
def random_pose(key, max_shift: float):
  """(R [3, 3] Haar-uniform, t [2] uniform in [-max_shift, max_shift]^2)."""
  k_r, k_t = jax.random.split(key)
  return (rotations.random_rotation(k_r),
          jax.random.uniform(k_t, (2,), minval=-max_shift, maxval=max_shift))


@fast_prng
def dyes(key, sites, p: SimParams):
  """Dye positions [S * F, 3] and weights [S * F] (0 for dropped sites) in the object frame."""
  k_drop, k_fluor, k_wob = jax.random.split(key, 3)
  s = sites.shape[0]
  f = max(1, p.fluorophores)
  keep = (jax.random.uniform(k_drop, (s,)) >= p.dropout).astype(jnp.float32)
  # never drop everything: if all sites are gone, keep them all (vanishing probability)
  keep = jnp.where(jnp.sum(keep) > 0, keep, jnp.ones_like(keep))
  pts = jnp.repeat(sites, f, axis=0)
  w = jnp.repeat(keep, f)
  if p.fluorophore_spread > 0:
    pts = pts + p.fluorophore_spread * jax.random.normal(k_fluor, pts.shape)
  if p.wobble > 0:
    pts = pts + p.wobble * jax.random.normal(k_wob, pts.shape)
  return pts, w


@fast_prng
def simulate_image(key, sites, sigma_px, p: SimParams):
  """One unit-mass image [size, size] of ``sites`` [S, 3] and its pose (R, t)."""
  k_pose, k_dye, k_loc, k_prec, k_cam = jax.random.split(key, 5)
  R, t = random_pose(k_pose, p.max_shift)
  pts, w = dyes(k_dye, sites, p)
  posed = pose_points(pts, R, t)
  uv = to_pixels(posed[:, :2], p.size, p.fov)
  if p.localizations <= 0:
    image = splat(uv, w / jnp.sum(w), sigma_px, p.size)
  else:
    # a random kept dye per localization, by inverse CDF: O(L log S) work, where
    # jax.random.categorical would draw L x S Gumbel numbers (6x slower training)
    cdf = jnp.cumsum(w)
    u = jax.random.uniform(k_loc, (p.localizations,)) * cdf[-1]
    idx = jnp.clip(jnp.searchsorted(cdf, u, side="right"), 0, w.shape[0] - 1)
    loc = uv[idx] + (p.precision * pixels_per_unit(p.size, p.fov)) * jax.random.normal(
        k_prec, (p.localizations, 2))
    image = splat(loc, jnp.full((p.localizations,), 1.0 / p.localizations), sigma_px,
                  p.size)
    if p.photons > 0:
      expected = p.photons * image + p.background_photons
      adu = noise.apply_camera(k_cam, expected, p.camera)
      image = (noise.adu_to_photons(adu, p.camera) - p.background_photons) / p.photons
  return image, R, t


@fast_prng
def simulate_batch(keys, sites, sigma_px, p: SimParams):
  """vmap of :func:`simulate_image` over keys [B]: images [B, size, size], R [B, 3, 3],
  t [B, 2]."""
  return jax.vmap(lambda k: simulate_image(k, sites, sigma_px, p))(keys)


def render_batch(points, R, t, sigma_px, size: int, fov: float):
  """One cloud [M, 3] at B poses (R [B, 3, 3], t [B, 2]); sigma_px scalar or [B]."""
  sig = jnp.broadcast_to(jnp.asarray(sigma_px, points.dtype), R.shape[:1])
  return jax.vmap(lambda r, tt, s: render(points, r, tt, s, size, fov))(R, t, sig)
