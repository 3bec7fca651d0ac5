"""Physics of the third light-sheet simulator: one raw view and its fused target (test data).

Contract: ``simulate_volume(rng, shape_zyx, label) -> {"view_adu", "fused", "meta"}`` with
  view_adu  uint16 (Z, Y, X): one single-sided light-sheet view, z = detection axis = stack axis
  fused     float32 (Z, Y, X): the multiview-fused target on the same voxel grid (photon units)
  meta      dict: voxel size, camera, every drawn parameter (JSON-serialisable)
Pure numpy/scipy; all randomness from ``rng`` (np.random.Generator). Lengths in um.

Pipeline (README.md gives the sources):
  sample (power-Voronoi cells in a spherical embryo, lumens, nuclei/membranes, anti-aliased)
  -> illumination: one-sided Gaussian or scanned-Bessel sheet, ballistic fraction exp(-path/ls_ex),
     absorption shadows (cumulative object density along the beam), scattered diffuse excitation
  -> detection: scalar Debye PSF (Richards-Wolf integral) with depth-dependent spherical
     aberration from the refractive-index mismatch (Gibson-Lanni sample term), emission loss
     exp(-depth/ls_em) and a scattered lateral halo
  -> camera: sCMOS (pixel-dependent offset, gain, read noise) or EMCCD (gamma EM gain).
  fused = object convolved with a near-isotropic PSF (Debye NA_f laterally x Gaussian axially),
  high photon count with its own Poisson and read noise; no attenuation, no shadows.
"""
import numpy as np
from scipy import fft as sfft
from scipy import ndimage, special
from scipy.spatial import cKDTree

KERNEL_XY = 63          # lateral kernel size (px, odd)
LAMBDA_EX_UM = 0.488


def _smooth_noise(rng, shape, sigma_vox):
  """Zero-mean, unit-variance Gaussian random field smoothed with ``sigma_vox`` (per axis)."""
  a = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
  return (a - a.mean()) / (a.std() + 1e-8)


def _random_rotation(rng):
  q, r = np.linalg.qr(rng.standard_normal((3, 3)))
  return q * np.sign(np.diag(r))


def _soft_step(signed_um, sigma_um):
  """Voxel-averaged step (erf edge): 1 inside (signed distance > 0), 0 outside."""
  return 0.5 * (1.0 + special.erf(signed_um / (np.sqrt(2.0) * sigma_um)))


def _aa_sigma(normal, vox, base_um):
  """Edge/sheet width after averaging over a voxel along the surface normal: base^2 + sum (n_i d_i)^2 / 12."""
  return np.sqrt(base_um ** 2 + sum((normal[..., i] * vox[i]) ** 2 for i in range(3)) / 12.0)


# --------------------------------------------------------------------------- sample
def draw_sample_params(rng, label, field_depth_um):
  r_um = float(rng.uniform(80, 300))
  deepest = min(150.0, 1.6 * r_um - field_depth_um)                  # keep the field inside the embryo
  return {
      "embryo_radius_um": r_um,
      "apex_offset_yx_um": [float(v) for v in rng.uniform(-40, 40, 2)],
      "field_top_depth_um": float(rng.uniform(-8, 12) if rng.random() < 0.3 else rng.uniform(12, deepest)),
      "cell_radius_median_um": float(rng.uniform(3.2, 6.0)),   # cell diameters ~5-20 um
      "cell_radius_log_sigma": float(rng.uniform(0.15, 0.35)),
      "n_lumens": int(rng.choice([0, 0, 1, 2])),
      "cell_brightness_log_sigma": float(rng.uniform(0.2, 0.5)),
      "dim_cell_fraction": float(rng.uniform(0.0, 0.15)),
      "mitotic_fraction": float(rng.uniform(0.02, 0.1)),
      "membrane_sigma_um": float(rng.uniform(0.15, 0.3)),
      "membrane_unevenness_log_sigma": float(rng.uniform(0.25, 0.6)),
      "membrane_gap_fraction": float(rng.uniform(0.0, 0.25)),
      "surface_membrane_gain": float(rng.uniform(1.0, 2.0)),
      "cytoplasm_level": float(rng.uniform(0.02, 0.08)),
      "chromatin_texture": float(rng.uniform(0.1, 0.3)),
      "label": label,
  }


