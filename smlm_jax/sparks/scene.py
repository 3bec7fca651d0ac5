"""Parameters of one simulated Ca2+ movie and their priors (domain randomization).

Contract: :func:`draw_scene` is a pure function of a key that returns a :class:`Scene`
(a pytree of per-movie scalars, a per-pixel texture and per-slot :class:`Events`) drawn
from :class:`Priors`; :mod:`smlm_jax.sparks.simulator` renders it. Every prior field
has a neutral default (no randomization of that quantity), so a config saved before a
field existed rebuilds the simulator it was trained with. Units are in the names.

Beyond the base model (a band-shaped cell, Gaussian sparks, plateau puffs, plane waves:
see simulator.py), the priors widen what a training movie can look like (issue 23, "training
that generalizes"; ranges and sources in configs/sparks.py):

* cell: a rounded (superelliptic) end in the field, wavy edges, a nucleus brighter or
  dimmer than the cytosol, smooth dye-loading inhomogeneity and a fine granular texture;
* dye and detector: dye saturation of dF/F0 (``dff / (1 + dff / dff_max)``), extra read
  noise and a detector excess-noise factor (analog PMT / HyD gain noise);
* acquisition: raster-scan line timing (row y sampled ``line_delay * dt * y / H`` after
  row 0, which shears fast events across rows);
* events: log-uniform amplitudes, elliptic sparks that widen while they decay,
  sympathetic sparks (a spark triggered a few ms later on a neighbouring release site),
  flickering puffs, curved wave fronts;
* sub-threshold fluctuations (``max_faint``; default none): faint, slow, local rises of
  fluorescence (plateau profiles like puffs, peak dF/F0 below the smallest puff) that
  the labels leave background (slot kind 0): no event by the detection criteria, so
  the network must learn not to report them.
"""
from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

