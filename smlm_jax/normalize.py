"""Model input from camera counts, by physics, identically for simulated and real data.

1. ADU -> photons with the camera's offset, gain, QE (and EM gain):
   photons = (ADU - offset_adu) / (gain_adu_per_e * em_gain * qe).
2. Background: the median of 4x4-pixel block means over the whole movie (the spot
   covers a few blocks, so the median is the background level; block means make it
   cheap and less noisy).
3. Scale: background-subtracted photons divided by the shot-noise sd of the background,
   sqrt(background + 1), then asinh: background noise stays ~ unit-variance and linear,
   bright spot centres are compressed logarithmically.

Because step 1 uses the camera parameters of the data at hand, a model trained on
simulated ADU from one camera applies to another camera with a different offset and
gain once those are given (``predict --camera_offset_adu/--camera_gain_adu_per_e`` or a
calibration file).
"""
from __future__ import annotations

import jax.numpy as jnp

from smlm_jax.noise import Camera, adu_to_photons


def background_photons(photons: jnp.ndarray, block: int = 4) -> jnp.ndarray:
  """Robust per-movie background (photons/pixel/frame) of [..., T, H, W] photons."""
  *lead, t, h, w = photons.shape
  hb, wb = h // block, w // block
  blocks = photons[..., : hb * block, : wb * block].reshape(*lead, t, hb, block, wb, block)
  means = blocks.mean(axis=(-1, -3)).reshape(*lead, -1)
  return jnp.median(means, axis=-1)


def normalize_photons(photons: jnp.ndarray):
  """[..., T, H, W] photons -> (model input, background [...])."""
  bg = background_photons(photons)
  b = jnp.maximum(bg, 0.0)[..., None, None, None]
  x = jnp.arcsinh((photons - b) / jnp.sqrt(b + 1.0))
  return x.astype(jnp.float32), bg


def model_input(frames_adu: jnp.ndarray, camera: Camera):
  """[..., T, H, W] ADU -> (model input, background photons, photons per frame)."""
  photons = adu_to_photons(frames_adu, camera)
  x, bg = normalize_photons(photons)
  spot = jnp.sum(photons - bg[..., None, None, None], axis=(-1, -2)).mean(axis=-1)
  return x, bg, spot