def render_sample(rng, sp, shape, vox):
  """Object density (Z, Y, X) in arbitrary units, nuclei or membranes, voxel-averaged edges.
  Returns (obj, geometry dict with depth below the surface and embryo/ray helpers)."""
  nz, ny, nx = shape
  dz, dy, dx = vox
  R = sp["embryo_radius_um"]
  ay, ax = sp["apex_offset_yx_um"]
  zc = (np.arange(nz) + 0.5) * dz + sp["field_top_depth_um"]       # depth of plane below the apex plane
  yc = (np.arange(ny) - ny / 2 + 0.5) * dy
  xc = (np.arange(nx) - nx / 2 + 0.5) * dx
  Z, Y, X = np.meshgrid(zc, yc, xc, indexing="ij")
  P = np.stack([Z, Y, X], -1).astype(np.float32)
  centre = np.array([R, ay, ax], np.float32)
  rad = np.linalg.norm(P - centre, axis=-1)
  rho2 = (Y - ay) ** 2 + (X - ax) ** 2
  surf_z = R - np.sqrt(np.maximum(R ** 2 - rho2, 0.0))             # detection-side surface
  depth_um = np.clip(Z - surf_z, 0.0, None).astype(np.float32)
  inside_d = R - rad                                                 # > 0 inside the embryo
  n_surf = (P - centre) / np.maximum(rad, 1e-6)[..., None]

  lumens, lumen_d, lumen_n = [], np.full(shape, 1e3, np.float32), np.zeros(shape + (3,), np.float32)
  lo, hi = P.reshape(-1, 3).min(0), P.reshape(-1, 3).max(0)
  for _ in range(sp["n_lumens"]):
    c = rng.uniform(lo, hi)
    radii = rng.uniform(5, 18, 3)
    rot = _random_rotation(rng)
    u = (P - c) @ rot
    f = np.sqrt(((u / radii) ** 2).sum(-1))
    d = ((f - 1.0) * radii.min()).astype(np.float32)               # approx signed distance, > 0 outside
    g = (u / radii ** 2) @ rot.T
    g /= np.linalg.norm(g, axis=-1, keepdims=True) + 1e-9
    closer = d < lumen_d
    lumen_d = np.where(closer, d, lumen_d)
    lumen_n = np.where(closer[..., None], g, lumen_n)
    lumens.append({"centre_zyx_um": [float(v) for v in c], "radii_um": [float(v) for v in radii]})

  # seeds: random sequential addition with log-normal radii (weights of a power diagram)
  margin = 12.0
  blo, bhi = lo - margin, hi + margin
  n_try = int(np.prod(bhi - blo) / (4.0 / 3 * np.pi * sp["cell_radius_median_um"] ** 3) * 3)
  cand = rng.uniform(blo, bhi, (n_try, 3))
  crad = np.clip(sp["cell_radius_median_um"] * np.exp(sp["cell_radius_log_sigma"] * rng.standard_normal(n_try)), 2.5, 10)
  seeds, srad = [], []
  for p, r in zip(cand, crad):
    if seeds:
      dd = np.linalg.norm(np.asarray(seeds) - p, axis=1)
      if np.any(dd < 0.85 * (np.asarray(srad) + r)):
        continue
    if np.linalg.norm(p - centre) > R - 1.0:
      continue
    seeds.append(p)
    srad.append(r)
  seeds = np.asarray(seeds, np.float32).reshape(-1, 3)
  srad = np.asarray(srad, np.float32)
  if len(seeds) < 2:                                                # field outside the embryo: empty
    seeds = np.array([[1e4, 0, 0], [1e4 + 10, 0, 0]], np.float32)
    srad = np.array([4.0, 4.0], np.float32)
  tree = cKDTree(seeds)
  k = min(8, len(seeds))
  _, idx = tree.query(P.reshape(-1, 3), k=k)
  pw = ((P.reshape(-1, 1, 3) - seeds[idx]) ** 2).sum(-1) - srad[idx] ** 2
  order = np.argsort(pw, axis=1)[:, :2]
  i1 = np.take_along_axis(idx, order[:, :1], 1)[:, 0]
  i2 = np.take_along_axis(idx, order[:, 1:2], 1)[:, 0]
  p1 = np.take_along_axis(pw, order[:, :1], 1)[:, 0]
  p2 = np.take_along_axis(pw, order[:, 1:2], 1)[:, 0]
  sep = seeds[i2] - seeds[i1]
  sepn = np.linalg.norm(sep, axis=1) + 1e-6
  wall_d = ((p2 - p1) / (2 * sepn)).reshape(shape)                  # distance to the power-cell face
  wall_n = (sep / sepn[:, None]).reshape(shape + (3,))
  cell = i1.reshape(shape)
  cell2 = i2.reshape(shape)

  n_cells = len(seeds)
  bright = np.exp(sp["cell_brightness_log_sigma"] * rng.standard_normal(n_cells))
  bright[rng.random(n_cells) < sp["dim_cell_fraction"]] *= rng.uniform(0.1, 0.3)
  tissue = _soft_step(inside_d, _aa_sigma(n_surf, vox, 0.2)) * _soft_step(lumen_d, _aa_sigma(lumen_n, vox, 0.2))

  nuc = np.zeros(shape, np.float32)
  nuc_mask = np.zeros(shape, np.float32)
  mitotic = rng.random(n_cells) < sp["mitotic_fraction"]
  sigma_vox = [0.6 / v for v in vox]
  tex = _smooth_noise(rng, shape, sigma_vox)
  for i in np.unique(cell):
    c = seeds[i] + rng.normal(0, 0.4, 3)
    rot = _random_rotation(rng)
    if mitotic[i]:                                                  # condensed chromatin: 1-2 plates
      radii = np.array([rng.uniform(3, 4.5), rng.uniform(3, 4.5), rng.uniform(0.8, 1.3)])
      sep_um = rng.uniform(5, 8) if rng.random() < 0.3 else 0.0
      centres = [c - rot[:, 2] * sep_um / 2, c + rot[:, 2] * sep_um / 2] if sep_um else [c]
      level = rng.uniform(1.5, 2.3)
    else:
      radii = srad[i] * rng.uniform(0.6, 0.75) * np.array([1.0, rng.uniform(0.75, 1.0), rng.uniform(0.6, 0.9)])
      centres, level = [c], 1.0
    ext = radii.max() + 1.5 + (sep_um / 2 if mitotic[i] else 0)
    sl = tuple(slice(max(0, int(np.floor((cc - ext - o) / v))), max(0, int(np.ceil((cc + ext - o) / v)) + 1))
               for cc, o, v in zip(c, (zc[0] - dz / 2, yc[0] - dy / 2, xc[0] - dx / 2), vox))
    Pb = P[sl]
    if Pb.size == 0:
      continue
    val = np.zeros(Pb.shape[:3], np.float32)
    for cc in centres:
      u = (Pb - cc) @ rot
      f = np.sqrt(((u / radii) ** 2).sum(-1))
      g = (u / radii ** 2) @ rot.T
      g /= np.linalg.norm(g, axis=-1, keepdims=True) + 1e-9
      val = np.maximum(val, _soft_step((1 - f) * radii.min(), _aa_sigma(g, vox, 0.15)))
    own = (cell[sl] == i) * _soft_step(wall_d[sl] - 0.4, _aa_sigma(wall_n[sl], vox, 0.15))
    val *= own
    if not mitotic[i]:                                              # nucleoli: dark holes in a histone label
      for _ in range(rng.integers(1, 4)):
        cn = c + rot @ (rng.uniform(-0.45, 0.45, 3) * radii)
        rn = rng.uniform(0.5, 1.3)
        dn = np.linalg.norm(Pb - cn, axis=-1)
        val *= 1.0 - rng.uniform(0.5, 0.8) * _soft_step(rn - dn, _aa_sigma((Pb - cn) / (dn[..., None] + 1e-6), vox, 0.15))
    nuc_mask[sl] = np.maximum(nuc_mask[sl], val)
    nuc[sl] = np.maximum(nuc[sl], val * level * bright[i])
  cyto = sp["cytoplasm_level"] * bright[cell]

  if sp["label"] == "nuclei":
    obj = nuc * (1.0 + sp["chromatin_texture"] * tex) + cyto * (1 - nuc_mask)
  else:
    sm = sp["membrane_sigma_um"]
    uneven = np.exp(sp["membrane_unevenness_log_sigma"] * _smooth_noise(rng, shape, [1.5 / v for v in vox]))
    gaps = _soft_step(_smooth_noise(rng, shape, [1.0 / v for v in vox]) + 1.6 - 3.2 * sp["membrane_gap_fraction"], 0.3)
    amp = uneven * (0.25 + 0.75 * gaps)

    def sheet(d, n):
      s = _aa_sigma(n, vox, sm)
      return (sm / s) * np.exp(-0.5 * (d / s) ** 2)
    walls = sheet(wall_d, wall_n) * 0.5 * (bright[cell] + bright[cell2])
    walls *= tissue
    outer = sp["surface_membrane_gain"] * (sheet(inside_d, n_surf) + sheet(lumen_d, lumen_n)) * bright[cell]
    obj = amp * (walls + outer) + cyto * (1 - nuc_mask) * tissue
  obj = np.clip(obj, 0, None) * (1.0 if sp["label"] == "membranes" else tissue)
  geo = {"depth_um": depth_um, "P": P, "centre": centre, "R": R, "plane_depth_um": zc,
         "n_cells": int(len(np.unique(cell))), "n_mitotic": int(mitotic[np.unique(cell)].sum()), "lumens": lumens}
  return obj.astype(np.float32), geo


