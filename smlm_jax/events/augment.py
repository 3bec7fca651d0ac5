"""Augmentation of (frames, event map) pairs inside the jitted training step.

``augment(key, frames [n, S, S], label [S, S], params) -> (frames [n, c, c], label [c,
c])`` for one example (vmap it over the batch). Geometric transforms act on the frames
and the label stacked together, so they stay aligned exactly; intensity transforms act
on the frames only:

  geometry   random crop of c = ``crop_px`` (uniform offset); one of the 8 symmetries
             of the square (random transpose, vertical and horizontal flip: all
             90-degree rotations and flips); small elastic deformation: a displacement
             field of ``elastic_px`` rms on a ``elastic_grid`` x ``elastic_grid`` grid,
             cubic-interpolated to c x c, applied by bilinear resampling (Simard et al.,
             ICDAR 2003; Ronneberger et al. 2015 use the same for U-Nets)
  intensity  in units of the window's (99.5th percentile - median) above its median:
             gamma ``x^g`` of the positive part (g log-uniform in ``gamma``), per-frame
             brightness (1 + ``flicker`` N(0, 1)), with probability ``poisson_prob``
             re-sampled shot noise at ``photons`` (log-uniform) per unit and
             ``background_photons`` per pixel, with probability ``gauss_prob`` additive
             Gaussian noise of up to ``gauss_sigma``.

The model normalization (:func:`smlm_jax.events.data.normalize`) comes after, as for
every input, so absolute brightness does not matter, only structure and noise.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from smlm_jax.core import noise


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  crop_px: int = 64
  dihedral: bool = True
  elastic_px: float = 1.5
  elastic_grid: int = 4
  gamma: tuple = (0.7, 1.4)
  flicker: float = 0.08
  poisson_prob: float = 0.5
  photons: tuple = (10.0, 200.0)
  background_photons: float = 3.0
  gauss_prob: float = 0.5
  gauss_sigma: float = 0.05

  @classmethod
  def from_config(cls, aug, crop_px: int) -> "AugmentParams":
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
              for k, v in dict(aug).items() if k in names}
    values["crop_px"] = crop_px
    return cls(**values)


def random_crop(key, stack, size: int):
  """[C, H, W] -> [C, size, size] at a uniform random offset."""
  _, h, w = stack.shape
  ky, kx = jax.random.split(key)
  y0 = jax.random.randint(ky, (), 0, h - size + 1)
  x0 = jax.random.randint(kx, (), 0, w - size + 1)
  return jax.lax.dynamic_slice(stack, (0, y0, x0), (stack.shape[0], size, size))


def dihedral(key, stack):
  """One of the 8 symmetries of the square, uniformly: transpose?, flip y?, flip x?"""
  bits = jax.random.bernoulli(key, 0.5, (3,))
  stack = jnp.where(bits[0], jnp.swapaxes(stack, -1, -2), stack)
  stack = jnp.where(bits[1], stack[:, ::-1, :], stack)
  return jnp.where(bits[2], stack[:, :, ::-1], stack)


def elastic(key, stack, sigma_px: float, grid: int):
  """Smooth random displacement (rms sigma_px) applied to every channel of [C, H, W]."""
  _, h, w = stack.shape
  coarse = sigma_px * jax.random.normal(key, (2, grid, grid))
  field = jax.image.resize(coarse, (2, h, w), method="cubic")
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  coords = [yy + field[0], xx + field[1]]
  warp = lambda img: jax.scipy.ndimage.map_coordinates(img, coords, order=1, mode="nearest")
  return jax.vmap(warp)(stack)


def geometry(key, frames, label, p: AugmentParams):
  """Crop, symmetry and elastic deformation applied identically to frames and label."""
  k_crop, k_sym, k_el = jax.random.split(key, 3)
  stack = jnp.concatenate([frames, label[None]], axis=0)
  stack = random_crop(k_crop, stack, p.crop_px)
  if p.dihedral:
    stack = dihedral(k_sym, stack)
  if p.elastic_px > 0:
    stack = elastic(k_el, stack, p.elastic_px, p.elastic_grid)
  return stack[:-1], stack[-1]


def intensity(key, frames, p: AugmentParams):
  """Gamma, per-frame brightness, shot and Gaussian noise on frames [n, H, W]."""
  ks = jax.random.split(key, 7)
  med = jnp.median(frames)
  scale = jnp.maximum(jnp.quantile(frames, 0.995) - med, 1e-6 * (jnp.abs(med) + 1.0))
  x = (frames - med) / scale
  g = jnp.exp(jax.random.uniform(ks[0], minval=math.log(p.gamma[0]),
                                 maxval=math.log(p.gamma[1])))
  x = jnp.where(x > 0, jnp.abs(x) ** g, x)
  x = x * (1.0 + p.flicker * jax.random.normal(ks[1], (frames.shape[0], 1, 1)))
  photons = jnp.exp(jax.random.uniform(ks[2], minval=math.log(p.photons[0]),
                                       maxval=math.log(p.photons[1])))
  lam = jnp.maximum(x, 0.0) * photons + p.background_photons
  shot = (noise.poisson(ks[3], lam) - p.background_photons) / photons
  x = jnp.where(jax.random.bernoulli(ks[4], p.poisson_prob), shot, x)
  sigma = jax.random.uniform(ks[5], maxval=p.gauss_sigma)
  gauss = x + sigma * jax.random.normal(ks[6], x.shape)
  return jnp.where(jax.random.bernoulli(jax.random.fold_in(ks[6], 1), p.gauss_prob), gauss, x)


def augment(key, frames, label, p: AugmentParams):
  """(frames [n, c, c], label [c, c]) of one example; see the module docstring."""
  k_geo, k_int = jax.random.split(key)
  frames, label = geometry(k_geo, frames, label, p)
  return intensity(k_int, frames, p), label
