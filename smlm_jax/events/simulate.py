"""Simulated division events: tubular mitochondria that constrict and divide, in JAX.

``simulate(key, params, num_frames) -> (frames [n, S, S] ADU, truth)`` is a pure function
of the key (jit/vmap-able, static shapes); ``batch(keys, params, n)`` vmaps it. The last
of the ``n`` frames is the "current" one: ``truth["label"]`` [S, S] is its event map, a
Gaussian of ``sigma_px`` (peak 1, 0 below 0.1, as :mod:`.annotate` makes from
annotations) centred on the division site, or all zeros when the crop holds no event.
So the detector can be checked where the truth is known.

Scene (lengths in px of ``pixel_size_nm``; defaults in ``configs/events.py``):

* ``num_tubules`` tubules (uniform integer range), each a quadratic Bezier curve of
  length ``length_um`` and bend up to ``bend`` x length, sampled at K points. A tubule
  of diameter d is a line of fluorophores whose cross-section is the projection of a
  filled cylinder (variance d^2 / 16) blurred by the PSF (``psf_sigma_nm``): each sample
  is a 2D Gaussian of ``sigma = sqrt(psf^2 + d^2 / 16)`` carrying photons proportional
  to d^2 (the labelled volume) times the arc length it stands for. The peak of a straight
  tubule of the nominal diameter is ``photons`` (per pixel, before QE).
* Along each tubule the labelling varies smoothly (three sinusoids, relative amplitude
  up to ``modulation``: nucleoids, cristae), and with probability ``static_dip_prob`` a
  tubule has a constriction of depth up to ``static_dip_depth`` that does not change in
  time (a stable constriction, or a thin tubule segment): a hard negative.
* Every tubule drifts by ``drift_px`` (rms, per frame and axis); the brightness of
  every frame fluctuates by ``flicker`` (relative rms; illumination, focus).
* With probability ``event_fraction`` tubule 0 divides at a site inside the crop
  (at least ``margin_px`` from the edge). Progress ``q`` grows by ``rate`` per frame
  and is ``q_now`` in the current frame: for ``q < 1`` the diameter at arc distance u
  from the site is ``d (1 - q exp(-u^2 / 2 w^2))`` (a neck of half-width ``w =
  neck_px``, narrower and dimmer as q -> 1: Kleele et al., Nature 593, 435 (2021)
  describe division by gradual constriction to ~100 nm before scission); for ``q >= 1``
  the tubule is cut and the two ends retract by ``retract_px`` per unit of ``q - 1``.
  The event map is present in the current frame while ``q_now`` lies in ``q_range``
  (from a visible neck to just after scission: the frames an annotator marks).
* Background ``background_photons`` per pixel, exact Poisson shot noise and an sCMOS
  read-out (:func:`smlm_jax.core.noise.apply_camera`).
* Column stripes (``column_gain_rel_std``, relative rms; default 0 = none): every
  pixel column x of a crop has its own gain ``1 + column_gain_rel_std * z_x``
  (z_x standard normal, one draw per crop, the same in every frame) on the expected
  photons, i.e. signal and background. This is the vertical fixed-pattern stripes of
  the shared iSIM crops: multiplicative (10-15% rms on bright structure, none in the
  pure-noise crop, so not a per-column camera offset), constant in time (column
  profiles of the first and last frame correlate 0.85-0.95); rows show nothing
  beyond white noise. Columns are drawn independently (the real ones often alternate
  even/odd, which is not modelled). Physically the photo-response non-uniformity of
  sCMOS column amplifiers, or the iSIM's scanned multifocal excitation. Drawn from ``fold_in(key, 24)``, so the other random
  numbers are unchanged, and skipped when the value is a Python 0 (``simulate``
  bit for bit as before).
* Branches (``branch_prob``; default 0 = none): each tubule after the first starts,
  with this probability, on the previous one (10-90% along it): T / Y junctions of a
  network, a hard negative for the detector (real crops show many; the detector's
  false detections sat on junctions and thick necks). Drawn from ``fold_in(key, 25)``
  and skipped at a Python 0, like the stripes.
* Growing and shrinking tips (``tip_px``; default 0 = none): both ends of every
  tubule move along its arc from frame to frame (U(0, 2 tip_px) cut back in the
  current frame, N(0, tip_px) px per frame, at most a quarter of the tubule): the
  tips of real mitochondria extend and retract between 5 s frames, so a moving end
  alone is not a division. Drawn from ``fold_in(key, 27)``, skipped at a Python 0.
* Rings (``ring_prob``; default 0 = none): each tubule after the first is, with this
  probability, a circular arc of its own length through 1.2-2 pi (C shapes to closed
  donuts, common in the shared crops); drawn from ``fold_in(key, 26)``, skipped at a
  Python 0.

* Blobs (``num_blobs`` slots; default 0 = none): each slot holds, with probability
  ``blob_prob``, a round mitochondrial fragment (or swollen mitochondrion) anywhere in
  the crop: a segment of length ``blob_elongation`` x its diameter (``blob_diameter_nm``)
  with the tubule cross-section model, peak ``blob_brightness`` x the crop's tubule
  peak, drifting like a tubule, present in every frame. A hard negative: the default's
  shortest tubule is 1.5 um long (the calibrated one 0.65 um), while the shared crops
  show many short round pieces, on which the zero-shot detector's frame maxima sat
  (tried as a default, not adopted: docs/events.md). Drawn from ``fold_in(key, 28)``, skipped
  at 0 (``num_blobs`` is static).

Defaults are set to match the shared iSIM crops (56 nm pixels, COS-7 mitochondria
~10-15 px wide, tubule peaks ~130 and background ~5 photo-electrons at ~2.5 ADU/e-,
offset 100 ADU: measured from their frame-to-frame variance vs. mean).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from smlm_jax.core import noise

CUTOFF = 0.1


@dataclasses.dataclass(frozen=True)
class SimParams:
  """Static simulation parameters (hashable; built from ``config.sim``)."""
  size_px: int = 64
  pixel_size_nm: float = 56.0
  psf_sigma_nm: float = 70.0
  diameter_nm: tuple = (400.0, 900.0)
  length_um: tuple = (1.5, 5.0)
  bend: float = 0.35
  num_tubules: tuple = (1, 4)
  points_per_tubule: int = 96
  modulation: float = 0.3
  static_dip_prob: float = 0.5
  static_dip_depth: tuple = (0.2, 0.7)
  drift_px: float = 0.5
  flicker: float = 0.05
  event_fraction: float = 0.5
  margin_px: float = 6.0
  q_now: tuple = (0.4, 1.6)
  q_range: tuple = (0.4, 1.6)
  rate: tuple = (0.15, 0.4)
  neck_px: tuple = (2.0, 4.0)
  retract_px: float = 6.0
  photons: tuple = (20.0, 200.0)
  background_photons: tuple = (1.0, 15.0)
  sigma_px: float = 2.0
  qe: float = 0.8
  gain_adu_per_e: float = 2.5
  offset_adu: float = 100.0
  read_noise_e: float = 1.5
  column_gain_rel_std: float = 0.0
  branch_prob: float = 0.0
  ring_prob: float = 0.0
  tip_px: float = 0.0
  num_blobs: int = 0
  blob_prob: float = 0.5
  blob_diameter_nm: tuple = (400.0, 1200.0)
  blob_elongation: tuple = (0.0, 1.5)
  blob_brightness: tuple = (0.5, 2.0)

  @classmethod
  def from_config(cls, sim) -> "SimParams":
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: (tuple(v) if isinstance(v, (list, tuple)) else v)
              for k, v in dict(sim).items() if k in names}
    return cls(**values)

  @property
  def camera(self) -> noise.Camera:
    return noise.Camera(qe=self.qe, gain_adu_per_e=self.gain_adu_per_e,
                        offset_adu=self.offset_adu, read_noise_e=self.read_noise_e)


def _log_uniform(key, lo_hi, shape=()):
  lo, hi = lo_hi
  return jnp.exp(jax.random.uniform(key, shape, minval=jnp.log(lo), maxval=jnp.log(hi)))


def _uniform(key, lo_hi, shape=()):
  return jax.random.uniform(key, shape, minval=lo_hi[0], maxval=lo_hi[1])


def gaussian_map(center_yx, shape, sigma_px: float, cutoff: float = CUTOFF):
  """[H, W] exp(-d^2 / 2 sigma^2) around center (pixel centres at integers), 0 below
  cutoff: the same map :func:`smlm_jax.events.annotate.gaussian_spots` draws."""
  y = jnp.arange(shape[0], dtype=jnp.float32)[:, None]
  x = jnp.arange(shape[1], dtype=jnp.float32)[None, :]
  g = jnp.exp(-((y - center_yx[0]) ** 2 + (x - center_yx[1]) ** 2) / (2.0 * sigma_px ** 2))
  return jnp.where(g >= cutoff, g, 0.0)


def _bezier(p0, p1, p2, s):
  s = s[:, None]
  return (1 - s) ** 2 * p0 + 2 * s * (1 - s) * p1 + s ** 2 * p2


def _render(yx, sigma, mass, size):
  """Sum over samples of mass * N(yx, sigma^2 I) on the pixel grid: [S, S].

  Separable: image = (Gy * w)^T Gx with Gy [K, S], Gx [K, S]; a matrix product.
  """
  grid = jnp.arange(size, dtype=jnp.float32)
  gy = jnp.exp(-0.5 * ((grid[None, :] - yx[:, :1]) / sigma[:, None]) ** 2)
  gx = jnp.exp(-0.5 * ((grid[None, :] - yx[:, 1:]) / sigma[:, None]) ** 2)
  w = mass / (2.0 * math.pi * sigma ** 2)
  return jnp.einsum("ky,kx->yx", gy * w[:, None], gx, precision=jax.lax.Precision.HIGHEST)


def column_gain(key, p: SimParams):
  """[S] per-column gain of a crop, 1 + column_gain_rel_std * N(0, 1) (floored at
  0.05): the fixed-pattern stripes (see the module docstring); ``key`` is the crop's."""
  z = jax.random.normal(jax.random.fold_in(key, 24), (p.size_px,))
  return jnp.maximum(1.0 + p.column_gain_rel_std * z, 0.05)


