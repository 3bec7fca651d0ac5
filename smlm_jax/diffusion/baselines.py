"""Classical estimates of D: per-frame MLE localization, then MSD / CVE on the track,
and the Cramér-Rao lower bounds of both steps. Pure JAX, jitted and vmapped.

  python -m smlm_jax.diffusion.baselines --input=PATH [--input=PATH ...] --output=FILE.csv \
      [--config=configs/diffusion.py (the default, found from any folder)] [--camera_offset_adu=A --camera_gain_adu_per_e=G]
      [--calibration=FILE.json] [--pixel_size_nm=P] [--frame_interval_s=S]

Localization (:func:`localize`): maximum likelihood fit of a pixel-integrated
Gaussian (x, y, photons N, background b, width s) to each frame. Noise model: photo-
electrons e = qe x photons are Poisson, plus sCMOS Gaussian read noise of variance g2 =
read_noise_e^2, handled by the usual shifted-Poisson approximation (Huang et al. 2013):
e + g2 ~ Poisson(mu + g2). Fixed number of Levenberg-Marquardt iterations on the
Fisher-scoring Hessian; standard errors from the inverse Fisher information
I = J^T diag(1 / (mu + g2)) J at the estimate (the localization CRLB).

Track estimators (per axis, averaged over x and y; dt = frame interval, R = motion-blur
coefficient = t_exposure / (6 dt), i.e. 1/6 for a shutter open the whole frame):
* CVE (Vestergaard, Blainey & Flyvbjerg, PRE 89, 022726, 2014):
    D = <dx_n^2> / (2 dt) + <dx_n dx_{n+1}> / dt,
    sigma^2 = R <dx_n^2> + (2R - 1) <dx_n dx_{n+1}>.
  Its variance (their result) for N displacements per axis, eps = sigma^2/(D dt) - 2R:
    var(D) = D^2 [(6 + 4 eps + 2 eps^2) / N + 4 (1 + eps)^2 / N^2]   (one axis).
* MSD fit (Michalet, PRE 82, 041914, 2010): unweighted least squares of
  MSD(n dt) = 4 D dt (n - 2R) + 4 sigma^2 over lags n = 1..p, with the optimal number
  of points p: Michalet showed the best p depends on x = sigma^2 / (D dt) and N; we
  compute it exactly for the Gaussian model (variance of the fitted slope from the
  covariance of the MSD points, 2 tr(A_i C A_j C)) on a grid of x, and iterate
  estimate -> x -> p three times.
* Track CRLB (Michalet & Berglund, PRE 85, 061916, 2012): the N - 1 displacements per
  axis are Gaussian with a tridiagonal Toeplitz covariance,
    diagonal a = 2 D dt (1 - 2R) + 2 sigma^2,  off-diagonal b = 2 R D dt - sigma^2,
  with eigenvalues lambda_k = a + 2 b cos(k pi / N), k = 1..N-1, so the Fisher
  information for D over two axes is
    I(D) = sum_k (d lambda_k / d D / lambda_k)^2,  d lambda_k/dD = 2 dt (1 - 2R + 2R cos(k pi/N)),
  and var(D) >= 1 / I(D).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from smlm_jax.diffusion import normalize
from smlm_jax.diffusion.simulator import pixel_integrated_gaussian

NUM_PARAMS = 5          # x_px, y_px, photons, background_photons, sigma_px
_FULL = jax.lax.Precision.HIGHEST   # Fisher products in full float32 (not TF32 on GPU)


# --------------------------------------------------------------------- localization
def gaussian_spot(theta, height_px: int, width_px: int):
  """[H, W] expected photons of a pixel-integrated Gaussian + flat background (px units)."""
  x, y, n, b, s = theta
  px = pixel_integrated_gaussian(x[None], s[None], width_px, 1.0)[0]
  py = pixel_integrated_gaussian(y[None], s[None], height_px, 1.0)[0]
  return n * py[:, None] * px[None, :] + b


def _initial_guess(frame, sigma_px):
  h, w = frame.shape
  b0 = jnp.median(frame)
  d = frame - b0
  py, px, _ = normalize.brightest_box(d)
  yy, xx = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
  near = normalize.square_mask(py, px, 2, h, w)
  wgt = jnp.where(near, jnp.maximum(d, 0.0), 0.0)
  tot = jnp.maximum(wgt.sum(), 1e-6)
  cx = jnp.where(wgt.sum() > 0, (wgt * (xx + 0.5)).sum() / tot, px + 0.5)
  cy = jnp.where(wgt.sum() > 0, (wgt * (yy + 0.5)).sum() / tot, py + 0.5)
  win = normalize.square_mask(py, px, 3, h, w)
  n0 = jnp.maximum(jnp.where(win, d, 0.0).sum(), 10.0)
  return jnp.array([cx, cy, n0, jnp.maximum(b0, 0.1), sigma_px])


def localize(frame_photons, sigma_px: float, qe: float, read_noise_e: float,
             iterations: int = 30, roi_px: int = 15):
  """MLE fit of one [H, W] frame of photons.

  The fit uses a roi_px square around the brightest 3x3 box (clamped to the frame).
  Returns (theta [5] = x_px, y_px, photons, background, sigma_px in frame pixel
  coordinates (pixel i spans [i, i + 1]), se [5] CRLB standard errors, ok bool:
  finite, inside the frame, photons > 3 standard errors, sane width).
  """
  H, W = frame_photons.shape
  if roi_px < min(H, W):
    py, px, _ = normalize.brightest_box(frame_photons - jnp.median(frame_photons))
    y0 = jnp.clip(py - roi_px // 2, 0, H - roi_px)
    x0 = jnp.clip(px - roi_px // 2, 0, W - roi_px)
    roi = jax.lax.dynamic_slice(frame_photons, (y0, x0), (roi_px, roi_px))
    theta, se, ok = localize(roi, sigma_px, qe, read_noise_e, iterations, roi_px)
    theta = theta.at[0].add(x0).at[1].add(y0)
    inside = (theta[0] >= 0) & (theta[0] <= W) & (theta[1] >= 0) & (theta[1] <= H)
    # A fit that ran to the ROI border has lost the spot: flag it as well.
    in_roi = ((theta[0] - x0 > 0.5) & (theta[0] - x0 < roi_px - 0.5)
              & (theta[1] - y0 > 0.5) & (theta[1] - y0 < roi_px - 0.5))
    return theta, se, ok & inside & in_roi
  h, w = frame_photons.shape
  g2 = read_noise_e ** 2
  data = jnp.maximum(qe * frame_photons + g2, 0.0)          # e + g2 ~ Poisson(mu + g2)

  def mu(theta):
    return qe * gaussian_spot(theta, h, w) + g2

  def loglik(theta):
    m = jnp.maximum(mu(theta), 1e-6)
    return jnp.sum(data * jnp.log(m) - m)

  lower = jnp.array([-2.0, -2.0, 1.0, 1e-3, 0.3])
  upper = jnp.array([w + 2.0, h + 2.0, 1e8, 1e6, 6.0 * sigma_px])

  def body(_, carry):
    theta, lam, ll = carry
    m = jnp.maximum(mu(theta), 1e-6)
    jac = jax.jacfwd(mu)(theta).reshape(-1, NUM_PARAMS)
    grad = jnp.matmul(jac.T, data.reshape(-1) / m.reshape(-1) - 1.0, precision=_FULL)
    fisher = jnp.matmul(jac.T, jac / m.reshape(-1)[:, None], precision=_FULL)
    step = jnp.linalg.solve(fisher + lam * jnp.diag(jnp.diag(fisher)) + 1e-9 * jnp.eye(5),
                            grad)
    new = jnp.clip(theta + step, lower, upper)
    new_ll = loglik(new)
    better = jnp.isfinite(new_ll) & (new_ll >= ll)
    return (jnp.where(better, new, theta), jnp.where(better, lam * 0.3, lam * 10.0),
            jnp.where(better, new_ll, ll))

  theta0 = _initial_guess(frame_photons, sigma_px)
  theta, _, _ = jax.lax.fori_loop(0, iterations, body, (theta0, 1e-2, loglik(theta0)))
  m = jnp.maximum(mu(theta), 1e-6)
  jac = jax.jacfwd(mu)(theta).reshape(-1, NUM_PARAMS)
  fisher = jnp.matmul(jac.T, jac / m.reshape(-1)[:, None], precision=_FULL)
  se = jnp.sqrt(jnp.abs(jnp.diag(jnp.linalg.inv(fisher))))
  ok = (jnp.all(jnp.isfinite(theta)) & jnp.all(jnp.isfinite(se))
        & (theta[0] >= 0) & (theta[0] <= w) & (theta[1] >= 0) & (theta[1] <= h)
        & (theta[2] > 3 * se[2]) & (theta[4] < 5.0 * sigma_px) & (se[0] < 2.0))
  return theta, se, ok


@functools.partial(jax.jit, static_argnames=("iterations", "roi_px"))
def localize_movies(photons, sigma_px, qe, read_noise_e, iterations: int = 30,
                    roi_px: int = 15):
  """[..., T, H, W] photons -> theta [..., T, 5], se [..., T, 5], ok [..., T]."""
  lead = photons.shape[:-2]
  flat = photons.reshape((-1,) + photons.shape[-2:])
  f = jax.vmap(lambda fr: localize(fr, sigma_px, qe, read_noise_e, iterations, roi_px))
  theta, se, ok = f(flat)
  return (theta.reshape(lead + (NUM_PARAMS,)), se.reshape(lead + (NUM_PARAMS,)),
          ok.reshape(lead))


def localize_frames(photons, sigma_px, qe, read_noise_e, iterations: int = 30):
  """:func:`localize_movies` with the frame count padded to a few fixed sizes, so files
  with different numbers of windows reuse one compiled fit."""
  photons = jnp.asarray(photons, jnp.float32)
  lead, hw = photons.shape[:-2], photons.shape[-2:]
  flat = photons.reshape((-1,) + hw)
  n = flat.shape[0]
  size = 1 << max(4, (n - 1).bit_length()) if n <= 256 else -(-n // 256) * 256
  if size > n:
    flat = jnp.concatenate([flat, jnp.broadcast_to(flat[:1], (size - n,) + hw)])
  theta, se, ok = localize_movies(flat, sigma_px, qe, read_noise_e, iterations)
  return (theta[:n].reshape(lead + (NUM_PARAMS,)), se[:n].reshape(lead + (NUM_PARAMS,)),
          ok[:n].reshape(lead))


# --------------------------------------------------------------------- track estimators
def cve(positions_nm, valid, frame_interval_s: float, R: float):
  """CVE of D (um^2/s) and localization variance (nm^2) of one track [N, 2].

  Uses displacements whose two ends are valid, and products of consecutive valid
  displacements. Returns (D, sigma2_nm2, ok).
  """
  dx = positions_nm[1:] - positions_nm[:-1]                      # [N-1, 2]
  vd = (valid[1:] & valid[:-1]).astype(jnp.float32)
  vp = vd[1:] * vd[:-1]
  n_d, n_p = vd.sum(), vp.sum()
  msd1 = jnp.sum(vd[:, None] * dx ** 2, axis=0) / jnp.maximum(n_d, 1.0)    # per axis
  cov1 = jnp.sum(vp[:, None] * dx[1:] * dx[:-1], axis=0) / jnp.maximum(n_p, 1.0)
  D_axis = msd1 / (2 * frame_interval_s) + cov1 / frame_interval_s           # nm^2/s
  s2_axis = R * msd1 + (2 * R - 1) * cov1
  ok = (n_d >= 2) & (n_p >= 1)
  nan = jnp.nan
  return (jnp.where(ok, D_axis.mean() * 1e-6, nan), jnp.where(ok, s2_axis.mean(), nan), ok)


def cve_variance(D, sigma2_nm2, frame_interval_s, R, num_displacements):
  """Published CVE variance (Vestergaard et al. 2014), both axes averaged (um^4/s^2)."""
  dt = frame_interval_s
  eps = sigma2_nm2 * 1e-6 / (D * dt) - 2 * R
  n = num_displacements
  one_axis = D ** 2 * ((6 + 4 * eps + 2 * eps ** 2) / n + 4 * (1 + eps) ** 2 / n ** 2)
  return one_axis / 2


def crlb_D(D, sigma_nm, frame_interval_s, R, num_positions):
  """Cramér-Rao lower bound on the standard error of D (um^2/s), two axes.

  Michalet & Berglund 2012: eigenvalues lambda_k = a + 2 b cos(k pi / N) of the
  displacement covariance, I(D) = sum over axes and k of (lambda_k' / lambda_k)^2 / 2.
  """
  dt, N = frame_interval_s, num_positions
  D_nm = D * 1e6
  s2 = sigma_nm ** 2
  k = jnp.arange(1, N)
  c = jnp.cos(k * jnp.pi / N)
  a = 2 * D_nm * dt * (1 - 2 * R) + 2 * s2
  b = 2 * R * D_nm * dt - s2
  lam = a[..., None] + 2 * b[..., None] * c
  dlam = 2 * dt * (1 - 2 * R + 2 * R * c)                  # d lambda / d D (nm^2/s units)
  info = jnp.sum((dlam / lam) ** 2, axis=-1)              # 2 axes x 1/2
  return jnp.sqrt(1.0 / info) * 1e-6


@functools.lru_cache(maxsize=16)
def _optimal_points_table(num_positions: int, R: float):
  """(log10 x grid, optimal p) for the unweighted MSD slope fit; D = dt = 1."""
  N = num_positions
  t = np.arange(N, dtype=np.float64)
  tE = 6 * R
  lags = np.arange(1, N)
  mats = []
  for n in lags:
    A = np.zeros((N, N))
    for i in range(N - n):
      e = np.zeros(N)
      e[i], e[i + n] = -1, 1
      A += np.outer(e, e)
    mats.append(A / (N - n))
  log_x = np.linspace(-3, 3, 61)
  best = []
  for lx in log_x:
    s2 = 10 ** lx
    C = 2 * (np.minimum.outer(t, t) + tE / 2) - np.eye(N) * (2 * tE / 6) + s2 * np.eye(N)
    AC = [A @ C for A in mats]
    cov = np.array([[2 * np.trace(a1 @ a2) for a2 in AC] for a1 in AC])   # one axis
    var = []
    for p in range(2, N):
      n = lags[:p]
      wts = (n - n.mean()) / np.sum((n - n.mean()) ** 2)
      var.append(wts @ cov[:p, :p] @ wts)
    best.append(2 + int(np.argmin(var)))
  return log_x, np.array(best)


def msd_fit(positions_nm, valid, frame_interval_s: float, R: float, iterations: int = 3):
  """MSD fit with Michalet's optimal number of points. Returns (D um^2/s, sigma2 nm^2, p)."""
  N = positions_nm.shape[0]
  log_x_grid, p_grid = _optimal_points_table(N, float(R))
  log_x_grid, p_grid = jnp.asarray(log_x_grid), jnp.asarray(p_grid)
  dt = frame_interval_s
  lags = jnp.arange(1, N)
  idx = jnp.arange(N)

  def msd_at(n):
    j = jnp.clip(idx + n, 0, N - 1)
    pair = valid & valid[j] & (idx + n < N)
    d2 = jnp.sum((positions_nm[j] - positions_nm) ** 2, axis=-1)
    cnt = pair.sum()
    return jnp.where(cnt > 0, jnp.sum(jnp.where(pair, d2, 0.0)) / jnp.maximum(cnt, 1), jnp.nan)

  msd = jax.vmap(msd_at)(lags)                                   # [N-1], 2D MSD

  def fit(p):
    use = (lags <= p) & jnp.isfinite(msd)
    n = jnp.where(use, lags, 0.0).astype(jnp.float32)
    m = jnp.where(use, msd, 0.0)
    k = use.sum()
    nbar = n.sum() / jnp.maximum(k, 1)
    mbar = m.sum() / jnp.maximum(k, 1)
    sxx = jnp.sum(jnp.where(use, (n - nbar) ** 2, 0.0))
    slope = jnp.sum(jnp.where(use, (n - nbar) * (m - mbar), 0.0)) / jnp.maximum(sxx, 1e-9)
    intercept = mbar - slope * nbar
    D_nm = slope / (4 * dt)
    s2 = (intercept + 8 * D_nm * R * dt) / 4
    return D_nm, s2, k >= 2

  p = jnp.asarray(2)
  for _ in range(iterations):
    D_nm, s2, ok = fit(p)
    x = jnp.maximum(s2, 1e-6) / jnp.maximum(D_nm * dt, 1e-6)
    p = jnp.round(jnp.interp(jnp.log10(x), log_x_grid, p_grid)).astype(jnp.int32)
  D_nm, s2, ok = fit(p)
  return jnp.where(ok, D_nm * 1e-6, jnp.nan), jnp.where(ok, s2, jnp.nan), p


# ---------------------------------------------------------------------- whole movies
def estimate_movies(photons, pixel_size_nm, frame_interval_s, exposure_s, psf_fwhm_nm,
                    qe, read_noise_e):
  """Localization + CVE + MSD + CRLB for [M, T, H, W] photons (numpy dict of [M] arrays)."""
  sigma_px = psf_fwhm_nm / 2.3548 / pixel_size_nm
  R = exposure_s / (6 * frame_interval_s)
  theta, se, ok = localize_frames(photons, sigma_px, qe, read_noise_e)
  return tracks_from_localizations(theta, se, ok, pixel_size_nm, frame_interval_s, R)


@functools.partial(jax.jit, static_argnames=("frame_interval_s", "R"))
def _tracks(pos, ok, loc_se_nm, frame_interval_s, R):
  D_cve, s2_cve, ok_cve = jax.vmap(lambda p, v: cve(p, v, frame_interval_s, R))(pos, ok)
  D_msd, s2_msd, p_msd = jax.vmap(lambda p, v: msd_fit(p, v, frame_interval_s, R))(pos, ok)
  n = pos.shape[1]
  D_ref = jnp.maximum(jnp.where(jnp.isfinite(D_cve), D_cve, D_msd), 1e-4)
  crlb = crlb_D(D_ref, loc_se_nm, frame_interval_s, R, n)
  return D_cve, s2_cve, D_msd, p_msd, crlb


def tracks_from_localizations(theta, se, ok, pixel_size_nm, frame_interval_s, R):
  pos = theta[..., :2] * pixel_size_nm                        # [M, T, 2] nm
  loc_se = jnp.sqrt(jnp.nanmean(jnp.where(ok, 0.5 * (se[..., 0] ** 2 + se[..., 1] ** 2),
                                          jnp.nan), axis=-1)) * pixel_size_nm
  D_cve, s2_cve, D_msd, p_msd, crlb = _tracks(pos, ok, loc_se, float(frame_interval_s),
                                              float(R))
  return {"D_cve_um2_per_s": np.asarray(D_cve),
          "localization_sd_nm": np.sqrt(np.maximum(np.asarray(s2_cve), 0.0)),
          "D_msd_um2_per_s": np.asarray(D_msd), "msd_points": np.asarray(p_msd),
          "crlb_se_um2_per_s": np.asarray(crlb), "crlb_localization_se_nm": np.asarray(loc_se),
          "frames_localized": np.asarray(ok).sum(-1),
          "photons": np.asarray(jnp.nanmean(jnp.where(ok, theta[..., 2], jnp.nan), -1)),
          "background_photons": np.asarray(jnp.nanmean(jnp.where(ok, theta[..., 3], jnp.nan), -1)),
          "positions_nm": np.asarray(pos), "valid": np.asarray(ok)}


def frame_positions_nm(substep_positions_nm, num_frames: int):
  """True blurred frame positions: mean of each frame's sub-step positions [..., T, 2]."""
  *lead, ts, two = substep_positions_nm.shape
  return substep_positions_nm.reshape(*lead, num_frames, ts // num_frames, two).mean(-2)


# ----------------------------------------------------------------------------- CLI
COLUMNS = ("file", "first_frame", "D_um2_per_s", "D_msd_um2_per_s", "crlb_se_um2_per_s",
           "localization_sd_nm", "photons", "background_photons", "frames_localized",
           "flag")


def run(inputs, output, sim_cfg, stride=None, camera_offset_adu=None,
        camera_gain_adu_per_e=None, camera_qe=None, calibration=None, pixel_size_nm=None,
        frame_interval_s=None, exposure_s=None, log=print, channel=None) -> int:
  """Localization + CVE for every window of every input; returns the exit code."""
  import sys
  from smlm_jax.diffusion import camera_setup
  from smlm_jax.core import cli, noise as noise_lib, tiff_io
  cal = camera_setup.read_calibration(calibration) if calibration else None
  camera, notes = camera_setup.data_camera(sim_cfg.camera, camera_offset_adu,
                                           camera_gain_adu_per_e, camera_qe, cal)
  fwhm = camera_setup.scalar(cal["psf_fwhm_nm"]) if cal and "psf_fwhm_nm" in cal else \
      float(np.mean(sim_cfg.psf_fwhm_nm))
  notes.append(f"psf_fwhm_nm={fwhm:g} ({'calibration file' if cal else 'config'})")
  t = int(sim_cfg.num_frames)
  rows, errors = [], 0
  assumed = set()
  for path, movie, starts, error in tiff_io.scan_inputs(inputs, t, None, None, stride,
                                                       "baselines", log,
                                                       float(camera.offset_adu), channel):
    if error:
      rows.append([path, ""] + [""] * 7 + [f"error:{error[1]}"])
      errors += 1
      continue
    px, dt, missing = tiff_io.resolve_geometry(movie, pixel_size_nm, frame_interval_s,
                                               sim_cfg.pixel_size_nm,
                                               sim_cfg.frame_interval_s)
    assumed.update(f"{name}={value:g}" for name, value in
                   (("pixel_size_nm", px), ("frame_interval_s", dt)) if name in missing)
    exp_s = exposure_s or min(dt, float(sim_cfg.exposure_s) * dt / float(sim_cfg.frame_interval_s))
    windows = np.stack([movie.frames[s:s + t] for s in starts])
    photons = np.asarray(noise_lib.adu_to_photons(windows, camera))
    out = estimate_movies(photons, px, dt, exp_s, fwhm, float(camera.qe),
                          float(camera.read_noise_e))
    for i, s in enumerate(starts):
      flags = []
      n_loc = int(out["frames_localized"][i])
      if n_loc < t:
        flags.append("spot_not_localized_in_some_frames")
      D = out["D_cve_um2_per_s"][i]
      if not np.isfinite(D):
        flags.append("too_few_localizations")
      elif D <= 0:
        flags.append("D_not_positive")
      num = cli.number
      rows.append([path, s, num(D, ".5g"), num(out["D_msd_um2_per_s"][i], ".5g"),
                   num(out["crlb_se_um2_per_s"][i], ".4g"),
                   num(out["localization_sd_nm"][i], ".2f"), num(out["photons"][i], ".1f"),
                   num(out["background_photons"][i], ".3f"), n_loc,
                   ";".join(flags) or "ok"])
  header = ["smlm_jax.diffusion.baselines: MLE localization + CVE (Vestergaard 2014); D_msd = MSD "
            "fit with Michalet's optimal points; crlb_se = track Cramer-Rao bound",
            "camera: " + ", ".join(notes)]
  header += [f"note: {a} ASSUMED (config value; no metadata or flag)" for a in sorted(assumed)]
  cli.atomic_write_text(output, cli.csv_text(COLUMNS, rows, header))
  n_ok = sum(1 for r in rows if r[-1] == "ok")
  log(f"{len(rows) - errors} window(s) analysed ({n_ok} ok), {errors} input(s) failed; "
      f"wrote {output}", file=sys.stderr)
  return 1 if errors else 0


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  from smlm_jax.core import cli
  config_flags.DEFINE_config_file("config", cli.config_path("diffusion"),
                                  "Config: window length, PSF, camera defaults "
                                  "(default: this checkout's configs/diffusion.py).")
  flags.DEFINE_multi_string("input", [], "TIFF file or folder; repeat for several.")
  flags.DEFINE_string("output", None, "CSV file to write.")
  flags.DEFINE_integer("stride", None, "Frames between windows (default T).")
  flags.DEFINE_float("camera_offset_adu", None, "Camera baseline (ADU).")
  flags.DEFINE_float("camera_gain_adu_per_e", None, "ADU per photo-electron.")
  flags.DEFINE_float("camera_qe", None, "Quantum efficiency.")
  flags.DEFINE_string("calibration", None, "Calibration JSON (camera and PSF FWHM).")
  flags.DEFINE_float("pixel_size_nm", None, "Pixel size (nm); overrides metadata.")
  flags.DEFINE_float("frame_interval_s", None, "Frame interval (s); overrides metadata.")
  flags.DEFINE_float("exposure_s", None, "Exposure per frame (s); default: the frame "
                     "interval times the config's exposure/interval ratio.")
  cli.define_channel_flag("movies")


def main(argv):
  import sys
  from absl import flags
  from smlm_jax.diffusion import camera_setup
  from smlm_jax.core import cli
  cli.quiet_logs()
  f = flags.FLAGS
  inputs = cli.inputs_and_output(f, argv)
  for name in ("pixel_size_nm", "frame_interval_s", "exposure_s", "camera_gain_adu_per_e"):
    if f[name].value is not None and f[name].value <= 0:
      cli.fail(f"--{name} must be > 0")
  if f.stride is not None and f.stride < 1:
    cli.fail("--stride must be >= 1")
  try:
    code = run(inputs, f.output, f.config.sim, f.stride, f.camera_offset_adu,
               f.camera_gain_adu_per_e, f.camera_qe, f.calibration, f.pixel_size_nm,
               f.frame_interval_s, f.exposure_s, channel=cli.channel_flag(f))
  except camera_setup.CalibrationError as e:
    cli.fail(str(e))
  sys.exit(code)


if __name__ == "__main__":
  from smlm_jax.core import cli
  cli.run_app(main, _define_flags)
