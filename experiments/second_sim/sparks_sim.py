"""Second (independent) simulator of confocal xy-t Ca2+ movies of cardiomyocytes.

Contract: ``simulate_movie(seed, tiny=False, **overrides) -> dict`` with
  movie      uint16 [T, H, W] camera ADU (offset 100 + gain * e- + read noise),
  labels     uint8  [T, H, W] 0 background, 1 spark, 2 wave, 3 puff, 4 ignore,
  instances  uint16 [T, H, W] 0 none, 1..N event ids (the voxels labelled with its class),
  meta       dict for the JSON sidecar (units in the key names, event list).
Axes: t, y, x; pixel 0.2 um; frame interval 6.8 ms; each row y is acquired
``row_fraction * y / H`` of a frame later than row 0 (raster scan, flyback the rest).

Physics (README.md has the sources): the events add free-Ca2+ increments [nM] on a
resting 100 nM; fluorescence follows the dye's equilibrium binding curve (Kd, Fmax/Fmin),
so dF/F0 saturates and does not depend on the local dye loading. Sparks and puffs are
diffusing point/cluster releases (Gaussian spread with variance sigma0^2 + 2 D t, first-
order removal, seen through a confocal PSF at a random focal offset); waves are fronts of
arrival times from an (often off-field) origin with anisotropic speed. Cell: irregular
superellipse with rounded ends, 1-2 nuclei, z-line striation; Poisson + read noise;
photobleaching.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from scipy import ndimage

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
from experiments.second_sim import common  # noqa: E402

PIXEL_UM = 0.2
FRAME_S = 6.8e-3
CAMERA_OFFSET_ADU = 100.0
CLASS_CODES = {"spark": 1, "wave": 2, "puff": 3}
IGNORE = 4
CA_REST_NM = 100.0                        # resting [Ca2+]i (Cheng & Lederer 2008)
# name: (Kd nM, Fmax/Fmin, relative brightness); Gee 2000, Minta 1989, Lock 2015.
DYES = {"fluo4": (345.0, 100.0, 1.0), "fluo3": (390.0, 40.0, 0.45),
        "cal520": (320.0, 100.0, 1.25)}
LABEL_REL = 0.5                           # event dF/F0 >= 0.5 of its peak: its class
IGNORE_REL = 0.25                         # 0.25..0.5 of its peak: ignore
EDGE_FRAMES = 2                           # event voxels in the first/last 2 frames: ignore


def _shapes(tiny: bool):
  return (64, 48, 128) if tiny else (256, 64, 256)


# ---------------------------------------------------------------- dye ----
def dff_from_dca(dca_nm, kd_nm, rf):
  """dF/F0 of a Ca2+ increment on the resting level for an equilibrium dye."""
  def f(ca):
    return 1.0 + (rf - 1.0) * ca / (ca + kd_nm)
  return f(CA_REST_NM + dca_nm) / f(CA_REST_NM) - 1.0


def dca_from_dff(dff, kd_nm, rf):
  """Inverse of ``dff_from_dca`` (raises when the dye cannot reach that dF/F0)."""
  f_rest = 1.0 + (rf - 1.0) * CA_REST_NM / (CA_REST_NM + kd_nm)
  frac = ((1.0 + dff) * f_rest - 1.0) / (rf - 1.0)
  if not 0 < frac < 1:
    raise ValueError(f"dF/F0 {dff} out of reach of the dye")
  return kd_nm * frac / (1.0 - frac) - CA_REST_NM


# --------------------------------------------------------------- cell ----
def _cell(rng, h, w):
  """Resting-fluorescence map (relative, blurred), cytosol mask, nucleus mask, cell axis."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) * PIXEL_UM
  ang = np.deg2rad(rng.uniform(-7, 7))
  half_w = rng.uniform(5.5, 11.0)                       # um, cells 11-22 um wide
  half_l = rng.uniform(35.0, 65.0)                      # um, 70-130 um long
  fw = w * PIXEL_UM
  if rng.random() < 0.55:                               # one rounded end in the field
    side = rng.choice([-1, 1])
    cx = fw / 2 + side * (half_l - rng.uniform(0.1, 0.35) * fw)
  else:
    cx = fw / 2 + rng.uniform(-0.2, 0.2) * fw
  cy = h * PIXEL_UM / 2 + rng.uniform(-0.15, 0.15) * h * PIXEL_UM
  u = (xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang)  # along the cell axis
  v = -(xx - cx) * np.sin(ang) + (yy - cy) * np.cos(ang)
  # irregular width along the cell: a few random Fourier modes (sarcolemma folds, steps)
  hw = np.full_like(u, half_w)
  for k in range(1, 6):
    hw *= 1.0 + rng.normal(0, 0.05 / k) * np.sin(2 * np.pi * k * u / (2 * half_l)
                                                   + rng.uniform(0, 2 * np.pi))
  hw += rng.normal(0, 0.25) * np.sin(2 * np.pi * u / rng.uniform(6, 14))
  p = rng.uniform(2.5, 5.0)                              # superellipse: rounded ends
  r = (np.abs(u) / half_l) ** p + (np.abs(v) / np.maximum(hw, 1.0)) ** 2.2
  cell = (r <= 1.0).astype(np.float64)
  # nuclei: 1 (70 %) or 2, ellipses on the axis, near the field
  nucleus = np.zeros_like(cell)
  n_nuc = 1 if rng.random() < 0.7 else 2
  u_field = np.clip((fw / 2 - cx) * np.cos(ang), -half_l + 8, half_l - 8)
  u0 = u_field + rng.uniform(-0.3, 0.3) * fw
  for i in range(n_nuc):
    a, b = rng.uniform(5.0, 8.0), rng.uniform(2.0, min(3.5, 0.45 * half_w))
    uc = u0 + (i - (n_nuc - 1) / 2) * rng.uniform(13, 18)
    vc = rng.uniform(-0.2, 0.2) * half_w
    nucleus = np.maximum(nucleus, (((u - uc) / a) ** 2 + ((v - vc) / b) ** 2 <= 1.0))
  nucleus *= cell
  # striation: dimmer at z-lines (t-tubule lumen excludes the dye), where the release
  # sites lie (u = period * (k - phase / 2 pi)); dye-loading inhomogeneity, granularity
  period = rng.uniform(1.8, 2.0)
  phase = rng.uniform(0, 2 * np.pi)
  stri = 1.0 - rng.uniform(0.04, 0.12) * np.cos(2 * np.pi * u / period + phase)
  smooth = ndimage.gaussian_filter(rng.standard_normal(cell.shape), 20) * 8.0
  grain = ndimage.gaussian_filter(rng.standard_normal(cell.shape), 1.0) * 0.08
  nuc_level = rng.choice([rng.uniform(1.15, 1.6), rng.uniform(0.65, 0.9)])
  f_rel = cell * stri * (1 + np.clip(smooth, -0.25, 0.25) + grain)
  f_rel = np.where(nucleus > 0, nuc_level * (1 + 0.5 * grain), f_rel)
  f_rel = ndimage.gaussian_filter(f_rel, 0.9)            # confocal PSF ~0.4 um FWHM
  cell_soft = ndimage.gaussian_filter(cell, 1.5)
  cytosol = (cell > 0) & (ndimage.binary_dilation(nucleus > 0, iterations=3) == 0)
  return dict(f_rel=f_rel, cell=cell > 0, cell_soft=cell_soft, cytosol=cytosol,
              u=u, v=v, period_um=period, phase=phase, angle=ang,
              n_nuclei=n_nuc, nucleus_level=nuc_level)


