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

from smlm_jax.core.noise import Camera, adu_to_photons


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


def _box_sum(images: jnp.ndarray, size: int) -> jnp.ndarray:
  """Sum over a size x size neighbourhood of every pixel of [..., H, W] (zero-padded).

  Separable: shifted slices summed along x, then along y (no gathers).
  """
  r = size // 2
  h, w = images.shape[-2:]
  pad = [(0, 0)] * (images.ndim - 2) + [(r, r), (r, r)]
  p = jnp.pad(images, pad)
  rows = sum(p[..., :, i:i + w] for i in range(size))
  return sum(rows[..., i:i + h, :] for i in range(size))


def brightest_box(signal: jnp.ndarray, box_px: int = 3):
  """(y, x) indices [...] of the brightest box_px x box_px sum of [..., H, W], and the sum."""
  boxes = _box_sum(signal, box_px)
  *lead, h, w = signal.shape
  flat = boxes.reshape(*lead, h * w)
  idx = jnp.argmax(flat, axis=-1)
  return idx // w, idx % w, jnp.max(flat, axis=-1)


def square_mask(y, x, radius_px: int, height_px: int, width_px: int) -> jnp.ndarray:
  """[..., H, W] True within radius_px (in y and in x) of the pixel (y, x) [...]."""
  in_y = jnp.abs(jnp.arange(height_px) - y[..., None]) <= radius_px
  in_x = jnp.abs(jnp.arange(width_px) - x[..., None]) <= radius_px
  return in_y[..., :, None] & in_x[..., None, :]


def spot_statistics(photons: jnp.ndarray, background: jnp.ndarray, camera: Camera,
                    box_px: int = 3, window_px: int = 15) -> dict[str, jnp.ndarray]:
  """Per-frame quality statistics of [..., T, H, W] photons with background [...].

  peak_snr [..., T]: the brightest box_px x box_px sum of background-subtracted photons
    over its shot + read noise sd (a pure-noise 64x64 frame gives about 3.5-4);
  peak_yx_px [..., T, 2]: where that box is;
  spot_photons [..., T]: background-subtracted photons in a window_px square around it
    (captures a blurred spot moving up to ~ window_px / 2 px within one exposure).
  """
  b = background[..., None, None, None]
  signal = photons - b
  h, w = photons.shape[-2:]
  py, px, peak = brightest_box(signal, box_px)
  # Noise of one pixel in photon units: Poisson electrons (qe * b, times the excess
  # noise factor 2 behind an EM register) plus read noise referred to the input.
  if camera.model == "emccd":
    excess, read_e = 2.0, camera.read_noise_e / camera.em_gain
  else:
    excess, read_e = 1.0, camera.read_noise_e
  var_px = (excess * camera.qe * jnp.maximum(background, 0.0) + read_e ** 2) / camera.qe ** 2
  peak_snr = peak / jnp.sqrt(box_px ** 2 * var_px[..., None])
  mask = square_mask(py, px, window_px // 2, h, w)
  spot = jnp.sum(jnp.where(mask, signal, 0.0), axis=(-1, -2))
  return {"peak_snr": peak_snr, "peak_yx_px": jnp.stack([py, px], axis=-1),
          "spot_photons": spot}
