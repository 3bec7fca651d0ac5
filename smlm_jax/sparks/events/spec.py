"""The event settings (``EventSpec``, from the config by ``spec_from_config``) and one
extracted event (``Event``). Tuples of per-class settings are ordered (spark, wave,
puff), i.e. indexed by class id - 1."""
from __future__ import annotations

import dataclasses
import math

from smlm_jax.sparks.simulator import PUFF, SPARK, WAVE

NAMES = {SPARK: "spark", WAVE: "wave", PUFF: "puff"}
DFF_ESTIMATORS = ("robust", "mean")


@dataclasses.dataclass(frozen=True)
class EventSpec:
  pixel_size_um: float = 0.2
  frame_interval_ms: float = 6.8
  spark_min_distance_um: float = 1.8
  spark_min_distance_ms: float = 20.0
  smooth_sigma_px: float = 2.0
  smooth_sigma_frames: float = 1.0
  min_duration_ms: tuple = (13.6, 20.0, 81.6)   # as configs/sparks.py get_events_config
  min_area_um2: tuple = (1.2, 20.0, 0.36)
  iomin_threshold: float = 0.5
  min_probability: tuple = (0.0, 0.0, 0.0)       # predictions only (step 5); off here,
                                                 # configs/sparks.py sets them
  min_volume_um2_ms: tuple = (0.0, 0.0, 0.0)     # predictions only (step 5)
  min_amplitude_dff: tuple = (0.0, 0.0, 0.0)     # predictions only (step 5)
  min_snr: tuple = (0.0, 0.0, 0.0)               # predictions only (step 5)
  # A ceiling on the volume (um^2 ms) per class: larger predictions are dropped (0 = off;
  # predictions only, fixed by the config, not tuned: config.events.max_volume_um2_ms).
  max_volume_um2_ms: tuple = (0.0, 0.0, 0.0)
  # Step 1b: spark / puff components that touch a wave become part of it (a wave's
  # front breaking into pieces the network calls sparks). Off for runs without it.
  absorb_into_waves: bool = False
  # Step 4b: a puff component with at least this fraction of its voxels at pixels a
  # wave occupied in an earlier frame is the wave's decay, not a new release, and is
  # dropped (0 = off, the default; predictions only).
  wave_tail_fraction: float = 0.0
  # First / last frames of a movie read as background (step 1): the training labels
  # make them ignore (sim.labels.ignore_frames), so the network's output there is
  # untrained: a retrained default put 120 of its 132 false sparks on 8 movies of the
  # independent simulator (whose labels do not ignore the ends) in those frames.
  edge_frames: int = 0
  # How dF/F0 and its noise are estimated (extraction.estimate_dff, confidence.noise_dff):
  # 'robust' (F0 = median over time of the background voxels; noise = MAD of dF/F0 about
  # its running median in time) or 'mean' (F0 = their mean; noise = their SD over time:
  # the estimates before 2026-12-07, inflated by waves' unlabelled tails and bleaching).
  dff_estimator: str = "robust"

  def __post_init__(self):
    if self.dff_estimator not in DFF_ESTIMATORS:
      raise ValueError(f"config.events.dff_estimator must be one of {DFF_ESTIMATORS}, got "
                       f"{self.dff_estimator!r}")

  def min_frames(self, cls: int) -> int:
    return max(1, int(math.ceil(self.min_duration_ms[cls - 1] / self.frame_interval_ms - 1e-6)))

  def min_pixels(self, cls: int) -> int:
    return max(1, int(math.ceil(self.min_area_um2[cls - 1] / self.pixel_size_um ** 2 - 1e-6)))


def spec_from_config(config, pixel_size_um: float | None = None,
                     frame_interval_ms: float | None = None) -> EventSpec:
  e = config.events
  return EventSpec(
      pixel_size_um=float(pixel_size_um or config.sim.pixel_size_um),
      frame_interval_ms=float(frame_interval_ms or config.sim.frame_interval_ms),
      spark_min_distance_um=float(e.spark_min_distance_um),
      spark_min_distance_ms=float(e.spark_min_distance_ms),
      smooth_sigma_px=float(e.smooth_sigma_px), smooth_sigma_frames=float(e.smooth_sigma_frames),
      min_duration_ms=tuple(float(v) for v in e.min_duration_ms),
      min_area_um2=tuple(float(v) for v in e.min_area_um2),
      iomin_threshold=float(e.iomin_threshold),
      # .get: runs trained before these settings existed keep them off.
      min_probability=tuple(float(v) for v in e.get("min_probability", (0.0,) * 3)),
      min_volume_um2_ms=tuple(float(v) for v in e.get("min_volume_um2_ms", (0.0,) * 3)),
      min_amplitude_dff=tuple(float(v) for v in e.get("min_amplitude_dff", (0.0,) * 3)),
      min_snr=tuple(float(v) for v in e.get("min_snr", (0.0,) * 3)),
      max_volume_um2_ms=tuple(float(v) for v in e.get("max_volume_um2_ms", (0.0,) * 3)),
      absorb_into_waves=bool(e.get("absorb_into_waves", False)),
      wave_tail_fraction=float(e.get("wave_tail_fraction", 0.0)),
      edge_frames=int(config.sim.labels.ignore_frames),
      dff_estimator=str(e.get("dff_estimator", "robust")))


@dataclasses.dataclass
class Event:
  event_id: int
  cls: int
  t_start: int
  t_end: int
  y_px: float
  x_px: float
  duration_ms: float
  area_um2: float
  amplitude: float
  num_voxels: int
  snr: float = float("nan")     # peak dF/F0 over the movie's noise (confidence.event_snr)

  @property
  def class_name(self) -> str:
    return NAMES[self.cls]
