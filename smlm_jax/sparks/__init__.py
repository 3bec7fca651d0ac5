"""Ca2+ release events (sparks, waves, puffs) in full-frame confocal movies.

* ``simulator``: movies [T, H, W] with labels and instances, pure JAX, in the step.
* ``model``: (2+1)D-factorized U-Net (CPU) or ``smlm_jax.nn.UNet`` 3D; 4 classes.
* ``task``: :class:`SparksTask` for the shared trainer (losses: CE / focal / Lovasz).
* ``inference``: seamless chunked inference on long movies.
* ``events``: instances, IoMin matching, per-class F1, the confidence filter (a
  package: spec, extraction, confidence, matching, scoring, tuning).
* ``predict`` / ``evaluate``: command-line tools.
"""
