"""Classical restorations of a single light-sheet view, tuned on validation volumes.

Contract (volumes ``[Z, Y, X]``, z = detection axis, voxel size ``(dz, dy, dx)`` um):

* :func:`gaussian` - a Gaussian filter of the view, sigmas ``(sigma_z, sigma_xy)`` in
  voxels (the simplest denoiser).
* :func:`restore` - the standard restoration of a light-sheet view:
  1. ADU -> photo-electrons with the camera's offset and gain (what a user knows);
  2. optional Gaussian pre-filter of the data (FWHM ``prefilter_fwhm_um``: damping);
  3. Richardson-Lucy deconvolution (Richardson 1972; Lucy 1974) with the view's PSF and
     a constant background, optionally with total-variation regularization (``tv``,
     Dey et al. 2006, Microsc. Res. Tech. 69:260): ``x <- x H^T(y / (H x + b)) /
     (1 - tv div(grad x / |grad x|))``; FFT convolution on a reflect-padded grid;
  4. the estimate re-blurred to the fused view's resolution (the target of the task is
     a fused view, not the specimen: deconvolve, then convolve with the target PSF);
  5. depth-attenuation correction (``correct``): the exponential decay of the per-slice
     robust (trimmed) mean along the detection axis z (and, with ``correct='zx'``, the
     illumination axis x) is fitted by least squares on log intensities and divided out.
* The PSF is the fusion simulator's model (:mod:`smlm_jax.fusion.simulator`): a
  pixel-integrated Gaussian, lateral FWHM ``fwhm_xy_um``, axial ``fwhm_z_um``, both
  growing as ``1 + depth / L_blur``, evaluated at the volume's centre depth (one
  shift-invariant PSF per volume). :func:`nominal_psf` takes the middle of the
  simulator's ranges: what a user without a PSF measurement would assume.
* :func:`tune_restore` / :func:`tune_gaussian` pick parameters from a grid by the mean
  N_SSIM (:mod:`smlm_jax.fusion.metrics`) on the volumes they are given; callers pass
  validation volumes (never the test set).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr
import numpy as np

from smlm_jax.fusion import metrics

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
# Grids searched on validation volumes.
GAUSS_SIGMAS_Z = (0.0, 0.5, 1.0, 1.5, 2.0)
GAUSS_SIGMAS_XY = (0.0, 0.5, 0.75, 1.0, 1.5)
RL_ITERATIONS = (10, 20, 40, 80)
RL_PREFILTER_FWHM_UM = (0.35, 0.7, 1.0, 1.4)
RL_TV = (0.0, 0.003)
RL_CORRECT = ("none", "z", "zx")


@dataclasses.dataclass(frozen=True)
class PSF:
  """Gaussian PSF model of a view (FWHM at depth 0, growth length; um)."""
  fwhm_xy_um: float = 0.425
  fwhm_z_um: float = 2.75
  blur_growth_length_um: float = 75.0
  target_fwhm_xy_um: float = 0.425      # the fused view's PSF (re-blur, step 4)
  target_fwhm_z_um: float = 0.85

  def sigmas_vox(self, depth_um: float, voxel_size_um) -> tuple[float, float, float]:
    """(sigma_z, sigma_y, sigma_x) in voxels of the view PSF at ``depth_um``."""
    growth = 1.0 + max(float(depth_um), 0.0) / self.blur_growth_length_um
    dz, dy, dx = voxel_size_um
    s = lambda f, d: f * growth / FWHM_PER_SIGMA / d
    return s(self.fwhm_z_um, dz), s(self.fwhm_xy_um, dy), s(self.fwhm_xy_um, dx)

  def target_sigmas_vox(self, voxel_size_um) -> tuple[float, float, float]:
    dz, dy, dx = voxel_size_um
    s = lambda f, d: f / FWHM_PER_SIGMA / d
    return (s(self.target_fwhm_z_um, dz), s(self.target_fwhm_xy_um, dy),
            s(self.target_fwhm_xy_um, dx))


def _mid(lo_hi) -> float:
  return 0.5 * (float(lo_hi[0]) + float(lo_hi[1]))


def nominal_psf(sc) -> tuple[PSF, float]:
  """(PSF at the middle of a SimConfig's ranges, nominal centre depth in um of a
  ``sc.shape`` stack): the middle of ``depth_offset_um`` plus half the stack."""
  psf = PSF(_mid(sc.view_fwhm_xy_um), _mid(sc.view_fwhm_z_um),
            _mid(sc.blur_growth_length_um), _mid(sc.fused_fwhm_xy_um),
            _mid(sc.fused_fwhm_z_um))
  depth = _mid(sc.depth_offset_um) + 0.5 * sc.shape[0] * sc.voxel_size_um[0]
  return psf, depth


@dataclasses.dataclass(frozen=True)
class RLParams:
  iterations: int = 20
  prefilter_fwhm_um: float = 0.0
  tv: float = 0.0
  correct: str = "z"        # 'none', 'z' or 'zx' (depth-attenuation correction axes)


# ------------------------------------------------------------------- FFT convolution
def _otf_1d(sigma_vox: float, n: int):
  """FFT of a pixel-integrated, circularly centred Gaussian of ``n`` taps (sum 1)."""
  d = jnp.asarray(np.fft.fftfreq(n) * n, jnp.float32)
  s = max(float(sigma_vox), 1e-3)
  taps = ndtr((d + 0.5) / s) - ndtr((d - 0.5) / s)
  return jnp.fft.fft(taps / jnp.sum(taps))


def otf(sigmas_vox, shape):
  """Real-FFT transfer function ``[Z, Y, X // 2 + 1]`` of a separable Gaussian."""
  sz, sy, sx = sigmas_vox
  nz, ny, nx = shape
  kx = _otf_1d(sx, nx)[: nx // 2 + 1]
  return (_otf_1d(sz, nz)[:, None, None] * _otf_1d(sy, ny)[None, :, None]
          * kx[None, None, :])


def _conv(x, h):
  return jnp.fft.irfftn(jnp.fft.rfftn(x) * h, s=x.shape)


def _pad_widths(sigmas_vox, shape):
  return [(min(int(math.ceil(3 * s)) + 1, n - 1),) * 2 for s, n in zip(sigmas_vox, shape)]


def _tv_divergence(x, eps=1e-3):
  """div(grad x / |grad x|) with forward differences (Dey et al. 2006)."""
  grads = [jnp.diff(x, axis=a, append=jnp.take(x, jnp.array([-1]), axis=a)) for a in range(3)]
  norm = jnp.sqrt(sum(g * g for g in grads) + eps * eps)
  div = 0.0
  for a, g in enumerate(grads):
    u = g / norm
    div = div + u - jnp.roll(u, 1, axis=a).at[(slice(None),) * a + (0,)].set(0.0)
  return div


@functools.partial(jax.jit, static_argnames=("checkpoints",))
def richardson_lucy(y, h, background, tv, checkpoints=(20,)):
  """RL (with TV regularization ``tv``; 0 = plain) of non-negative data ``y`` [Z, Y, X]
  blurred by the transfer function ``h`` (:func:`otf` of the same shape) plus a constant
  ``background``; returns the estimates after each of the (increasing, static)
  ``checkpoints`` iterations, ``[len(checkpoints), Z, Y, X]``."""
  y = jnp.maximum(y, 0.0)
  x = jnp.full_like(y, jnp.maximum(jnp.mean(y) - background, 1e-3))

  def step(_, x):
    est = jnp.maximum(_conv(x, h) + background, 1e-6)
    corr = _conv(y / est, jnp.conj(h))
    reg = 1.0 - tv * _tv_divergence(x)
    return jnp.maximum(x * corr / jnp.maximum(reg, 0.2), 0.0)

  out, done = [], 0
  for c in checkpoints:
    x = jax.lax.fori_loop(0, c - done, step, x)
    done = c
    out.append(x)
  return jnp.stack(out)


# ------------------------------------------------------------- depth attenuation
def decay_profile(volume, axis: int, spacing_um: float, trim=(0.05, 0.95),
                  max_gain: float = 8.0):
  """(profile along ``axis`` (1 at the first slice), decay length um) of the exponential
  fitted to the per-slice trimmed mean of ``volume`` (background already removed) by
  weighted least squares on log intensities. The profile is floored so that dividing
  by it gains at most ``max_gain``; a rising fit is returned as flat (length inf)."""
  v = np.moveaxis(np.asarray(volume, np.float64), axis, 0).reshape(volume.shape[axis], -1)
  lo, hi = np.quantile(v, trim, axis=1, keepdims=True)
  w_in = (v >= lo) & (v <= hi)
  m = np.sum(v * w_in, axis=1) / np.maximum(np.sum(w_in, axis=1), 1)
  pos = np.arange(len(m)) * spacing_um
  ok = m > 1e-6 * max(np.max(m), 1e-12)
  n = len(m)
  if ok.sum() < 3:
    return np.ones(n), math.inf
  slope, _ = np.polyfit(pos[ok], np.log(m[ok]), 1, w=np.sqrt(m[ok]))
  if slope >= 0:
    return np.ones(n), math.inf
  profile = np.maximum(np.exp(slope * pos), 1.0 / max_gain)
  return profile, -1.0 / slope


def depth_correct(volume, voxel_size_um, axes: str = "z", background: float = 0.0):
  """``volume`` with the fitted exponential decay divided out along 'z' (detection)
  and/or 'x' (illumination); ``background`` is subtracted first (and not restored)."""
  out = np.asarray(volume, np.float32) - background
  for name in axes:
    axis = {"z": 0, "x": 2}[name]
    profile, _ = decay_profile(np.maximum(out, 0.0), axis, voxel_size_um[axis])
    shape = [1, 1, 1]
    shape[axis] = -1
    out = out / profile.reshape(shape).astype(np.float32)
  return out


# ---------------------------------------------------------------------- restorations
def to_electrons(view_adu, offset_adu: float, gain_adu_per_e: float):
  return (np.asarray(view_adu, np.float32) - offset_adu) / gain_adu_per_e


def gaussian(view, sigma_z: float, sigma_xy: float):
  from scipy import ndimage
  return ndimage.gaussian_filter(np.asarray(view, np.float32), (sigma_z, sigma_xy, sigma_xy))


def restore_all(view_adu, voxel_size_um, psf: PSF, depth_um: float, offset_adu: float,
                gain_adu_per_e: float, prefilter_fwhm_um: float = 0.0, tv: float = 0.0,
                iterations=(20,), corrections=("z",)) -> dict:
  """{(iterations, correction): restored volume [Z, Y, X]} of one view in ADU (one RL
  run, snapshots at each iteration count; see the module doc for the steps)."""
  y = to_electrons(view_adu, offset_adu, gain_adu_per_e)
  sig = psf.sigmas_vox(depth_um, voxel_size_um)
  pads = _pad_widths(sig, y.shape)
  yp = np.pad(y, pads, mode="reflect")
  if prefilter_fwhm_um > 0:
    pre = tuple(prefilter_fwhm_um / FWHM_PER_SIGMA / d for d in voxel_size_um)
    yp = np.asarray(_conv(jnp.asarray(yp), otf(pre, yp.shape)))
  background = float(np.percentile(yp, 1.0))
  iterations = tuple(sorted(set(int(i) for i in iterations)))
  xs = richardson_lucy(jnp.asarray(yp), otf(sig, yp.shape), background, float(tv),
                       checkpoints=iterations)
  xs = _conv(xs, otf(psf.target_sigmas_vox(voxel_size_um), yp.shape)[None])
  crop = tuple(slice(a, a + n) for (a, _), n in zip(pads, y.shape))
  xs = np.asarray(xs)[(slice(None),) + crop]
  out = {}
  for i, n in enumerate(iterations):
    for c in corrections:
      out[(n, c)] = xs[i] if c == "none" else depth_correct(xs[i], voxel_size_um, c)
  return out


def restore(view_adu, voxel_size_um, psf: PSF, depth_um: float, offset_adu: float,
            gain_adu_per_e: float, params: RLParams = RLParams()):
  """The restored view [Z, Y, X] (float32, arbitrary units) with ``params``."""
  return restore_all(view_adu, voxel_size_um, psf, depth_um, offset_adu, gain_adu_per_e,
                     params.prefilter_fwhm_um, params.tv, (params.iterations,),
                     (params.correct,))[(params.iterations, params.correct)]


# ---------------------------------------------------------------------------- tuning
def _mean_n_ssim(preds, fused, views) -> float:
  return float(np.mean([metrics.compare(p, f, v)["n_ssim"]
                        for p, f, v in zip(preds, fused, views)]))


def tune_gaussian(views, fused, sigmas_z=GAUSS_SIGMAS_Z, sigmas_xy=GAUSS_SIGMAS_XY):
  """((sigma_z, sigma_xy) voxels, mean N_SSIM) maximizing the mean N_SSIM on the given
  (validation) volumes."""
  scores = {(sz, sxy): _mean_n_ssim([gaussian(v, sz, sxy) for v in views], fused, views)
            for sz, sxy in itertools.product(sigmas_z, sigmas_xy)}
  best = max(scores, key=scores.get)
  return best, scores[best]


def tune_restore(views, fused, voxel_size_um, psf: PSF, depths_um, offset_adu,
                 gain_adu_per_e, iterations=RL_ITERATIONS,
                 prefilters_fwhm_um=RL_PREFILTER_FWHM_UM, tvs=RL_TV, corrections=RL_CORRECT):
  """(best RLParams, its mean N_SSIM, {RLParams: mean N_SSIM} over the whole grid) on
  the given (validation) views in ADU and their fused targets. ``voxel_size_um``,
  ``offset_adu`` and ``gain_adu_per_e`` are one value for all volumes or a list of one
  per volume."""
  each = lambda x: x if isinstance(x, list) else [x] * len(views)
  voxels, offsets, gains = each(voxel_size_um), each(offset_adu), each(gain_adu_per_e)
  scores = {}
  for pre, tv in itertools.product(prefilters_fwhm_um, tvs):
    per = {}
    for v, f, d, vox, off, gain in zip(views, fused, depths_um, voxels, offsets, gains):
      outs = restore_all(v, vox, psf, d, off, gain, pre, tv, iterations, corrections)
      for (n, c), p in outs.items():
        per.setdefault(RLParams(n, pre, tv, c), []).append(
            metrics.compare(p, f, v)["n_ssim"])
    scores.update({k: float(np.mean(s)) for k, s in per.items()})
  best = max(scores, key=scores.get)
  return best, scores[best], scores
