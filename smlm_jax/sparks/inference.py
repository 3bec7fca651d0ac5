"""Segmentation of movies of any length: overlapping time chunks merged without seams.

A movie ``[T, H, W]`` is normalized as a whole (:func:`smlm_jax.sparks.task.model_input`),
then cut into chunks of ``chunk`` frames starting every ``stride`` frames (the end is
reflect-padded so that the last chunk is full). Each output frame is taken from the
one chunk in which it is most central: chunk i contributes frames
``[s_i + m, s_i + m + stride)`` with ``m = (chunk - stride) // 2`` (the first chunk
from frame 0, the last to the end). Nothing is averaged, so there is no seam: the
network is local in time (position-local norms only), and when ``m`` and ``chunk -
stride - m`` are both >= the model's temporal halo (``model.temporal_halo``) and
``stride`` is a multiple of the temporal pooling product (``model.time_alignment``),
every kept frame is computed from exactly the inputs the whole-movie pass would see:
the result equals whole-movie inference (to float rounding). :func:`plan_chunks`
reports whether that holds. A movie no longer than ``chunk`` is one chunk.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from smlm_jax.core import trainer
from smlm_jax.sparks import model as model_lib


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
  starts: tuple          # first frame of each chunk (in the padded movie)
  keep: tuple            # (lo, hi) frames of each chunk kept, in movie coordinates
  chunk: int
  padded_frames: int
  exact: bool            # margins cover the receptive field and strides are aligned
  reason: str = ""


def plan_chunks(num_frames: int, chunk: int, stride: int, halo: int = 0,
                alignment: int = 1) -> ChunkPlan:
  if chunk < 1 or stride < 1 or stride > chunk:
    raise ValueError(f"need 1 <= stride <= chunk, got chunk={chunk} stride={stride}")
  if num_frames <= chunk:
    return ChunkPlan((0,), ((0, num_frames),), num_frames, num_frames, True)
  n = 1 + -(-(num_frames - chunk) // stride)
  starts = tuple(i * stride for i in range(n))
  m = (chunk - stride) // 2
  keep = []
  for i, s in enumerate(starts):
    lo = 0 if i == 0 else s + m
    hi = num_frames if i == n - 1 else s + m + stride
    keep.append((lo, min(hi, num_frames)))
  reasons = []
  if min(m, chunk - stride - m) < halo:
    reasons.append(f"overlap margin {min(m, chunk - stride - m)} frames < receptive-field "
                   f"halo {halo}")
  if stride % alignment or chunk % alignment:
    reasons.append(f"chunk {chunk} and stride {stride} must be multiples of the temporal "
                   f"pooling {alignment}")
  return ChunkPlan(starts, tuple(keep), chunk, starts[-1] + chunk, not reasons,
                   "; ".join(reasons))


def plan_for_model(num_frames, chunk, stride, model_cfg) -> ChunkPlan:
  return plan_chunks(num_frames, chunk, stride, model_lib.temporal_halo(model_cfg),
                     model_lib.time_alignment(model_cfg))


def predict_chunked(predict_batch, x, plan: ChunkPlan, batch_size: int, mesh,
                    progress=None):
  """Probabilities [T, H, W, K] of one normalized movie x [T, H, W, 1].

  ``predict_batch``: numpy [B, chunk, H, W, 1] -> [B, chunk, H, W, K] (e.g. a jitted
  model call); chunks go through :func:`smlm_jax.core.trainer.batched`.
  """
  x = np.asarray(x, np.float32)
  t = x.shape[0]
  pad = plan.padded_frames - t
  if pad > 0:
    x = np.pad(x, ((0, pad), (0, 0), (0, 0), (0, 0)), mode="reflect" if pad < t else "edge")
  out = None
  starts = list(plan.starts)
  bs = trainer.divisible_batch(batch_size, mesh)
  for b0 in range(0, len(starts), bs):
    group = starts[b0:b0 + bs]
    chunks = np.stack([x[s:s + plan.chunk] for s in group])
    probs = trainer.batched(predict_batch, chunks, bs, mesh, pad="edge")
    for j, s in enumerate(group):
      lo, hi = plan.keep[b0 + j]
      if out is None:
        out = np.zeros((t,) + probs.shape[2:], np.float32)
      out[lo:hi] = probs[j, lo - s:hi - s]
    if progress is not None:
      progress(len(group))
  return out


def make_predict_batch(task, state, mesh):
  """numpy chunks [B, T, H, W, 1] -> probabilities via the task's jitted model."""
  fn = task.predict_fn(mesh)
  return lambda chunk: jax.device_get(fn(state, chunk))
