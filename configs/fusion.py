"""Light-sheet fusion from one view (task 'fusion', smlm_jax/fusion/): simulator physics
and training defaults.

Train (default: 2-core CPU, about 14 minutes under the CPU lock):

  python -m smlm_jax.train --config=configs/fusion.py --workdir=runs/fusion

The default trains on the domain-randomized priors of :func:`randomize_sim` (issue 23).
Expected result: the final summary reports the validation N_SSIM on 16 volumes of those
wide priors, about 0.64 (0.642 measured; they include 8-photon views 100 um deep).
experiments/fusion_study.py (test seed 777, 24 x 80 x 80 volumes of the narrow
literature priors, 4 blended tiles): N_SSIM 0.763 after 844 s of training (4000
steps); on the independent second simulator 0.678 and the third 0.612, next to
Richardson-Lucy + depth correction re-tuned on those simulators' own volumes 0.328 /
0.415 (README).
``:narrow`` (the literature priors only, the default before issue 23): 0.800 on the
narrow test volumes (nuclei 0.845, membranes 0.773; 0.792 without the self-ensemble)
after 688 s, 0.634 / 0.548 on the independent simulators; 0.255 for a Gaussian filter
and 0.484 for Richardson-Lucy + depth correction, both tuned on validation volumes (the
Gaussian was tuned on the test set before, 0.266). What got there from 0.446 (800 steps, 867 s): loss.renormalize (the
metric percentile-normalizes the prediction on its own, so a prediction trained in the
target's units was scored after a gain/offset change that SSIM punishes; validation
N_SSIM at 300 steps 0.378 -> 0.777), more steps in the budget (0.27-0.3 s per step
measured under the lock) and the 8-fold flip/transpose self-ensemble at prediction
(validation: 0.443 -> 0.523 for the old 800-step model, +0.008 on the test set for
this one). loss.clean_target did not help (0.369 vs 0.378 alone, 0.693 vs 0.777 with
renormalize: the metric's target is the noisy fused view).
Then:

  python -m smlm_jax.fusion.predict --workdir=runs/fusion --input=VIEW.tif --output=out/
  python -m smlm_jax.fusion.evaluate --pred=out/VIEW_fused.tif --target=FUSED.tif \
      --input=VIEW.tif

Variants: ``configs/fusion.py:gpu`` (bigger patches and network, longer schedule, the
same randomized priors), ``configs/fusion.py:narrow`` (literature priors only) and
``configs/fusion.py:tiny`` (unit tests). Every field can be overridden, e.g.
``--config.model.depth_channel=True``.

Physics of the narrow priors (per volume, ranges drawn uniformly; photons
log-uniformly; the default widens them, see randomize_sim), z = detection axis:
* Voxels 1.0 x 0.5 x 0.5 um (z, y, x): a typical light-sheet stack (20-25x/1.0 water
  objectives sample 0.3-0.5 um laterally, z steps of 1-2 um); patches of 24 x 32 x 32
  voxels = 24 x 16 x 16 um hold ~2 cells per side (CPU default; gpu: 64 x 128 x 128). The fused view is predicted on the
  same grid (the challenge's fused images are registered to the view).
* Cells 8-11 um apart (Drosophila / zebrafish embryo and organoid cells), nuclei of
  radius 0.25-0.4 of that (2-4.4 um) with +-25% per-axis aspect, a 0.3 um soft edge and
  20-50% chromatin texture on a 0.6 um scale; membranes 0.3 um sigma sheets (a
  diffraction-limited membrane label). Nuclei or membranes per volume, 50/50, as the
  challenge's two channels.
* Single view PSF: lateral FWHM 0.35-0.5 um (0.51 lambda/NA, NA 0.6-1.0, 500-600 nm),
  axial FWHM 2-3.5 um (the light-sheet thickness of typical SPIM/MuVi-SPIM set-ups,
  Power & Huisken, Nat. Methods 14, 360 (2017)), both growing as (1 + depth / L_blur),
  L_blur 50-100 um (scattering and aberrations roughly double the PSF over the first
  50-100 um of an embryo). Attenuation exp(-depth / L) along detection and illumination,
  L 40-120 um (mean free paths of visible light in embryos / organoids); the patch lies
  0-30 um below the surface and 0-40 um along the illumination path.
* Photons: 40-200 per voxel at full brightness for the single view (live light-sheet
  imaging at low dose), 400-1500 for the fused view (2-4 views plus deconvolution-
  level SNR), 2-10 background photons; sCMOS camera (ORCA-Flash4 class): QE 0.8,
  2.17 ADU/e-, 100 ADU offset, 1.4 e- read noise.
* Fused PSF: FWHM 0.35-0.5 um lateral, 0.7-1.0 um axial (multiview fusion/deconvolution
  gets within 1.5-2x of the lateral resolution along z; Preibisch et al., Nat. Methods
  11, 645 (2014); Chhetri et al., Nat. Methods 12, 1171 (2015)).
Model: a 2-level 3D U-Net with factorized (2+1)D convs (gpu: true 3D convs), width 8
(gpu: 3 levels, width 32), group norm, pooling
(1, 2, 2) then (2, 2, 2) so the coarse levels have isotropic 1 um voxels; prediction =
view + U-Net (residual). Loss L1 + SSIM (the metric's SSIM) of the prediction
percentile-normalized again, as the metric does (loss.renormalize); predict averages
every tile over its 8 y/x flips/transposes (predict.tta). On CPU the specimens come
from a pool of 128 simulated volumes (fresh noise and flips every step; pool_size = 0
simulates in the step). Prediction of large volumes uses overlapping tiles.
"""
import ml_collections


