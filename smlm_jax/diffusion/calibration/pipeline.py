"""Both stages on a set of movies: ``calibrate`` fits the camera under each model
(``camera``), the simulator for the plausible ones (``fit``), chooses the model and
returns the result that is written as JSON.

Camera model choice: a model is a candidate only if its camera passes the plausibility
checks; among those whose simulator fit is plausible too, the excess-noise test
decides, or, when it is inconclusive (within 2 standard errors of 1.25, or no slope),
the lower final simulator distance. A forced model (``camera_model``) is used as is.
When no model tried is plausible, ``ImplausibleCalibration`` says which value failed,
its range and what to try (``implausible_message``), unless ``allow_implausible``.

The result holds the keys of :data:`JSON_KEYS` (distributions as {"mean", "std",
"low", "high"}: low/high is the fitted log-uniform range that training uses;
mean/std are those of the fitted distribution, except for the background, whose
mean/std are measured directly on every movie's spot-free pixels in stage 1),
``<key>_se`` standard errors (:data:`SE_KEYS`), ``camera_model_selection`` (both fits,
their checks, the excess-noise ratio and the reason), ``warnings``, ``implausible``
(only when a fit failed its checks), the distances before (training defaults) and
after, the assumed geometry, and arrays for the plots under ``_plot``.
"""
from __future__ import annotations

import time

import numpy as np

from smlm_jax.diffusion.calibration.camera import (CAMERA_MODELS, MODEL_LABELS,
                                                   ImplausibleCalibration, camera_fit,
                                                   check_text, excess_noise_preference,
                                                   movie_cumulants)
from smlm_jax.diffusion.calibration.fit import fit_simulator
from smlm_jax.diffusion.calibration.parameters import log_uniform_moments
from smlm_jax.diffusion.calibration.statistics import STAT_NAMES
from smlm_jax.diffusion.calibration.uncertainty import bootstrap_indices

JSON_KEYS = ("psf_fwhm_nm", "photons", "background_photons", "camera_offset_adu",
             "camera_gain_adu_per_e", "read_noise_e")
SE_KEYS = ("camera_offset_adu_se", "camera_gain_adu_per_e_se", "read_noise_e_se",
           "psf_fwhm_nm_se", "photons_mean_se", "background_photons_mean_se")


def implausible_message(cams: dict, fits: dict, tried, forced: bool, preference) -> str:
  """The one line for an exit on an implausible fit: value, range and what to try."""
  parts, hints = [], []
  for m in tried:
    failed = cams[m]["failed"] + (fits[m]["failed"] if m in fits else [])
    if failed:
      parts.append(f"{MODEL_LABELS[m]} {check_text(failed[0])}")
      hints += [h for h in failed[0]["hint"] if not h.startswith("--camera_model=")]
  if forced:
    other = [m for m in CAMERA_MODELS if m != tried[0]][0]
    hints.insert(0, f"the {MODEL_LABELS[other]} model (--camera_model={other} or auto "
                 "instead of the forced one"
                 + (f"; the {preference[2]}" if preference[0] == other else "") + ")")
  hints = list(dict.fromkeys(hints))
  head = ("implausible calibration"
          + (f" with the camera model forced to {MODEL_LABELS[tried[0]]}" if forced
             else " under every camera model"))
  return (f"{head}: {'; '.join(parts)}; try {', '.join(hints)}; or --allow_implausible to "
          "write the fit anyway")