BACKGROUND, SPARK, WAVE, PUFF, IGNORE = 0, 1, 2, 3, 4
CLASS_NAMES = ("background", "spark", "wave", "puff")
EVENT_CLASSES = (SPARK, WAVE, PUFF)
NUM_CLASSES = 4


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static movie geometry (hashable)."""
  num_frames: int = 64
  height_px: int = 32
  width_px: int = 64
  pixel_size_um: float = 0.2
  frame_interval_ms: float = 6.8

  @property
  def shape(self):
    return (self.num_frames, self.height_px, self.width_px)


@dataclasses.dataclass(frozen=True)
class Priors:
  """Ranges (lo, hi) of every drawn quantity; see configs/sparks.py for sources."""
  f0_photons: tuple = (5.0, 40.0)
  background_photons: tuple = (0.5, 3.0)
  cell_top_px: tuple = (-0.3, 0.3)          # fractions of the height
  cell_bottom_px: tuple = (0.7, 1.3)
  cell_edge_slope: float = 0.1               # max |slope| of an edge (px per px)
  cell_edge_px: float = 1.0
  cell_edge_wobble_px: float = 0.0           # max amplitude of a sinusoidal edge wobble
  cell_end_probability: float = 0.0          # a rounded cell end inside the field
  cell_end_exponent: tuple = (2.0, 2.0)      # superellipse exponent of the end
  nucleus_probability: float = 0.0
  nucleus_contrast: tuple = (1.0, 1.0)       # log-uniform F0 factor inside the nucleus
  nucleus_length_um: tuple = (8.0, 14.0)
  nucleus_width_um: tuple = (3.0, 6.0)
  dye_inhomogeneity: float = 0.0             # max amplitude of smooth F0 variation
  granular_texture: float = 0.0              # max rms of the fine per-pixel texture
  striation_spacing_um: tuple = (1.8, 2.0)
  striation_depth: tuple = (0.05, 0.3)
  striation_angle_deg: float = 10.0
  illumination_tilt: float = 0.2
  bleach_rate_per_s: tuple = (0.0, 0.2)
  dye_max_dff: tuple = (0.0, 0.0)            # saturation scale; 0: linear dye
  line_delay_fraction: tuple = (0.0, 0.0)    # raster scan: last row's delay / frame
  extra_read_noise_e: tuple = (0.0, 0.0)
  excess_noise_factor: tuple = (1.0, 1.0)
  log_uniform_amplitudes: bool = False
  max_sparks: int = 6
  spark_probability: float = 0.5
  spark_fwhm_um: tuple = (1.5, 3.0)
  spark_aspect: tuple = (1.0, 1.0)           # log-uniform FWHM_y / FWHM_x
  spark_widening: tuple = (0.0, 0.0)         # sigma^2 growth per decay time constant
  spark_rise_ms: tuple = (5.0, 15.0)
  spark_tau_ms: tuple = (15.0, 50.0)
  spark_amplitude: tuple = (0.3, 1.5)
  spark_log_amplitude: bool = False          # log-uniform spark dF/F0 (many faint ones)
  sympathetic_probability: float = 0.0       # a spark slot triggered by the previous one
  sympathetic_delay_ms: tuple = (4.0, 30.0)
  sympathetic_distance_um: tuple = (1.2, 2.5)
  max_puffs: int = 2
  puff_probability: float = 0.4
  puff_fwhm_um: tuple = (1.5, 3.0)
  puff_rise_ms: tuple = (10.0, 30.0)
  puff_duration_ms: tuple = (50.0, 500.0)   # log-uniform plateau
  puff_tau_ms: tuple = (20.0, 60.0)
  puff_amplitude: tuple = (0.2, 0.6)
  puff_flicker: tuple = (0.0, 0.0)           # relative depth of the release flicker
  puff_flicker_hz: tuple = (2.0, 20.0)
  max_waves: int = 1
  wave_probability: float = 0.3
  wave_speed_um_per_s: tuple = (30.0, 150.0)
  wave_rise_ms: tuple = (10.0, 30.0)
  wave_tau_ms: tuple = (60.0, 200.0)
  wave_amplitude: tuple = (0.5, 1.5)
  wave_curvature: tuple = (0.0, 0.0)         # transverse / longitudinal distance weight
  # Sub-threshold fluctuations: slots of kind BACKGROUND (never labelled), puff-like
  # profiles (FWHM, rise, log-uniform plateau, decay) with log-uniform peak dF/F0.
  max_faint: int = 0
  faint_probability: float = 0.5
  faint_fwhm_um: tuple = (1.5, 4.0)
  faint_rise_ms: tuple = (20.0, 100.0)
  faint_duration_ms: tuple = (50.0, 800.0)
  faint_tau_ms: tuple = (30.0, 150.0)
  faint_amplitude: tuple = (0.03, 0.12)

  @property
  def num_slots(self) -> int:
    return self.max_sparks + self.max_puffs + self.max_waves + self.max_faint

  def slot_classes(self) -> tuple:
    """Class id of every event slot (sparks, then puffs, then waves, then the
    sub-threshold fluctuations, kind BACKGROUND)."""
    return ((SPARK,) * self.max_sparks + (PUFF,) * self.max_puffs + (WAVE,) * self.max_waves
            + (BACKGROUND,) * self.max_faint)


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  event_fraction: float = 0.3
  ring_fraction: float = 0.1
  ignore_frames: int = 4
  wave_fraction: float | None = None   # None: waves cover rel >= event_fraction too


@flax.struct.dataclass
class Events:
  """Per-slot event parameters ``[E]`` (a pytree; E = sparks + puffs + waves slots).

  kind: class id (1 spark, 2 wave, 3 puff); active: bool; t0_ms: start of the rise
  (waves: arrival at the origin (y_px, x_px)); y_px, x_px: centre; fwhm_um (waves
  unused); rise_ms; plateau_ms (puffs; 0 otherwise); tau_ms; speed_um_per_s (waves; 0
  otherwise); amplitude: peak dF/F0 (before dye saturation). Optional shape terms
  (defaults: none): aspect (sparks / puffs: FWHM_y / FWHM_x), widening (sigma^2 grows by
  this factor per tau after the peak), flicker / flicker_hz / flicker_phase (puffs: the
  release dips by up to ``flicker`` at that frequency), curvature (waves: arrival
  distance sqrt(dx^2 + (curvature dy)^2); 0 is a band across the cell).
  """
  kind: jax.Array
  active: jax.Array
  t0_ms: jax.Array
  y_px: jax.Array
  x_px: jax.Array
  fwhm_um: jax.Array
  rise_ms: jax.Array
  plateau_ms: jax.Array
  tau_ms: jax.Array
  speed_um_per_s: jax.Array
  amplitude: jax.Array
  aspect: jax.Array = 1.0
  widening: jax.Array = 0.0
  flicker: jax.Array = 0.0
  flicker_hz: jax.Array = 10.0
  flicker_phase: jax.Array = 0.0
  curvature: jax.Array = 0.0


@flax.struct.dataclass
class Scene:
  """Per-movie resting fluorescence and camera-independent parameters (the fields after
  ``events`` default to no effect)."""
  f0_photons: jax.Array
  background_photons: jax.Array
  top_px: jax.Array            # cell edges at the central column, px
  bottom_px: jax.Array
  top_slope: jax.Array
  bottom_slope: jax.Array
  striation_spacing_um: jax.Array
  striation_depth: jax.Array
  striation_angle_rad: jax.Array
  striation_phase: jax.Array
  tilt_y: jax.Array
  tilt_x: jax.Array
  bleach_rate_per_s: jax.Array
  events: Events
  wobble_px: jax.Array = 0.0         # edge wobble amplitude, wavelength, phase
  wobble_period_px: jax.Array = 50.0
  wobble_phase: jax.Array = 0.0
  end_x_px: jax.Array = 1e6          # cell end column (beyond the field: no end)
  end_side: jax.Array = 1.0          # +1: the cell lies left of the end, -1: right
  end_exponent: jax.Array = 2.0
  nucleus_y_px: jax.Array = 0.0
  nucleus_x_px: jax.Array = 0.0
  nucleus_half_length_px: jax.Array = 0.0   # 0: no nucleus
  nucleus_half_width_px: jax.Array = 1.0
  nucleus_contrast: jax.Array = 1.0
  inhomogeneity: jax.Array = 0.0     # amplitude, wave numbers (rad / px) and phase of a
  inhom_ky: jax.Array = 0.0          # smooth dye-loading modulation
  inhom_kx: jax.Array = 0.0
  inhom_phase: jax.Array = 0.0
  texture: jax.Array | None = None   # [H, W] multiplicative fine texture (None: flat)
  dye_saturation_inv: jax.Array = 0.0   # 1 / dye_max_dff (0: linear)
  line_delay_fraction: jax.Array = 0.0


class _Uniforms:
  """Every uniform number of one scene from a single flat draw, handed out in order.

  One flat ``jax.random.uniform`` call instead of dozens of small ones: the same
  distribution, and XLA's CPU compiler handles one flat threefry draw in well under a
  second while each multi-dimensional one (e.g. under ``vmap``) can take ~15 s.
  """

  def __init__(self, key, total: int):
    self.u = jax.random.uniform(key, (total,))
    self.i = 0

  def take(self, n=None):
    k = 1 if n is None else n
    out = self.u[self.i:self.i + k]
    self.i += k
    assert self.i <= self.u.shape[0], (self.i, self.u.shape)
    return out[0] if n is None else out

  def uniform(self, rng, n=None):
    return rng[0] + (rng[1] - rng[0]) * self.take(n)

  def log_uniform(self, rng, n=None):
    if rng[0] <= 0:
      return self.uniform(rng, n)
    return jnp.exp(self.uniform((math.log(rng[0]), math.log(rng[1])), n))

  def amplitude(self, rng, log: bool, n=None):
    return self.log_uniform(rng, n) if log else self.uniform(rng, n)

  def bernoulli(self, p, n=None):
    return self.take(n) < p


def num_uniforms(priors: Priors, geom: Geometry) -> int:
  return (64 + 16 * priors.max_sparks + 16 * priors.max_puffs + 12 * priors.max_waves
          + 10 * priors.max_faint + geom.height_px * geom.width_px)


def _texture(u, rms, geom: Geometry):
  """[H, W] fine granular texture, mean ~1 and rms ~``rms``: uniform noise smoothed
  over 3 x 3 pixels (a grain of about a PSF width at 0.2 um pixels)."""
  H, W = geom.height_px, geom.width_px
  z = (u.reshape(H, W) - 0.5) * math.sqrt(12.0)           # unit variance
  zp = jnp.pad(z, 1, mode="edge")
  s = sum(zp[i:i + H, j:j + W] for i in range(3) for j in range(3)) / 3.0   # unit var
  return jnp.maximum(1.0 + rms * s, 0.1)


def draw_scene(key, priors: Priors, geom: Geometry) -> Scene:
  """One movie's parameters drawn from the priors (pure function of key)."""
  r = _Uniforms(key, num_uniforms(priors, geom))
  T, H, W = geom.shape
  dt, a = geom.frame_interval_ms, geom.pixel_size_um
  p = priors
  log_amp = bool(p.log_uniform_amplitudes)
  top = r.uniform(p.cell_top_px) * H
  bottom = r.uniform(p.cell_bottom_px) * H
  top_slope = r.uniform((-p.cell_edge_slope, p.cell_edge_slope))
  bottom_slope = r.uniform((-p.cell_edge_slope, p.cell_edge_slope))
  # Cell end: a column inside the middle 80% of the field, the cell on either side.
  has_end = r.bernoulli(p.cell_end_probability)
  end_x = r.uniform((0.1 * W, 0.9 * W))
  end_side = jnp.where(r.bernoulli(0.5), 1.0, -1.0)
  # No end: far away on the side away from the cell (the cell lies left of an end with
  # side +1, right of one with side -1). Before this fix a movie without an end and side
  # -1 (half of them) had no cell at all: no labels, only background.
  end_x = jnp.where(has_end, end_x, 1e6 * end_side)
  end_exponent = r.uniform(p.cell_end_exponent)
  half_w = 0.5 * (bottom - top)

  def centres(n):
    """Centres inside the cell band (between 15% and 85% of its local width), and
    before its end."""
    x = r.uniform((0.0, W - 1.0), n)
    x = jnp.where(has_end & ((x - end_x) * end_side > -0.5 * half_w),
                  end_x - end_side * (0.5 * half_w + r.uniform((0.0, 0.5), n) * W), x)
    x = jnp.clip(x, 0.0, W - 1.0)
    xc = x - (W - 1) / 2
    lo = jnp.maximum(top + top_slope * xc, 0.0)
    hi = jnp.minimum(bottom + bottom_slope * xc, H - 1.0)
    return lo + r.uniform((0.15, 0.85), n) * (hi - lo), x

  ns, npf, nw = p.max_sparks, p.max_puffs, p.max_waves
  t_ms = T * dt
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  # Sparks: the rise starts anywhere from just before the movie to its end.
  s_y, s_x = centres(ns)
  s_rise = r.uniform(p.spark_rise_ms, ns)
  s_t0 = -s_rise - 2 * dt + r.take(ns) * (t_ms + s_rise + 2 * dt)
  # Sympathetic sparks: slot i (i >= 1) is triggered by slot i - 1, a few ms later on a
  # neighbouring release site (along the z-line (y) or on the next z-line (x)).
  if ns > 1:
    sym = r.bernoulli(p.sympathetic_probability, ns)
    sym = sym.at[0].set(False)
    dist_px = r.uniform(p.sympathetic_distance_um, ns) / a
    sgn = jnp.where(r.bernoulli(0.5, ns), 1.0, -1.0)
    along_x = r.bernoulli(0.5, ns)
    delay = r.uniform(p.sympathetic_delay_ms, ns)
    ys, xs, t0s = [s_y[0]], [s_x[0]], [s_t0[0]]
    for i in range(1, ns):        # in order: a triggered spark may trigger the next
      dy = jnp.where(along_x[i], 0.0, sgn[i] * dist_px[i])
      dx = jnp.where(along_x[i], sgn[i] * dist_px[i], 0.0)
      ys.append(jnp.where(sym[i], jnp.clip(ys[-1] + dy, 0.0, H - 1.0), s_y[i]))
      xs.append(jnp.where(sym[i], jnp.clip(xs[-1] + dx, 0.0, W - 1.0), s_x[i]))
      t0s.append(jnp.where(sym[i], t0s[-1] + s_rise[i - 1] + delay[i] - s_rise[i], s_t0[i]))
    s_y, s_x, s_t0 = jnp.stack(ys), jnp.stack(xs), jnp.stack(t0s)
  sparks = dict(
      kind=jnp.full((ns,), SPARK, jnp.int32), active=r.bernoulli(p.spark_probability, ns),
      t0_ms=s_t0, y_px=s_y, x_px=s_x, fwhm_um=r.uniform(p.spark_fwhm_um, ns), rise_ms=s_rise,
      plateau_ms=jnp.zeros((ns,)), tau_ms=r.uniform(p.spark_tau_ms, ns),
      speed_um_per_s=jnp.zeros((ns,)),
      amplitude=r.amplitude(p.spark_amplitude, log_amp or bool(p.spark_log_amplitude), ns),
      aspect=r.log_uniform(p.spark_aspect, ns), widening=r.uniform(p.spark_widening, ns),
      flicker=jnp.zeros((ns,)), flicker_hz=jnp.full((ns,), 10.0),
      flicker_phase=jnp.zeros((ns,)), curvature=jnp.zeros((ns,)))
  # Puffs: may start before the movie (up to 80% of their rise + plateau).
  f_y, f_x = centres(npf)
  f_plateau = r.log_uniform(p.puff_duration_ms, npf)
  f_rise = r.uniform(p.puff_rise_ms, npf)
  lead = 0.8 * (f_rise + f_plateau)
  f_t0 = -lead + r.take(npf) * (t_ms + lead)
  puffs = dict(
      kind=jnp.full((npf,), PUFF, jnp.int32), active=r.bernoulli(p.puff_probability, npf),
      t0_ms=f_t0, y_px=f_y, x_px=f_x, fwhm_um=r.uniform(p.puff_fwhm_um, npf), rise_ms=f_rise,
      plateau_ms=f_plateau, tau_ms=r.uniform(p.puff_tau_ms, npf),
      speed_um_per_s=jnp.zeros((npf,)), amplitude=r.amplitude(p.puff_amplitude, log_amp, npf),
      aspect=r.log_uniform(p.spark_aspect, npf), widening=jnp.zeros((npf,)),
      flicker=r.uniform(p.puff_flicker, npf), flicker_hz=r.uniform(p.puff_flicker_hz, npf),
      flicker_phase=r.uniform((0.0, 2 * math.pi), npf), curvature=jnp.zeros((npf,)))
  # Waves: origin column from half a field left to half a field right; the wave
  # reaches the field's nearest column between -30% and +70% of the movie.
  w_speed = r.uniform(p.wave_speed_um_per_s, nw)
  w_x0 = r.uniform((-0.5 * W, 1.5 * W), nw)
  dist_um = jnp.maximum(jnp.maximum(-w_x0, w_x0 - (W - 1)), 0.0) * a
  w_t0 = r.uniform((-0.3 * t_ms, 0.7 * t_ms), nw) - dist_um / w_speed * 1000.0
  waves = dict(
      kind=jnp.full((nw,), WAVE, jnp.int32), active=r.bernoulli(p.wave_probability, nw),
      t0_ms=w_t0, y_px=r.uniform((0.0, H - 1.0), nw), x_px=w_x0, fwhm_um=jnp.zeros((nw,)),
      rise_ms=r.uniform(p.wave_rise_ms, nw), plateau_ms=jnp.zeros((nw,)),
      tau_ms=r.uniform(p.wave_tau_ms, nw), speed_um_per_s=w_speed,
      amplitude=r.amplitude(p.wave_amplitude, log_amp, nw),
      aspect=jnp.ones((nw,)), widening=jnp.zeros((nw,)), flicker=jnp.zeros((nw,)),
      flicker_hz=jnp.full((nw,), 10.0), flicker_phase=jnp.zeros((nw,)),
      curvature=r.uniform(p.wave_curvature, nw))
  cat = {k: jnp.concatenate([f32(d[k]) if k not in ("kind", "active") else d[k]
                             for d in (sparks, puffs, waves)]) for k in sparks}
  ev = Events(**cat)
  has_nucleus = r.bernoulli(p.nucleus_probability)
  dye_max = r.uniform(p.dye_max_dff)
  scene = Scene(
      f0_photons=r.log_uniform(p.f0_photons),
      background_photons=r.uniform(p.background_photons),
      top_px=top, bottom_px=bottom, top_slope=top_slope, bottom_slope=bottom_slope,
      striation_spacing_um=r.uniform(p.striation_spacing_um),
      striation_depth=r.uniform(p.striation_depth),
      striation_angle_rad=jnp.deg2rad(r.uniform((-p.striation_angle_deg,
                                                 p.striation_angle_deg))),
      striation_phase=r.uniform((0.0, 2 * math.pi)),
      tilt_y=r.uniform((-p.illumination_tilt, p.illumination_tilt)),
      tilt_x=r.uniform((-p.illumination_tilt, p.illumination_tilt)),
      bleach_rate_per_s=r.uniform(p.bleach_rate_per_s),
      events=ev,
      wobble_px=r.uniform((0.0, p.cell_edge_wobble_px)),
      wobble_period_px=r.uniform((5.0 / a, 20.0 / a)),
      wobble_phase=r.uniform((0.0, 2 * math.pi)),
      end_x_px=end_x, end_side=end_side, end_exponent=end_exponent,
      nucleus_y_px=0.5 * (top + bottom) + r.uniform((-0.15, 0.15)) * (bottom - top),
      nucleus_x_px=r.uniform((0.0, W - 1.0)),
      nucleus_half_length_px=jnp.where(has_nucleus, 0.5 * r.uniform(p.nucleus_length_um) / a,
                                       0.0),
      nucleus_half_width_px=0.5 * r.uniform(p.nucleus_width_um) / a,
      nucleus_contrast=r.log_uniform(p.nucleus_contrast),
      inhomogeneity=r.uniform((0.0, p.dye_inhomogeneity)),
      inhom_ky=2 * math.pi * a / r.uniform((4.0, 15.0)),
      inhom_kx=2 * math.pi * a / r.uniform((4.0, 15.0)) * jnp.where(r.bernoulli(0.5), 1., -1.),
      inhom_phase=r.uniform((0.0, 2 * math.pi)),
      texture=_texture(r.take(geom.height_px * geom.width_px),
                       r.uniform((0.0, p.granular_texture)), geom),
      dye_saturation_inv=jnp.where(dye_max > 0, 1.0 / jnp.maximum(dye_max, 1e-6), 0.0),
      line_delay_fraction=r.uniform(p.line_delay_fraction))
  if p.max_faint:
    scene = scene.replace(events=_append_faint(scene.events, r, p, geom, centres))
  return scene


