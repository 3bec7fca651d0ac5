"""Simulated full-frame confocal movies of Ca2+ release events: pure, jit/vmap-able JAX.

A movie is ``[T, H, W]`` (frames, rows, columns) with frame interval ``dt`` (ms) and
square pixels of ``a`` um; pixel (i, j) is centred at (y, x) = (i, j) px and frame k
is sampled at t = k dt ms. The cell's long axis runs along x (the striations are
perpendicular to it and waves travel along it).

Forward model (expected photons per pixel per frame, then the detector):

  F(t, y, x) = b + F0(y, x) B(t) [1 + dF/F0(t, y, x)]

* ``b``: out-of-focus / dark background, photons (uniform).
* ``F0(y, x) = f0 * cell(y, x) * striation(y, x) * tilt(y, x)``: resting fluorescence.
  ``cell`` is a band between a top and a bottom edge (straight lines of random slope)
  with soft edges (logistic, ``edge_px``); ``striation = 1 + m cos(2 pi s / L + phi)``
  with ``s`` the distance along the (slightly rotated) long axis and ``L`` the
  sarcomere spacing (bright bands of cytosolic dye between the Z-lines); ``tilt`` a
  gentle linear illumination gradient.
* ``B(t) = exp(-k t)``: slow photobleaching (rate ``k`` per second).
* ``dF/F0``: the sum of the events, each ``A * rel(t, y, x)`` with ``rel`` in [0, 1]
  peaking at 1 (``A`` is the event's peak dF/F0):
  - spark: ``g(r) p(t - t0)`` with ``g`` a 2D Gaussian of the drawn FWHM and ``p`` a
    linear rise over ``rise_ms`` (the time to peak) then an exponential decay with
    time constant ``tau_ms`` (Cheng et al. 1993; Cheng & Lederer 2008);
  - puff: the same Gaussian with a linear rise, a plateau of ``duration_ms`` and an
    exponential decay (long, weak, non-propagating release);
  - wave: a band across the whole cell whose arrival time at column x is
    ``t0 + |x - x0| a / v``: it spreads from the column x0 in both directions at speed
    v (x0 outside the field: it enters from one side), with a linear rise and an
    exponential decay at each column.
  Events are multiplied by F0, i.e. they exist only inside the cell.
* Detector: :func:`smlm_jax.core.noise.apply_camera` (QE, exact Poisson, read-out).

Labels (per voxel, int32): 0 background, 1 spark, 2 wave, 3 puff, 4 ignore. An event
covers the voxels inside the cell (``cell >= 0.5``) where its own ``rel >=
event_fraction`` (the same relative threshold for bright and dim events, so a
footprint does not grow with amplitude). Where several events cover a voxel it
belongs to the one with the largest ``A rel`` there. A spark's *ignore ring* is
where ``ring_fraction <= rel < event_fraction`` (its uncertain rim in space and
time) and no event covers the voxel; the first and last ``ignore_frames`` frames are
ignore too (events cut by the movie's ends). ``instances`` gives each covered voxel
its event's slot id + 1 (0 elsewhere, also on ignored frames); slots are ordered
sparks, puffs, waves.

Static shapes: every movie has ``max_sparks + max_puffs + max_waves`` event slots,
each active with its probability, so batches jit and vmap.
"""
from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp

