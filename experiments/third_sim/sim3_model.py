"""Physics of the third (independent) Ca2+ imaging simulator: cells, events, dye, detector, labels.

Contract: `simulate_movie(rng, n_frames, height_px, width_px)` returns a dict with
  movie_adu   uint16 (T, Y, X)   confocal frames, 200 nm pixels, 6.8 ms apart, offset 100 ADU
  labels      uint8  (T, Y, X)   0 background, 1 spark, 2 wave, 3 puff, 4 ignore
  instances   int32  (T, Y, X)   0 none, k = event id k (all voxels of one id share one class)
  meta        dict               camera and physics parameters, per-event records (JSON-safe)
Everything is drawn from the numpy Generator passed in (deterministic for a given seed).
Units: time in ms, space in um, Ca2+ in uM, light in photons; see README.md for sources.
"""
import numpy as np
from scipy import ndimage

PIXEL_UM = 0.2                # Dotti et al. 2024 reference set-up
FRAME_MS = 6.8
CAMERA_OFFSET_ADU = 100.0
CLASS_IDS = {"spark": 1, "wave": 2, "puff": 3}
IGNORE = 4
LABEL_FRAC = 0.25             # footprint: own dF/F0 >= 25 % of own peak ...
HALO_FRAC = 0.10              # ... 10-25 % of peak is a halo marked ignore
MIN_PEAK_DFF = 0.2            # events peaking below this dF/F0 are ignore as a whole
CONFLICT_FRAC = 0.5           # runner-up class >= 50 % of the winner's dF/F0 -> ignore
LAT_PSF_SIGMA_UM = 0.17       # ~0.4 um FWHM lateral
AX_PSF_SIGMA_UM = 0.6         # ~1.4 um FWHM axial
LABEL_RULE = (
  "Each event's own dF/F0 is simulated in isolation (same dye kinetics, resting Ca2+, no noise). "
  "A voxel belongs to an event's footprint where that own dF/F0 >= 0.25 x the event's peak own dF/F0 "
  "and the voxel lies inside a cell (cell mask >= 0.5). Where footprints overlap, the event with the "
  "largest own dF/F0 wins; if the best event of another class reaches >= 0.5 x the winner's dF/F0 "
  "the voxel is 4 (ignore). Also 4: the halo where own dF/F0 is 0.10-0.25 x peak, footprint voxels on "
  "the soft cell rim (mask < 0.5), and every footprint voxel of events whose peak own dF/F0 < 0.2 "
  "(too faint to call; such events get no instance id). Ignore voxels have instance 0.")


def _smooth_noise(rng, shape, sigma_px):
  n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_px, mode="wrap")
  return n / (n.std() + 1e-12)


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


