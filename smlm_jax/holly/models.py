"""The pose CNN: one image -> rotation (6D), image-plane translation (and sigma).

Input ``x`` [B, H, W] (a unit-mass image divided by its maximum, so values lie in
[0, 1] at every sigma of the curriculum), optionally average-pooled by ``pool`` before
the convolutions (the CPU default looks at 64x64 while the loss compares 128x128).
Body: HOLLy's design (Blundell et al. 2021: a strided 5x5 convolution, then pairs of
3x3 convolutions, a stride-2 one doubling the width and a stride-1 one, and a
flattened dense layer; no global pooling, because pose needs *where* things are),
with GroupNorm instead of BatchNorm (no train/
eval discrepancy, independent of the per-device batch) and swish activations.

Outputs (a dict):
  ``r6``    [B, K, 6]  K rotation hypotheses in the continuous 6D representation
                       (see :mod:`smlm_jax.holly.rotations`); K = ``hypotheses``
  ``t``     [B, 2]     translation, ``max_shift * 1.5 * tanh(.)`` (normalized units)
  ``log_sigma_scale`` [B]  (only with ``predict_sigma``) a per-image factor on the
                       curriculum sigma, exp(0.5 tanh(.)) in [0.61, 1.65]

The K hypotheses (multiple-choice learning; Insafutdinov & Dosovitskiy, "Unsupervised
learning of shape and pose with differentiable point clouds", NeurIPS 2018) let the
network propose several poses for ambiguous images; the loss keeps the best one per
image. The 6D heads start near distinct rotations so that the hypotheses differ.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def _initial_hypotheses(k: int) -> np.ndarray:
  """6D of k well-spread fixed rotations (identity first), [k, 6]."""
  if k == 1:
    return np.array([[1, 0, 0, 0, 1, 0]], np.float32)
  from scipy.spatial.transform import Rotation
  R = Rotation.random(k, random_state=0).as_matrix()
  R[0] = np.eye(3)
  return np.concatenate([R[:, :, 0], R[:, :, 1]], axis=1).astype(np.float32)


class PoseNet(nn.Module):
  widths: Sequence[int] = (16, 32, 64, 128)
  dense: int = 256
  hypotheses: int = 1
  pool: int = 1
  max_shift: float = 0.05
  predict_sigma: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = x[..., None].astype(jnp.float32)
    if self.pool > 1:
      h = nn.avg_pool(h, (self.pool, self.pool), strides=(self.pool, self.pool))
    norm = lambda c: nn.GroupNorm(num_groups=min(8, c))
    h = nn.swish(norm(self.widths[0])(nn.Conv(self.widths[0], (5, 5), strides=2)(h)))
    for w in self.widths[1:]:
      h = nn.swish(norm(w)(nn.Conv(w, (3, 3), strides=2)(h)))
      h = nn.swish(norm(w)(nn.Conv(w, (3, 3))(h)))
    h = h.reshape(h.shape[0], -1)
    h = nn.swish(nn.Dense(self.dense)(h))
    k = self.hypotheses
    base = jnp.asarray(_initial_hypotheses(k))
    r6 = nn.Dense(6 * k, kernel_init=nn.initializers.variance_scaling(
        0.1, "fan_in", "truncated_normal"))(h).reshape(-1, k, 6) + base
    t = nn.Dense(2, kernel_init=nn.initializers.zeros)(h)
    out = {"r6": r6, "t": 1.5 * self.max_shift * jnp.tanh(t)}
    if self.predict_sigma:
      s = nn.Dense(1, kernel_init=nn.initializers.zeros)(h)[:, 0]
      out["log_sigma_scale"] = 0.5 * jnp.tanh(s)
    return out
