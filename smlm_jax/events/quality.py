"""Is there anything in a crop? The structure check of ``db add``, training and scoring.

``structure_snr(frames [T, H, W]) -> float``: per frame, the contrast of its bright
structures, (99.5th percentile - median), in units of the frame's own camera noise,
sigma = 1.4826 MAD(x[:, j+1] - x[:, j]) / sqrt(2) (adjacent-pixel differences: a
smooth structure of a few px width barely changes between neighbours, so the MAD of
the differences is the pixel noise, robust to the structures); the median over frames.
Camera noise alone (offset and gain drop out) gives about 2.6 (Gaussian) to 4.8
(Poisson of 0.05-2 counts: skewed, discrete); a fluorescent structure of a few noise
sigmas gives more.

``usable(score)``: ``score >= MIN_STRUCTURE_SNR`` = 6, twice pure noise's value. On the
shared iSIM crops: the pure-noise crop event_643a9c8cc961ee3e0ca48b33 (mean 105, std
4.8 ADU) scores 3.6; the five with mitochondria 16.5-52.

A crop that fails is flagged ``usable = 0`` in the database (:mod:`.db`), left out of
training and scoring unless ``config.data.include_unusable`` (or the study's
``--include_unusable``), and reported by ``db add``.
"""
from __future__ import annotations

import sys

import numpy as np

MIN_STRUCTURE_SNR = 6.0
QUANTILE_HIGH = 0.995


def noise_sigma(frame: np.ndarray) -> float:
  """Pixel noise of one frame [H, W] from adjacent-pixel differences (robust MAD)."""
  d = np.diff(np.asarray(frame, np.float64), axis=-1).ravel()
  mad = 1.4826 * np.median(np.abs(d - np.median(d)))
  if mad == 0:                        # few-count (integer) noise: the MAD can be 0
    mad = np.std(d)
  return float(mad / np.sqrt(2.0))


def structure_snr(frames) -> float:
  """Median over frames of (q99.5 - median) / noise sigma; see the module docstring."""
  frames = np.asarray(frames, np.float64)
  if frames.ndim == 2:
    frames = frames[None]
  scores = []
  for f in frames:
    lo, hi = np.quantile(f, [0.5, QUANTILE_HIGH])
    sigma = noise_sigma(f)
    if sigma <= 0:                    # noiseless (simulated/constant): any contrast counts
      scores.append(np.inf if hi > lo else 0.0)
    else:
      scores.append((hi - lo) / sigma)
  return float(np.median(scores))


def usable(score: float, min_snr: float = MIN_STRUCTURE_SNR) -> bool:
  return bool(score >= min_snr)


def file_structure_snr(path: str) -> float:
  """:func:`structure_snr` of a TIFF crop or movie (MovieError if unreadable)."""
  from smlm_jax.events import annotate
  frames, _ = annotate.read_frames(path)
  return structure_snr(frames)


def report_unusable(records, stream=None) -> list[dict]:
  """One ``note:`` line per database record flagged unusable; those records."""
  bad = [r for r in records if not r["usable"]]
  for r in bad:
    print(f"note: {r['event_id']} ({r['folder']}): no structure above the camera noise "
          f"(structure SNR {r['structure_snr']:.1f} < {MIN_STRUCTURE_SNR:g}); "
          "flagged usable=0, left out of training and scoring unless asked "
          "(config.data.include_unusable=True)", file=stream or sys.stderr)
  return bad