def _release_sites(rng, cellinfo, n):
  """n release sites on z-lines (u = period * (k - phase/2pi)) inside the cytosol."""
  ys, xs = np.nonzero(cellinfo["cytosol"])
  if ys.size == 0:
    return np.zeros((0, 2))
  out = []
  for _ in range(n):
    i = rng.integers(ys.size)
    y, x = ys[i] * PIXEL_UM, xs[i] * PIXEL_UM
    u = cellinfo["u"][ys[i], xs[i]]
    per, ph = cellinfo["period_um"], cellinfo["phase"]
    k = np.round(u / per + ph / (2 * np.pi))           # nearest z-line
    du = (k - ph / (2 * np.pi)) * per - u
    du += rng.normal(0, 0.1)
    out.append((y + du * np.sin(cellinfo["angle"]), x + du * np.cos(cellinfo["angle"])))
  return np.array(out)


# ------------------------------------------------------------- events ----
def _row_times_ms(t, h, row_fraction):
  """[T, H] acquisition time of each row, ms."""
  return ((np.arange(t)[:, None] + row_fraction * np.arange(h)[None, :] / h)
          * FRAME_S * 1e3)


def _local_release(times_ms, y_um, x_um, ev, psf):
  """Unit-free Ca2+ increment of a (spark/puff) release on a [t, h, w] box.

  Release rate profile r(s) on [t0, t0 + dur] (rect for sparks, ramped and flickering for
  puffs), each released packet spreads as a Gaussian with variance sigma0^2 + 2 D (t - s)
  per axis and is removed at rate k; observed through a Gaussian confocal PSF at focal
  offset dz (Smith et al. 1998 style point-source diffusion, simplified)."""
  t0, dur = ev["t0_ms"], ev["release_ms"]
  nq = int(np.clip(np.ceil(dur / 2.5), 8, 240))           # packets <= 2.5 ms long
  step = dur / nq
  frac = (np.arange(nq) + 0.5) / nq
  s = t0 + np.arange(nq) * step                            # packet starts
  prof = ev.get("rate_profile", np.ones(2))               # on an even grid over [0, 1]
  rate = np.interp(frac, np.linspace(0, 1, prof.size), prof)
  out = 0.0
  r2 = (y_um[None, :, None] - ev["y_um"]) ** 2 + (x_um[None, None, :] - ev["x_um"]) ** 2
  for q in range(nq):
    # the elapsed part of packet q (continuous in t): its amount and its mean age
    el = np.clip(times_ms - s[q], 0.0, step)[:, :, None]   # [t, h, 1]
    on = el / step
    tq = np.maximum(times_ms[:, :, None] - s[q] - el / 2, 0.0)
    s2 = ev["sigma0_um"] ** 2 + 2 * ev["d_um2_per_ms"] * tq
    sxy, sz = s2 + psf[0] ** 2, s2 + psf[1] ** 2
    g = (np.exp(-r2 / (2 * sxy) - ev["dz_um"] ** 2 / (2 * sz)) / (sxy * np.sqrt(sz))
         * np.exp(-ev["k_per_ms"] * tq))
    out = out + rate[q] * on * g
  return out


