"""Motion-blurred single-molecule movies: pure, jit- and vmap-able JAX physics.

Forward model (source -> optics -> detector, every stage differentiable):

1. Trajectory (``brownian_substeps_nm``): 2D Brownian motion with diffusion coefficient
   D (um^2/s), sampled at ``substeps`` (S) instants inside each camera exposure, at the
   centres of S equal slices of the exposure. The per-axis displacement between two
   instants dt apart is Normal(0, 2 D dt); inside one exposure dt = t_exp / S, and
   between the last instant of a frame and the first of the next it also includes the
   dead time (frame_interval - t_exp), during which the molecule keeps moving.
   Positions are in nm, x along the image width, origin at the outer corner of pixel
   (0, 0), so pixel (i, j) spans [j a, (j+1) a) x [i a, (i+1) a) with a = pixel size.
2. Optics (``pixel_integrated_gaussian``): Gaussian PSF with
   sigma = FWHM / (2 sqrt(2 ln 2)), integrated exactly over each pixel with error
   functions, separably in x and y, with no high-resolution grid. Each frame is the sum
   over the S sub-step images, each carrying photons / S: the motion blur.
3. Background: uniform photons per pixel per frame, optionally tilted by a gentle
   linear gradient (fractional change across the field, mean preserved).
4. Detector (``smlm_jax.core.noise.apply_camera``): QE, exact Poisson shot noise, sCMOS or
   EMCCD read-out, float32 ADU.

Shapes: a movie is [T, H, W] (frames, rows, columns); a batch is [B, T, H, W]; the
sub-step positions are [T*S, 2] (x, y) in nm.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from smlm_jax.core import noise as noise_lib
from smlm_jax.core.noise import Camera

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548...


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static movie geometry and timing (hashable: a jit static argument)."""
  num_frames: int = 16
  substeps: int = 10
  height_px: int = 64
  width_px: int = 64
  pixel_size_nm: float = 100.0
  frame_interval_s: float = 0.01
  exposure_s: float = 0.01

  def __post_init__(self):
    for name in ("num_frames", "substeps", "height_px", "width_px"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
    if self.pixel_size_nm <= 0 or self.frame_interval_s <= 0 or self.exposure_s <= 0:
      raise ValueError("pixel_size_nm, frame_interval_s and exposure_s must be > 0")
    if self.exposure_s > self.frame_interval_s * (1 + 1e-9):
      raise ValueError(f"exposure_s ({self.exposure_s}) cannot exceed frame_interval_s "
                       f"({self.frame_interval_s})")

  @property
  def substep_dt_s(self) -> float:
    return self.exposure_s / self.substeps

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.num_frames, self.height_px, self.width_px)

  @property
  def field_nm(self) -> tuple[float, float]:
    """(width, height) of the field of view in nm."""
    return (self.width_px * self.pixel_size_nm, self.height_px * self.pixel_size_nm)


@flax.struct.dataclass
class Emitter:
  """Per-movie emitter and background parameters (a pytree of scalars).

  D_um2_per_s: diffusion coefficient.
  photons: photons per frame reaching the camera (before QE) over the full exposure.
  background_photons: mean background photons per pixel per frame.
  background_gradient: [2] fractional change of the background across the field in
    (x, y); 0.1 means +-5% at the edges around the mean.
  psf_fwhm_nm: PSF full width at half maximum.
  start_nm: [2] (x, y) position at the first sub-step.
  """
  D_um2_per_s: jax.Array
  photons: jax.Array
  background_photons: jax.Array
  background_gradient: jax.Array
  psf_fwhm_nm: jax.Array
  start_nm: jax.Array


@dataclasses.dataclass(frozen=True)
class Priors:
  """Ranges from which training movies draw their parameters (static, hashable).

  D is log-uniform, photons and background are log-uniform, FWHM uniform, the
  gradient uniform in [-max, max] per axis, and the start uniform in a central square
  covering ``start_region_fraction`` of each image side.
  """
  D_um2_per_s: tuple[float, float] = (0.01, 10.0)
  photons: tuple[float, float] = (300.0, 3000.0)
  background_photons: tuple[float, float] = (2.0, 30.0)
  background_gradient_max: float = 0.1
  psf_fwhm_nm: tuple[float, float] = (200.0, 250.0)
  start_region_fraction: float = 0.25

  def __post_init__(self):
    for name in ("D_um2_per_s", "photons", "background_photons", "psf_fwhm_nm"):
      lo, hi = getattr(self, name)
      if not 0 < lo <= hi:
        raise ValueError(f"prior range {name}={lo, hi} must satisfy 0 < low <= high")
    if not 0 <= self.start_region_fraction <= 1:
      raise ValueError("start_region_fraction must be in [0, 1]")


def _log_uniform(key, low_high, shape=()):
  lo, hi = low_high
  return jnp.exp(jax.random.uniform(key, shape, minval=math.log(lo), maxval=math.log(hi)))