def _enabled(value) -> bool:
  """An optional scene feature (stripes, branches, rings) is drawn unless its value is
  a Python 0 (then ``simulate`` is bit for bit as without it; a traced value, as in
  calibration, always draws)."""
  return not (isinstance(value, (int, float)) and value == 0)


def _ring_curves(key, length, k_pts, ring_prob, curve):
  """Curves [m, K, 2] where each tubule i >= 1, with probability ``ring_prob``, is a
  circular arc of its own length through an angle U(1.2, 2) pi about its centre (C
  shapes to closed rings: the 'donut' mitochondria of stressed cells, which the shared
  iSIM crops show and the straight-ish tubules lack; a hard negative: a ring has no
  neck and its ends are not a division). Tubule 0 (the one that may divide) never
  changes. ``length`` [m] px; other tubules keep ``curve``."""
  m = curve.shape[0]
  k_on, k_arc, k_phase = jax.random.split(key, 3)
  on = jax.random.bernoulli(k_on, ring_prob, (m,)) & (jnp.arange(m) > 0)
  arc = jax.random.uniform(k_arc, (m,), minval=1.2, maxval=2.0) * math.pi
  phase = jax.random.uniform(k_phase, (m,), maxval=2 * math.pi)
  radius = length / arc
  ang = phase[:, None] + arc[:, None] * jnp.linspace(0.0, 1.0, k_pts)[None, :]
  ring = radius[:, None, None] * jnp.stack([jnp.sin(ang), jnp.cos(ang)], -1)
  return jnp.where(on[:, None, None], ring, curve)