def _wave_shape(times_ms, y_um, x_um, ev, cellinfo, rng):
  """Unit-free Ca2+ increment of a wave on the whole movie: arrival time from an elliptic
  distance to the origin (slower across the cell: curved fronts), saltatory jitter,
  rise 1 - exp(-u/tau_r) and decay exp(-u/tau_d); fades out beyond its range."""
  ang = cellinfo["angle"]
  dy = y_um[:, None] - ev["y0_um"]
  dx = x_um[None, :] - ev["x0_um"]
  du = dx * np.cos(ang) + dy * np.sin(ang)
  dv = -dx * np.sin(ang) + dy * np.cos(ang)
  dist = np.sqrt(du ** 2 + (dv / ev["transverse_ratio"]) ** 2)
  jitter = ndimage.gaussian_filter(rng.standard_normal(dist.shape), 4.0)
  jitter *= ev["jitter_ms"] / max(jitter.std(), 1e-9)
  arrival = ev["t0_ms"] + dist / ev["speed_um_per_ms"] + jitter
  reach = np.exp(-np.maximum(dist - ev["range_um"], 0) ** 2 / (2 * 6.0 ** 2))
  spatial = reach * cellinfo["cell_soft"] * np.where(cellinfo["cell"] & ~(
      cellinfo["cytosol"]), ev["nuclear_factor"], 1.0)
  spatial = ndimage.gaussian_filter(spatial, 1.0)
  u = times_ms[:, :, None] - arrival[None]
  u = np.maximum(u, 0.0)
  tr, td = ev["rise_ms"], ev["decay_ms"]
  shape = (1 - np.exp(-u / tr)) * np.exp(-u / td)
  umax = tr * np.log(1 + td / tr)
  shape /= (1 - np.exp(-umax / tr)) * np.exp(-umax / td)
  return (shape * spatial[None]).astype(np.float32), arrival