def sample_emitter(key: jax.Array, priors: Priors, geometry: Geometry) -> Emitter:
  """Draws one movie's parameters from the priors."""
  k_d, k_p, k_b, k_g, k_f, k_s = jax.random.split(key, 6)
  field = jnp.array(geometry.field_nm)
  half = 0.5 * priors.start_region_fraction * field
  start = field / 2 + jax.random.uniform(k_s, (2,), minval=-1.0, maxval=1.0) * half
  return Emitter(
      D_um2_per_s=_log_uniform(k_d, priors.D_um2_per_s),
      photons=_log_uniform(k_p, priors.photons),
      background_photons=_log_uniform(k_b, priors.background_photons),
      background_gradient=jax.random.uniform(
          k_g, (2,), minval=-priors.background_gradient_max,
          maxval=priors.background_gradient_max),
      psf_fwhm_nm=jax.random.uniform(k_f, (), minval=priors.psf_fwhm_nm[0],
                                     maxval=priors.psf_fwhm_nm[1]),
      start_nm=start,
  )


def substep_times_s(geometry: Geometry) -> jax.Array:
  """[T*S] times of the sub-step positions, from the start of the first frame."""
  t = jnp.arange(geometry.num_frames)[:, None] * geometry.frame_interval_s
  s = (jnp.arange(geometry.substeps)[None, :] + 0.5) * geometry.substep_dt_s
  return (t + s).reshape(-1)


def brownian_substeps_nm(key: jax.Array, D_um2_per_s: jax.Array, start_nm: jax.Array,
                         geometry: Geometry) -> jax.Array:
  """[T*S, 2] positions in nm of a 2D Brownian trajectory starting at ``start_nm``."""
  dt = jnp.diff(substep_times_s(geometry))  # [T*S - 1]
  sd_nm = jnp.sqrt(2.0 * D_um2_per_s * 1e6 * dt)  # um^2 -> nm^2
  steps = jax.random.normal(key, (dt.shape[0], 2)) * sd_nm[:, None]
  path = jnp.concatenate([jnp.zeros((1, 2)), jnp.cumsum(steps, axis=0)], axis=0)
  return start_nm + path


def pixel_integrated_gaussian(center_nm: jax.Array, sigma_nm: jax.Array, num_px: int,
                              pixel_size_nm: float) -> jax.Array:
  """[..., num_px] fraction of a 1D Gaussian falling into each pixel.

  Exact pixel integration with the normal CDF; each pixel's mass is computed on the
  tail side of the Gaussian (lower tail left of the centre, upper tail right of it) so
  that far pixels keep their tiny, positive values instead of float32 cancellation.
  """
  edges = jnp.arange(num_px + 1, dtype=jnp.float32) * pixel_size_nm
  z = (edges - center_nm[..., None]) / sigma_nm[..., None]
  lower = jax.scipy.special.ndtr(z)       # P(X < edge)
  upper = jax.scipy.special.ndtr(-z)      # P(X > edge)
  left_side = (z[..., 1:] + z[..., :-1]) < 0
  mass = jnp.where(left_side, lower[..., 1:] - lower[..., :-1],
                   upper[..., :-1] - upper[..., 1:])
  return jnp.maximum(mass, 0.0)


def background_image(emitter: Emitter, geometry: Geometry) -> jax.Array:
  """[H, W] background photons per pixel per frame (mean = background_photons)."""
  x = (jnp.arange(geometry.width_px) + 0.5) / geometry.width_px - 0.5
  y = (jnp.arange(geometry.height_px) + 0.5) / geometry.height_px - 0.5
  gx, gy = emitter.background_gradient[0], emitter.background_gradient[1]
  tilt = 1.0 + gx * x[None, :] + gy * y[:, None]
  return emitter.background_photons * tilt


def expected_photons(positions_nm: jax.Array, emitter: Emitter,
                     geometry: Geometry) -> jax.Array:
  """[T, H, W] noiseless photons per pixel: blurred PSF + background.

  Differentiable in positions, photons, background and PSF FWHM.
  """
  T, S = geometry.num_frames, geometry.substeps
  pos = positions_nm.reshape(T, S, 2)
  sigma = emitter.psf_fwhm_nm / FWHM_PER_SIGMA
  px = pixel_integrated_gaussian(pos[..., 0], sigma, geometry.width_px,
                                 geometry.pixel_size_nm)   # [T, S, W]
  py = pixel_integrated_gaussian(pos[..., 1], sigma, geometry.height_px,
                                 geometry.pixel_size_nm)   # [T, S, H]
  spot = jnp.einsum("tsh,tsw->thw", py * (emitter.photons / S), px,
                    precision=jax.lax.Precision.HIGHEST)   # not TF32 on GPU
  return spot + background_image(emitter, geometry)[None]


def in_field_fraction(positions_nm: jax.Array, geometry: Geometry) -> jax.Array:
  """Fraction of the sub-step positions inside the field of view."""
  w, h = geometry.field_nm
  x, y = positions_nm[..., 0], positions_nm[..., 1]
  inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
  return jnp.mean(inside.astype(jnp.float32), axis=-1)


