"""Diffusion-from-motion-blur (task 'diffusion', smlm_jax/diffusion/): simulator priors
and training defaults.

Train (default: 2-core CPU, about 10 minutes on an idle machine; model locformer):

  python -m smlm_jax.train --config=configs/diffusion.py --workdir=runs/default

Then: python -m smlm_jax.diffusion.evaluate --workdir=runs/default (test set, plots),
python -m smlm_jax.diffusion.predict --workdir=runs/default --input=DIR --output=D.csv
(your TIFF movies), python -m smlm_jax.diffusion.calibrate / .baselines (see README).

Expected result on a 2-core CPU (measured, issue 11; 1,000 steps took 18 min wall while
the 2 cores were shared ~5x with other jobs, one train step ~0.5 s under load ~6):
the final validation table reports relative RMSE of D 0.26 over D = 0.01-10 um^2/s
(0.29 / 0.27 / 0.24 per decade), median |rel. error| 0.18, 68% coverage 0.68.
``experiments/accuracy_study.py`` on 1,024 unseen movies: model 0.27 vs MLE
localization + CVE 0.43 (track CRLB 0.275); model/CVE 0.49-0.69 in every bin;
coverage 0.69. Variants: ``configs/diffusion.py:gpu`` (batch 256, 30,000 steps for
one GPU; not measured: no GPU was lent to issue 11, so what it reaches is unknown) and
``configs/diffusion.py:tiny`` (tests).
Every field can be overridden, e.g. ``--config.model.name=cnn3d``.

Simulate movies with these priors:

  python -m smlm_jax.diffusion.simulate --config=configs/diffusion.py --num_movies=100 \
      --output_dir=/tmp/sim

Field choices (all per frame of 10 ms unless stated):
* Geometry: 16 frames of 64x64 px, 100 nm pixels, 10 ms frames with the shutter open
  the whole frame (exposure_s = frame_interval_s), S = 10 sub-steps per exposure
  (the blur second moment is then within 1% of the continuous-exposure limit,
  (S^2 - 1) / S^2 = 0.99).
* D: log-uniform over 0.01-10 um^2/s, three decades from nearly immobile (per-frame
  displacement ~ 14 nm, below the localization error) to fast lipids in fluid
  bilayers (~ 450 nm per frame per axis, strong blur).
* PSF FWHM: 200-250 nm, the diffraction limit 0.51 lambda / NA for 520-680 nm
  emission at NA 1.4-1.49, with some defocus/aberration margin.
* Photons: log-uniform 300-3000 per frame, typical of a single organic dye (Cy3B,
  ATTO 647N) at 10 ms exposures under TIRF, before QE.
* Background: log-uniform 2-30 photons per pixel per frame, from clean TIRF on a
  supported bilayer to moderate autofluorescence; a +-5% linear tilt (gradient 0.1)
  mimics uneven illumination.
* Start: uniform in the central 25% square (16x16 px), so a D = 10 um^2/s molecule
  (18 px rms travel per axis over 16 frames) still mostly stays in the field.
* Camera: sCMOS (e.g. Hamamatsu ORCA-Flash4 class): QE 0.9 (incident photons to
  photo-electrons), 1.6 e- rms read noise, 2 ADU/e- (0.5 e-/ADU, so
  single photo-electrons are resolved in uint16), offset 100 ADU. EMCCD is
  selected with --config.sim.camera.model=emccd (em_gain sets the EM gain).
* Calibrated to your microscope: --config.sim.calibration=calibration.json (from
  python -m smlm_jax.diffusion.calibrate) sets FWHM (fitted value +-5%), photons and background
  (fitted log-uniform ranges) and the camera offset, gain and read noise.
"""
import ml_collections


def get_sim_config() -> ml_collections.ConfigDict:
  sim = ml_collections.ConfigDict()
  sim.num_frames = 16
  sim.substeps = 10
  sim.height_px = 64
  sim.width_px = 64
  sim.pixel_size_nm = 100.0
  sim.frame_interval_s = 0.01
  sim.exposure_s = 0.01
  sim.D_um2_per_s = (0.01, 10.0)
  sim.photons = (300.0, 3000.0)
  sim.background_photons = (2.0, 30.0)
  sim.background_gradient_max = 0.1
  sim.psf_fwhm_nm = (200.0, 250.0)
  sim.start_region_fraction = 0.25
  sim.camera = ml_collections.ConfigDict()
  sim.camera.model = "scmos"
  sim.camera.qe = 0.9
  sim.camera.gain_adu_per_e = 2.0
  sim.camera.offset_adu = 100.0
  sim.camera.read_noise_e = 1.6
  sim.camera.em_gain = 300.0
  # A calibration JSON from `python -m smlm_jax.diffusion.calibrate` replaces the PSF, photon and
  # background priors and the camera offset/gain/read noise with the fitted values
  # (applied when the simulator is built; the file name is kept in calibration_applied).
  sim.calibration = ""
  sim.calibration_applied = ""
  return sim


def get_model_config(name: str = "locformer") -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  model.name = name
  return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: None (CPU default), 'gpu', 'tiny' (unit tests)."""
  variant = arg or "cpu"
  if variant not in ("cpu", "gpu", "tiny"):
    raise ValueError(f"unknown config variant {variant!r}; use cpu, gpu or tiny")
  config = ml_collections.ConfigDict()
  config.task = "diffusion"
  config.seed = 0
  config.sim = get_sim_config()
  config.model = get_model_config()

  config.num_train_steps = 1000
  config.batch_size = 32
  config.learning_rate = 2e-3
  config.warmup_steps = 100
  config.weight_decay = 1e-4
  config.grad_clip_norm = 1.0
  config.ema_decay = 0.0        # > 0: evaluate / export / predict with a moving average of the weights
  # Mean-squared error of log D is mixed into the NLL during warm-up so the mean
  # learns before the variance can explain errors away.
  config.mse_weight = 1.0

  config.log_every_steps = 25
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 250
  config.max_to_keep = 3
  config.eval_num_movies = 512
  config.eval_batch_size = 128
  config.eval_seed = 12345

  if variant == "gpu":
    config.num_train_steps = 30000
    config.batch_size = 256
    config.learning_rate = 1e-3
    config.warmup_steps = 1000
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 2000
    config.eval_num_movies = 4096
    config.eval_batch_size = 512
  elif variant == "tiny":
    config.sim.num_frames = 8
    config.sim.height_px = 32
    config.sim.width_px = 32
    config.sim.substeps = 4
    config.num_train_steps = 2
    config.batch_size = 8
    config.warmup_steps = 1
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 1
    config.eval_num_movies = 16
    config.eval_batch_size = 8
  return config