def _draw_events(rng, cellinfo, t, h, w, rates):
  """Event parameter dicts (sparks incl. sympathetic ones, puffs, waves); ``rates``:
  (mean primary sparks per full cytosol, mean puffs, probability of a wave)."""
  dur_ms = t * FRAME_S * 1e3
  n_spark = rng.poisson(rates[0] * cellinfo["cytosol"].mean()) + int(rng.random() < 0.6)
  n_puff = rng.poisson(rates[1])
  n_wave = int(rng.random() < rates[2])
  events = []
  sites = _release_sites(rng, cellinfo, n_spark + n_puff)
  if len(sites) < n_spark + n_puff:                   # no cytosol in the field
    n_spark = n_puff = 0
  margin = 20.0
  for i in range(n_spark):
    events.append(dict(
        cls="spark", y_um=sites[i, 0], x_um=sites[i, 1],
        t0_ms=rng.uniform(margin, dur_ms - 60), release_ms=np.exp(rng.uniform(
            np.log(8), np.log(30))), sigma0_um=rng.uniform(0.45, 0.7),
        d_um2_per_ms=rng.uniform(0.006, 0.015), k_per_ms=1 / rng.uniform(30, 80),
        dz_um=rng.uniform(-0.8, 0.8),
        peak_dff=float(np.exp(rng.uniform(np.log(0.2), np.log(2.0))))))
  # sympathetic sparks: neighbouring CRUs (next z-line or along it) fire 4-30 ms later
  for parent in [e for e in events if rng.random() < 0.25]:
    for _ in range(1 if rng.random() < 0.7 else 2):
      if rng.random() < 0.5:
        d_u, d_v = rng.choice([-1, 1]) * cellinfo["period_um"], rng.normal(0, 0.4)
      else:
        d_u, d_v = rng.normal(0, 0.2), rng.choice([-1, 1]) * rng.uniform(1.2, 2.5)
      a = cellinfo["angle"]
      y = parent["y_um"] + d_u * np.sin(a) + d_v * np.cos(a)
      x = parent["x_um"] + d_u * np.cos(a) - d_v * np.sin(a)
      iy, ix = int(round(y / PIXEL_UM)), int(round(x / PIXEL_UM))
      if not (0 <= iy < h and 0 <= ix < w and cellinfo["cytosol"][iy, ix]):
        continue
      child = dict(parent, y_um=y, x_um=x, t0_ms=parent["t0_ms"] + rng.uniform(4, 30),
                   dz_um=rng.uniform(-0.8, 0.8), release_ms=np.exp(rng.uniform(
                       np.log(5), np.log(25))),
                   peak_dff=float(np.exp(rng.uniform(np.log(0.2), np.log(1.5)))),
                   trigger=parent)
      if child["t0_ms"] < dur_ms - 40:
        events.append(child)
  for i in range(n_puff):
    rel = np.exp(rng.uniform(np.log(50), np.log(500)))
    nq = 24
    ramp = np.minimum(1.0, (np.arange(nq) + 0.5) / nq * rel / 20.0)
    flick = np.clip(1 + 0.3 * ndimage.gaussian_filter1d(rng.standard_normal(nq), 1.5),
                    0.6, 1.4)                   # channel flicker within the puff
    events.append(dict(
        cls="puff", y_um=sites[n_spark + i, 0], x_um=sites[n_spark + i, 1],
        t0_ms=rng.uniform(margin, max(margin + 1, dur_ms - rel - 40)), release_ms=rel,
        rate_profile=ramp * flick, sigma0_um=rng.uniform(0.5, 1.0),
        d_um2_per_ms=rng.uniform(0.015, 0.04), k_per_ms=1 / rng.uniform(15, 40),
        dz_um=rng.uniform(-0.6, 0.6),
        peak_dff=float(np.exp(rng.uniform(np.log(0.2), np.log(0.8))))))
  for _ in range(n_wave):
    fw, fh = w * PIXEL_UM, h * PIXEL_UM
    if rng.random() < 0.6:                    # enters from a field edge
      x0 = -rng.uniform(3, 30) if rng.random() < 0.5 else fw + rng.uniform(3, 30)
      y0 = rng.uniform(0, fh)
      t0 = rng.uniform(-0.1, 0.4) * dur_ms
    else:                                     # starts inside the field at a release site
      y0, x0 = _release_sites(rng, cellinfo, 1)[0] if cellinfo["cytosol"].any() else (
          fh / 2, fw / 2)
      t0 = rng.uniform(0.05, 0.45) * dur_ms
    events.append(dict(
        cls="wave", y0_um=y0, x0_um=x0, t0_ms=t0,
        speed_um_per_ms=rng.uniform(0.05, 0.15), transverse_ratio=rng.uniform(0.5, 1.0),
        jitter_ms=rng.uniform(2, 8), rise_ms=rng.uniform(8, 25),
        decay_ms=rng.uniform(90, 300), range_um=rng.uniform(40, 200),
        nuclear_factor=rng.uniform(0.4, 0.9),
        peak_dff=float(rng.uniform(0.8, 2.5))))
  return events


