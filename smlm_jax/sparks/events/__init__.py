"""From class probabilities to event instances, IoMin matching and per-class F1.

Conventions: a movie is ``[T, H, W]``; ``probs`` are ``[T, H, W, 4]`` (background,
spark, wave, puff); label volumes use 0 background, 1 spark, 2 wave, 3 puff, 4 ignore;
instance volumes are int32 with 0 = no event and ids 1..N. Tuples of per-class
settings are ordered (spark, wave, puff), i.e. indexed by class id - 1.

  probs [T, H, W, 4], movie --extract_events--> instances, class per id, Event list
      (argmax -> components -> spark peaks split -> minimum sizes -> confidence filter)
  Scorer.add(probs, movie, labels, true instances) --> MovieRecord (unfiltered)
  Scorer.metrics(filter) --> IoMin matching --> per-class P / R / F1, IoU, confusion
  choose_filter(Scorer.records) --> per-class confidence filter, saved with the run

spec         EventSpec (sizes, distances, thresholds; from the config), Event
extraction   dF/F0, spark peaks, instances from classes or labels, ``extract_events``
confidence   the confidence filter (mean own-class probability, volume, peak
             dF/F0, peak over the movie's noise)
matching     IoMin matching of one movie, precision / recall / F1
scoring      Scorer and MovieRecord over many movies, metric tables
tuning       choosing the confidence filter per class; FILTER_FILE in the run

Every name below is importable from here (``from smlm_jax.sparks import events``).
"""
from smlm_jax.sparks.events.spec import NAMES, Event, EventSpec, spec_from_config
from smlm_jax.sparks.events.confidence import (apply_confidence_filter, confident,
                                               event_amplitude, event_confidence,
                                               event_snr, noise_dff, renumber)
from smlm_jax.sparks.events.extraction import (absorb_into_waves, annotated_instances,
                                               describe, estimate_dff, extract_events,
                                               extract_unfiltered, filter_true_instances,
                                               find_peaks, instances_from_classes,
                                               instances_from_labels, smooth)
from smlm_jax.sparks.events.matching import greedy, match_events, match_pairs, overlaps, prf
from smlm_jax.sparks.events.scoring import (AMPLITUDE_BINS, MovieRecord, Scorer,
                                            amplitude_table, amplitude_table_text,
                                            confusion_table, flat_metrics,
                                            simulated_scorer, summary_table)
from smlm_jax.sparks.events.tuning import (AMPLITUDE_GRID_DFF, FILTER_FILE, FLOOR_GRID,
                                           PROBABILITY_GRID, SNR_FLOORS, VOLUME_GRID_UM2_MS,
                                           choice_options, choose_filter, filter_counts,
                                           filter_floors, load_filter, save_filter,
                                           set_puff_ceiling, tune_simulated,
                                           use_run_filter)