def simulate_movie(key: jax.Array, emitter: Emitter, camera: Camera, geometry: Geometry,
                   noise: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """One movie from given parameters.

  Returns (frames [T, H, W] float32 ADU, truth dict). With ``noise=False`` the frames
  are the noiseless expected ADU (differentiable in every parameter).
  """
  k_traj, k_cam = jax.random.split(key)
  positions = brownian_substeps_nm(k_traj, emitter.D_um2_per_s, emitter.start_nm, geometry)
  photons_img = expected_photons(positions, emitter, geometry)
  if noise:
    frames = noise_lib.apply_camera(k_cam, photons_img, camera)
  else:
    frames = noise_lib.expected_adu(photons_img, camera).astype(jnp.float32)
  truth = {
      "D_um2_per_s": emitter.D_um2_per_s,
      "positions_nm": positions,
      "photons": emitter.photons,
      "background_photons": emitter.background_photons,
      "background_gradient": emitter.background_gradient,
      "psf_fwhm_nm": emitter.psf_fwhm_nm,
      "in_field_fraction": in_field_fraction(positions, geometry),
  }
  return frames, truth


def simulate_random_movie(key: jax.Array, priors: Priors, camera: Camera,
                          geometry: Geometry, noise: bool = True):
  """One movie with parameters drawn from ``priors``."""
  k_params, k_movie = jax.random.split(key)
  emitter = sample_emitter(k_params, priors, geometry)
  return simulate_movie(k_movie, emitter, camera, geometry, noise)


def movie_keys(key: jax.Array, indices) -> jax.Array:
  """[N] per-movie keys ``fold_in(key, i)`` for an array of movie indices."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices))


def simulate_batch(key: jax.Array, batch_size: int, priors: Priors, camera: Camera,
                   geometry: Geometry, noise: bool = True):
  """[B, T, H, W] movies and batched truth; movie b uses ``fold_in(key, b)``.

  Because each movie only depends on its own folded key, a batch equals the stack of
  ``simulate_random_movie(fold_in(key, b), ...)`` and any sharding of the batch axis
  gives the same movies.
  """
  return simulate_keys(movie_keys(key, jnp.arange(batch_size)), priors, camera, geometry, noise)


def simulate_keys(keys: jax.Array, priors: Priors, camera: Camera, geometry: Geometry,
                  noise: bool = True):
  """Movies for an explicit [B] array of keys (vmapped ``simulate_random_movie``)."""
  return jax.vmap(lambda k: simulate_random_movie(k, priors, camera, geometry, noise))(keys)


@dataclasses.dataclass(frozen=True)
class Simulator:
  """Everything needed to simulate training movies, built from a config."""
  geometry: Geometry
  priors: Priors
  camera: Camera

  def batch(self, key, batch_size: int, noise: bool = True):
    return simulate_batch(key, batch_size, self.priors, self.camera, self.geometry, noise)

  def from_keys(self, keys, noise: bool = True):
    return simulate_keys(keys, self.priors, self.camera, self.geometry, noise)


def _pair(value, name):
  try:
    lo, hi = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"config field sim.{name} must be a (low, high) pair, got {value!r}")
  return (lo, hi)


def simulator_from_config(sim_cfg: Any) -> Simulator:
  """Builds a :class:`Simulator` from the ``sim`` section of a config (see configs/).

  If ``sim_cfg.calibration`` names a calibration JSON, its values are first written
  into ``sim_cfg`` (see :func:`smlm_jax.diffusion.camera_setup.apply_calibration`).
  """
  from smlm_jax.diffusion import camera_setup
  camera_setup.apply_calibration(sim_cfg)
  geometry = Geometry(
      num_frames=int(sim_cfg.num_frames), substeps=int(sim_cfg.substeps),
      height_px=int(sim_cfg.height_px), width_px=int(sim_cfg.width_px),
      pixel_size_nm=float(sim_cfg.pixel_size_nm),
      frame_interval_s=float(sim_cfg.frame_interval_s),
      exposure_s=float(sim_cfg.exposure_s))
  priors = Priors(
      D_um2_per_s=_pair(sim_cfg.D_um2_per_s, "D_um2_per_s"),
      photons=_pair(sim_cfg.photons, "photons"),
      background_photons=_pair(sim_cfg.background_photons, "background_photons"),
      background_gradient_max=float(sim_cfg.background_gradient_max),
      psf_fwhm_nm=_pair(sim_cfg.psf_fwhm_nm, "psf_fwhm_nm"),
      start_region_fraction=float(sim_cfg.start_region_fraction))
  cam = sim_cfg.camera
  camera = Camera(model=str(cam.model), qe=float(cam.qe),
                  gain_adu_per_e=float(cam.gain_adu_per_e),
                  offset_adu=float(cam.offset_adu), read_noise_e=float(cam.read_noise_e),
                  em_gain=float(cam.em_gain))
  return Simulator(geometry=geometry, priors=priors, camera=camera)
