"""Diffusion coefficient from motion blur: simulator, models, training task, tools.

simulator     Brownian sub-frame motion, pixel-integrated PSF, background (pure JAX)
normalize     ADU -> photons -> model input, identically for simulated and real data
models        Flax models of (mean, log-variance) of ln D
task          the trainer task: simulate in the step, Gaussian NLL, validation metrics
metrics       D accuracy metrics (relative RMSE per decade, interval coverage)
evaluate      python -m smlm_jax.diffusion.evaluate: test set + plots
predict       python -m smlm_jax.diffusion.predict: D for your TIFF movies
calibrate     python -m smlm_jax.diffusion.calibrate: fit camera/PSF/priors to real data
calibration   the calibration package (camera, statistics, fit, uncertainty, cli, ...)
baselines     python -m smlm_jax.diffusion.baselines: MLE localization + CVE/MSD + CRLB
simulate      python -m smlm_jax.diffusion.simulate: write simulated TIFFs + truth
camera_setup  which camera numbers convert a user's ADU (flags > calibration > config)
analyze       python -m smlm_jax.diffusion.analyze: whole movies -> tracks -> D per molecule
detect        spot detection with a set false-positive rate (Anscombe + DoG + null tail)
tracks        trackpy linking, the model's windows along tracks, combining windows, CVE/MSD
fullmovie     simulated full-frame movies: many molecules appearing, diffusing, bleaching
"""
