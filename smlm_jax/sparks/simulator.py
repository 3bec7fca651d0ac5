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
  - sub-threshold fluctuation (optional, ``Priors.max_faint``): a puff-like profile
    with a peak dF/F0 below the smallest puff, labelled background.
* Detector: :func:`smlm_jax.core.noise.apply_camera` (QE, exact Poisson, read-out).

Labels (per voxel, int32): 0 background, 1 spark, 2 wave, 3 puff, 4 ignore. An event
covers the voxels inside the cell (``cell >= 0.5``) where its own ``rel >=
event_fraction`` (the same relative threshold for bright and dim events, so a
footprint does not grow with amplitude). Where several events cover a voxel it
belongs to the one with the largest ``A rel`` there. With ``sim.labels.wave_fraction``
below ``event_fraction``, a wave's slow tail (``wave_fraction <= rel``) also counts as
the wave where the voxel would otherwise be background. A spark's *ignore ring* is
where ``ring_fraction <= rel < event_fraction`` (its uncertain rim in space and
time) and no event covers the voxel; the first and last ``ignore_frames`` frames are
ignore too (events cut by the movie's ends). ``instances`` gives each covered voxel
its event's slot id + 1 (0 elsewhere, also on ignored frames); slots are ordered
sparks, puffs, waves.

Domain randomization (``configs/sparks.py:randomized``; parameters drawn in
:mod:`smlm_jax.sparks.scene`): F0 is further multiplied by a rounded cell end, an edge
wobble, a nucleus, a smooth dye-loading modulation and a fine texture; the summed
dF/F0 saturates as ``dff / (1 + dff / dff_max)``; rows are sampled with raster-scan
delays (:func:`row_times_ms`); sparks may be elliptic and widen while they decay,
puffs flicker, waves have curved fronts; :func:`detect` adds extra read noise and an
excess-noise factor. All default to off (Priors defaults).

Static shapes: every movie has ``max_sparks + max_puffs + max_waves`` event slots,
each active with its probability, so batches jit and vmap.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from smlm_jax.core import noise as noise_lib
from smlm_jax.core.noise import Camera
from smlm_jax.sparks.scene import (  # noqa: F401  (re-exported: the simulator's API)
    BACKGROUND, CLASS_NAMES, EVENT_CLASSES, IGNORE, NUM_CLASSES, PUFF, SPARK, WAVE, Events,
    Geometry, LabelSpec, Priors, Scene, draw_noise, draw_scene, num_uniforms)

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


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
  """(F0 [H, W] in photons per pixel per frame (no bleaching), cell mask [H, W] in [0, 1])."""
  y = jnp.arange(geom.height_px, dtype=jnp.float32)[:, None]
  x = jnp.arange(geom.width_px, dtype=jnp.float32)[None, :]
  xc = x - (geom.width_px - 1) / 2
  wobble = scene.wobble_px * jnp.sin(2 * jnp.pi * x / scene.wobble_period_px
                                     + scene.wobble_phase)
  top = scene.top_px + scene.top_slope * xc + wobble
  bottom = scene.bottom_px + scene.bottom_slope * xc - wobble
  # A rounded end: beyond end_x - half width, the band's half width shrinks as a
  # superellipse (exponent n: 2 a half disc, larger flatter), to 0 at end_x.
  centre, half = 0.5 * (top + bottom), jnp.maximum(0.5 * (bottom - top), 1.0)
  u = (x - scene.end_x_px) * scene.end_side / half + 1.0
  n = scene.end_exponent
  shrink = jnp.clip(1.0 - jnp.clip(u, 0.0, 1.0) ** n, 0.0, 1.0) ** (1.0 / n)
  half_eff = jnp.where(u >= 1.0, -edge_px * 4, half * shrink)
  cell = jax.nn.sigmoid((half_eff - jnp.abs(y - centre)) / edge_px)
  along_um = (x * jnp.cos(scene.striation_angle_rad) + y * jnp.sin(scene.striation_angle_rad)
              ) * geom.pixel_size_um
  stri = 1.0 + scene.striation_depth * jnp.cos(
      2 * jnp.pi * along_um / scene.striation_spacing_um + scene.striation_phase)
  tilt = (1.0 + scene.tilt_y * (y / max(geom.height_px - 1, 1) - 0.5)
          + scene.tilt_x * (x / max(geom.width_px - 1, 1) - 0.5))
  # Nucleus: a soft ellipse of F0 factor nucleus_contrast (absent when its length is 0).
  ell = (((x - scene.nucleus_x_px) / jnp.maximum(scene.nucleus_half_length_px, 1e-3)) ** 2
         + ((y - scene.nucleus_y_px) / scene.nucleus_half_width_px) ** 2)
  inside = jax.nn.sigmoid((1.0 - ell) * 4.0) * (scene.nucleus_half_length_px > 0)
  nucleus = 1.0 + (scene.nucleus_contrast - 1.0) * inside
  inhom = 1.0 + scene.inhomogeneity * jnp.cos(scene.inhom_ky * y + scene.inhom_kx * x
                                              + scene.inhom_phase)
  f0 = scene.f0_photons * cell * stri * tilt * nucleus * inhom
  if scene.texture is not None:
    f0 = f0 * scene.texture
  return f0, cell


def row_times_ms(geom: Geometry, line_delay_fraction=0.0):
  """[T, H] acquisition time of each row: frame k starts at k dt and row y is sampled
  ``line_delay_fraction * dt * y / H`` later (raster scan; 0 = all rows at once)."""
  t = jnp.arange(geom.num_frames, dtype=jnp.float32) * geom.frame_interval_ms
  y = jnp.arange(geom.height_px, dtype=jnp.float32)
  return t[:, None] + line_delay_fraction * geom.frame_interval_ms * y[None] / geom.height_px


def event_rel(ev: Events, geom: Geometry, line_delay_fraction=0.0):
  """rel [E, T, H, W] in [0, 1] of every slot (inactive slots included)."""
  t = row_times_ms(geom, line_delay_fraction)[:, :, None]        # [T, H, 1]
  y = jnp.arange(geom.height_px, dtype=jnp.float32)[None, :, None]
  x = jnp.arange(geom.width_px, dtype=jnp.float32)[None, None, :]

  def one(e):
    u = t - e.t0_ms
    # Local events (sparks, puffs): Gaussian of FWHM fwhm (x) and fwhm * aspect (y), whose
    # variance grows by `widening` per decay time constant after the peak.
    time = rise_decay(u, e.rise_ms, e.tau_ms, e.plateau_ms)
    after = jnp.maximum(u - e.rise_ms - e.plateau_ms, 0.0) / e.tau_ms
    grow = 1.0 + e.widening * after
    sx = e.fwhm_um / geom.pixel_size_um / FWHM_PER_SIGMA
    sy = sx * e.aspect
    space = jnp.exp(-((y - e.y_px) ** 2 / (2 * sy ** 2) + (x - e.x_px) ** 2 / (2 * sx ** 2))
                    / grow)
    # Puff flicker: the release dips by up to `flicker` while it lasts.
    dip = e.flicker * 0.5 * (1.0 + jnp.sin(2 * jnp.pi * e.flicker_hz * u / 1000.0
                                           + e.flicker_phase))
    time = time * jnp.where((u > 0) & (u < e.rise_ms + e.plateau_ms), 1.0 - dip, 1.0)
    local = time * space
    # Waves: arrival time from the origin at distance sqrt(dx^2 + (curvature dy)^2).
    speed_um_per_ms = jnp.maximum(e.speed_um_per_s, 1e-6) / 1000.0
    dist_px = jnp.sqrt((x - e.x_px) ** 2 + (e.curvature * (y - e.y_px)) ** 2)
    arrival = e.t0_ms + dist_px * geom.pixel_size_um / speed_um_per_ms
    wave = rise_decay(t - arrival, e.rise_ms, e.tau_ms)
    return jnp.where(e.kind == WAVE, wave, local)

  # Shape fields left at their scalar defaults apply to every slot.
  ev = jax.tree.map(lambda v: jnp.broadcast_to(jnp.asarray(v), ev.kind.shape), ev)
  return jax.vmap(one)(ev)


def labels_from_rel(rel, ev: Events, cell, spec: LabelSpec):
  """(labels [T, H, W], instances [T, H, W]) from per-slot rel [E, T, H, W]."""
  inside = (cell >= 0.5)[None, None]
  # Sub-threshold fluctuation slots (kind BACKGROUND) add dF/F0 but cover no voxel.
  active = (ev.active & (ev.kind != BACKGROUND))[:, None, None, None]
  covered = (rel >= spec.event_fraction) & inside & active
  strength = jnp.where(covered, ev.amplitude[:, None, None, None] * rel, -1.0)
  best = jnp.argmax(strength, axis=0)
  any_cov = jnp.any(covered, axis=0)
  ring = ((rel >= spec.ring_fraction) & (rel < spec.event_fraction) & inside & active
          & (ev.kind == SPARK)[:, None, None, None])
  any_ring = jnp.any(ring, axis=0)
  labels = jnp.where(any_cov, ev.kind[best], jnp.where(any_ring, IGNORE, BACKGROUND))
  instances = jnp.where(any_cov, best + 1, 0)
  if spec.wave_fraction is not None and spec.wave_fraction < spec.event_fraction:
    # A wave's slow tail (wave_fraction <= rel < event_fraction) takes only voxels that
    # would otherwise be background: every other label stays as it is.
    tail = ((rel >= spec.wave_fraction) & inside & active
            & (ev.kind == WAVE)[:, None, None, None])
    tail_strength = jnp.where(tail, ev.amplitude[:, None, None, None] * rel, -1.0)
    free = jnp.any(tail, axis=0) & (labels == BACKGROUND)
    labels = jnp.where(free, WAVE, labels)
    instances = jnp.where(free, jnp.argmax(tail_strength, axis=0) + 1, instances)
  T = rel.shape[1]
  k = spec.ignore_frames
  if k > 0:
    t = jnp.arange(T)[:, None, None]
    edge = (t < k) | (t >= T - k)
    labels = jnp.where(edge, IGNORE, labels)
    instances = jnp.where(edge, 0, instances)
  return labels.astype(jnp.int32), instances.astype(jnp.int32)


# --------------------------------------------------------------------------- render
def render(scene: Scene, geom: Geometry, spec: LabelSpec, edge_px: float = 1.0):
  """Noiseless movie and labels of one scene.

  Returns a dict: expected_photons [T, H, W], dff [T, H, W] (dF/F0 of all events),
  f0 [H, W] (resting photons, unbleached), cell [H, W], labels [T, H, W],
  instances [T, H, W].
  """
  f0, cell = resting_f0(scene, geom, edge_px)
  ev = scene.events
  rel = event_rel(ev, geom, scene.line_delay_fraction)
  amp = jnp.where(ev.active, ev.amplitude, 0.0)
  dff = jnp.einsum("e,ethw->thw", amp, rel)
  # Dye saturation (Ca2+ binding curve): large or summed events grow less than linearly.
  dff = dff / (1.0 + dff * scene.dye_saturation_inv)
  t_s = row_times_ms(geom, scene.line_delay_fraction)[:, :, None] / 1000.0
  bleach = jnp.exp(-scene.bleach_rate_per_s * t_s)
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
    adu = detect(k_cam, out["expected_photons"], self.camera, self.priors)
    ev = scene.events
    return {"adu": adu, "labels": out["labels"], "instances": out["instances"],
            "dff": out["dff"], "kind": ev.kind, "active": ev.active,
            "amplitude": ev.amplitude}

  def from_keys(self, keys):
    """Batched :meth:`simulate` over keys [B]."""
    return jax.vmap(self.simulate)(keys)


def detect(key, expected_photons, camera: Camera, priors: Priors):
  """Noisy ADU of expected photons: the camera of :mod:`smlm_jax.core.noise`, plus, when
  the priors randomize them, a per-movie extra read noise (e- rms) and a detector excess
  noise factor F (variance F x the shot noise: analog PMT / hybrid-detector gain noise),
  both Gaussian and drawn with the shot noise's own normals."""
  lo, hi = priors.extra_read_noise_e
  f_lo, f_hi = priors.excess_noise_factor
  if camera.model == "emccd" or (hi <= 0 and f_hi <= 1):
    return noise_lib.apply_camera(key, expected_photons, camera)
  k_draw, k_shot = jax.random.split(key)
  extra_read_e, excess = draw_noise(k_draw, priors)
  lam = camera.qe * expected_photons
  electrons, z = noise_lib.poisson_and_normal(k_shot, lam)
  sd = jnp.sqrt(camera.read_noise_e ** 2 + extra_read_e ** 2
                + jnp.maximum(excess - 1.0, 0.0) * lam)
  return (camera.gain_adu_per_e * (electrons + sd * z) + camera.offset_adu).astype(jnp.float32)


def movie_keys(key, indices):
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def _pair(v):
  return tuple(float(x) for x in v)


# Domain-randomization fields: (config group, key, Priors field); absent keys keep the
# Priors default (no randomization), so runs saved before they existed rebuild as trained.
_RANDOMIZATION = (
    ("cell", "edge_wobble_px", "cell_edge_wobble_px"),
    ("cell", "end_probability", "cell_end_probability"),
    ("cell", "end_exponent", "cell_end_exponent"),
    ("cell", "nucleus_probability", "nucleus_probability"),
    ("cell", "nucleus_contrast", "nucleus_contrast"),
    ("cell", "nucleus_length_um", "nucleus_length_um"),
    ("cell", "nucleus_width_um", "nucleus_width_um"),
    ("cell", "dye_inhomogeneity", "dye_inhomogeneity"),
    ("cell", "granular_texture", "granular_texture"),
    ("cell", "dye_max_dff", "dye_max_dff"),
    ("acquisition", "line_delay_fraction", "line_delay_fraction"),
    ("acquisition", "extra_read_noise_e", "extra_read_noise_e"),
    ("acquisition", "excess_noise_factor", "excess_noise_factor"),
    ("acquisition", "log_uniform_amplitudes", "log_uniform_amplitudes"),
    ("sparks", "log_uniform", "spark_log_amplitude"),
    ("sparks", "aspect", "spark_aspect"),
    ("sparks", "widening", "spark_widening"),
    ("sparks", "sympathetic_probability", "sympathetic_probability"),
    ("sparks", "sympathetic_delay_ms", "sympathetic_delay_ms"),
    ("sparks", "sympathetic_distance_um", "sympathetic_distance_um"),
    ("puffs", "flicker", "puff_flicker"),
    ("puffs", "flicker_hz", "puff_flicker_hz"),
    ("waves", "curvature", "wave_curvature"),
    ("faint", "max_per_movie", "max_faint"),
    ("faint", "probability", "faint_probability"),
    ("faint", "fwhm_um", "faint_fwhm_um"),
    ("faint", "rise_ms", "faint_rise_ms"),
    ("faint", "duration_ms", "faint_duration_ms"),
    ("faint", "tau_ms", "faint_tau_ms"),
    ("faint", "amplitude_dff", "faint_amplitude"),
)


def _randomization_from_config(sim) -> dict:
  out = {}
  for group, key, field in _RANDOMIZATION:
    g = sim.get(group, None)
    if g is None or g.get(key, None) is None:
      continue
    v = g[key]
    if isinstance(v, bool):
      out[field] = v
    elif field == "max_faint":
      out[field] = int(v)
    elif isinstance(v, (tuple, list)):
      out[field] = _pair(v)
    else:
      out[field] = float(v)
  return out


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
      wave_tau_ms=_pair(w.tau_ms), wave_amplitude=_pair(w.amplitude_dff),
      **_randomization_from_config(sim))
  wave_fraction = sim.labels.get("wave_fraction", None)
  spec = LabelSpec(float(sim.labels.event_fraction), float(sim.labels.ring_fraction),
                   int(sim.labels.ignore_frames),
                   None if wave_fraction is None else float(wave_fraction))
  cam = sim.camera
  camera = Camera(qe=float(cam.qe), gain_adu_per_e=float(cam.gain_adu_per_e),
                  offset_adu=float(cam.offset_adu), read_noise_e=float(cam.read_noise_e),
                  em_gain=float(cam.get("em_gain", 1.0)), model=str(cam.model))
  if spec.wave_fraction is not None and not 0.0 < spec.wave_fraction <= spec.event_fraction:
    raise ValueError(f"sim.labels.wave_fraction={spec.wave_fraction} must be in (0, "
                     f"event_fraction={spec.event_fraction}]: it only extends a wave's "
                     "labels into its tail")
  if geom.num_frames <= 2 * spec.ignore_frames:
    raise ValueError(f"sim.num_frames={geom.num_frames} leaves no frame outside the "
                     f"{spec.ignore_frames} ignored frames at each end")
  return Simulator(geom, priors, spec, camera)