def _append_faint(ev: Events, r: _Uniforms, p: Priors, geom: Geometry, centres) -> Events:
  """``ev`` with ``p.max_faint`` sub-threshold fluctuation slots (kind BACKGROUND)
  appended; drawn last, so the other slots are those of the same key without them."""
  n, dt = p.max_faint, geom.frame_interval_ms
  t_ms = geom.num_frames * dt
  y, x = centres(n)
  plateau = r.log_uniform(p.faint_duration_ms, n)
  rise = r.uniform(p.faint_rise_ms, n)
  lead = 0.8 * (rise + plateau)
  faint = Events(
      kind=jnp.full((n,), BACKGROUND, jnp.int32), active=r.bernoulli(p.faint_probability, n),
      t0_ms=-lead + r.take(n) * (t_ms + lead), y_px=y, x_px=x,
      fwhm_um=r.uniform(p.faint_fwhm_um, n), rise_ms=rise, plateau_ms=plateau,
      tau_ms=r.uniform(p.faint_tau_ms, n), speed_um_per_s=jnp.zeros((n,)),
      amplitude=r.log_uniform(p.faint_amplitude, n), aspect=jnp.ones((n,)),
      widening=jnp.zeros((n,)), flicker=jnp.zeros((n,)), flicker_hz=jnp.full((n,), 10.0),
      flicker_phase=jnp.zeros((n,)), curvature=jnp.zeros((n,)))
  full = jax.tree.map(lambda v: jnp.broadcast_to(jnp.asarray(v), ev.kind.shape), ev)
  return jax.tree.map(lambda a, b: jnp.concatenate([jnp.asarray(a, b.dtype), b]), full, faint)


def draw_noise(key, priors: Priors):
  """(extra read noise e- rms, excess noise factor) of one movie."""
  u = jax.random.uniform(key, (2,))
  lo, hi = priors.extra_read_noise_e
  f_lo, f_hi = priors.excess_noise_factor
  return lo + (hi - lo) * u[0], f_lo + (f_hi - f_lo) * u[1]
