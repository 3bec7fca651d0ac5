"""The camera of the user's data: training defaults, calibration files and flags, once.

Prediction, the classical baselines and calibration all convert camera counts to
photons with :func:`smlm_jax.core.noise.adu_to_photons`; this module decides which numbers
that conversion uses and records where each came from, so every output can say
"offset 100 ADU (training default, assumed)" instead of silently assuming it.

Precedence for each parameter: command-line flag > calibration JSON > the camera of
the model's training config. For prediction the camera is a plain linear one:
``gain_adu_per_e`` is the *total* ADU per photo-electron (for an EMCCD, EM gain times
conversion gain, which is what a photon-transfer calibration measures).
"""
from __future__ import annotations

import json
import math
import os
import sys

from smlm_jax.core.noise import Camera

# Calibration JSON keys used for the camera (written by smlm_jax.diffusion.calibrate).
CAMERA_KEYS = ("camera_offset_adu", "camera_gain_adu_per_e", "read_noise_e", "qe")


class CalibrationError(ValueError):
  """A calibration file cannot be used; the message says why in one line."""


def read_calibration(path: str) -> dict:
  """Loads a calibration JSON (from ``smlm_jax.diffusion.calibrate``) and checks its camera keys."""
  if not os.path.isfile(path):
    raise CalibrationError(f"{path}: calibration file not found")
  try:
    with open(path) as f:
      cal = json.load(f)
  except (OSError, ValueError) as e:
    raise CalibrationError(f"{path}: not a readable JSON file ({e})") from None
  if not isinstance(cal, dict):
    raise CalibrationError(f"{path}: expected a JSON object with calibration keys")
  for key in CAMERA_KEYS:
    if key in cal:
      v = scalar(cal[key])
      if v is None or not math.isfinite(v):
        raise CalibrationError(f"{path}: {key} must be a finite number, got {cal[key]!r}")
  if "camera_gain_adu_per_e" in cal and scalar(cal["camera_gain_adu_per_e"]) <= 0:
    raise CalibrationError(f"{path}: camera_gain_adu_per_e must be > 0")
  # A negative baseline is physically impossible; calibrate only writes one when the
  # user passed --allow_implausible, and then the file lists it under "implausible".
  if ("camera_offset_adu" in cal and scalar(cal["camera_offset_adu"]) < 0
      and not cal.get("implausible")):
    raise CalibrationError(
        f"{path}: camera_offset_adu={scalar(cal['camera_offset_adu']):g} is negative, "
        "which no camera has; recalibrate (calibrate now checks this) or give "
        "--camera_offset_adu")
  return cal


def implausible_note(cal: dict, path: str = "calibration file") -> str | None:
  """One line when the file was written with --allow_implausible, else None."""
  bad = cal.get("implausible") or []
  if not bad:
    return None
  return (f"warning: {path} was written with --allow_implausible and fails "
          f"{len(bad)} plausibility check(s): {bad[0]}")