from smlm_jax.core import noise as noise_lib
from smlm_jax.core.noise import Camera

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
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
  striation_spacing_um: tuple = (1.8, 2.0)
  striation_depth: tuple = (0.05, 0.3)
  striation_angle_deg: float = 10.0
  illumination_tilt: float = 0.2
  bleach_rate_per_s: tuple = (0.0, 0.2)
  max_sparks: int = 6
  spark_probability: float = 0.5
  spark_fwhm_um: tuple = (1.5, 3.0)
  spark_rise_ms: tuple = (5.0, 15.0)
  spark_tau_ms: tuple = (15.0, 50.0)
  spark_amplitude: tuple = (0.3, 1.5)
  max_puffs: int = 2
  puff_probability: float = 0.4
  puff_fwhm_um: tuple = (1.5, 3.0)
  puff_rise_ms: tuple = (10.0, 30.0)
  puff_duration_ms: tuple = (50.0, 500.0)   # log-uniform plateau
  puff_tau_ms: tuple = (20.0, 60.0)
  puff_amplitude: tuple = (0.2, 0.6)
  max_waves: int = 1
  wave_probability: float = 0.3
  wave_speed_um_per_s: tuple = (30.0, 150.0)
  wave_rise_ms: tuple = (10.0, 30.0)
  wave_tau_ms: tuple = (60.0, 200.0)
  wave_amplitude: tuple = (0.5, 1.5)

  @property
  def num_slots(self) -> int:
    return self.max_sparks + self.max_puffs + self.max_waves

  def slot_classes(self) -> tuple:
    """Class id of every event slot (sparks, then puffs, then waves)."""
    return (SPARK,) * self.max_sparks + (PUFF,) * self.max_puffs + (WAVE,) * self.max_waves


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  event_fraction: float = 0.3
  ring_fraction: float = 0.1
  ignore_frames: int = 4