def get_sim_config() -> ml_collections.ConfigDict:
  sim = ml_collections.ConfigDict()
  sim.shape = (24, 32, 32)
  sim.voxel_size_um = (1.0, 0.5, 0.5)
  sim.cell_spacing_um = (8.0, 11.0)
  sim.cell_jitter = 0.3
  sim.nucleus_radius_fraction = (0.25, 0.4)
  sim.nucleus_aspect = (0.75, 1.25)
  sim.nucleus_edge_um = 0.3
  sim.texture_sigma_um = 0.6
  sim.nucleus_texture = (0.2, 0.5)
  sim.membrane_sigma_um = 0.3
  sim.membrane_texture = 0.3
  sim.cytoplasm_level = (0.02, 0.1)
  sim.cell_brightness = (0.6, 1.4)
  sim.membrane_probability = 0.5
  sim.depth_offset_um = (0.0, 30.0)
  sim.illumination_offset_um = (0.0, 40.0)
  sim.view_fwhm_xy_um = (0.35, 0.5)
  sim.view_fwhm_z_um = (2.0, 3.5)
  sim.blur_growth_length_um = (50.0, 100.0)
  sim.detection_attenuation_um = (40.0, 120.0)
  sim.illumination_attenuation_um = (40.0, 120.0)
  sim.view_photons = (40.0, 200.0)
  sim.view_background_photons = (2.0, 10.0)
  sim.fused_fwhm_xy_um = (0.35, 0.5)
  sim.fused_fwhm_z_um = (0.7, 1.0)
  sim.fused_photons = (400.0, 1500.0)
  sim.fused_background_photons = (2.0, 10.0)
  sim.fused_noise = True
  sim.camera = ml_collections.ConfigDict()
  sim.camera.model = "scmos"
  sim.camera.qe = 0.8
  sim.camera.gain_adu_per_e = 2.17
  sim.camera.offset_adu = 100.0
  sim.camera.read_noise_e = 1.4
  sim.camera.em_gain = 1.0
  return sim