# ----------------------------------------------------------------------------- cells
def make_cells(rng, height_px, width_px):
  """One or two rod-shaped myocytes at an angle, with striations, mitochondria-like texture, nuclei."""
  h_um, w_um = height_px * PIXEL_UM, width_px * PIXEL_UM
  yy_um, xx_um = np.mgrid[0:height_px, 0:width_px].astype(np.float64) * PIXEL_UM
  angle_rad = np.deg2rad(np.clip(rng.normal(0.0, 10.0), -25.0, 25.0))
  two = rng.random() < 0.35
  widths_um = rng.uniform(8, 16, 2) if two else rng.uniform(12, 24, 1)
  gap_um = rng.uniform(0.5, 3.0)
  v_centres = ([-(widths_um[0] + gap_um) / 2, (widths_um[1] + gap_um) / 2] if two else [0.0])
  v_shift = rng.uniform(-0.25, 0.25) * widths_um[0]
  cx, cy = w_um / 2, h_um / 2
  ca, sa = np.cos(angle_rad), np.sin(angle_rad)
  u_all = (xx_um - cx) * ca + (yy_um - cy) * sa          # along the long axis
  v_all = -(xx_um - cx) * sa + (yy_um - cy) * ca         # across
  mask = np.zeros((height_px, width_px))
  texture = np.zeros_like(mask)
  cell_index = -np.ones((height_px, width_px), np.int32)
  nucleus_all = np.zeros_like(mask)
  phase_all = np.zeros_like(mask)
  period_um = rng.uniform(1.75, 2.0)                     # sarcomere length
  cells = []
  for k, (wc, vc) in enumerate(zip(widths_um, v_centres)):
    length_um = rng.uniform(80, 140)
    end_visible = rng.random() < 0.3
    u_c = (rng.choice([-1, 1]) * (length_um / 2 - rng.uniform(0.1, 0.4) * w_um)
           if end_visible else rng.uniform(-10, 10))
    u = u_all - u_c
    v = v_all - (vc + v_shift)
    r_c = rng.uniform(0.3, 0.5) * wc                     # rounded-rectangle signed distance
    qu, qv = np.abs(u) - (length_um / 2 - r_c), np.abs(v) - (wc / 2 - r_c)
    dist_out = (np.hypot(np.maximum(qu, 0), np.maximum(qv, 0)) + np.minimum(np.maximum(qu, qv), 0) - r_c)
    m = _sigmoid(-dist_out / 0.15)                       # ~0.6 um 10-90 % soft membrane edge
    phase = 2 * np.pi * u / period_um + 0.8 * _smooth_noise(rng, mask.shape, 10.0)
    stria = 1 + rng.uniform(0.03, 0.12) * np.cos(phase)
    mito = 1 + rng.uniform(0.04, 0.12) * ndimage.gaussian_filter(
      rng.standard_normal(mask.shape), (1.5, 3.0), mode="wrap") * 2.5
    nuc = np.zeros_like(mask)
    if rng.random() < 0.5:
      nu, nv = rng.uniform(-w_um / 2, w_um / 2), rng.uniform(-0.2, 0.2) * wc
      a_um, b_um = rng.uniform(5, 8), rng.uniform(2.5, 4)
      r = np.sqrt(((u_all - u_c - nu) / a_um) ** 2 + ((v - nv) / b_um) ** 2)
      nuc = _sigmoid((1 - r) / 0.08)
    bright = rng.uniform(0.7, 1.3) * (1 + rng.uniform(-0.3, 0.3) * v / wc)
    tex = bright * (stria * (1 - nuc) + rng.uniform(1.1, 1.5) * nuc) * np.clip(mito, 0.5, 1.5)
    sel = m > mask
    cell_index[sel & (m > 0.5)] = k
    texture = np.where(sel, tex, texture)
    phase_all = np.where(sel, phase, phase_all)
    nucleus_all = np.maximum(nucleus_all, nuc * m)
    mask = np.maximum(mask, m)
    cells.append({"width_um": float(wc), "length_um": float(length_um), "u_centre_um": float(u_c),
                  "v_centre_um": float(vc + v_shift), "nucleus": bool(nuc.max() > 0.5)})
  geo = {"mask": mask, "texture": texture * mask, "cell_index": cell_index, "phase": phase_all,
         "nucleus": nucleus_all, "u": u_all, "v": v_all, "angle_rad": angle_rad,
         "period_um": period_um, "cells": cells}
  return geo


def _pick_site(rng, geo, on_zline):
  """A pixel well inside a cell, away from nuclei; sparks are moved onto the nearest z-line."""
  ok = np.argwhere((geo["mask"] > 0.9) & (geo["nucleus"] < 0.3))
  if len(ok) == 0:
    ok = np.argwhere(geo["mask"] > 0.5)
  if len(ok) == 0:
    return None
  y, x = ok[rng.integers(len(ok))]
  y_um, x_um = y * PIXEL_UM, x * PIXEL_UM
  if on_zline:      # z-lines at cos(phase) = -1 (dark bands), shift along the long axis
    d = (np.pi - geo["phase"][y, x] + np.pi) % (2 * np.pi) - np.pi
    du = d * geo["period_um"] / (2 * np.pi)
    x_um += du * np.cos(geo["angle_rad"])
    y_um += du * np.sin(geo["angle_rad"])
  return float(y_um), float(x_um)