@flax.struct.dataclass
class Events:
  """Per-slot event parameters ``[E]`` (a pytree; E = sparks + puffs + waves slots).

  kind: class id (1 spark, 2 wave, 3 puff); active: bool; t0_ms: start of the rise
  (waves: arrival at column x0); y_px, x_px: centre (waves: x_px = x0, y_px unused);
  fwhm_um (waves unused); rise_ms; plateau_ms (puffs; 0 otherwise); tau_ms;
  speed_um_per_s (waves; 0 otherwise); amplitude: peak dF/F0.
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


@flax.struct.dataclass
class Scene:
  """Per-movie resting fluorescence and camera-independent parameters."""
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


# --------------------------------------------------------------------------- profiles
def rise_decay(u_ms, rise_ms, tau_ms, plateau_ms=0.0):
  """Time course in [0, 1] at ``u_ms`` after the start: linear rise to 1 over
  ``rise_ms``, a plateau of ``plateau_ms``, then ``exp(-(u - rise - plateau) / tau)``."""
  rise = jnp.maximum(rise_ms, 1e-3)
  up = jnp.clip(u_ms / rise, 0.0, 1.0)
  down = jnp.exp(-jnp.maximum(u_ms - rise - plateau_ms, 0.0) / tau_ms)
  return jnp.where(u_ms < 0, 0.0, up * down)


def gaussian_2d(y_px, x_px, cy, cx, fwhm_px):
  sigma = fwhm_px / FWHM_PER_SIGMA
  return jnp.exp(-((y_px - cy) ** 2 + (x_px - cx) ** 2) / (2.0 * sigma ** 2))


def resting_f0(scene: Scene, geom: Geometry, edge_px: float = 1.0):
  """F0(y, x) in photons per pixel per frame (no bleaching), [H, W]."""
  y = jnp.arange(geom.height_px, dtype=jnp.float32)[:, None]
  x = jnp.arange(geom.width_px, dtype=jnp.float32)[None, :]
  xc = x - (geom.width_px - 1) / 2
  top = scene.top_px + scene.top_slope * xc
  bottom = scene.bottom_px + scene.bottom_slope * xc
  cell = jax.nn.sigmoid((y - top) / edge_px) * jax.nn.sigmoid((bottom - y) / edge_px)
  along_um = (x * jnp.cos(scene.striation_angle_rad) + y * jnp.sin(scene.striation_angle_rad)
              ) * geom.pixel_size_um
  stri = 1.0 + scene.striation_depth * jnp.cos(
      2 * jnp.pi * along_um / scene.striation_spacing_um + scene.striation_phase)
  tilt = (1.0 + scene.tilt_y * (y / max(geom.height_px - 1, 1) - 0.5)
          + scene.tilt_x * (x / max(geom.width_px - 1, 1) - 0.5))
  return scene.f0_photons * cell * stri * tilt, cell


def event_rel(ev: Events, geom: Geometry):
  """rel [E, T, H, W] in [0, 1] of every slot (inactive slots included)."""
  t = jnp.arange(geom.num_frames, dtype=jnp.float32) * geom.frame_interval_ms
  y = jnp.arange(geom.height_px, dtype=jnp.float32)
  x = jnp.arange(geom.width_px, dtype=jnp.float32)

  def one(e):
    # Local events (sparks, puffs): separable space x time.
    space = gaussian_2d(y[:, None], x[None, :], e.y_px, e.x_px, e.fwhm_um / geom.pixel_size_um)
    time = rise_decay(t - e.t0_ms, e.rise_ms, e.tau_ms, e.plateau_ms)
    local = time[:, None, None] * space[None]
    # Waves: arrival time per column.
    speed_um_per_ms = jnp.maximum(e.speed_um_per_s, 1e-6) / 1000.0
    arrival = e.t0_ms + jnp.abs(x - e.x_px) * geom.pixel_size_um / speed_um_per_ms
    wave = rise_decay(t[:, None] - arrival[None, :], e.rise_ms, e.tau_ms)   # [T, W]
    wave = jnp.broadcast_to(wave[:, None, :], local.shape)
    return jnp.where(e.kind == WAVE, wave, local)

  return jax.vmap(one)(ev)


def labels_from_rel(rel, ev: Events, cell, spec: LabelSpec):
  """(labels [T, H, W], instances [T, H, W]) from per-slot rel [E, T, H, W]."""
  inside = (cell >= 0.5)[None, None]
  active = ev.active[:, None, None, None]
  covered = (rel >= spec.event_fraction) & inside & active
  strength = jnp.where(covered, ev.amplitude[:, None, None, None] * rel, -1.0)
  best = jnp.argmax(strength, axis=0)
  any_cov = jnp.any(covered, axis=0)
  ring = ((rel >= spec.ring_fraction) & (rel < spec.event_fraction) & inside & active
          & (ev.kind == SPARK)[:, None, None, None])
  any_ring = jnp.any(ring, axis=0)
  labels = jnp.where(any_cov, ev.kind[best], jnp.where(any_ring, IGNORE, BACKGROUND))
  instances = jnp.where(any_cov, best + 1, 0)
  T = rel.shape[1]
  k = spec.ignore_frames
  if k > 0:
    t = jnp.arange(T)[:, None, None]
    edge = (t < k) | (t >= T - k)
    labels = jnp.where(edge, IGNORE, labels)
    instances = jnp.where(edge, 0, instances)
  return labels.astype(jnp.int32), instances.astype(jnp.int32)


# --------------------------------------------------------------------------- priors
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
    return out[0] if n is None else out

  def uniform(self, rng, n=None):
    return rng[0] + (rng[1] - rng[0]) * self.take(n)

  def log_uniform(self, rng, n=None):
    return jnp.exp(self.uniform((math.log(rng[0]), math.log(rng[1])), n))

  def bernoulli(self, p, n=None):
    return self.take(n) < p


def num_uniforms(priors: Priors) -> int:
  return 13 + 8 * priors.max_sparks + 9 * priors.max_puffs + 7 * priors.max_waves


def draw_scene(key, priors: Priors, geom: Geometry) -> Scene:
  """One movie's parameters drawn from the priors (pure function of key)."""
  r = _Uniforms(key, num_uniforms(priors))
  T, H, W = geom.shape
  dt = geom.frame_interval_ms
  p = priors
  top = r.uniform(p.cell_top_px) * H
  bottom = r.uniform(p.cell_bottom_px) * H
  top_slope = r.uniform((-p.cell_edge_slope, p.cell_edge_slope))
  bottom_slope = r.uniform((-p.cell_edge_slope, p.cell_edge_slope))

  def centres(n):
    """Centres inside the cell band (between 15% and 85% of its local width)."""
    x = r.uniform((0.0, W - 1.0), n)
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
  sparks = dict(
      kind=jnp.full((ns,), SPARK, jnp.int32), active=r.bernoulli(p.spark_probability, ns),
      t0_ms=s_t0, y_px=s_y, x_px=s_x, fwhm_um=r.uniform(p.spark_fwhm_um, ns), rise_ms=s_rise,
      plateau_ms=jnp.zeros((ns,)), tau_ms=r.uniform(p.spark_tau_ms, ns),
      speed_um_per_s=jnp.zeros((ns,)), amplitude=r.uniform(p.spark_amplitude, ns))
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
      speed_um_per_s=jnp.zeros((npf,)), amplitude=r.uniform(p.puff_amplitude, npf))
  # Waves: origin column from half a field left to half a field right; the wave
  # reaches the field's nearest column between -30% and +70% of the movie.
  w_speed = r.uniform(p.wave_speed_um_per_s, nw)
  w_x0 = r.uniform((-0.5 * W, 1.5 * W), nw)
  dist_um = jnp.maximum(jnp.maximum(-w_x0, w_x0 - (W - 1)), 0.0) * geom.pixel_size_um
  w_t0 = r.uniform((-0.3 * t_ms, 0.7 * t_ms), nw) - dist_um / w_speed * 1000.0
  waves = dict(
      kind=jnp.full((nw,), WAVE, jnp.int32), active=r.bernoulli(p.wave_probability, nw),
      t0_ms=w_t0, y_px=jnp.zeros((nw,)), x_px=w_x0, fwhm_um=jnp.zeros((nw,)),
      rise_ms=r.uniform(p.wave_rise_ms, nw), plateau_ms=jnp.zeros((nw,)),
      tau_ms=r.uniform(p.wave_tau_ms, nw), speed_um_per_s=w_speed,
      amplitude=r.uniform(p.wave_amplitude, nw))
  cat = {k: jnp.concatenate([d[k] for d in (sparks, puffs, waves)]) for k in sparks}
  ev = Events(**{k: (v if k in ("kind", "active") else f32(v)) for k, v in cat.items()})
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
      events=ev)
  assert r.i == r.u.shape[0], (r.i, r.u.shape)
  return scene


