"""Summary statistics of n-frame windows, as the model sees them: the common measure of
real and simulated crops (:mod:`.calibrate` matches them, the domain-gap study
compares them and classifies on them).

``window_statistics(frames [B, n, S, S]) -> [B, K]`` (jnp, jit/grad-able; any camera
units: everything is computed after :func:`.data.normalize`, which maps the window's
median to 0 and its 99.5th percentile to 1, so offset and gain drop out):

  q05 ... q97    quantiles 0.05, 0.25, 0.75, 0.9, 0.97 of the current (last) frame's
                 normalized intensities: background spread and the area of structure
  band0 ... 5    radial power spectrum of the current frame (Hann window, mean
                 removed): log10 of the fraction of power in 6 octave bands from
                 1/64 to the Nyquist frequency 1/2 cycles/px (coarse structure ...
                 pixel noise)
  noise          pixel noise, 1.4826 MAD of adjacent-pixel differences / sqrt 2
  ac2 ... ac8    autocorrelation of the current frame at 2, 4, 6, 8 px relative to 1 px
                 (skips the white noise at 0 px): the width of the tubules
  dframe         rms frame-to-frame change (t vs t-1, mean over pairs)
  corr           correlation of consecutive frames (motion, bleaching, change)
  stripes        log10 of var_x(mean_y dx) / var_y(mean_x dy) of the current frame, dx
                 and dy the differences of neighbouring pixels along x and y: column
                 stripes (a pattern constant along y) survive the mean over y while
                 isotropic structure and noise average alike in both directions (0
                 for white noise and randomly oriented tubules; the shared iSIM
                 crops: about 0.5-1)

``quantile_distance(a [N, K], b [M, K], scale [K])``: the mean over statistics of
the squared differences of their QUANTILES quantiles, in units of ``scale`` (the
real statistics' spread), as the diffusion calibration does: distributions are
compared, not single crops.
"""
from __future__ import annotations

import numpy as np

NAMES = ("q05", "q25", "q75", "q90", "q97", "band0", "band1", "band2", "band3", "band4",
         "band5", "noise", "ac2", "ac4", "ac6", "ac8", "dframe", "corr", "stripes")
INTENSITY_QUANTILES = (0.05, 0.25, 0.75, 0.9, 0.97)
BAND_EDGES = (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 0.375, 0.71)
AC_LAGS = (2, 4, 6, 8)
QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)


def _frame_stats(x):
  """Statistics of one normalized frame [S, S] (jnp): quantiles, bands, noise, ac."""
  import jax.numpy as jnp
  s = x.shape[-1]
  q = jnp.quantile(x.reshape(-1), jnp.asarray(INTENSITY_QUANTILES))
  hann = jnp.hanning(s)
  xc = (x - jnp.mean(x)) * hann[:, None] * hann[None, :]
  power = jnp.abs(jnp.fft.fft2(xc)) ** 2
  f = jnp.fft.fftfreq(s)
  r = jnp.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
  total = jnp.sum(power) + 1e-12
  bands = [jnp.log10(jnp.sum(jnp.where((r >= lo) & (r < hi), power, 0.0)) / total + 1e-6)
           for lo, hi in zip(BAND_EDGES[:-1], BAND_EDGES[1:])]
  d = jnp.diff(x, axis=-1).reshape(-1)
  noise = 1.4826 * jnp.median(jnp.abs(d - jnp.median(d))) / jnp.sqrt(2.0)
  xm = x - jnp.mean(x)
  ac = jnp.real(jnp.fft.ifft2(jnp.abs(jnp.fft.fft2(xm)) ** 2))    # circular, [S, S]
  radial = lambda k: 0.25 * (ac[k, 0] + ac[0, k] + ac[-k, 0] + ac[0, -k])
  ref = radial(1) + 1e-12
  acs = [radial(k) / ref for k in AC_LAGS]
  return jnp.concatenate([q, jnp.stack(bands), noise[None], jnp.stack(acs)])


def stripe_statistic(x):
  """log10 var_x(mean_y dx) / var_y(mean_x dy) of a frame [S, S] (see the docstring)."""
  import jax.numpy as jnp
  col = jnp.mean(jnp.diff(x, axis=-1), axis=-2)
  row = jnp.mean(jnp.diff(x, axis=-2), axis=-1)
  return jnp.log10((jnp.var(col) + 1e-12) / (jnp.var(row) + 1e-12))


def window_statistics(frames):
  """[B, n, S, S] (any units) -> [B, len(NAMES)] float32; see the module docstring."""
  import jax
  import jax.numpy as jnp
  from smlm_jax.events import data as data_lib
  x = data_lib.normalize(jnp.asarray(frames, jnp.float32))
  per = jax.vmap(_frame_stats)(x[:, -1])
  if x.shape[1] > 1:
    d = x[:, 1:] - x[:, :-1]
    dframe = jnp.sqrt(jnp.mean(d ** 2, axis=(1, 2, 3)))
    a = x[:, 1:] - jnp.mean(x[:, 1:], axis=(2, 3), keepdims=True)
    b = x[:, :-1] - jnp.mean(x[:, :-1], axis=(2, 3), keepdims=True)
    corr = jnp.mean(jnp.sum(a * b, axis=(2, 3)) / jnp.sqrt(
        jnp.sum(a ** 2, axis=(2, 3)) * jnp.sum(b ** 2, axis=(2, 3)) + 1e-12), axis=1)
  else:
    dframe = corr = jnp.zeros(x.shape[0])
  stripes = jax.vmap(stripe_statistic)(x[:, -1])
  return jnp.concatenate([per, dframe[:, None], corr[:, None], stripes[:, None]], axis=1)


def robust_scale(stats: np.ndarray) -> np.ndarray:
  """[K]: the interquartile range / 1.349 of each statistic (a floor of 1e-3)."""
  q25, q75 = np.quantile(np.asarray(stats), [0.25, 0.75], axis=0)
  return np.maximum((q75 - q25) / 1.349, 1e-3)


def quantile_distance(a, b, scale):
  """Mean over statistics of the squared difference of their QUANTILES quantiles."""
  import jax.numpy as jnp
  qs = jnp.asarray(QUANTILES)
  qa = jnp.quantile(a, qs, axis=0)
  qb = jnp.quantile(b, qs, axis=0)
  return jnp.mean(((qa - qb) / jnp.asarray(scale)) ** 2)


def tiles(frames: np.ndarray, num_frames: int, size: int, stride: int | None = None,
          exclude=None) -> np.ndarray:
  """Windows [N, num_frames, size, size] of a movie or crop [T, H, W]: every frame t
  >= num_frames - 1 (full windows only), tiled with ``stride`` (default size);
  ``exclude`` [H, W] bool drops the tiles that touch it (e.g. annotated sites)."""
  frames = np.asarray(frames, np.float32)
  t_all, h, w = frames.shape
  stride = stride or size
  out = []
  for t in range(num_frames - 1, t_all):
    for y in range(0, h - size + 1, stride):
      for x in range(0, w - size + 1, stride):
        if exclude is not None and exclude[y:y + size, x:x + size].any():
          continue
        out.append(frames[t - num_frames + 1:t + 1, y:y + size, x:x + size])
  return np.stack(out) if out else np.zeros((0, num_frames, size, size), np.float32)
