"""Simulated full-frame movies with many molecules that appear, diffuse and bleach.

Same physics as the training windows (:mod:`smlm_jax.diffusion.simulator`): Brownian
motion at S sub-steps per exposure (dead time included), pixel-integrated Gaussian PSF
summed over the sub-steps (motion blur), photons per frame, uniform background with a
gentle linear tilt, and the camera's exact Poisson + read noise
(:func:`smlm_jax.core.noise.apply_camera`). Here the field is H x W px for many frames;
each molecule has its own D, photons, first frame and lifetime (it is present from
``t0`` to ``t0 + length - 1``, then bleached), and its start is at least
``min_start_distance_px`` from the starts of molecules alive at the same time.

``simulate_to_tiff`` renders in chunks of frames and streams them to a uint16 ImageJ
TIFF (bounded memory for any length); ``truth`` holds per molecule D, t0, length,
photons and the true blurred frame positions [length, 2] (x, y) in px.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from smlm_jax.core import noise as noise_lib
from smlm_jax.core.noise import Camera
from smlm_jax.diffusion import simulator as sim_lib


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  num_frames: int = 200
  height_px: int = 256
  width_px: int = 256
  molecules_per_frame: float = 15.0
  lifetime_frames: tuple[int, int] = (24, 80)
  D_um2_per_s: tuple[float, float] = (0.01, 5.0)
  photons: tuple[float, float] = (300.0, 3000.0)
  background_photons: tuple[float, float] = (2.0, 30.0)
  background_gradient_max: float = 0.1
  psf_fwhm_nm: tuple[float, float] = (200.0, 250.0)
  min_start_distance_px: float = 30.0
  edge_margin_px: float = 8.0
  substeps: int = 10
  pixel_size_nm: float = 100.0
  frame_interval_s: float = 0.01
  exposure_s: float = 0.01


def _log_uniform(key, lo_hi, shape):
  lo, hi = lo_hi
  return np.exp(np.asarray(jax.random.uniform(key, shape, minval=math.log(lo),
                                              maxval=math.log(hi))))


def sample_molecules(key, spec: FieldSpec) -> dict:
  """Per-molecule parameters (numpy) of a steady-state field of
  ``molecules_per_frame`` molecules present at a time."""
  lo, hi = spec.lifetime_frames
  hi = min(hi, spec.num_frames)
  lo = min(lo, hi)
  mean_life = 0.5 * (lo + hi)
  n = max(1, int(round(spec.molecules_per_frame * spec.num_frames / mean_life)))
  k = jax.random.split(key, 7)
  length = np.asarray(jax.random.randint(k[0], (n,), lo, hi + 1))
  t0 = np.floor(np.asarray(jax.random.uniform(k[1], (n,))) *
                (spec.num_frames - length + 1)).astype(int)
  order = np.argsort(t0, kind="stable")
  length, t0 = length[order], t0[order]
  m = spec.edge_margin_px
  cand = np.asarray(jax.random.uniform(k[2], (n, 64, 2))) * np.array(
      [spec.width_px - 2 * m, spec.height_px - 2 * m]) + m
  start = np.zeros((n, 2))
  keep = np.ones(n, bool)
  for i in range(n):
    alive = np.nonzero(keep[:i] & (t0[:i] + length[:i] > t0[i]))[0]
    for c in cand[i]:
      if alive.size == 0 or np.min(np.hypot(*(start[alive] - c).T)) >= \
          spec.min_start_distance_px:
        start[i] = c
        break
    else:
      keep[i] = False            # no room: this molecule is not simulated
  return {"t0": t0[keep], "length": length[keep], "start_px": start[keep],
          "D_um2_per_s": _log_uniform(k[3], spec.D_um2_per_s, (n,))[keep],
          "photons": _log_uniform(k[4], spec.photons, (n,))[keep],
          "background_photons": float(_log_uniform(k[5], spec.background_photons, ())),
          "background_gradient": np.asarray(jax.random.uniform(
              k[6], (2,), minval=-spec.background_gradient_max,
              maxval=spec.background_gradient_max)),
          "psf_fwhm_nm": float(np.asarray(jax.random.uniform(
              jax.random.fold_in(key, 99), (), minval=spec.psf_fwhm_nm[0],
              maxval=spec.psf_fwhm_nm[1])))}


def trajectories_nm(key, mol: dict, spec: FieldSpec) -> np.ndarray:
  """[M, L_max * S, 2] Brownian sub-step positions (nm) of every molecule."""
  l_max = int(mol["length"].max())
  geo = sim_lib.Geometry(num_frames=l_max, substeps=spec.substeps, height_px=8, width_px=8,
                         pixel_size_nm=spec.pixel_size_nm,
                         frame_interval_s=spec.frame_interval_s, exposure_s=spec.exposure_s)
  keys = sim_lib.movie_keys(key, jnp.arange(len(mol["t0"])))
  start = jnp.asarray(mol["start_px"] * spec.pixel_size_nm, jnp.float32)
  D = jnp.asarray(mol["D_um2_per_s"], jnp.float32)
  return np.asarray(jax.vmap(lambda k, d, s: sim_lib.brownian_substeps_nm(k, d, s, geo))(
      keys, D, start))


@jax.jit
def _render(pos_nm, amp, sigma_nm, bg_img, pixel_size_nm):
  """[m, Tc, S, 2] positions, [m, Tc] photons -> [Tc, H, W] expected photons."""
  h, w = bg_img.shape
  px = sim_lib.pixel_integrated_gaussian(pos_nm[..., 0], sigma_nm, w, 1.0)
  py = sim_lib.pixel_integrated_gaussian(pos_nm[..., 1], sigma_nm, h, 1.0)
  s = pos_nm.shape[2]
  spot = jnp.einsum("mtsh,mtsw,mt->thw", py, px, amp / s,
                    precision=jax.lax.Precision.HIGHEST)   # not TF32 on GPU
  return spot + bg_img[None]


_apply_camera = jax.jit(noise_lib.apply_camera)


def render_chunk(key, c0: int, c1: int, mol, traj_nm, spec: FieldSpec, camera: Camera,
                 chunk_frames: int | None = None):
  """Frames [c0, c1) in ADU (float32 numpy); computed as ``chunk_frames`` frames (the
  extra ones dropped) so every chunk reuses one compiled function."""
  S = spec.substeps
  n_out = c1 - c0
  c1 = c0 + max(n_out, chunk_frames or 0)
  tc = c1 - c0
  alive = np.nonzero((mol["t0"] < c1) & (mol["t0"] + mol["length"] > c0))[0]
  m = max(8, int(math.ceil(max(len(alive), 1) / 8)) * 8)      # few compiled sizes
  pos = np.zeros((m, tc, S, 2), np.float32)
  amp = np.zeros((m, tc), np.float32)
  for j, i in enumerate(alive):
    t = np.arange(c0, c1) - mol["t0"][i]
    on = (t >= 0) & (t < mol["length"][i])
    tt = np.clip(t, 0, mol["length"][i] - 1)
    sub = traj_nm[i].reshape(-1, S, 2)[tt]
    pos[j] = sub / spec.pixel_size_nm                            # px units
    amp[j] = np.where(on, mol["photons"][i], 0.0)
  x = (np.arange(spec.width_px) + 0.5) / spec.width_px - 0.5
  y = (np.arange(spec.height_px) + 0.5) / spec.height_px - 0.5
  gx, gy = mol["background_gradient"]
  bg = mol["background_photons"] * (1.0 + gx * x[None, :] + gy * y[:, None])
  sigma_px = mol["psf_fwhm_nm"] / sim_lib.FWHM_PER_SIGMA / spec.pixel_size_nm
  expected = _render(jnp.asarray(pos), jnp.asarray(amp), jnp.float32(sigma_px),
                     jnp.asarray(bg, jnp.float32), spec.pixel_size_nm)
  return np.asarray(_apply_camera(jax.random.fold_in(key, c0), expected, camera))[:n_out]


def simulate_to_tiff(key, spec: FieldSpec, camera: Camera, path: str,
                     chunk_frames: int = 32) -> dict:
  """Writes the movie to ``path`` (uint16 ImageJ TIFF with pixel size and interval) and
  returns the truth (see module docstring)."""
  from smlm_jax.core import tiff_io
  k_mol, k_traj, k_cam = jax.random.split(key, 3)
  mol = sample_molecules(k_mol, spec)
  traj = trajectories_nm(k_traj, mol, spec)

  def frames():
    for c0 in range(0, spec.num_frames, chunk_frames):
      c1 = min(c0 + chunk_frames, spec.num_frames)
      yield from render_chunk(k_cam, c0, c1, mol, traj, spec, camera, chunk_frames)

  tiff_io.write_frames(path, (np.clip(np.rint(f), 0, 65535).astype(np.uint16)
                              for f in frames()),
                       (spec.num_frames, spec.height_px, spec.width_px), np.uint16,
                       spec.pixel_size_nm, spec.frame_interval_s)
  positions = [traj[i].reshape(-1, spec.substeps, 2)[:mol["length"][i]].mean(1)
               / spec.pixel_size_nm for i in range(len(mol["t0"]))]
  return dict(mol, positions_px=positions)
