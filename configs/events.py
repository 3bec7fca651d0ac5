"""Event detection (task 'events', smlm_jax/events/): U-Net on n-frame windows.

Train (default: simulated dividing mitochondria; 2-core CPU: 397 s measured, 800 steps):

  python -m smlm_jax.train --config=configs/events.py --workdir=runs/events_sim

Expected result on a 2-core CPU: the final table reports, on the fixed simulated
validation set (eval.sim_seed, never a training key), event-level precision 1.00,
recall 0.79 and F1 0.88 at the F0.1-optimal threshold (0.73) and a best F1 of 0.96;
on held-out test crops (experiments/events_study.py, seed 777) F1 0.926 at the
validation set's F1-optimal threshold and 0.868 at the F0.1 one; threshold.json, pr_curve.png and examples.png appear in the workdir. Then fine-tune
on your crops (after python -m smlm_jax.events.db add ... --db=events.db):

  python -m smlm_jax.train --config=configs/events.py --workdir=runs/events_real \
      --config.init_from=runs/events_sim --config.data.source=db \
      --config.data.db=events.db --config.data.query="microscope=isim" \
      --config.crop_px=128 --config.num_train_steps=600 --config.learning_rate=5e-4

and predict: python -m smlm_jax.events.predict --workdir=runs/events_real --input=...
Variants: ``configs/events.py:gpu`` (bigger model, crops and schedule for one GPU) and
``configs/events.py:tiny`` (unit tests). Every field can be overridden.

Field choices:
* data.num_frames = 3: the model sees frames t-2, t-1, t and predicts frame t's event
  map; a constriction is told from a stable thin segment by its change over frames
  (deep-events also feeds a few frames as channels).
* crop_px = 64 on CPU (3.6 um at 56 nm/px; a tubule is 8-15 px wide, so a crop holds
  1-4 tubule segments). Real crops (256 px) are cut to random crop_px windows on device
  (use 128 when fine-tuning on real crops: more context, 4x the cost).
* sim.*: see :mod:`smlm_jax.events.simulate`. 56 nm pixels and 5 s frames are those of
  the shared iSIM crops (their OME metadata); PSF sigma 70 nm = FWHM 165 nm, iSIM's
  lateral resolution (York et al., Nature Methods 10, 1122 (2013): 145 nm at 488 nm,
  plus margin); tubule diameters 400-900 nm (COS-7 mitochondria are 0.3-1 um wide;
  measured on the shared crops as 10-15 px apparent width); lengths 1.5-5 um; camera
  (gain 2.5 ADU/e-, offset 100 ADU, read noise 1.5 e-) and brightness (tubule peak 20-200,
  background 1-15 photons/px/frame) from the shared crops' frame-to-frame variance vs.
  mean. Necks of 2-4 px half-width (110-220 nm) narrow over frames at 0.15-0.4 of full
  constriction per frame (a division takes a few 5 s frames on the iSIM, as the
  shared crops' 4-10 annotated frames show), then the ends retract.
* data.calibration = "" (the default simulator; a file from python -m
  smlm_jax.events.calibrate overrides sim.*: on the shared crops it brought the
  real-vs-simulated classifier accuracy from 0.82 to 0.72, README), data.negative_fraction
  = 0 (0.4 when fine-tuning with source 'mixed': real hard negatives), and
  data.include_unusable = False (crops db add flagged without structure stay out).
* sigma_px = 2: the ground-truth Gaussian of the shared crops (fit), 112 nm.
* model: depth 3, base width 16, first kernel 5, group norm; output bias -log(99)
  (prior event-pixel fraction 1%, Lin et al. 2017) so the focal loss starts small.
* loss: soft focal, alpha 0.25, gamma 2 (Lin et al., ICCV 2017 defaults).
* eval: beta 0.1 (deep-events; see :mod:`smlm_jax.events.metrics`), a detection counts
  within 8 px (450 nm) of the annotated site: about the site's localization precision
  by eye on these data, and under half a tubule width away from a neighbouring tubule.
"""
import ml_collections