# --------------------------------------------------------------------------- optics
def _pixel_map(px_um, n_r, dr_um, sub=5):
  """Matrix (KERNEL_XY^2, n_r) averaging a radial profile over each camera pixel (sub x sub points)."""
  h = KERNEL_XY // 2
  off = (np.arange(sub) + 0.5) / sub - 0.5
  g = (np.arange(-h, h + 1)[:, None] + off[None, :]).ravel() * px_um
  r = np.sqrt(g[:, None] ** 2 + g[None, :] ** 2) / dr_um                 # (K*sub, K*sub)
  r = r.reshape(KERNEL_XY, sub, KERNEL_XY, sub).transpose(0, 2, 1, 3).reshape(KERNEL_XY ** 2, sub * sub)
  i0 = np.clip(np.floor(r).astype(int), 0, n_r - 2)
  t = np.clip(r - i0, 0, 1)
  M = np.zeros((KERNEL_XY ** 2, n_r), np.float32)
  rows = np.repeat(np.arange(KERNEL_XY ** 2), sub * sub)
  np.add.at(M, (rows, i0.ravel()), (1 - t).ravel() / sub ** 2)
  np.add.at(M, (rows, i0.ravel() + 1), t.ravel() / sub ** 2)
  return M


def debye_psf(dz_list_um, na, n_imm, n_sample, lam_um, depth_um, px_um, n_rho=160, focus_shift_um=0.0):
  """Scalar Debye (Richards-Wolf) intensity PSF at axial offsets ``dz_list_um``, pixel-averaged,
  shape (len(dz), KERNEL_XY, KERNEL_XY); in-focus plane of the unaberrated PSF sums to 1.
  Aberration: Gibson-Lanni sample-layer term k0 d [sqrt(ns^2 - (NA rho)^2) - sqrt(ni^2 - (NA rho)^2)]
  with its best-fit defocus and piston removed, plus a detection focus offset ``focus_shift_um``
  from the sheet (the part of the index-mismatch focal shift that the stack does not follow)."""
  rho = (np.arange(n_rho) + 0.5) / n_rho
  s = na * rho
  k0 = 2 * np.pi / lam_um
  ci = np.sqrt(n_imm ** 2 - s ** 2)
  apod = np.sqrt(ci / n_imm)                                        # aplanatic sqrt(cos theta)
  w = rho * apod / n_rho
  opd = depth_um * (np.sqrt(n_sample ** 2 - s ** 2) - ci)
  A = np.stack([np.ones_like(rho), ci], 1) * np.sqrt(rho)[:, None]
  coef = np.linalg.lstsq(A, opd * np.sqrt(rho), rcond=None)[0]
  W = k0 * (opd - coef[0] - coef[1] * ci + focus_shift_um * ci)
  Wm = W - np.sum(rho * W) / rho.sum()                               # piston does not change the PSF
  rms_waves = float(np.sqrt(np.sum(rho * (Wm / (2 * np.pi)) ** 2) / rho.sum()))
  dr = 0.02
  rmax = KERNEL_XY / 2 * px_um * 1.5
  r = np.arange(0, rmax + dr, dr)
  J = special.j0(k0 * np.outer(r, s))                                # (n_r, n_rho)
  phase = np.exp(1j * (k0 * np.outer(ci, dz_list_um) + W[:, None]))  # (n_rho, n_z)
  E = J @ (w[:, None] * phase)
  I_r = (np.abs(E) ** 2).T                                           # (n_z, n_r)
  I0 = (np.abs(J @ w) ** 2)                                          # unaberrated focus, for normalisation
  M = _pixel_map(px_um, len(r), dr)
  psf = (I_r @ M.T).reshape(len(dz_list_um), KERNEL_XY, KERNEL_XY)
  return psf / (M @ I0).sum(), rms_waves