# --------------------------------------------------------------------------- render
def render(scene: Scene, geom: Geometry, spec: LabelSpec, edge_px: float = 1.0):
  """Noiseless movie and labels of one scene.

  Returns a dict: expected_photons [T, H, W], dff [T, H, W] (dF/F0 of all events),
  f0 [H, W] (resting photons, unbleached), cell [H, W], labels [T, H, W],
  instances [T, H, W].
  """
  f0, cell = resting_f0(scene, geom, edge_px)
  ev = scene.events
  rel = event_rel(ev, geom)
  amp = jnp.where(ev.active, ev.amplitude, 0.0)
  dff = jnp.einsum("e,ethw->thw", amp, rel)
  t_s = jnp.arange(geom.num_frames, dtype=jnp.float32) * geom.frame_interval_ms / 1000.0
  bleach = jnp.exp(-scene.bleach_rate_per_s * t_s)[:, None, None]
  photons = scene.background_photons + f0[None] * bleach * (1.0 + dff)
  labels, instances = labels_from_rel(rel, ev, cell, spec)
  return {"expected_photons": photons, "dff": dff, "f0": f0, "cell": cell,
          "labels": labels, "instances": instances}


class Simulator:
  """Movies of Ca2+ release events from a config (``config.sim`` of configs/sparks.py)."""

  def __init__(self, geometry: Geometry, priors: Priors, labels: LabelSpec, camera: Camera):
    self.geometry = geometry
    self.priors = priors
    self.label_spec = labels
    self.camera = camera

  def simulate(self, key):
    """One movie: dict with 'adu' [T, H, W] float32, 'labels', 'instances' [T, H, W]
    int32, 'kind', 'active', 'amplitude' [E] (per slot) and the noiseless 'dff'."""
    k_scene, k_cam = jax.random.split(key)
    scene = draw_scene(k_scene, self.priors, self.geometry)
    out = render(scene, self.geometry, self.label_spec, self.priors.cell_edge_px)
    adu = noise_lib.apply_camera(k_cam, out["expected_photons"], self.camera)
    ev = scene.events
    return {"adu": adu, "labels": out["labels"], "instances": out["instances"],
            "dff": out["dff"], "kind": ev.kind, "active": ev.active,
            "amplitude": ev.amplitude}

  def from_keys(self, keys):
    """Batched :meth:`simulate` over keys [B]."""
    return jax.vmap(self.simulate)(keys)


