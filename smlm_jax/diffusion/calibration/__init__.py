"""Differentiable calibration: fit the simulator's camera, PSF and emitter to real movies.

  python -m smlm_jax.diffusion.calibrate --input=PATH [--input=PATH ...] \
      --config=configs/diffusion.py --output=calibration.json [--plot=calibration.png]

Two stages, then standard errors:
1. the camera (offset, total gain, read noise) by photon transfer, closed form, under
   the sCMOS/CCD and the EMCCD model, each checked for plausibility;
2. PSF FWHM, emitter photons and background ranges (and optionally D) by matching
   the distributions of four per-movie statistics between the real movies and a
   simulated set with fixed random numbers, through the differentiable simulator;
3. standard errors by a bootstrap over movies (stage 2 linearized through its
   Jacobian).

camera       stage 1: background cumulants, both camera models, plausibility checks,
             the excess-noise test between the models (``camera_fit``,
             ``photon_transfer``)
statistics   the four statistics of a movie, their quantiles and the distance
parameters   unconstrained parameters <-> the log-uniform ranges training uses
fit          stage 2: the simulated set and the optax fit (``fit_simulator``)
uncertainty  bootstrap resamples and the linearized bootstrap of stage 2
pipeline     ``calibrate``: both stages on both models, the model choice, the result
plots        ``plot_calibration``: real vs. simulated statistics, photon transfer, loss
cli          the command (``main``), ``load_movies``, ``json_text``, ``summary_table``

Imports run one way: statistics, parameters <- uncertainty <- camera <- fit <-
pipeline <- cli (plots reads camera and statistics only).
``smlm_jax.diffusion.calibrate`` is the command's module name and re-exports these names.
"""
from smlm_jax.diffusion.calibration.camera import (
    BACKGROUND_RANGE_PHOTONS, CAMERA_MODELS, CUMULANT_FACTORS, EXCESS_NOISE_SPLIT,
    GAIN_RANGE_ADU_PER_E, MODEL_LABELS, MODEL_TOLERANCE, READ_NOISE_RANGE_E,
    CalibrationFailed, ImplausibleCalibration, MovieCumulants, background_masks,
    camera_fit, check_range, check_text, excess_noise_preference, movie_cumulants,
    photon_transfer, pixel_cumulants, solve_camera)
from smlm_jax.diffusion.calibration.statistics import (
    NUM_QUANTILES, STAT_NAMES, WINDOW_PX, Noise, movie_statistics, quantiles,
    robust_scale, stat_distance)
from smlm_jax.diffusion.calibration.parameters import (
    log_uniform_moments, params_from_ranges, ranges_from_params, reported)
from smlm_jax.diffusion.calibration.uncertainty import (bootstrap_indices,
                                                        linearized_bootstrap)
from smlm_jax.diffusion.calibration.fit import (FWHM_RANGE_NM, PHOTONS_RANGE,
                                                fit_simulator, make_sim_statistics)
from smlm_jax.diffusion.calibration.pipeline import (JSON_KEYS, SE_KEYS, calibrate,
                                                     implausible_message)
from smlm_jax.diffusion.calibration.plots import plot_calibration
from smlm_jax.diffusion.calibration.cli import (camera_model_flag, json_text,
                                                load_movies, main, summary_table)