def _attach_branches(key, curve, branch_prob):
  """Curves [m, K, 2] where each tubule i >= 1, with probability ``branch_prob``, is
  moved so that its first point lies on tubule i - 1 (at 10-90% of its samples): a
  T / Y junction of a mitochondrial network (a hard negative: a junction is not a
  division). Tubule 0 (the one that may divide) never moves."""
  m, k = curve.shape[0], curve.shape[1]
  k_on, k_at = jax.random.split(key)
  on = jax.random.bernoulli(k_on, branch_prob, (m,))
  at = jax.random.randint(k_at, (m,), int(0.1 * k), int(0.9 * k))
  out = [curve[0]]
  for i in range(1, m):
    shift = out[i - 1][at[i]] - curve[i, 0]
    out.append(jnp.where(on[i], curve[i] + shift, curve[i]))
  return jnp.stack(out)


def _tip_windows(key, arc, num_frames, tip_px):
  """[n, m, K] weights in [0, 1] of each tubule's samples in each frame: both ends of
  every tubule extend and retract along its own arc (mitochondrial tips grow and
  shrink between 5 s frames without dividing: a hard negative for the ends a division
  leaves). Per end, the cut in the current frame (n - 1) is U(0, 2 tip_px) and moves
  by v ~ N(0, tip_px) per frame (linear in time), floored at 0 (the nominal end) and
  capped at a quarter of the tubule (a site lies at 30-70% of tubule 0's arc, so the
  neck is never cut away); a 1 px linear ramp. ``arc`` [m, K] px."""
  m = arc.shape[0]
  k_now, k_v = jax.random.split(key)
  length = arc[:, -1:]                                                  # [m, 1]
  now = jax.random.uniform(k_now, (2, m, 1), maxval=2.0) * tip_px
  v = jax.random.normal(k_v, (2, m, 1)) * tip_px
  lag = jnp.arange(num_frames, dtype=jnp.float32) - (num_frames - 1)   # [n], <= 0
  cut = jnp.clip(now[:, None] + v[:, None] * lag[None, :, None, None], 0.0,
                 0.25 * length[None, None])                             # [2, n, m, 1]
  start = jnp.clip(arc[None] - cut[0] + 1.0, 0.0, 1.0)
  end = jnp.clip(length[None] - cut[1] - arc[None] + 1.0, 0.0, 1.0)
  return start * end