def get_model_config() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  # 'unet3d': 3D U-Net (any stack depth). 'unet2d_z': 2D U-Net over (y, x) with the Z
  # slices of a patch as channels: ~40x cheaper per step on CPU, but it learned far
  # less per example in our runs (validation N_SSIM -0.01 after 1600 examples, vs 0.22
  # for the 3D U-Net after 400), so the 3D U-Net is the default.
  model.kind = "unet3d"
  model.depth = 2
  model.base_width = 8
  model.max_width = 32
  model.convs_per_level = 2
  model.norm = "group"
  model.upsample = "transpose"
  model.pool_factors = ((1, 2, 2), (2, 2, 2))      # unet3d only
  model.residual_blocks = False
  # 'factorized': (2+1)D convs (a k x k conv per slice, then a k-tap conv along z; see
  # smlm_jax/nn/unet.py), ~4x faster training steps than true 3D convs on CPU
  # (1.06 vs 4.55 s per step of 4 x 24 x 32 x 32 on 2 cores), so ~5x more examples fit
  # the CPU budget. 'full': true 3D convs (the gpu variant).
  model.conv = "factorized"
  # Extra input channel: depth of each slice below the surface / depth_scale_um.
  model.depth_channel = False
  model.depth_scale_um = 100.0
  return model