# ----------------------------------------------------------------------------- events
def _release_template(rel_ms, tau_ms, flux_ms=None):
  """Normalised local Ca2+ time course: release flux J(t) convolved with exp(-t/tau) (removal)."""
  n = int(rel_ms + 8 * tau_ms) + 2
  t = np.arange(n, dtype=np.float64)
  flux = (t < rel_ms).astype(np.float64) if flux_ms is None else flux_ms[:n]
  if len(flux) < n:
    flux = np.pad(flux, (0, n - len(flux)))
  a = np.convolve(flux, np.exp(-t / tau_ms))[:n]
  return t, a / max(a.max(), 1e-12)


def _puff_flux(rng, rel_ms):
  """Stochastic cluster of IP3R channels (Yao et al. 1995): fraction open, 1 ms grid."""
  n_ms = int(rel_ms) + 1
  n_ch = rng.integers(3, 11)
  flux = np.zeros(n_ms)
  for _ in range(n_ch):
    t, is_open = rng.uniform(0, 15), True
    while t < n_ms:
      dur = rng.exponential(30.0 if is_open else 20.0)
      if is_open:
        flux[int(t):int(min(t + dur, n_ms))] += 1.0
      t += dur
      is_open = not is_open
  return flux / n_ch


def sample_events(rng, geo, n_frames):
  t_ms = n_frames * FRAME_MS
  area_um2 = geo["mask"].sum() * PIXEL_UM ** 2
  exposure = area_um2 * t_ms / 1000.0                    # um^2 s of cell observed
  n_spark = max(1, rng.poisson(rng.lognormal(np.log(0.008), 0.7) * exposure))
  n_puff = rng.poisson(rng.lognormal(np.log(0.0015), 0.7) * exposure)
  n_wave = min(2, rng.poisson(0.4 * t_ms / 1740.0))
  def onset(lo_fr, hi_fr):
    hi = max(lo_fr + 1, n_frames - hi_fr)
    return rng.uniform(lo_fr, hi) * FRAME_MS
  events, sites = [], []
  for _ in range(n_spark):
    if sites and rng.random() < 0.2:                     # recurring spark site
      site = sites[rng.integers(len(sites))]
    else:
      site = _pick_site(rng, geo, on_zline=True)
    if site is None:
      break
    sites.append(site)
    rel_ms = float(np.clip(rng.lognormal(np.log(10.0), 0.35), 4, 30))
    events.append({"class": "spark", "t0_ms": onset(3, 8), "yx_um": site,
                   "dz_um": float(np.clip(rng.normal(0, 0.9), -2.0, 2.0)),
                   "dca_uM": float(rng.lognormal(np.log(0.45), 0.5)), "rel_ms": rel_ms,
                   "tau_ms": float(rng.uniform(12, 25)), "s0_um": float(rng.uniform(0.35, 0.6)),
                   "d_app_um2_ms": float(rng.uniform(0.008, 0.02))})
  for _ in range(n_puff):
    site = _pick_site(rng, geo, on_zline=False)
    if site is None:
      break
    rel_ms = float(np.clip(rng.lognormal(np.log(250.0), 0.6), 60, 1500))
    events.append({"class": "puff", "t0_ms": onset(3, 20), "yx_um": site,
                   "dz_um": float(np.clip(rng.normal(0, 0.9), -2.0, 2.0)),
                   "dca_uM": float(rng.lognormal(np.log(0.15), 0.5)), "rel_ms": rel_ms,
                   "tau_ms": float(rng.uniform(40, 90)), "s0_um": float(rng.uniform(0.8, 1.4)),
                   "d_app_um2_ms": float(rng.uniform(0.001, 0.004)),
                   "flux": _puff_flux(rng, rel_ms)})
  for _ in range(n_wave):
    k = rng.integers(len(geo["cells"]))
    cell = geo["cells"][k]
    w_um = geo["mask"].shape[1] * PIXEL_UM
    events.append({"class": "wave", "t0_ms": onset(5, 40), "cell": int(k),
                   "uv_um": (float(rng.uniform(-w_um / 2 - 20, w_um / 2 + 20)),
                             float(cell["v_centre_um"] + rng.uniform(-0.3, 0.3) * cell["width_um"])),
                   "speed_um_ms": float(rng.uniform(0.04, 0.15)),
                   "aniso": float(rng.uniform(0.6, 1.0)), "dca_uM": float(rng.lognormal(np.log(0.6), 0.35)),
                   "rel_ms": float(rng.uniform(20, 60)), "tau_ms": float(rng.uniform(100, 250)),
                   "dmax_um": float(rng.uniform(15, 200)), "jitter_ms": float(rng.uniform(3, 12))})
  events.sort(key=lambda e: e["t0_ms"])
  return events