def _measure(dff, f0_frame, iy, ix):
  """(t_peak_frame, FDHM ms, FWHM um) of one event's own dF/F0 on its box at (iy, ix)."""
  course = dff[:, iy, ix]
  k = int(np.argmax(course))
  half = course[k] / 2
  fdhm = float((course >= half).sum() * FRAME_S * 1e3)
  wx = (dff[k, iy, :] >= dff[k, iy, ix] / 2).sum()
  wy = (dff[k, :, ix] >= dff[k, iy, ix] / 2).sum()
  return f0_frame + k, fdhm, float((wx + wy) / 2 * PIXEL_UM)


def simulate_movie(seed, tiny: bool = False, shape=None, photons_scale: float = 1.0,
                   gain_adu_per_e: float = 1.0, read_noise_e: float | None = None,
                   dye: str | None = None, row_fraction: float = 0.9,
                   event_rates=None) -> dict:
  """One movie (see the module docstring); ``seed`` is an int or a numpy Generator.

  ``photons_scale`` multiplies all photon levels; ``event_rates`` = (mean primary sparks
  per cytosol-filled field, mean puffs, wave probability), default scaled to the shape."""
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  t, h, w = shape or _shapes(tiny)
  cellinfo = _cell(rng, h, w)
  dye = dye or str(rng.choice(list(DYES), p=[0.6, 0.25, 0.15]))
  kd, rf, bright = DYES[dye]
  f0_e = rng.uniform(10, 35) * bright * photons_scale     # e-/px/frame, cytosol at rest
  bg_e = rng.uniform(0.5, 3.0) * photons_scale
  read_noise_e = rng.uniform(1.0, 2.0) if read_noise_e is None else read_noise_e
  bleach_tau_s, bleach_floor = rng.uniform(3, 30), rng.uniform(0.3, 0.8)
  psf = (0.17, 0.5)                                        # um, confocal sigma xy, z
  times = _row_times_ms(t, h, row_fraction)
  y_um, x_um = np.arange(h) * PIXEL_UM, np.arange(w) * PIXEL_UM
  inside = ndimage.binary_dilation(cellinfo["cell"], iterations=1)
  dca = np.zeros((t, h, w), np.float32)
  best_dff = np.zeros((t, h, w), np.float32)
  best_rel = np.zeros((t, h, w), np.float32)
  best_id = np.zeros((t, h, w), np.uint16)
  strong = np.zeros((t, h, w), np.uint8)                   # bit c: class c >= LABEL_REL
  if event_rates is None:                        # ~4 primary sparks/s in 13 x 51 um
    scale = t / 256 * (h * w) / (64 * 256)
    event_rates = (7.0 * scale, 0.9 * t / 256, 0.5) if not tiny else (5.0, 0.7, 0.45)
  events, records = _draw_events(rng, cellinfo, t, h, w, event_rates), []
  for eid, ev in enumerate(events, start=1):
    peak = ev["peak_dff"]
    a_ca = dca_from_dff(peak, kd, rf)
    if ev["cls"] == "wave":
      sl = (slice(0, t), slice(0, h), slice(0, w))
      shp, arrival = _wave_shape(times, y_um, x_um, ev, cellinfo, rng)
      shp /= max(shp.max(), 1e-12)
      d = a_ca * shp
      dff = dff_from_dca(d, kd, rf)
      local = dff.max(axis=0)
      rel = np.minimum(dff / np.maximum(local, 1e-9), local / peak)
      first = np.where(cellinfo["cell"], arrival, np.inf)
      iy, ix = np.unravel_index(np.argmin(first), first.shape)
      tpk, fdhm, _ = _measure(dff, 0, iy, ix)
      width = float(np.sqrt((local >= LABEL_REL * peak).sum()) * PIXEL_UM)
      pos = (float(iy), float(ix))
    else:
      rad = 4.0 if ev["cls"] == "spark" else 6.0
      iy0, iy1 = [int(np.clip((ev["y_um"] + s) / PIXEL_UM, 0, h)) for s in (-rad, rad)]
      ix0, ix1 = [int(np.clip((ev["x_um"] + s) / PIXEL_UM, 0, w)) for s in (-rad, rad)]
      f0 = max(int(ev["t0_ms"] / (FRAME_S * 1e3)) - 1, 0)
      f1 = min(int((ev["t0_ms"] + ev["release_ms"] + 8 / ev["k_per_ms"])
                   / (FRAME_S * 1e3)) + 2, t)
      if iy1 - iy0 < 2 or ix1 - ix0 < 2 or f1 - f0 < 2:
        continue
      sl = (slice(f0, f1), slice(iy0, iy1), slice(ix0, ix1))
      shp = _local_release(times[f0:f1, iy0:iy1], y_um[iy0:iy1], x_um[ix0:ix1], ev, psf)
      shp /= max(shp.max(), 1e-12)
      d = (a_ca * shp).astype(np.float32)
      dff = dff_from_dca(d, kd, rf)
      rel = dff / peak * inside[sl[1:]]
      cy = int(np.clip(round(ev["y_um"] / PIXEL_UM), iy0, iy1 - 1))
      cx = int(np.clip(round(ev["x_um"] / PIXEL_UM), ix0, ix1 - 1))
      tpk, fdhm, width = _measure(dff, f0, cy - iy0, cx - ix0)
      pos = (ev["y_um"] / PIXEL_UM, ev["x_um"] / PIXEL_UM)
    dca[sl] += d
    win = (rel >= IGNORE_REL) & (dff > best_dff[sl])
    best_dff[sl] = np.where(win, dff, best_dff[sl])
    best_rel[sl] = np.where(win, rel, best_rel[sl])
    best_id[sl] = np.where(win, eid, best_id[sl])
    strong[sl] |= ((rel >= LABEL_REL) * (1 << CLASS_CODES[ev["cls"]])).astype(np.uint8)
    rec = dict(id=eid, **{"class": ev["cls"]}, label=CLASS_CODES[ev["cls"]],
               t_peak_frame=int(tpk), y_px=round(pos[0], 2), x_px=round(pos[1], 2),
               peak_dF_F0=round(peak, 4), duration_ms=round(fdhm, 1),
               width_um=round(width, 2))
    if "trigger" in ev:
      rec["triggered_by"] = 1 + events.index(ev["trigger"])
    rec.update({k: round(float(v), 4) for k, v in ev.items() if k.endswith(
        ("_ms", "_um", "_per_ms", "ratio", "factor")) and np.isscalar(v)})
    records.append(rec)
  # labels: the strongest event (>= IGNORE_REL of its peak) owns a voxel; its class where
  # >= LABEL_REL, else ignore; ignore where two classes are both >= LABEL_REL, and
  # event voxels in the first/last EDGE_FRAMES frames.
  cls_of = np.zeros(len(events) + 1, np.uint8)
  for eid, ev in enumerate(events, start=1):
    cls_of[eid] = CLASS_CODES[ev["cls"]]
  labels = np.where(best_rel >= LABEL_REL, cls_of[best_id], IGNORE).astype(np.uint8)
  labels[best_id == 0] = 0
  multi = (strong & (strong - 1)) > 0
  labels[multi & (best_id > 0)] = IGNORE
  labels[:EDGE_FRAMES][best_id[:EDGE_FRAMES] > 0] = IGNORE
  labels[t - EDGE_FRAMES:][best_id[t - EDGE_FRAMES:] > 0] = IGNORE
  instances = np.where((labels >= 1) & (labels <= 3), best_id, 0).astype(np.uint16)
  counts = np.bincount(instances.ravel(), minlength=len(events) + 1)
  for rec in records:
    rec["n_voxels"] = int(counts[rec["id"]])
  # fluorescence -> photo-electrons -> ADU
  f_rest = 1.0 + (rf - 1.0) * CA_REST_NM / (CA_REST_NM + kd)
  ca = CA_REST_NM + dca
  ratio = (1.0 + (rf - 1.0) * ca / (ca + kd)) / f_rest
  bleach = bleach_floor + (1 - bleach_floor) * np.exp(-times / (bleach_tau_s * 1e3))
  mean_e = (f0_e * cellinfo["f_rel"][None] * bleach[:, :, None] * ratio + bg_e)
  movie = common.to_adu(mean_e, rng, CAMERA_OFFSET_ADU, gain_adu_per_e, read_noise_e)
  meta = dict(
      simulator="experiments/second_sim/sparks_sim.py", seed=_seed_of(seed),
      shape_tyx=[t, h, w], axes="TYX", pixel_size_nm=PIXEL_UM * 1e3,
      frame_interval_s=FRAME_S, row_fraction_of_frame=row_fraction,
      camera_offset_adu=CAMERA_OFFSET_ADU, camera_gain_adu_per_e=gain_adu_per_e,
      read_noise_e=round(float(read_noise_e), 3), dye=dye, dye_kd_nM=kd,
      dye_fmax_over_fmin=rf, ca_rest_nM=CA_REST_NM,
      f0_cytosol_e_per_px_frame=round(float(f0_e), 3),
      background_e_per_px_frame=round(float(bg_e), 3),
      bleach_tau_s=round(float(bleach_tau_s), 3), bleach_floor=round(float(bleach_floor), 3),
      n_nuclei=cellinfo["n_nuclei"], nucleus_level=round(float(cellinfo["nucleus_level"]), 3),
      striation_period_um=round(float(cellinfo["period_um"]), 3),
      label_codes={"background": 0, "spark": 1, "wave": 2, "puff": 3, "ignore": IGNORE},
      label_rule=(f"event dF/F0 >= {LABEL_REL} x its peak (waves: local per-pixel peak, "
                  f"and local peak >= {LABEL_REL} x wave peak) -> class; {IGNORE_REL}.."
                  f"{LABEL_REL} -> ignore; two classes both strong -> ignore; first/last "
                  f"{EDGE_FRAMES} frames -> ignore"),
      events=records)
  return dict(movie=movie, labels=labels, instances=instances, meta=meta,
              mean_e=mean_e.astype(np.float32))


