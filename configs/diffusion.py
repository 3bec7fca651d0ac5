"""Diffusion-from-motion-blur: simulator priors and training defaults.

Simulate movies with these priors:

  python -m smlm_jax.simulate --config=configs/diffusion.py --num_movies=100 \
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
  return sim


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.sim = get_sim_config()
  return config