def movie_keys(key, indices):
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def _pair(v):
  return tuple(float(x) for x in v)


def simulator_from_config(sim) -> Simulator:
  """A :class:`Simulator` from ``config.sim``."""
  geom = Geometry(int(sim.num_frames), int(sim.height_px), int(sim.width_px),
                  float(sim.pixel_size_um), float(sim.frame_interval_ms))
  c, s, f, w = sim.cell, sim.sparks, sim.puffs, sim.waves
  priors = Priors(
      f0_photons=_pair(c.f0_photons), background_photons=_pair(c.background_photons),
      cell_top_px=_pair(c.top_fraction), cell_bottom_px=_pair(c.bottom_fraction),
      cell_edge_slope=float(c.edge_slope), cell_edge_px=float(c.edge_px),
      striation_spacing_um=_pair(c.striation_spacing_um),
      striation_depth=_pair(c.striation_depth),
      striation_angle_deg=float(c.striation_angle_deg),
      illumination_tilt=float(c.illumination_tilt),
      bleach_rate_per_s=_pair(c.bleach_rate_per_s),
      max_sparks=int(s.max_per_movie), spark_probability=float(s.probability),
      spark_fwhm_um=_pair(s.fwhm_um), spark_rise_ms=_pair(s.rise_ms),
      spark_tau_ms=_pair(s.tau_ms), spark_amplitude=_pair(s.amplitude_dff),
      max_puffs=int(f.max_per_movie), puff_probability=float(f.probability),
      puff_fwhm_um=_pair(f.fwhm_um), puff_rise_ms=_pair(f.rise_ms),
      puff_duration_ms=_pair(f.duration_ms), puff_tau_ms=_pair(f.tau_ms),
      puff_amplitude=_pair(f.amplitude_dff),
      max_waves=int(w.max_per_movie), wave_probability=float(w.probability),
      wave_speed_um_per_s=_pair(w.speed_um_per_s), wave_rise_ms=_pair(w.rise_ms),
      wave_tau_ms=_pair(w.tau_ms), wave_amplitude=_pair(w.amplitude_dff))
  spec = LabelSpec(float(sim.labels.event_fraction), float(sim.labels.ring_fraction),
                   int(sim.labels.ignore_frames))
  cam = sim.camera
  camera = Camera(qe=float(cam.qe), gain_adu_per_e=float(cam.gain_adu_per_e),
                  offset_adu=float(cam.offset_adu), read_noise_e=float(cam.read_noise_e),
                  em_gain=float(cam.get("em_gain", 1.0)), model=str(cam.model))
  if geom.num_frames <= 2 * spec.ignore_frames:
    raise ValueError(f"sim.num_frames={geom.num_frames} leaves no frame outside the "
                     f"{spec.ignore_frames} ignored frames at each end")
  return Simulator(geom, priors, spec, camera)