BLOB_POINTS = 8


def _blobs(key, p: SimParams, psf_px, peak):
  """Round fragments (see the module docstring): sample positions [b * 8, 2] px (before
  drift), widths [b * 8], masses [b * 8] (0 for absent slots) and drift [b, 2] px/frame."""
  b, k = p.num_blobs, BLOB_POINTS
  keys = jax.random.split(key, 7)
  on = jax.random.bernoulli(keys[0], p.blob_prob, (b,))
  diameter = _uniform(keys[1], p.blob_diameter_nm, (b,)) / p.pixel_size_nm
  length = _uniform(keys[2], p.blob_elongation, (b,)) * diameter
  theta = jax.random.uniform(keys[3], (b,), maxval=2 * math.pi)
  centre = jax.random.uniform(keys[4], (b, 2), minval=-0.05 * p.size_px,
                              maxval=1.05 * p.size_px)
  bright = _uniform(keys[5], p.blob_brightness, (b,)) * peak
  drift = p.drift_px * jax.random.normal(keys[6], (b, 2))
  u = jnp.stack([jnp.sin(theta), jnp.cos(theta)], -1)
  t = jnp.linspace(-0.5, 0.5, k)
  yx = centre[:, None, :] + length[:, None, None] * t[None, :, None] * u[:, None, :]
  sigma = jnp.sqrt(psf_px ** 2 + diameter ** 2 / 16.0)                  # [b]
  # The mass of one Gaussian of width sigma peaking at `bright`, spread over the k
  # samples: exact for a round blob; an elongated one peaks a little lower.
  mass = bright * 2.0 * math.pi * sigma ** 2 * on / k                  # [b]
  return (yx.reshape(-1, 2), jnp.repeat(sigma, k), jnp.repeat(mass, k), drift)


def simulate(key, p: SimParams, num_frames: int, has_event=None):
  """One crop: (frames [n, S, S] float32 ADU, truth dict: label [S, S], has_event,
  site_yx [2] px, q_now, expected_photons [n, S, S] (before QE and noise)).
  ``has_event`` (bool array) overrides the Bernoulli draw."""
  photons, truth, noise_key = scene(key, p, num_frames, has_event)
  return noise.apply_camera(noise_key, photons, p.camera), truth