def get_sim_config() -> ml_collections.ConfigDict:
  sim = ml_collections.ConfigDict()
  sim.pixel_size_nm = 56.0
  sim.frame_interval_s = 5.0
  sim.psf_sigma_nm = 70.0
  sim.diameter_nm = (400.0, 900.0)
  sim.length_um = (1.5, 5.0)
  sim.bend = 0.35
  sim.num_tubules = (1, 4)
  sim.points_per_tubule = 96
  sim.modulation = 0.3
  sim.static_dip_prob = 0.5
  sim.static_dip_depth = (0.2, 0.7)
  sim.drift_px = 0.5
  sim.flicker = 0.05
  sim.event_fraction = 0.5
  sim.margin_px = 6.0
  sim.q_now = (0.4, 1.6)
  sim.q_range = (0.4, 1.6)
  sim.rate = (0.15, 0.4)
  sim.neck_px = (2.0, 4.0)
  sim.retract_px = 6.0
  sim.photons = (20.0, 200.0)
  sim.background_photons = (1.0, 15.0)
  sim.sigma_px = 2.0
  sim.qe = 0.8
  sim.gain_adu_per_e = 2.5
  sim.offset_adu = 100.0
  sim.read_noise_e = 1.5
  sim.column_gain_rel_std = 0.0      # vertical fixed-pattern stripes (relative rms per
                                     # pixel column; the iSIM crops: fitted by calibrate)
  sim.branch_prob = 0.0              # tubules starting on the previous one (junctions)
  sim.ring_prob = 0.0                # tubules bent into C shapes / closed rings (donuts)
  sim.tip_px = 0.0                   # tubule ends extending / retracting (rms px per frame)
  sim.num_blobs = 0                  # slots for round fragments (hard negatives); 0 = none
  sim.blob_prob = 0.5                # each slot filled with this probability
  sim.blob_diameter_nm = (400.0, 1200.0)
  sim.blob_elongation = (0.0, 1.5)   # segment length / diameter
  sim.blob_brightness = (0.5, 2.0)   # peak / the crop's tubule peak
  return sim


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Variants: None (CPU default), 'gpu', 'tiny' (unit tests)."""
  variant = arg or "cpu"
  if variant not in ("cpu", "gpu", "tiny"):
    raise ValueError(f"unknown config variant {variant!r}; use cpu, gpu or tiny")
  config = ml_collections.ConfigDict()
  config.task = "events"
  config.seed = 0
  config.crop_px = 64
  config.init_from = ""

  config.data = ml_collections.ConfigDict()
  config.data.source = "sim"           # 'sim' | 'db' | 'mixed'
  config.data.num_frames = 3
  config.data.db = ""                  # SQLite file from smlm_jax.events.db
  config.data.query = ""               # e.g. "microscope=isim; frames>=5"
  config.data.val_fraction = 0.2
  config.data.split_seed = 0
  config.data.group_by = ""            # e.g. "source_file": all crops of a movie together
  config.data.real_fraction = 0.5      # 'mixed': probability that an example is real
  config.data.positive_fraction = 0.5  # real windows placed around the annotated site
  config.data.negative_fraction = 0.0  # real windows drawn as hard negatives (no site
                                       # of any frame within 16 px; label 0)
  config.data.include_unusable = False  # crops db add flagged (no structure): left out
  config.data.calibration = ""        # JSON of python -m smlm_jax.events.calibrate

  config.sim = get_sim_config()

  config.augment = ml_collections.ConfigDict()
  config.augment.dihedral = True
  config.augment.elastic_px = 1.5
  config.augment.elastic_grid = 4
  config.augment.gamma = (0.7, 1.4)
  config.augment.flicker = 0.08
  config.augment.poisson_prob = 0.5
  config.augment.photons = (10.0, 200.0)
  config.augment.background_photons = 3.0
  config.augment.gauss_prob = 0.5
  config.augment.gauss_sigma = 0.05

  config.model = ml_collections.ConfigDict()
  config.model.depth = 3
  config.model.base_width = 16
  config.model.first_kernel_size = 5
  config.model.kernel_size = 3
  config.model.norm = "group"
  config.model.upsample = "transpose"
  config.model.dropout = 0.0
  config.model.prior = 0.01

  config.loss = ml_collections.ConfigDict()
  config.loss.name = "focal"           # 'focal' | 'bce' | 'dice' | 'focal+dice'
  config.loss.alpha = 0.25
  config.loss.gamma = 2.0
  config.loss.dice_weight = 1.0

  config.eval = ml_collections.ConfigDict()
  config.eval.beta = 0.1
  config.eval.radius_px = 8.0
  config.eval.num_sim = 256
  config.eval.sim_seed = 12345

  config.num_train_steps = 800
  config.batch_size = 16
  config.learning_rate = 2e-3
  config.warmup_steps = 100
  config.weight_decay = 1e-4
  config.grad_clip_norm = 1.0
  config.ema_decay = 0.0        # > 0: evaluate / export / predict with a moving average of the weights
  config.log_every_steps = 25
  config.eval_every_steps = 400
  config.checkpoint_every_steps = 400
  config.max_to_keep = 2
  config.eval_batch_size = 32

  if variant == "gpu":
    config.crop_px = 128
    config.model.depth = 4
    config.model.base_width = 32
    config.num_train_steps = 20000
    config.batch_size = 64
    config.learning_rate = 1e-3
    config.warmup_steps = 500
    config.eval_every_steps = 2000
    config.checkpoint_every_steps = 2000
    config.eval.num_sim = 1024
    config.eval_batch_size = 128
  elif variant == "tiny":
    config.crop_px = 32
    config.model.depth = 2
    config.model.base_width = 4
    config.sim.num_tubules = (1, 2)
    config.sim.points_per_tubule = 32
    config.num_train_steps = 2
    config.batch_size = 4
    config.warmup_steps = 1
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.eval.num_sim = 16
    config.eval_batch_size = 8
  return config