def _seed_of(seed):
  return int(seed) if not isinstance(seed, np.random.Generator) else None


def write_movie_files(out_dir: str, name: str, seed, tiny: bool = False, **kw) -> str:
  """NAME.tif, NAME_labels.tif, NAME_instances.tif, NAME.json; returns a summary line."""
  sim = simulate_movie(seed, tiny=tiny, **kw)
  base = os.path.join(out_dir, name)
  common.write_imagej(base + ".tif", sim["movie"], "TYX", PIXEL_UM, finterval_s=FRAME_S)
  common.write_imagej(base + "_labels.tif", sim["labels"], "TYX", PIXEL_UM,
                      finterval_s=FRAME_S, compress=True)
  common.write_imagej(base + "_instances.tif", sim["instances"], "TYX", PIXEL_UM,
                      finterval_s=FRAME_S, compress=True)
  common.write_json(base + ".json", sim["meta"])
  n = {c: sum(e["class"] == c for e in sim["meta"]["events"]) for c in CLASS_CODES}
  return (f"{name}: {sim['movie'].shape} dye={sim['meta']['dye']} sparks={n['spark']} "
          f"puffs={n['puff']} waves={n['wave']}")


def main(argv=None) -> int:
  return common.cli("Second-simulator confocal Ca2+ spark movies (issue 23).", "sparks",
                    write_movie_files, argv)


if __name__ == "__main__":
  sys.exit(main())