def _fit_summary(cam: dict, fit: dict | None) -> dict:
  v, se = cam["value"], cam["se"]
  out = {"camera_offset_adu": v["offset_adu"], "camera_offset_adu_se": se["offset_adu"],
         "camera_gain_adu_per_e": v["gain_adu_per_e"],
         "camera_gain_adu_per_e_se": se["gain_adu_per_e"],
         "read_noise_input_e": v["read_noise_input_e"],
         "read_noise_input_e_se": se["read_noise_input_e"],
         "read_variance_ratio": v["read_variance_ratio"],
         "background_photons_mean": v["background_photons"],
         "background_photons_mean_se": se["background_photons"],
         "gain_method": cam["gain_method"],
         "implausible": [check_text(c) for c in cam["failed"]]}
  if fit is not None:
    out.update({"psf_fwhm_nm": fit["value"]["psf_fwhm_nm"],
                "psf_fwhm_nm_se": fit["se"]["psf_fwhm_nm"],
                "photons_mean": fit["value"]["photons_mean"],
                "photons_mean_se": fit["se"]["photons_mean"],
                "distance_after": fit["distance_after"]})
    out["implausible"] += [check_text(c) for c in fit["failed"]]
  else:
    out["simulator_fit"] = "skipped (camera implausible or model not selected)"
  return out


