"""Second (independent) simulator of single-view light-sheet volumes and fused targets.

Contract: ``simulate_volume(seed, tiny=False, **overrides) -> dict`` with
  view   uint16  [Z, Y, X] camera ADU of one view (offset 100 ADU, gain 2.17 ADU/e-),
  fused  float32 [Z, Y, X] target: the object through a near-isotropic PSF (FWHM 0.4 um
         xy, 0.9 um z), uniform with depth, high photons, arbitrary units,
  object float32 [Z, Y, X] the noise-free labelled structure on the output grid,
  meta   dict for the JSON sidecar.
Axes z (detection axis; depth into the sample grows with z), y, x; voxel (1.0, 0.5,
0.5) um. Everything is built on a 0.5 um isotropic grid and the view/target keep every
second plane (the light sheet selects planes 1 um apart).

Physics (README.md has the sources): a curved embryo surface over packed, size-graded,
multiplicatively weighted Voronoi cells (membrane label) or textured nuclei with dark
nucleoli and mosaic expression; yolk below. The view is the object times a one-sided
illumination (Gaussian-beam light sheet from x = 0 or x = end, its waist growing away
from focus and with path length in tissue, absorbed along x by tissue and a few dense
absorbers: shadows and stripes), times emission attenuation with depth, convolved with
(scalar Debye detection PSF x sheet profile), with the scattered fraction of light
(growing with depth) spread by a broad kernel; Poisson + sCMOS read noise per pixel.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from scipy import ndimage, signal, special
from scipy.spatial import cKDTree

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
from experiments.second_sim import common  # noqa: E402

VOXEL_UM = (1.0, 0.5, 0.5)
FINE_UM = 0.5                       # isotropic working grid
CAMERA_OFFSET_ADU = 100.0
CAMERA_GAIN_ADU_PER_E = 2.17
FUSED_FWHM_UM = (0.9, 0.4, 0.4)     # target PSF (z, y, x)
N_WATER = 1.333


def _shapes(tiny: bool):
  return (16, 48, 48) if tiny else (32, 96, 96)


# ---------------------------------------------------------------- PSF ----
def debye_psf(na: float, wavelength_um: float, n: float = N_WATER, half_z: int = 16,
              half_xy: int = 8, voxel_um: float = FINE_UM, supersample: int = 4):
  """Scalar Debye (Born & Wolf 8.8) wide-field detection PSF, aplanatic sqrt(cos)
  apodisation, integrated over [2 half_z + 1, 2 half_xy + 1, same] voxels; sums to 1.
  Returns (psf, lateral FWHM um, axial FWHM um, (z um, on-axis profile) on the fine grid).

  h(r, z) = |int_0^alpha sqrt(cos t) sin t J0(k n r sin t) exp(i k n z cos t) dt|^2."""
  alpha = np.arcsin(min(na / n, 0.999))
  theta = np.linspace(0, alpha, 400)
  k = 2 * np.pi / wavelength_um
  step = voxel_um / supersample
  zf = (np.arange((2 * half_z + 1) * supersample) - ((2 * half_z + 1) * supersample - 1) / 2
        ) * step
  xf = (np.arange((2 * half_xy + 1) * supersample) - ((2 * half_xy + 1) * supersample - 1)
        / 2) * step
  r_grid = np.linspace(0, np.sqrt(2) * xf.max() + step, 600)
  ap = np.sqrt(np.cos(theta)) * np.sin(theta)
  j0 = special.j0(k * n * r_grid[:, None] * np.sin(theta)[None])          # [r, t]
  phase = np.exp(1j * k * n * zf[:, None] * np.cos(theta)[None])          # [z, t]
  field = np.einsum("zt,rt->zr", phase * ap * (theta[1] - theta[0]), j0)
  h_rz = np.abs(field) ** 2                                               # [z, r]
  rr = np.sqrt(xf[:, None] ** 2 + xf[None, :] ** 2)
  h = np.stack([np.interp(rr, r_grid, h_rz[i]) for i in range(zf.size)])
  s = supersample
  h = h.reshape(2 * half_z + 1, s, 2 * half_xy + 1, s, 2 * half_xy + 1, s).sum((1, 3, 5))
  fine_lat = h_rz[zf.size // 2]
  fwhm_lat = 2 * np.interp(0.5, fine_lat[::-1] / fine_lat[0], r_grid[::-1])
  ax = h_rz[:, 0] / h_rz[:, 0].max()
  fwhm_ax = (ax >= 0.5).sum() * step
  return (h / h.sum()).astype(np.float64), float(fwhm_lat), float(fwhm_ax), (zf, ax)


def _fwhm_of(profile, step_um):
  p = profile / profile.max()
  return float((p >= 0.5).sum() * step_um)


# ------------------------------------------------------------- sample ----
def _seeds(rng, lo, hi, radius_fn, n_cand=5000):
  """Dart throwing in the box [lo, hi] um: candidates closer than 1.6 x their radius to
  an accepted seed are rejected; returns positions [n, 3] and radii [n]."""
  cand = rng.uniform(lo, hi, size=(n_cand, 3))
  rad = radius_fn(cand)
  keep_p, keep_r = [], []
  for p, r in zip(cand, rad):
    if np.isnan(r):
      continue
    if keep_p:
      d = np.linalg.norm(np.asarray(keep_p) - p, axis=1)
      if np.any(d < 0.8 * (r + np.asarray(keep_r))):
        continue
    keep_p.append(p)
    keep_r.append(r)
  return np.asarray(keep_p), np.asarray(keep_r)


def _object(rng, shape_f, label):
  """Fluorophore density [Zf, Y, X] on the 0.5 um grid, depth map [um] and absorption
  coefficient [1/um] (same grid), and a dict of geometry parameters."""
  zf, h, w = shape_f
  zz, yy, xx = [a * FINE_UM for a in np.meshgrid(np.arange(zf), np.arange(h), np.arange(w),
                                                 indexing="ij")]
  r_emb = rng.uniform(60, 220)                        # embryo radius, um
  yc = h * FINE_UM / 2 + rng.uniform(-25, 25)
  xc = w * FINE_UM / 2 + rng.uniform(-25, 25)
  z_top = rng.uniform(-15, 4)                         # apex depth of the surface, um
  rho2 = (yy[0] - yc) ** 2 + (xx[0] - xc) ** 2
  surf = z_top + r_emb - np.sqrt(np.maximum(r_emb ** 2 - rho2, 0))         # [Y, X]
  depth = zz - surf[None]                                                   # um
  d_yolk = rng.uniform(25, 60)
  r_surf, r_deep = rng.uniform(2.8, 4.5), rng.uniform(4.5, 7.5)

  def radius_fn(p):
    s = z_top + r_emb - np.sqrt(np.maximum(
        r_emb ** 2 - (p[:, 1] - yc) ** 2 - (p[:, 2] - xc) ** 2, 0))
    d = p[:, 0] - s
    r = r_surf + (r_deep - r_surf) * np.clip(d / 25, 0, 1)
    r = r * rng.uniform(0.8, 1.2, size=r.shape)
    return np.where((d > -1) & (d < d_yolk + 3), r, np.nan)

  ext = np.array([zf, h, w]) * FINE_UM
  pos, rad = _seeds(rng, -6.0, ext + 6.0, radius_fn)
  pts = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], 1)
  dist, idx = cKDTree(pos).query(pts, k=min(4, len(pos)))
  q = dist / rad[idx]                                 # multiplicatively weighted
  order = np.argsort(q, axis=1)
  q1 = np.take_along_axis(q, order[:, :1], 1)[:, 0]
  q2 = np.take_along_axis(q, order[:, 1:2], 1)[:, 0]
  i1 = np.take_along_axis(idx, order[:, :1], 1)[:, 0]
  i2 = np.take_along_axis(idx, order[:, 1:2], 1)[:, 0]
  gap_um = (q2 - q1) * (rad[i1] + rad[i2]) / 4        # ~ distance to the cell boundary
  inside = (depth >= 0) & (depth <= d_yolk)
  bright = rng.uniform(0.6, 1.4, size=len(pos))
  tex = ndimage.gaussian_filter(rng.standard_normal(shape_f), 1.0)
  tex /= max(tex.std(), 1e-9)
  if label == "uniform":                                 # test phantom: dye-filled sample
    obj = np.where(inside, 1.0, 0.0)
    params = {}
  elif label == "membranes":
    sig = rng.uniform(0.25, 0.35)
    memb = np.exp(-gap_um ** 2 / (2 * sig ** 2)).reshape(shape_f)
    pair = ((bright[i1] + bright[i2]) / 2).reshape(shape_f)
    obj = memb * pair * np.clip(1 + 0.25 * tex, 0.2, None) * inside
    obj += 1.2 * np.exp(-depth ** 2 / (2 * sig ** 2)) * (depth > -2)      # apical surface
    params = dict(membrane_sigma_um=sig)
  else:
    obj = np.zeros(shape_f)
    expressed = rng.random(len(pos)) < rng.uniform(0.7, 1.0)            # mosaic
    cell_of = i1.reshape(shape_f)
    for j in np.nonzero(expressed)[0]:
      mitotic = rng.random() < 0.04
      axes_um = rad[j] * rng.uniform(0.45, 0.62) * rng.uniform(0.85, 1.15, 3)
      axes_um *= 0.6 if mitotic else 1.0
      rot = _random_rotation(rng)
      c = pos[j] + rng.normal(0, 0.3, 3)
      lo = np.maximum(((c - axes_um.max() - 1) / FINE_UM).astype(int), 0)
      hi = np.minimum(((c + axes_um.max() + 1) / FINE_UM).astype(int) + 1, shape_f)
      if np.any(hi <= lo):
        continue
      box = tuple(slice(a, b) for a, b in zip(lo, hi))
      rel = np.stack([zz[box] - c[0], yy[box] - c[1], xx[box] - c[2]], -1) @ rot.T
      qn = np.sqrt(((rel / axes_um) ** 2).sum(-1))
      inten = 1 / (1 + np.exp((qn - 1) * axes_um.min() / 0.15))          # soft edge
      for _ in range(rng.integers(1, 4) if not mitotic else 0):          # nucleoli
        nc = rng.normal(0, 0.35, 3) * axes_um
        rn = rng.uniform(0.2, 0.32) * axes_um.min()
        dn = np.sqrt(((rel - nc) ** 2).sum(-1))
        inten *= 1 - 0.75 / (1 + np.exp((dn - rn) / 0.12))
      inten *= bright[j] * (2.5 if mitotic else 1.0) * (cell_of[box] == j)
      obj[box] = np.maximum(obj[box], inten)
    obj *= np.clip(1 + 0.35 * tex, 0.1, None) * inside
    params = dict(fraction_expressing=float(expressed.mean()))
  obj += 0.02 * (depth >= 0)                                               # autofluor.
  yolk = depth > d_yolk
  obj += yolk * rng.uniform(0.03, 0.08) * np.clip(1 + 0.5 * tex, 0, None)
  # absorption [1/um]: tissue, yolk and a few dense granules (shadow casters)
  mu = (depth >= 0) * rng.uniform(0.004, 0.015) + yolk * rng.uniform(0.01, 0.03)
  n_abs = int(rng.integers(3, 13))                      # dense bodies, 0.8-3 um
  n_gran = int(rng.integers(20, 80))                    # small granules: thin stripes
  for i in range(n_abs + n_gran):
    c = rng.uniform([0, 0, 0], ext)
    ra = rng.uniform(0.8, 3.0) if i < n_abs else rng.uniform(0.3, 0.8)
    lo = np.maximum(((c - ra) / FINE_UM).astype(int), 0)
    hi = np.minimum(((c + ra) / FINE_UM).astype(int) + 2, shape_f)
    if np.any(hi <= lo):
      continue
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    mu[box] += rng.uniform(0.15, 0.6 if i < n_abs else 1.0) * (
        ((zz[box] - c[0]) ** 2 + (yy[box] - c[1]) ** 2 + (xx[box] - c[2]) ** 2)
        < ra ** 2) * (depth[box] >= 0)
  params.update(embryo_radius_um=r_emb, surface_apex_depth_um=z_top, yolk_depth_um=d_yolk,
                cell_radius_surface_um=r_surf, cell_radius_deep_um=r_deep,
                n_cells=len(pos), n_absorbers=n_abs, n_granules=n_gran)
  return obj.astype(np.float32), depth.astype(np.float32), mu.astype(np.float32), params


def _random_rotation(rng):
  q, r = np.linalg.qr(rng.standard_normal((3, 3)))
  return q * np.sign(np.diag(r))


# ------------------------------------------------------------ imaging ----
def _illumination(rng, mu, shape_f, from_left: bool):
  """Transmission of the one-sided sheet [Zf, Y, X]: exp(-cumulative absorption along
  the propagation direction), softened by a little beam divergence/scattering; plus the
  tissue path before the field (random, um) added to it."""
  mu_dir = mu if from_left else mu[:, :, ::-1]
  pre_um = rng.uniform(0, 40)
  od = np.cumsum(mu_dir, axis=2) * FINE_UM + pre_um * float(mu_dir[mu_dir > 0].min()
                                                             if (mu_dir > 0).any() else 0)
  trans = np.exp(-od)
  trans = ndimage.gaussian_filter(trans, (1.0, 1.0, 0))    # divergence smooths shadows
  return trans if from_left else trans[:, :, ::-1], pre_um


def _sheet_bands(w0_um, zr_um, x_um, focus_um, tissue_um, beta, n_bands):
  """Sheet 1/e^2 half-width at band centres along x (Gaussian beam + scattering
  thickening), and the per-x linear interpolation weights [n_bands, X]."""
  edges = np.linspace(x_um.min(), x_um.max(), n_bands)
  w = np.sqrt(w0_um ** 2 * (1 + ((edges - focus_um) / zr_um) ** 2)
              + (beta * (tissue_um + edges - x_um.min())) ** 2)
  wts = np.zeros((n_bands, x_um.size))
  pos = np.interp(x_um, edges, np.arange(n_bands))
  lo = np.floor(pos).astype(int).clip(0, n_bands - 1)
  hi = np.minimum(lo + 1, n_bands - 1)
  frac = pos - lo
  np.add.at(wts, (lo, np.arange(x_um.size)), 1 - frac)
  np.add.at(wts, (hi, np.arange(x_um.size)), frac)
  return w, wts


def simulate_volume(seed, tiny: bool = False, shape=None, label: str | None = None,
                    peak_photons: float | None = None) -> dict:
  """One view + fused target (module docstring); ``seed``: int or numpy Generator."""
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  z, h, w = shape or _shapes(tiny)
  shape_f = (2 * z, h, w)
  if label is None:                       # int seeds alternate: even nuclei, odd membranes
    odd = seed % 2 if isinstance(seed, (int, np.integer)) else rng.random() < 0.5
    label = "membranes" if odd else "nuclei"
  obj, depth, mu, geo = _object(rng, shape_f, label)
  # detection PSF and the one-sided light sheet
  na = rng.uniform(0.8, 1.1)
  lam_em, lam_ex = rng.uniform(0.50, 0.60), 0.488
  psf, fwhm_lat, fwhm_ax, (z_fine, axial) = debye_psf(na, lam_em)
  w0 = rng.uniform(1.8, 3.5)                                # 1/e^2 waist, um
  zr = np.pi * w0 ** 2 * N_WATER / lam_ex
  from_left = bool(rng.random() < 0.5)
  x_um = np.arange(w) * FINE_UM
  x_prop = x_um if from_left else x_um[::-1]                # distance along the beam
  focus = rng.uniform(0.2, 0.8) * x_um.max()
  trans, pre_um = _illumination(rng, mu, shape_f, from_left)
  beta = rng.uniform(0.02, 0.06)                            # sheet thickening per um
  widths, wts = _sheet_bands(w0, zr, np.sort(x_prop), focus, pre_um, beta, 4)
  if not from_left:
    wts = wts[:, ::-1]
  # emission attenuation and scattering with depth (detection side)
  l_abs, l_sca = rng.uniform(40, 120), rng.uniform(25, 70)
  dpos = np.maximum(depth, 0)
  emit = obj * trans * np.exp(-dpos / l_abs)
  dz = (np.arange(psf.shape[0]) - psf.shape[0] // 2) * FINE_UM
  view_clean = np.zeros(shape_f)
  for b, wb in enumerate(widths):
    kern = psf * np.exp(-2 * dz ** 2 / wb ** 2)[:, None, None] * (w0 / wb)
    view_clean += wts[b][None, None, :] * signal.fftconvolve(emit, kern, mode="same")
  # refractive-index mismatch: an axial spread growing with depth (Gibson & Lanni 1991)
  l_ab, sigma_ab = rng.uniform(10, 30), rng.uniform(0.8, 1.6)
  aberr = 1 - np.exp(-dpos / l_ab)
  view_clean = (1 - aberr) * view_clean + aberr * ndimage.gaussian_filter1d(
      view_clean, sigma_ab / FINE_UM, axis=0)
  # scattering: the ballistic fraction exp(-d / l_s) keeps the image, the rest is a halo
  ballistic = np.exp(-dpos / l_sca)
  sigma_sc = rng.uniform(2.0, 4.0)                          # um, scattered-light halo
  halo = ndimage.gaussian_filter(view_clean, sigma_sc / FINE_UM)
  view_clean = ballistic * view_clean + (1 - ballistic) * halo
  view_clean = view_clean[::2]                              # planes 1 um apart
  # camera: few photons, sCMOS read noise per pixel (log-normal rms)
  peak_e = peak_photons or rng.uniform(15, 70)
  scale = peak_e / max(np.percentile(view_clean, 99.5), 1e-9)
  bg_e = rng.uniform(1.0, 4.0)
  read_e = np.exp(rng.normal(np.log(1.3), 0.35, size=(h, w)))
  view = common.to_adu(view_clean * scale + bg_e, rng, CAMERA_OFFSET_ADU,
                       CAMERA_GAIN_ADU_PER_E, read_e)
  # fused target: near-isotropic Gaussian PSF, no attenuation, ~2000 photons at peak
  sig = np.array(FUSED_FWHM_UM) / (2 * np.sqrt(2 * np.log(2))) / FINE_UM
  fused_clean = ndimage.gaussian_filter(obj.astype(np.float64), sig)[::2]
  fscale = 2000.0 / max(np.percentile(fused_clean, 99.8), 1e-9)
  fused = (rng.poisson(fused_clean * fscale) / 2000.0).astype(np.float32)
  eff_ax = _fwhm_of(axial * np.exp(-2 * z_fine ** 2 / widths.min() ** 2),  # at focus,
                    z_fine[1] - z_fine[0])                 # before depth effects
  meta = dict(
      simulator="experiments/second_sim/fusion_sim.py", seed=_seed_of(seed),
      shape_zyx=[z, h, w], axes="ZYX", voxel_size_um=list(VOXEL_UM), label=label,
      camera_offset_adu=CAMERA_OFFSET_ADU, camera_gain_adu_per_e=CAMERA_GAIN_ADU_PER_E,
      read_noise_e_median=float(np.median(read_e)), background_e=float(bg_e),
      peak_photons_e=float(peak_e),
      psf=dict(model="scalar Debye (Born & Wolf), sqrt(cos) apodisation, water",
               na=float(na), n=N_WATER, wavelength_em_um=float(lam_em),
               detection_fwhm_xy_um=fwhm_lat, detection_fwhm_z_um=fwhm_ax,
               sheet_waist_1e2_um=float(w0), sheet_rayleigh_um=float(zr),
               sheet_focus_um=float(focus), sheet_widths_1e2_um=widths.tolist(),
               sheet_thickening_per_um=float(beta),
               system_fwhm_z_um_at_focus=eff_ax,
               illumination_from="x=0" if from_left else "x=end",
               tissue_before_field_um=float(pre_um)),
      attenuation=dict(emission_absorption_length_um=float(l_abs),
                       scattering_length_um=float(l_sca),
                       scattered_halo_sigma_um=float(sigma_sc),
                       aberration_length_um=float(l_ab),
                       aberration_axial_sigma_um=float(sigma_ab)),
      fused=dict(psf_fwhm_um_zyx=list(FUSED_FWHM_UM), photons_at_p99_8=2000.0,
                 units="arbitrary (photons / 2000)"),
      sample={k: (float(v) if not isinstance(v, str) else v) for k, v in geo.items()})
  return dict(view=view, fused=fused, object=obj[::2].astype(np.float32),
              depth_um=depth[::2],
              view_clean_e=(view_clean * scale).astype(np.float32), meta=meta)


def _seed_of(seed):
  return int(seed) if not isinstance(seed, np.random.Generator) else None


def write_volume_files(out_dir: str, name: str, seed, tiny: bool = False, **kw) -> str:
  """NAME_view.tif (uint16 ADU), NAME_fused.tif (float32), NAME.json; a summary line."""
  sim = simulate_volume(seed, tiny=tiny, **kw)
  base = os.path.join(out_dir, name)
  common.write_imagej(base + "_view.tif", sim["view"], "ZYX", VOXEL_UM[1],
                      spacing_um=VOXEL_UM[0])
  common.write_imagej(base + "_fused.tif", sim["fused"], "ZYX", VOXEL_UM[1],
                      spacing_um=VOXEL_UM[0])
  common.write_json(base + ".json", sim["meta"])
  m = sim["meta"]
  return (f"{name}: {sim['view'].shape} {m['label']} NA={m['psf']['na']:.2f} "
          f"peak={m['peak_photons_e']:.0f} e- light from {m['psf']['illumination_from']}")


def main(argv=None) -> int:
  return common.cli("Second-simulator light-sheet views and fused targets (issue 23).",
                    "fusion", write_volume_files, argv)


if __name__ == "__main__":
  sys.exit(main())