def scene(key, p: SimParams, num_frames: int, has_event=None):
  """The noiseless part of :func:`simulate`: (expected photons [n, S, S], truth, the
  key of the camera noise). Differentiable in the continuous fields of ``p`` (they may
  be traced arrays: :mod:`.calibrate` fits them with the random numbers held fixed);
  ``size_px``, ``num_tubules``, ``points_per_tubule`` must stay static."""
  s, n, k_pts = p.size_px, num_frames, p.points_per_tubule
  m = p.num_tubules[1]
  keys = iter(jax.random.split(key, 24))
  px = p.pixel_size_nm
  if has_event is None:
    has_event = jax.random.bernoulli(next(keys), p.event_fraction)
  n_tub = jax.random.randint(next(keys), (), p.num_tubules[0], m + 1)
  present = (jnp.arange(m) < n_tub) | ((jnp.arange(m) == 0) & has_event)

  # Geometry of every tubule (px): length, direction, bend; arc-length samples.
  length = _uniform(next(keys), p.length_um, (m,)) * 1000.0 / px
  theta = jax.random.uniform(next(keys), (m,), maxval=2 * math.pi)
  u = jnp.stack([jnp.sin(theta), jnp.cos(theta)], -1)
  normal = jnp.stack([-u[:, 1], u[:, 0]], -1)
  bend = jax.random.uniform(next(keys), (m,), minval=-p.bend, maxval=p.bend) * length
  t = jnp.linspace(0.0, 1.0, k_pts)
  p0 = -0.5 * length[:, None] * u
  p2 = 0.5 * length[:, None] * u
  p1 = bend[:, None] * normal
  curve = jax.vmap(_bezier, (0, 0, 0, None))(p0, p1, p2, t)          # [m, K, 2]
  if _enabled(p.ring_prob):
    curve = _ring_curves(jax.random.fold_in(key, 26), length, k_pts, p.ring_prob, curve)
  seg = jnp.linalg.norm(jnp.diff(curve, axis=1), axis=-1)
  arc = jnp.concatenate([jnp.zeros((m, 1)), jnp.cumsum(seg, axis=1)], axis=1)
  ds = jnp.concatenate([seg[:, :1] / 2, (seg[:, 1:] + seg[:, :-1]) / 2, seg[:, -1:] / 2], 1)

  # Placement: tubule 0 through the division site (inside the crop), others anywhere.
  site_s = jax.random.uniform(next(keys), (), minval=0.3, maxval=0.7)
  site_k = jnp.clip(jnp.round(site_s * (k_pts - 1)).astype(jnp.int32), 0, k_pts - 1)
  site = jax.random.uniform(next(keys), (2,), minval=p.margin_px, maxval=s - 1 - p.margin_px)
  centres = jax.random.uniform(next(keys), (m, 2), minval=-0.15 * s, maxval=1.15 * s)
  centres = centres.at[0].set(site - curve[0, site_k])
  curve = curve + centres[:, None, :]
  if _enabled(p.branch_prob):
    curve = _attach_branches(jax.random.fold_in(key, 25), curve, p.branch_prob)
  site_arc = arc[0, site_k]

  # Labelling: nominal diameter, smooth modulation, static dips.
  diameter = _uniform(next(keys), p.diameter_nm, (m,)) / px
  freq = jax.random.uniform(next(keys), (m, 3), minval=1.0 / 40, maxval=1.0 / 8)
  phase = jax.random.uniform(next(keys), (m, 3), maxval=2 * math.pi)
  amp = jax.random.uniform(next(keys), (m, 1), maxval=p.modulation)
  waves = jnp.sin(2 * math.pi * freq[:, None, :] * arc[..., None] + phase[:, None, :])
  labelling = jnp.clip(1.0 + amp * waves.mean(-1), 0.2, None)
  dip_on = jax.random.bernoulli(next(keys), p.static_dip_prob, (m,))
  dip_depth = _uniform(next(keys), p.static_dip_depth, (m,)) * dip_on
  dip_at = jax.random.uniform(next(keys), (m,), minval=0.15, maxval=0.85) * arc[:, -1]
  dip_w = _uniform(next(keys), p.neck_px, (m,))
  dip = 1.0 - dip_depth[:, None] * jnp.exp(-0.5 * ((arc - dip_at[:, None]) / dip_w[:, None]) ** 2)
  # Tubule 0 carries the event instead of a static dip when it divides.
  dip = dip.at[0].set(jnp.where(has_event, 1.0, dip[0]))

  # Event progress per frame (current frame = n - 1).
  q_now = _uniform(next(keys), p.q_now)
  rate = _uniform(next(keys), p.rate)
  q = q_now - rate * (n - 1 - jnp.arange(n))                            # [n]
  neck = _uniform(next(keys), p.neck_px)
  dist = jnp.abs(arc[0] - site_arc)                                     # [K]

  def event_factor(qj):
    narrowing = 1.0 - jnp.clip(qj, 0.0, 1.0) * jnp.exp(-0.5 * (dist / neck) ** 2)
    gap = neck + p.retract_px * jnp.maximum(qj - 1.0, 0.0)
    return jnp.where((qj >= 1.0) & (dist < gap), 0.0, narrowing)

  psf = p.psf_sigma_nm / px
  peak = _log_uniform(next(keys), p.photons)
  background = _log_uniform(next(keys), p.background_photons)
  drift = p.drift_px * jax.random.normal(next(keys), (m, 2))
  flicker = 1.0 + p.flicker * jax.random.normal(next(keys), (n,))

  tips = (_tip_windows(jax.random.fold_in(key, 27), arc, n, p.tip_px)
          if _enabled(p.tip_px) else None)                              # [n, m, K]
  blobs = (_blobs(jax.random.fold_in(key, 28), p, psf, peak)
           if p.num_blobs > 0 else None)

  def frame(j):
    factor = jnp.where(has_event, event_factor(q[j]), 1.0)              # [K]
    d = diameter[:, None] * dip
    d = d.at[0].multiply(factor)                                        # [m, K]
    sigma = jnp.sqrt(psf ** 2 + d ** 2 / 16.0) + 1e-3
    sigma0 = jnp.sqrt(psf ** 2 + diameter ** 2 / 16.0)
    # Line density so that a straight tubule of nominal diameter peaks at `peak`.
    density = peak * math.sqrt(2 * math.pi) * sigma0[:, None] * (d / diameter[:, None]) ** 2
    mass = density * labelling * ds * present[:, None]
    if tips is not None:
      mass = mass * tips[j]
    shift = (j - (n - 1)) * drift
    yx = (curve + shift[:, None, :]).reshape(-1, 2)
    sigma, mass = sigma.reshape(-1), mass.reshape(-1)
    if blobs is not None:
      b_yx, b_sigma, b_mass, b_drift = blobs
      b_shift = jnp.repeat((j - (n - 1)) * b_drift, BLOB_POINTS, axis=0)
      yx = jnp.concatenate([yx, b_yx + b_shift])
      sigma = jnp.concatenate([sigma, b_sigma])
      mass = jnp.concatenate([mass, b_mass])
    return _render(yx, sigma, mass, s) * flicker[j]

  photons = jax.vmap(frame)(jnp.arange(n)) + background
  if _enabled(p.column_gain_rel_std):
    photons = photons * column_gain(key, p)[None, None, :]
  noise_key = next(keys)
  on = has_event & (q_now >= p.q_range[0]) & (q_now <= p.q_range[1])
  label = gaussian_map(site, (s, s), p.sigma_px) * on
  return photons, {"label": label, "has_event": on, "site_yx": site, "q_now": q_now,
                   "expected_photons": photons}, noise_key


def batch(keys, p: SimParams, num_frames: int):
  """vmap of :func:`simulate` over keys [B]: frames [B, n, S, S], truth of [B, ...]."""
  return jax.vmap(lambda k: simulate(k, p, num_frames))(keys)