def calibrate(frames_adu: np.ndarray, sim_cfg, fit_D: bool = False, steps: int = 120,
              num_sim: int = 128, learning_rate: float = 0.05, seed: int = 0,
              progress: bool = True, camera_model: str = "auto", offset_adu=None,
              gain_adu_per_e=None, allow_implausible: bool = False,
              num_bootstrap: int = 200) -> dict:
  """Full calibration of [M, T, H, W] ADU movies against the config's simulator.

  camera_model: 'auto' (fit sCMOS and EMCCD, pick one; see the module docstring) or
    the one to use. offset_adu / gain_adu_per_e: fixed known values (None: fitted).
  Raises ImplausibleCalibration (one-line message) when no model tried gives a
  plausible fit, unless ``allow_implausible``, which returns the best one with the
  failed checks in ``result["implausible"]``.
  """
  if camera_model not in ("auto",) + CAMERA_MODELS:
    raise ValueError(f"camera_model must be auto, scmos or emccd, got {camera_model!r}")
  t0 = time.time()
  cam_cfg = sim_cfg.camera
  qe = float(cam_cfg.qe)
  cum = movie_cumulants(frames_adu)
  boot = bootstrap_indices(cum.count.size, num_bootstrap, seed)
  cams = {m: camera_fit(cum, m, qe, offset_adu, gain_adu_per_e, boot) for m in CAMERA_MODELS}
  kappa, kappa_se = cams["scmos"]["value"]["kappa"], cams["scmos"]["se"]["kappa"]
  preference = excess_noise_preference(kappa, kappa_se)
  forced = camera_model != "auto"
  tried = [camera_model] if forced else list(CAMERA_MODELS)
  # Candidates pass the camera checks; the simulator is fitted only for them.
  candidates = [m for m in tried if not cams[m]["failed"]]
  if not candidates:
    if not allow_implausible:
      raise ImplausibleCalibration(implausible_message(cams, {}, tried, forced, preference))
    if preference[0] in tried:
      candidates = [preference[0]]
    else:
      candidates = [min(tried, key=lambda m: len(cams[m]["failed"]))]
  fits = {m: fit_simulator(frames_adu, sim_cfg, cams[m], fit_D, steps, num_sim,
                           learning_rate, seed, progress, boot) for m in candidates}
  passing = [m for m in candidates if not cams[m]["failed"] and not fits[m]["failed"]]
  if forced:
    chosen = camera_model
    reason = f"forced on the command line; {preference[2]}"
  elif len(passing) == 2:
    if preference[0] is not None and preference[1]:
      chosen = preference[0]
      reason = f"both fits plausible; {preference[2]}"
    else:
      chosen = min(passing, key=lambda m: fits[m]["distance_after"])
      other = [m for m in passing if m != chosen][0]
      reason = (f"both fits plausible and {preference[2]}; lower final distance "
                f"({fits[chosen]['distance_after']:.3g} vs {fits[other]['distance_after']:.3g})")
  elif len(passing) == 1:
    chosen = passing[0]
    other = [m for m in CAMERA_MODELS if m != chosen][0]
    bad = cams[other]["failed"] + (fits[other]["failed"] if other in fits else [])
    reason = (f"the {MODEL_LABELS[other]} fit is implausible ({check_text(bad[0])}); "
              f"{preference[2]}")
  else:
    if not allow_implausible:
      raise ImplausibleCalibration(implausible_message(cams, fits, tried, forced,
                                                       preference))
    chosen = preference[0] if preference[0] in candidates else candidates[0]
    reason = f"no plausible fit (--allow_implausible); {preference[2]}"

  cam, fit = cams[chosen], fits[chosen]
  v, cse = cam["value"], cam["se"]
  em_gain = float(cam_cfg.em_gain) if chosen == "emccd" else 1.0
  g = v["gain_adu_per_e"]
  bg_direct = (cum.mean[cum.ok] - v["offset_adu"]) / (g * qe)
  fitted = fit["fitted"]
  failed = cam["failed"] + fit["failed"]
  warnings = cams[chosen]["notes"] + fit["notes"] + [
      f"IMPLAUSIBLE: {MODEL_LABELS[chosen]} {check_text(c)}" for c in failed]
  result = {
      "psf_fwhm_nm": fitted["psf_fwhm_nm"],
      "psf_fwhm_nm_se": fit["se"]["psf_fwhm_nm"],
      "photons": log_uniform_moments(fitted["photons"]),
      "photons_mean_se": fit["se"]["photons_mean"],
      "background_photons": dict(log_uniform_moments(fitted["background_photons"]),
                                 mean=float(np.mean(bg_direct)),
                                 std=float(np.std(bg_direct))),
      "background_photons_mean_se": cse["background_photons"],
      "camera_offset_adu": v["offset_adu"],
      "camera_offset_adu_se": cse["offset_adu"],
      "camera_gain_adu_per_e": g,
      "camera_gain_adu_per_e_se": cse["gain_adu_per_e"],
      "read_noise_e": v["read_noise_adu"] / (g / em_gain),
      "read_noise_e_se": cse["read_noise_adu"] / (g / em_gain),
      "camera_model": chosen,
      "em_gain": em_gain,
      "qe": qe,
      "read_noise_input_e": v["read_noise_input_e"],
      "read_noise_input_e_se": cse["read_noise_input_e"],
      "fixed": cam["fixed"],
      "camera_model_selection": {
          "mode": "forced" if forced else "auto", "chosen": chosen, "reason": reason,
          "excess_noise_ratio": kappa, "excess_noise_ratio_se": kappa_se,
          "fits": {m: _fit_summary(cams[m], fits.get(m)) for m in CAMERA_MODELS}},
      "warnings": warnings,
      "pixel_size_nm": float(sim_cfg.pixel_size_nm),
      "frame_interval_s": float(sim_cfg.frame_interval_s),
      "exposure_s": float(sim_cfg.exposure_s),
      "num_movies": int(frames_adu.shape[0]),
      "num_bootstrap": 0 if boot is None else int(boot.shape[0]),
      "distance_before": fit["distance_before"],
      "distance_after": fit["distance_after"],
      "statistics": list(STAT_NAMES),
      "photon_transfer": {"method": cam["gain_method"],
                          "gain_relative_se": (cam["slope_se"] / cam["slope"]
                                               if cam["slope"] > 0 else float("nan")),
                          "read_variance_adu2": cam["read_variance_adu2"],
                          "data_low_quantile_adu": cum.low_quantile_adu},
      "seconds": time.time() - t0,
  }
  if failed:
    result["implausible"] = [check_text(c) for c in failed]
  if fit_D:
    result["D_um2_per_s"] = log_uniform_moments(fitted["D_um2_per_s"])
    result["D_mean_se"] = fit["se"]["D_mean"]
  # Arrays for plots (not written to JSON).
  ok = cum.ok
  result["_plot"] = dict(fit["_plot"], pt={
      "movie_mean_adu": cum.mean[ok], "movie_k2": cum.k2[ok], "movie_k3": cum.k3[ok],
      "lines": {m: (cams[m]["value"]["offset_adu"], cams[m]["value"]["gain_adu_per_e"],
                    cams[m]["read_variance_adu2"]) for m in CAMERA_MODELS}})
  return result