def event_calcium(ev, geo, n_frames):
  """Apparent (PSF-blurred) free Ca2+ increment of one event on its bounding box.

  Returns (t_slice, y_slice, x_slice, dca (T', Y', X') float32)."""
  h, w = geo["mask"].shape
  t_fr = np.arange(n_frames) * FRAME_MS
  if ev["class"] == "wave":
    tt, a = _release_template(ev["rel_ms"], ev["tau_ms"])
    du = geo["u"] - ev["uv_um"][0]
    dv = geo["v"] - ev["uv_um"][1]
    d_um = np.sqrt(du ** 2 + (dv / ev["aniso"]) ** 2)
    rng = np.random.default_rng(int(ev["t0_ms"] * 1000))   # saltatory jitter of arrival
    t_arr = ev["t0_ms"] + d_um / ev["speed_um_ms"] + ev["jitter_ms"] * _smooth_noise(rng, (h, w), 5.0)
    amp = ev["dca_uM"] * np.exp(-np.maximum(d_um - ev["dmax_um"], 0) / 5.0)
    amp = amp * np.where(geo["cell_index"] == ev["cell"], geo["mask"], 0.0)
    f0 = int(ev["t0_ms"] // FRAME_MS)
    dca = amp[None] * np.interp(t_fr[f0:, None, None] - t_arr[None], tt, a, left=0.0, right=0.0)
    return slice(f0, n_frames), slice(0, h), slice(0, w), dca.astype(np.float32)
  tt, a = _release_template(ev["rel_ms"], ev["tau_ms"], ev.get("flux"))
  dur_ms = tt[-1] + 6 * FRAME_MS
  f0 = int(ev["t0_ms"] // FRAME_MS)
  f1 = min(n_frames, int((ev["t0_ms"] + dur_ms) // FRAME_MS) + 2)
  s_max = np.sqrt(ev["s0_um"] ** 2 + 2 * ev["d_app_um2_ms"] * (ev["rel_ms"] + ev["tau_ms"]) + 0.3)
  r_px = int(np.ceil((4 * s_max + 1.0) / PIXEL_UM))
  yc, xc = ev["yx_um"][0] / PIXEL_UM, ev["yx_um"][1] / PIXEL_UM
  ys = slice(max(0, int(yc) - r_px), min(h, int(yc) + r_px + 1))
  xs = slice(max(0, int(xc) - r_px), min(w, int(xc) + r_px + 1))
  yy, xx = np.mgrid[ys, xs].astype(np.float64) * PIXEL_UM
  r2 = (yy - ev["yx_um"][0]) ** 2 + (xx - ev["yx_um"][1]) ** 2
  t_rel = t_fr[f0:f1] - ev["t0_ms"]
  amp_t = np.interp(t_rel, tt, a, left=0.0, right=0.0)
  s2 = ev["s0_um"] ** 2 + 2 * ev["d_app_um2_ms"] * np.clip(t_rel, 0, ev["rel_ms"] + ev["tau_ms"])
  s2 = s2 + (0.3 * ev["dz_um"]) ** 2                     # out-of-focus events look wider
  s2_lat = s2 + LAT_PSF_SIGMA_UM ** 2                    # lateral PSF (Gaussian convolution)
  ax = np.sqrt(s2 / (s2 + AX_PSF_SIGMA_UM ** 2)) * np.exp(-ev["dz_um"] ** 2 / (2 * (s2 + AX_PSF_SIGMA_UM ** 2)))
  peak = ev["dca_uM"] * amp_t * ax * s2 / s2_lat
  dca = peak[:, None, None] * np.exp(-r2[None] / (2 * s2_lat[:, None, None]))
  dca = dca * geo["mask"][ys, xs][None]
  return slice(f0, f1), ys, xs, dca.astype(np.float32)


# ----------------------------------------------------------------------------- dye, detector
def dye_bound_fraction(ca_uM, kon_per_uM_ms, koff_per_ms, n_sub=4):
  """Bound fraction of the indicator, d f/dt = kon Ca (1 - f) - koff f, started at steady state;
  Ca2+ linearly interpolated between frames, exact exponential step per sub-step."""
  f = kon_per_uM_ms * ca_uM[0] / (kon_per_uM_ms * ca_uM[0] + koff_per_ms)
  out = np.empty_like(ca_uM)
  out[0] = f
  dt_ms = FRAME_MS / n_sub
  for t in range(1, len(ca_uM)):
    for k in range(n_sub):
      wgt = (k + 0.5) / n_sub
      c = (1 - wgt) * ca_uM[t - 1] + wgt * ca_uM[t]
      rate = kon_per_uM_ms * c + koff_per_ms
      fss = kon_per_uM_ms * c / rate
      f = fss + (f - fss) * np.exp(-rate * dt_ms)
    out[t] = f
  return out


def simulate_movie(rng, n_frames, height_px, width_px):
  shape = (n_frames, height_px, width_px)
  geo = make_cells(rng, height_px, width_px)
  dye = {"kd_uM": float(rng.uniform(0.8, 1.2)), "kon_per_uM_ms": float(rng.uniform(0.08, 0.15)),
         "fmax_over_fmin": float(rng.uniform(40, 100)), "ca_rest_uM": float(rng.uniform(0.08, 0.13))}
  kon = dye["kon_per_uM_ms"]
  koff = kon * dye["kd_uM"]
  ca_rest = dye["ca_rest_uM"]
  f_rest = ca_rest / (ca_rest + dye["kd_uM"])
  fmin_rel = 1.0 / (dye["fmax_over_fmin"] - 1.0)          # F = Fmin (1 + (Rf - 1) f)

  events = sample_events(rng, geo, n_frames)
  ca_total = np.full(shape, ca_rest, np.float32)
  cls_best = np.zeros((3,) + shape, np.float32)            # best own dF/F0 per class
  cls_id = np.zeros((3,) + shape, np.int32)
  ignore = np.zeros(shape, bool)
  records = []
  next_id = 1
  for ev in events:
    ts, ys, xs, dca = event_calcium(ev, geo, n_frames)
    if dca.size == 0 or dca.max() <= 0:
      continue
    ca_total[ts, ys, xs] += dca
    f_e = dye_bound_fraction(ca_rest + dca, kon, koff)
    dff = (f_e - f_rest) / (fmin_rel + f_rest)
    inside = geo["mask"][ys, xs][None] >= 0.5
    peak = float((dff * inside).max())
    rel = dff / max(peak, 1e-9)
    fg = rel >= LABEL_FRAC
    halo = (rel >= HALO_FRAC) & ~fg
    c = CLASS_IDS[ev["class"]] - 1
    faint = peak < MIN_PEAK_DFF
    rec = {"class": ev["class"], "class_id": c + 1, "peak_dff": round(peak, 4)}
    if faint:
      ignore[ts, ys, xs] |= fg | halo
      rec.update(id=0, ignored=True)
    else:
      ignore[ts, ys, xs] |= halo | (fg & ~inside)
      fg &= inside
      sub_best, sub_id = cls_best[c, ts, ys, xs], cls_id[c, ts, ys, xs]
      win = fg & (dff > sub_best)
      sub_best[win] = dff[win]
      sub_id[win] = next_id
      rec.update(id=next_id, ignored=False)
      next_id += 1
    ip = np.unravel_index(np.argmax(dff * inside), dff.shape)
    peak_frame = ts.start + int(ip[0])
    trace = dff[:, ip[1], ip[2]]
    fr_fg = np.flatnonzero(fg.any(axis=(1, 2)))
    rec.update(onset_frame=round(ev["t0_ms"] / FRAME_MS, 2), peak_frame=peak_frame,
               centre_yx_px=[int(ys.start + ip[1]), int(xs.start + ip[2])],
               fdhm_ms=round(float((trace >= 0.5 * peak).sum() * FRAME_MS), 1),
               duration_ms=round(float(len(fr_fg) * FRAME_MS), 1))
    if ev["class"] == "wave":
      rec["origin_uv_um"] = [round(v, 2) for v in ev["uv_um"]]
      rec["speed_um_per_s"] = round(ev["speed_um_ms"] * 1000, 1)
    else:
      rec["site_yx_px"] = [round(ev["yx_um"][0] / PIXEL_UM, 2), round(ev["yx_um"][1] / PIXEL_UM, 2)]
      s_um = np.sqrt(ev["s0_um"] ** 2 + 2 * ev["d_app_um2_ms"] * ev["rel_ms"] + LAT_PSF_SIGMA_UM ** 2)
      rec["ca_fwhm_um_at_release_end"] = round(float(2.355 * s_um), 2)
    rec["params"] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in ev.items()
                     if k not in ("class", "flux", "yx_um", "uv_um")}
    records.append(rec)

  # labels: per voxel the class with the largest own dF/F0, conflicts between classes -> ignore
  order = np.argsort(-cls_best, axis=0)
  best_c = order[0]
  best = np.take_along_axis(cls_best, best_c[None], 0)[0]
  second = np.take_along_axis(cls_best, order[1][None], 0)[0]
  labelled = best > 0
  conflict = labelled & (second >= CONFLICT_FRAC * best)
  labels = np.where(labelled, best_c + 1, 0).astype(np.uint8)
  instances = np.where(labelled, np.take_along_axis(cls_id, best_c[None], 0)[0], 0).astype(np.int32)
  amb = conflict | (ignore & ~labelled)
  labels[amb] = IGNORE
  instances[amb] = 0
  for rec in records:
    rec["n_voxels"] = int((instances == rec["id"]).sum()) if rec["id"] else 0

  # fluorescence: dye kinetics on the summed Ca2+, resting texture, bleaching, laser noise
  f_all = dye_bound_fraction(ca_total, kon, koff)
  ratio = (fmin_rel + f_all) / (fmin_rel + f_rest)
  rest_photons = float(rng.lognormal(np.log(12.0), 0.4))
  bg_photons = float(rng.uniform(0.3, 1.5))
  f0_map = ndimage.gaussian_filter(geo["texture"], LAT_PSF_SIGMA_UM / PIXEL_UM) * rest_photons
  tau_bleach_s = float(rng.uniform(5, 40))
  t_s = np.arange(n_frames) * FRAME_MS / 1000.0
  laser_rms = float(rng.uniform(0.003, 0.015))
  laser = 1 + laser_rms * _smooth_noise(rng, (n_frames,), 5.0)
  scale = (np.exp(-t_s / tau_bleach_s) * laser)[:, None, None]
  mean_photons = f0_map[None] * ratio * scale + bg_photons
  photons = rng.poisson(mean_photons)
  enf_shape = float(rng.uniform(3.0, 6.0))                 # excess noise factor 1 + 1/shape
  electrons = rng.gamma(photons * enf_shape) / enf_shape
  gain = float(rng.uniform(2.0, 5.0))
  read_adu = float(rng.uniform(1.0, 3.0))
  adu = CAMERA_OFFSET_ADU + gain * electrons + rng.normal(0, read_adu, shape)
  movie = np.clip(np.rint(adu), 0, 65535).astype(np.uint16)

  meta = {"camera_gain_adu_per_e": round(gain, 4), "read_noise_adu": round(read_adu, 3),
          "excess_noise_factor": round(1 + 1 / enf_shape, 3), "rest_photons_per_px": round(rest_photons, 3),
          "background_photons_per_px": round(bg_photons, 3), "bleach_tau_s": round(tau_bleach_s, 2),
          "laser_rms": round(laser_rms, 4), "dye": {k: round(v, 4) for k, v in dye.items()},
          "cells": geo["cells"], "cell_angle_deg": round(float(np.rad2deg(geo["angle_rad"])), 2),
          "sarcomere_um": round(geo["period_um"], 3), "label_rule": LABEL_RULE, "events": records}
  return {"movie_adu": movie, "labels": labels, "instances": instances, "meta": meta}