def scalar(value):
  """A number, or the mean of a ``{"mean": .., "std": ..}`` distribution."""
  if isinstance(value, dict):
    value = value.get("mean")
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def data_camera(train_camera_cfg, offset_adu=None, gain_adu_per_e=None, qe=None,
                calibration: dict | None = None) -> tuple[Camera, list[str]]:
  """The camera to convert the user's ADU to photons, and one note per parameter.

  train_camera_cfg: the ``sim.camera`` block of the model's training config.
  """
  cal = calibration or {}
  train = Camera(model=train_camera_cfg.model, qe=train_camera_cfg.qe,
                 gain_adu_per_e=train_camera_cfg.gain_adu_per_e,
                 offset_adu=train_camera_cfg.offset_adu,
                 read_noise_e=train_camera_cfg.read_noise_e,
                 em_gain=train_camera_cfg.em_gain)
  defaults = {"camera_offset_adu": train.offset_adu,
              "camera_gain_adu_per_e": float(train.adu_per_electron_in),
              "qe": train.qe,
              "read_noise_e": train.read_noise_e / (train.em_gain if train.model == "emccd"
                                                    else 1.0)}
  given = {"camera_offset_adu": offset_adu, "camera_gain_adu_per_e": gain_adu_per_e,
           "qe": qe, "read_noise_e": None}
  values, notes = {}, []
  for key, default in defaults.items():
    if given[key] is not None:
      values[key], source = float(given[key]), "command line"
    elif key in cal:
      if key == "read_noise_e" and "read_noise_input_e" in cal:
        key_in_file = "read_noise_input_e"    # an EMCCD's read noise before EM gain
      else:
        key_in_file = key
      values[key], source = scalar(cal[key_in_file]), "calibration file"
    else:
      values[key], source = float(default), "training default, ASSUMED"
    notes.append(f"{key}={values[key]:g} ({source})")
  if values["camera_gain_adu_per_e"] <= 0:
    raise CalibrationError("camera gain must be > 0 ADU per electron")
  if not 0 < values["qe"] <= 1:
    raise CalibrationError(f"quantum efficiency must be in (0, 1], got {values['qe']:g}")
  camera = Camera(model="scmos", qe=values["qe"],
                  gain_adu_per_e=values["camera_gain_adu_per_e"],
                  offset_adu=values["camera_offset_adu"],
                  read_noise_e=values["read_noise_e"])
  return camera, notes


def apply_calibration(sim_cfg):
  """Replaces a sim config's priors and camera by its calibration file, in place.

  Uses ``sim_cfg.calibration`` (a JSON from ``smlm_jax.diffusion.calibrate``): FWHM -> fitted
  value +-5%, photons and background -> the fitted log-uniform ranges (low, high),
  camera model (and EM gain) as calibrated, camera offset, gain (total ADU per photo-electron; divided by the EM gain for an
  EMCCD) and read noise. Afterwards ``calibration`` is cleared and
  ``calibration_applied`` names the file, so a saved config is self-contained.
  """
  path = sim_cfg.get("calibration") if hasattr(sim_cfg, "get") else None
  if not path:
    return sim_cfg
  cal = read_calibration(path)
  note = implausible_note(cal, path)
  if note:
    print(note, file=sys.stderr)
  missing = [k for k in ("psf_fwhm_nm", "photons", "background_photons",
                         "camera_offset_adu", "camera_gain_adu_per_e", "read_noise_e")
             if k not in cal]
  if missing:
    raise CalibrationError(f"{path}: missing keys {', '.join(missing)}")

  def low_high(key):
    v = cal[key]
    if isinstance(v, dict) and "low" in v and "high" in v:
      return float(v["low"]), float(v["high"])
    m = scalar(v)
    s = float(v.get("std", 0.0)) if isinstance(v, dict) else 0.0
    return max(m - s, 1e-3), m + s
  fwhm = scalar(cal["psf_fwhm_nm"])
  sim_cfg.psf_fwhm_nm = (0.95 * fwhm, 1.05 * fwhm)
  sim_cfg.photons = low_high("photons")
  sim_cfg.background_photons = low_high("background_photons")
  cam = sim_cfg.camera
  if cal.get("camera_model") in ("scmos", "emccd"):
    cam.model = cal["camera_model"]
  if cam.model == "emccd" and cal.get("em_gain"):
    cam.em_gain = scalar(cal["em_gain"])
  em = float(cam.em_gain) if cam.model == "emccd" else 1.0
  cam.offset_adu = scalar(cal["camera_offset_adu"])
  cam.gain_adu_per_e = scalar(cal["camera_gain_adu_per_e"]) / em
  cam.read_noise_e = scalar(cal["read_noise_e"])
  sim_cfg.calibration_applied = os.path.abspath(path)
  sim_cfg.calibration = ""
  return sim_cfg