def randomize_sim(sim: ml_collections.ConfigDict) -> None:
  """Domain randomization (issue 23): wider priors than any one microscope, so a model
  trained on them does not depend on our simulator's particular choices. Sources:
  deeper samples and fewer photons (embryos imaged 100+ um deep at low dose, Power &
  Huisken 2017); lateral FWHM 0.3-0.7 um (NA 0.4-1.1 at 500-600 nm) and sheets 1.5-4.5
  um thick; attenuation lengths 25-200 um (clear organoids to dense embryos);
  cell spacing 5-16 um (early embryos to organoids); axial side lobes up to 35% (Bessel
  and lattice sheets, Gao et al. 2014 / Chen et al. 2014; spherical aberration from
  refractive-index mismatch); a diffuse scattering halo up to 50% of the light, growing
  with depth; sheet stripes and absorption shadows behind structure (one-sided
  illumination, Huisken & Stainier 2007); target resolution 0.3-0.55 / 0.6-1.3 um."""
  sim.cell_spacing_um = (5.0, 16.0)
  sim.cell_jitter = 0.4
  sim.nucleus_radius_fraction = (0.2, 0.45)
  sim.nucleus_aspect = (0.6, 1.4)
  sim.nucleus_texture = (0.1, 0.7)
  sim.membrane_texture = 0.5
  sim.cytoplasm_level = (0.0, 0.2)
  sim.cell_brightness = (0.3, 1.7)
  sim.depth_offset_um = (0.0, 100.0)
  sim.illumination_offset_um = (0.0, 80.0)
  sim.view_fwhm_xy_um = (0.3, 0.7)
  sim.view_fwhm_z_um = (1.5, 4.5)
  sim.blur_growth_length_um = (80.0, 200.0)
  sim.detection_attenuation_um = (25.0, 200.0)
  sim.illumination_attenuation_um = (25.0, 200.0)
  sim.view_photons = (8.0, 300.0)
  sim.view_background_photons = (0.5, 20.0)
  sim.fused_fwhm_xy_um = (0.3, 0.55)
  sim.fused_fwhm_z_um = (0.6, 1.3)
  sim.fused_photons = (200.0, 3000.0)
  sim.fused_background_photons = (1.0, 20.0)
  sim.axial_lobe_weight = (0.0, 0.35)
  sim.axial_lobe_scale = (1.5, 2.0)
  sim.halo_fraction = (0.0, 0.5)
  sim.halo_sigma_um = (1.5, 5.0)
  sim.scatter_length_um = (30.0, 120.0)
  sim.stripe_amplitude = (0.0, 0.3)
  sim.shadow_strength = (0.0, 0.03)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: None (CPU default: trained on the domain-randomized priors of
  :func:`randomize_sim`), 'gpu' (the same priors, bigger network and patches),
  'narrow' (the CPU default before issue 23: the literature priors of
  :func:`get_sim_config` only; they are also the priors of the study's own-simulator
  test volumes), 'tiny' (unit tests, narrow priors)."""
  variant = arg or "cpu"
  if variant not in ("cpu", "gpu", "tiny", "narrow"):
    raise ValueError(f"unknown config variant {variant!r}; use cpu, gpu, narrow or tiny")
  config = ml_collections.ConfigDict()
  config.task = "fusion"
  config.seed = 0
  config.sim = get_sim_config()
  config.model = get_model_config()
  config.loss = ml_collections.ConfigDict()
  config.loss.kind = "ssim_l1"          # or 'n_ssim'
  config.loss.l1_weight = 1.0
  config.loss.ssim_weight = 1.0
  # Percentile-normalize the prediction again inside the loss, as the metric does (on:
  # validation N_SSIM 0.777 vs 0.378 at 300 steps), and train against the noiseless
  # fused view (off: 0.693 with renormalize; see smlm_jax/fusion/task.py).
  config.loss.renormalize = True
  config.loss.clean_target = False

  # Noiseless simulated examples reused with fresh noise and flips (0: simulate every
  # example inside the step, as on GPU).
  config.pool_size = 128
  config.num_train_steps = 2000
  config.batch_size = 4
  config.accumulate_steps = 1
  config.learning_rate = 3e-3
  config.warmup_steps = 40
  config.weight_decay = 1e-4
  config.grad_clip_norm = 1.0
  config.ema_decay = 0.0        # > 0: evaluate / export / predict with a moving average of the weights
  config.schedule = "cosine"

  config.log_every_steps = 10
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  config.max_to_keep = 2
  config.eval_num_volumes = 16
  config.eval_batch_size = 8
  config.eval_seed = 4242
  # Prediction of large volumes: tile (z, y, x) voxels, overlap and discarded halo.
  config.predict = ml_collections.ConfigDict()
  config.predict.tile = (24, 96, 96)
  config.predict.overlap = (12, 16, 16)
  config.predict.halo = (2, 4, 4)
  config.predict.memory_gb = 2.0
  # Self-ensemble at prediction (and validation): the mean over the 8 y/x flips and
  # transposes of each tile (smlm_jax.fusion.task.predict_tta); 8x the inference cost,
  # no training cost.
  config.predict.tta = True

  if variant in ("cpu", "gpu"):
    # Chosen by the rule fixed before the run (issue 23): the second simulator's
    # volumes (validation from then on) N_SSIM 0.654 vs 0.634 for the narrow priors,
    # and >= 0.7 kept on our narrow-prior test volumes (0.741; narrow-trained 0.800).
    randomize_sim(config.sim)
    config.pool_size = 256          # more specimens for the wider priors
    # 4000 (was 2000, 470 s): the wider priors keep learning; chosen by a rule fixed
    # before the run: validation N_SSIM (randomized priors) 0.610 -> 0.642, second
    # simulator 0.654 -> 0.678; 844 s alone on 2 cores (budget 20 min)
    config.num_train_steps = 4000
  if variant == "gpu":
    config.sim.shape = (64, 128, 128)
    config.model.kind = "unet3d"
    config.model.conv = "full"
    config.pool_size = 0
    config.model.base_width = 32
    config.model.depth = 3
    config.model.max_width = 128
    config.model.pool_factors = ((1, 2, 2), (2, 2, 2), (2, 2, 2))
    config.num_train_steps = 20000
    config.batch_size = 8
    config.learning_rate = 1e-3
    config.warmup_steps = 500
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 2000
    config.eval_num_volumes = 64
    config.eval_batch_size = 8
    config.predict.tile = (64, 256, 256)
    config.predict.overlap = (16, 32, 32)
    config.predict.halo = (4, 8, 8)
    config.predict.memory_gb = 16.0
  elif variant == "tiny":
    config.sim.shape = (12, 16, 16)
    config.sim.depth_offset_um = (0.0, 10.0)
    config.model.kind = "unet2d_z"
    config.model.base_width = 8
    config.model.max_width = 16
    config.num_train_steps = 2
    config.batch_size = 2
    config.pool_size = 4
    config.warmup_steps = 1
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.eval_num_volumes = 2
    config.eval_batch_size = 2
    config.predict.tile = (12, 16, 16)
    config.predict.overlap = (6, 8, 8)
    config.predict.halo = (1, 2, 2)
  return config
