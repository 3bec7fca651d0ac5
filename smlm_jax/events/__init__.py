"""Event detection in 2D+t movies (e.g. mitochondrial divisions), after deep-events.

Pipeline (each step a module and a command, ``python -m smlm_jax.events.<verb>``):

  annotate   napari points CSV + movie -> Gaussian ground-truth movie [T, H, W]
  crops      ground truth -> events (peaks linked over frames) -> crop folders
             (images.tif, ground_truth.tif, event_db.yaml) and negative crops
  db         SQLite event database: add | query | list | delete | split
  (train)    python -m smlm_jax.train --config=configs/events.py (task 'events'):
             a 2D U-Net with the last n frames as channels, trained on simulated
             dividing tubules (:mod:`.simulate`), on database crops augmented on device
             (:mod:`.augment`), or both
  predict    movies -> probability TIFFs + CSV of detections above the run's threshold
  calibrate  real movies/crops (no labels) -> the simulator's parameters fitted by
             gradient descent through :func:`.simulate.scene` (``events_calibration.json``,
             used with ``config.data.calibration``)

Library modules: ``quality`` (the structure check: crops of camera noise only are
flagged by ``db add`` and left out of training and scoring), ``statistics`` (summary
statistics of model-input windows, the common measure of real and simulated crops),
``plots`` (real vs simulated statistics and patches), ``data`` (normalization, windows,
the host sampler with positives around the site and hard negatives far from it).

Conventions: frames ``[T, H, W]`` (a crop, a movie), a model input window ``[n, H, W]``
= frames ``t-n+1 .. t`` (the first frame repeated before the start) predicting the
event map of frame ``t``; pixel coordinates ``(y, x)`` with pixel centres at integers
(napari's convention); ground truth in [0, 1] (peak 1 at an annotated site, Gaussian of
``sigma_px``, zero below 0.1 of the peak); stored ground-truth TIFFs are uint8 scaled
by 254 (deep-events' convention, also that of the shared iSIM crops).

Reference: deep-events, LEB-EPFL (Laboratory of Experimental Biophysics), event-driven
microscopy; Mahecic et al., "Event-driven acquisition for content-enriched microscopy",
Nature Methods 19, 1262 (2022).
"""
