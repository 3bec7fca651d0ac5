"""Spot detection in whole frames with a false-positive rate the user sets.

Per frame of photons (camera counts converted with the data's camera, as everywhere):

1. Variance stabilization (generalized Anscombe transform for Poisson electrons plus
   Gaussian read noise, Murtagh, Starck & Bijaoui 1995): z = 2 sqrt(qe N + 3/8 + r^2)
   with N photons and r the read noise in electrons. Background noise becomes ~N(0, 1)
   per pixel whatever the background level (and however it varies across the field).
2. Difference of Gaussians (DoG, the usual approximation of the Laplacian of Gaussian),
   sigma_1 ~ the PSF sigma (slightly wider, for motion blur) minus sigma_2 = 3 sigma_1:
   the kernel sums to zero, so smooth backgrounds and linear tilts are removed. Divided
   by the kernel's norm, noise-only pixels give a unit-variance Gaussian random field.
3. Local maxima (3x3) of that score above a threshold z*.

The threshold comes from the null distribution of the score's local maxima, computed
once per kernel: in 2D the expected number of local maxima above z per pixel of a
smooth Gaussian field is, for large z, c z exp(-z^2 / 2) (its Euler characteristic
density; Adler 1981, Worsley et al. 1996). c is fitted to a Monte-Carlo run of white
noise through the same filter (empirical rates 1e-3-1e-5 per pixel), and z* solves
c z exp(-z^2/2) = (false positives per frame) / (H W). Tested on Poisson noise-only
frames (tests/test_analyze.py).

Positions are in pixel units with pixel i spanning [i, i + 1) (centre i + 0.5), x
along the width, as the localizer of :mod:`smlm_jax.diffusion.baselines` reports them.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from scipy import ndimage

SURROUND = 3.0       # sigma_2 / sigma_1 of the DoG
BLUR_WIDENING = 1.2  # sigma_1 / PSF sigma: a slightly blurred spot is the typical target


@dataclasses.dataclass(frozen=True)
class Detector:
  """A calibrated detector for one PSF width and frame size."""
  sigma_px: float                 # DoG inner sigma
  threshold: float                # score threshold z*
  false_positives_per_frame: float
  qe: float
  read_noise_e: float

  def __call__(self, frame_photons: np.ndarray):
    """[H, W] photons -> (x_px [n], y_px [n], score [n]) of the detected spots."""
    return detect_frame(frame_photons, self.sigma_px, self.threshold, self.qe,
                        self.read_noise_e)


def stabilize(frame_photons, qe: float, read_noise_e: float) -> np.ndarray:
  """Generalized Anscombe transform: noise of Poisson electrons + read noise -> ~N(0, 1)."""
  electrons = qe * np.asarray(frame_photons, np.float32)
  return 2.0 * np.sqrt(np.maximum(electrons + 0.375 + read_noise_e ** 2, 0.0))


def _dog(image, sigma_px):
  image = np.asarray(image, np.float32)
  return (ndimage.gaussian_filter(image, sigma_px, mode="reflect", truncate=3.0)
          - ndimage.gaussian_filter(image, SURROUND * sigma_px, mode="reflect",
                                    truncate=3.0))


@functools.lru_cache(maxsize=32)
def _kernel_norm(sigma_px: float) -> float:
  n = int(2 * math.ceil(3 * SURROUND * sigma_px) + 1)
  delta = np.zeros((n, n), np.float32)
  delta[n // 2, n // 2] = 1.0
  return float(np.sqrt(np.sum(_dog(delta, sigma_px) ** 2)))


def score(frame_photons, sigma_px: float, qe: float, read_noise_e: float) -> np.ndarray:
  """[H, W] detection score: unit-variance Gaussian field where there is only noise."""
  return _dog(stabilize(frame_photons, qe, read_noise_e), sigma_px) / _kernel_norm(sigma_px)


def local_maxima(s: np.ndarray, threshold: float):
  """(rows, cols) of 3x3 local maxima of s above threshold."""
  peak = (s == ndimage.maximum_filter(s, size=3, mode="constant", cval=-np.inf))
  return np.nonzero(peak & (s > threshold))


def detect_frame(frame_photons, sigma_px, threshold, qe, read_noise_e):
  """Spots of one frame: (x_px, y_px, score) with a 3x3 score-weighted centroid."""
  s = score(frame_photons, sigma_px, qe, read_noise_e)
  rows, cols = local_maxima(s, threshold)
  h, w = s.shape
  pad = np.pad(np.maximum(s, 0.0), 1)
  dy, dx = np.mgrid[-1:2, -1:2]
  wts = np.stack([pad[rows + 1 + a, cols + 1 + b] for a, b in zip(dy.ravel(), dx.ravel())],
                 axis=-1)                                            # [n, 9]
  tot = np.maximum(wts.sum(-1), 1e-9)
  x = cols + 0.5 + (wts * dx.ravel()).sum(-1) / tot
  y = rows + 0.5 + (wts * dy.ravel()).sum(-1) / tot
  return x.astype(np.float64), y.astype(np.float64), s[rows, cols].astype(np.float64)


@functools.lru_cache(maxsize=32)
def null_rate_constant(sigma_px: float, num_frames: int = 48, size_px: int = 256,
                       seed: int = 0) -> float:
  """c of the null rate c z exp(-z^2/2) of local maxima per pixel, from white noise."""
  import jax
  key = jax.random.key(seed)
  zs = np.linspace(2.5, 4.0, 13)
  counts = np.zeros_like(zs)
  for i in range(num_frames):
    noise = np.asarray(jax.random.normal(jax.random.fold_in(key, i), (size_px, size_px)))
    s = _dog(noise, sigma_px) / _kernel_norm(sigma_px)
    m = size_px // 8          # keep away from the reflecting border
    inner = s[m:-m, m:-m]
    rows, cols = local_maxima(inner, zs[0])
    vals = inner[rows, cols]
    counts += (vals[:, None] > zs[None, :]).sum(0)
  pixels = num_frames * (size_px - 2 * (size_px // 8)) ** 2
  use = counts >= 20
  rates = counts[use] / pixels
  shape = zs[use] * np.exp(-zs[use] ** 2 / 2)
  return float(np.exp(np.mean(np.log(rates) - np.log(shape))))


def threshold_for_rate(rate_per_px: float, c: float) -> float:
  """z* with c z* exp(-z*^2/2) = rate_per_px (bisection on the decreasing branch z > 1)."""
  lo, hi = 1.0, 40.0
  f = lambda z: math.log(c) + math.log(z) - z * z / 2 - math.log(rate_per_px)
  if f(lo) <= 0:
    return lo
  for _ in range(100):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
  return 0.5 * (lo + hi)


def make_detector(psf_fwhm_nm: float, pixel_size_nm: float, frame_shape,
                  false_positives_per_frame: float, qe: float,
                  read_noise_e: float) -> Detector:
  """A detector for frames of ``frame_shape`` (H, W) expecting ``false_positives_per_frame``
  noise detections per frame on average."""
  if false_positives_per_frame <= 0:
    raise ValueError("false_positives_per_frame must be > 0")
  sigma = BLUR_WIDENING * psf_fwhm_nm / 2.3548 / pixel_size_nm
  sigma = round(max(sigma, 0.7), 2)
  rate = false_positives_per_frame / float(frame_shape[0] * frame_shape[1])
  z = threshold_for_rate(rate, null_rate_constant(sigma))
  return Detector(sigma_px=sigma, threshold=z,
                  false_positives_per_frame=false_positives_per_frame, qe=float(qe),
                  read_noise_e=float(read_noise_e))