def sheet_profile(dz_um, sp):
  """Time-averaged excitation across the sheet (integral 1 over dz), for the ballistic beam."""
  if sp["sheet_type"] == "gaussian":
    w = sp["_w_um"]
    return np.sqrt(2 / np.pi) / w * np.exp(-2 * dz_um ** 2 / w ** 2)
  kr = 2.25 / sp["bessel_core_fwhm_um"]                               # J0^2 FWHM = 2.25 / kr
  t = np.arange(-4 * sp["bessel_envelope_um"], 4 * sp["bessel_envelope_um"], 0.05)
  rr = np.sqrt(dz_um[:, None] ** 2 + t[None, :] ** 2)
  prof = (special.j0(kr * rr) ** 2 * np.exp(-rr ** 2 / (2 * sp["bessel_envelope_um"] ** 2))).sum(1)
  tz = np.arange(-40, 40, 0.01)
  rz = np.sqrt(tz[:, None] ** 2 + t[None, :] ** 2)
  norm = (special.j0(kr * rz) ** 2 * np.exp(-rz ** 2 / (2 * sp["bessel_envelope_um"] ** 2))).sum() * 0.01
  return prof / norm


def voxel_kernels(sp, vox, depths_um, sheet_widths_um):
  """Light-sheet kernels K[a][b] (2Kz+1, K, K): Debye PSF at depth a times sheet b, both integrated
  over the voxel's z extent (sub-planes); sum over a kernel ~ excited fraction of the voxel."""
  dz = vox[0]
  kz = int(np.ceil(12.0 / dz))
  ns = int(np.ceil(dz / 0.4))
  sub = (np.arange(ns) + 0.5) / ns - 0.5
  zz = ((np.arange(-kz, kz + 1)[:, None] + sub[None, :]) * dz).ravel()
  out, rms = [], []
  d_ref = depths_um[len(depths_um) // 2]                          # focus aligned on the sheet mid-stack
  for d in depths_um:
    shift = sp["sheet_focus_drift_fraction"] * (d - d_ref) * (sp["n_sample"] - sp["n_immersion"]) / sp["n_immersion"]
    h, wv = debye_psf(zz, sp["na_det"], sp["n_immersion"], sp["n_sample"], sp["lambda_em_um"], d, vox[1],
                      focus_shift_um=shift)
    rms.append(wv)
    row = []
    for w in sheet_widths_um:
      prof = sheet_profile(zz, dict(sp, _w_um=w))
      k = (h * prof[:, None, None]).reshape(2 * kz + 1, ns, KERNEL_XY, KERNEL_XY).mean(1) * dz
      row.append(k.astype(np.float32))
    out.append(row)
  return out, kz, rms


def fused_kernel(sp, vox):
  dz = vox[0]
  kz = int(np.ceil(3.0 / dz))
  ns = int(np.ceil(dz / 0.2))
  sub = (np.arange(ns) + 0.5) / ns - 0.5
  zz = ((np.arange(-kz, kz + 1)[:, None] + sub[None, :]) * dz).ravel()
  h, _ = debye_psf(zz, sp["fused_na"], sp["n_immersion"], sp["n_immersion"], sp["lambda_em_um"], 0.0, vox[1])
  s = sp["fused_axial_fwhm_um"] / 2.3548
  g = np.exp(-0.5 * (zz / s) ** 2) / (np.sqrt(2 * np.pi) * s)
  k = (h * g[:, None, None]).reshape(2 * kz + 1, ns, KERNEL_XY, KERNEL_XY).mean(1) * dz
  return (k / k.sum()).astype(np.float32), kz


def convolve_sum(pairs, shape, kz):
  """sum_i src_i (*) ker_i, 'same' output, zero padding (one inverse FFT)."""
  h = KERNEL_XY // 2
  full = (shape[0] + 2 * kz, shape[1] + 2 * h, shape[2] + 2 * h)
  fshape = [sfft.next_fast_len(n, real=True) for n in full]
  acc = None
  for src, ker in pairs:
    f = sfft.rfftn(src, fshape) * sfft.rfftn(ker, fshape)
    acc = f if acc is None else acc + f
  out = sfft.irfftn(acc, fshape)
  return out[kz:kz + shape[0], h:h + shape[1], h:h + shape[2]].astype(np.float32)


def _beam_path(geo, direction):
  """Tissue path (um) travelled by the illumination to each voxel along unit vector ``direction``
  (ray-sphere intersection backwards), 0 outside the embryo; and the coordinate along the beam."""
  u = np.asarray(direction, np.float32)
  q = geo["P"] - geo["centre"]
  b = q @ u
  disc = b ** 2 - (q ** 2).sum(-1) + geo["R"] ** 2
  path = np.where(disc > 0, b + np.sqrt(np.maximum(disc, 0)), 0.0)
  return np.clip(path, 0, None).astype(np.float32), (geo["P"] @ u).astype(np.float32)


def _cumsum_along(a, axis, sign):
  if sign > 0:
    return np.cumsum(a, axis=axis) - a
  return np.flip(np.cumsum(np.flip(a, axis), axis=axis), axis) - a


def draw_optics_params(rng):
  sp = {
      "na_det": float(rng.uniform(0.5, 1.0)),
      "n_immersion": 1.333,
      "n_sample": float(rng.uniform(1.35, 1.39)),
      "lambda_em_um": float(rng.uniform(0.50, 0.62)),
      "sheet_type": "bessel" if rng.random() < 0.3 else "gaussian",
      "sheet_waist_um": float(rng.uniform(1.5, 3.5)),                # 1/e^2 radius of the Gaussian beam
      "sheet_waist_offset_um": float(rng.uniform(-12, 12)),
      "bessel_core_fwhm_um": float(rng.uniform(0.5, 1.0)),
      "bessel_envelope_um": float(rng.uniform(3.0, 9.0)),
      "illumination_direction": ["+x", "-x", "+y", "-y"][int(rng.integers(4))],
      "scattering_length_ex_um": float(rng.uniform(100, 400)),
      "scattered_excitation_fraction": float(rng.uniform(0.2, 0.6)),
      "scattered_excitation_sigma_um": float(rng.uniform(3, 8)),
      "shadow_absorption_per_um": float(rng.uniform(0.005, 0.03)),
      "scattering_length_em_um": float(rng.uniform(80, 300)),
      "halo_fraction_of_scattered": float(rng.uniform(0.3, 0.6)),
      "halo_sigma0_um": float(rng.uniform(1.0, 2.5)),
      "halo_sigma_per_um_depth": float(rng.uniform(0.02, 0.05)),
      "fused_na": float(rng.uniform(0.8, 1.0)),
      "fused_axial_fwhm_um": float(rng.uniform(1.0, 1.6)),           # before the product with the Debye PSF
      "sheet_focus_drift_fraction": float(rng.uniform(0.0, 1.0)),
  }
  return sp


def light_sheet_view(obj, geo, sp, vox):
  """Noise-free single view (Z, Y, X) in arbitrary units proportional to detected photons."""
  shape = obj.shape
  axis = {"x": 2, "y": 1}[sp["illumination_direction"][1]]
  sign = 1 if sp["illumination_direction"][0] == "+" else -1
  u = [0.0, 0.0, 0.0]
  u[axis] = float(sign)
  path, s = _beam_path(geo, u)
  shadow = np.exp(-sp["shadow_absorption_per_um"] * vox[axis] * _cumsum_along(obj, axis, sign))
  ball = np.exp(-path / sp["scattering_length_ex_um"])
  emit_loss = np.exp(-geo["depth_um"] / sp["scattering_length_em_um"])
  src = obj * shadow * emit_loss
  # bins: 3 depths (PSF aberration) x 3 positions along the beam (Gaussian beam divergence)
  pd = np.clip(geo["plane_depth_um"], 0, None)
  depths = [float(np.interp(t, np.arange(len(pd)), pd)) for t in (0, (len(pd) - 1) / 2, len(pd) - 1)]
  s_lo, s_hi = float(s.min()), float(s.max())
  s_bins = [s_lo, 0.5 * (s_lo + s_hi), s_hi]
  if sp["sheet_type"] == "gaussian":
    z_r = np.pi * sp["sheet_waist_um"] ** 2 * sp["n_immersion"] / LAMBDA_EX_UM
    widths = [sp["sheet_waist_um"] * np.sqrt(1 + ((sb - sp["sheet_waist_offset_um"]) / z_r) ** 2) for sb in s_bins]
  else:
    widths = [0.0]                                                   # Bessel: no divergence over the field
  kers, kz, rms = voxel_kernels(sp, vox, depths, widths)

  def hat(x, centres):
    return [np.clip(1 - np.abs(x - c) / max(centres[1] - centres[0], 1e-6), 0, 1) for c in centres]
  zi = np.arange(shape[0], dtype=np.float32)
  zc = [0.0, (shape[0] - 1) / 2, float(shape[0] - 1)]
  wz = [w[:, None, None] for w in hat(zi, zc)]                      # PSF depth blends by plane index
  ws = hat(s, s_bins) if len(widths) == 3 else [np.ones(shape)]
  pairs = [(src * ball * wz[a] * ws[b], kers[a][b]) for a in range(3) for b in range(len(widths))]
  img = convolve_sum(pairs, shape, kz)
  # scattered excitation: a broad, out-of-focus haze
  sd = sp["scattered_excitation_sigma_um"]
  diffuse = ndimage.gaussian_filter(src * (1 - ball) * sp["scattered_excitation_fraction"],
                                    (sd / vox[0], 0.6 * sd / vox[1], 0.6 * sd / vox[2]), mode="constant")
  # scattered emission: lateral halo growing with depth, recorded in the excited plane
  in_plane = obj * shadow * (ball + (1 - ball) * sp["scattered_excitation_fraction"])
  halo = np.zeros(shape, np.float32)
  frac = (1 - np.exp(-geo["depth_um"] / sp["scattering_length_em_um"])) * sp["halo_fraction_of_scattered"]
  for k in range(shape[0]):
    sig = sp["halo_sigma0_um"] + sp["halo_sigma_per_um_depth"] * pd[k]
    halo[k] = ndimage.gaussian_filter(in_plane[k] * frac[k], (sig / vox[1], sig / vox[2]), mode="constant")
  derived = {"sheet_widths_um_along_beam": [float(w) for w in widths], "psf_depths_um": [float(d) for d in depths],
             "psf_rms_wavefront_error_waves": rms, "kernel_half_z_planes": kz}
  return np.clip(img + diffuse + halo, 0, None), derived


# --------------------------------------------------------------------------- camera
def draw_camera_params(rng):
  if rng.random() < 0.75:
    return {"camera": "sCMOS", "qe": float(rng.uniform(0.7, 0.82)), "camera_offset_adu": 100.0,
            "offset_pixel_sd_adu": float(rng.uniform(0.3, 2.0)), "camera_gain_adu_per_e": float(rng.uniform(0.4, 2.2)),
            "gain_pixel_sd_rel": float(rng.uniform(0.005, 0.03)), "read_noise_median_e": float(rng.uniform(0.9, 1.8)),
            "hot_pixel_fraction": float(rng.uniform(0.0, 0.01))}
  cp = {"camera": "EMCCD", "qe": float(rng.uniform(0.85, 0.95)), "camera_offset_adu": 100.0,
        "em_gain": float(rng.uniform(30, 300)), "adu_per_e_after_em": float(rng.uniform(0.05, 0.2)),
        "read_noise_e": float(rng.uniform(20, 60)), "cic_per_pixel": float(rng.uniform(0.002, 0.02))}
  cp["camera_gain_adu_per_e"] = cp["em_gain"] * cp["adu_per_e_after_em"]   # mean ADU per photo-electron
  return cp


def camera(rng, photons, cp):
  """Photons (Z, Y, X) -> uint16 ADU; fixed-pattern maps shared by all planes of the stack."""
  ny, nx = photons.shape[1:]
  e = rng.poisson(cp["qe"] * photons).astype(np.float64)
  if cp["camera"] == "sCMOS":
    off = cp["camera_offset_adu"] + cp["offset_pixel_sd_adu"] * rng.standard_normal((ny, nx)) \
        + 0.3 * cp["offset_pixel_sd_adu"] * rng.standard_normal((1, nx))
    gain = cp["camera_gain_adu_per_e"] * (1 + cp["gain_pixel_sd_rel"] * rng.standard_normal((ny, nx)))
    rn = cp["read_noise_median_e"] * np.exp(0.3 * rng.standard_normal((ny, nx)))
    hot = rng.random((ny, nx)) < cp["hot_pixel_fraction"]
    rn[hot] *= rng.uniform(3, 8, hot.sum())
    adu = off + gain * (e + rn * rng.standard_normal(photons.shape))
  else:
    e = e + rng.poisson(cp["cic_per_pixel"], photons.shape)
    amp = rng.gamma(np.maximum(e, 1e-9), cp["em_gain"]) * (e > 0)
    adu = cp["camera_offset_adu"] + cp["adu_per_e_after_em"] * (amp + cp["read_noise_e"] * rng.standard_normal(photons.shape))
  return np.clip(np.round(adu), 0, 65535).astype(np.uint16)


# --------------------------------------------------------------------------- one volume
def draw_voxel_size(rng):
  if rng.random() < 0.5:
    return [1.0, 0.5, 0.5]
  xy = round(float(rng.uniform(0.3, 0.5)), 3)
  return [round(float(rng.uniform(1.0, 2.0)), 3), xy, xy]


def simulate_volume(rng, shape, label):
  vox = draw_voxel_size(rng)
  sp = draw_sample_params(rng, label, shape[0] * vox[0])
  op = draw_optics_params(rng)
  cp = draw_camera_params(rng)
  ph = {"view_peak_photons": float(np.exp(rng.uniform(np.log(5), np.log(300)))),
        "view_background_photons": float(rng.uniform(0.3, 3.0)),
        "fused_peak_photons": float(rng.uniform(1000, 4000)),
        "fused_background_photons": float(rng.uniform(1.0, 8.0)),
        "fused_read_noise_photons": float(rng.uniform(1.0, 4.0))}
  obj, geo = render_sample(rng, sp, shape, vox)
  view, derived = light_sheet_view(obj, geo, op, vox)
  ref = float(np.percentile(view, 99.5))                            # "peak" = 99.5th percentile
  view_ph = view * (ph["view_peak_photons"] / max(ref, 1e-12)) + ph["view_background_photons"]
  view_adu = camera(rng, view_ph, cp)
  fk, fkz = fused_kernel(op, vox)
  fused = convolve_sum([(obj, fk)], shape, fkz)
  fused_ph = np.clip(fused, 0, None) * (ph["fused_peak_photons"] / max(float(np.percentile(fused, 99.9)), 1e-12))
  fused_ph = rng.poisson(fused_ph + ph["fused_background_photons"]) \
      + ph["fused_read_noise_photons"] * rng.standard_normal(shape)
  meta = {"voxel_size_um": vox, "label": label, "sample": sp, "optics": op, "camera_params": cp,
          "photons": ph, "derived": derived, "n_cells": geo["n_cells"], "n_mitotic_cells": geo["n_mitotic"],
          "lumens": geo["lumens"], "camera_offset_adu": cp["camera_offset_adu"],
          "camera_gain_adu_per_e": cp["camera_gain_adu_per_e"],
          "fused_units": "photons (object x near-isotropic PSF, Poisson + Gaussian read noise, background added)"}
  return {"view_adu": view_adu, "fused": fused_ph.astype(np.float32), "meta": meta}
