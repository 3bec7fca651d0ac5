"""Test-time self-ensembles of dense predictors."""
from __future__ import annotations

import jax.numpy as jnp


def mirror_ensemble(fn, x, axes=(2, 3), transpose: bool = False):
  """Self-ensemble (Lim et al., EDSR, CVPRW 2017): the mean of ``fn`` over the 4 flips
  of ``x`` along the two ``axes`` (and, with ``transpose``, their swapped versions too:
  8 calls), each output mapped back. ``fn``'s output must keep ``x``'s layout on
  ``axes`` (e.g. [B, Z, Y, X, C] -> [B, Z, Y, X] or [B, T, H, W, K] with axes (2, 3))."""
  a, b = axes
  total, count = 0.0, 0
  for swap in ((False, True) if transpose else (False,)):
    for flip in ((), (b,), (a,), (a, b)):
      h = jnp.flip(x, flip) if flip else x
      if swap:
        h = jnp.swapaxes(h, a, b)
      y = fn(h)
      if swap:
        y = jnp.swapaxes(y, a, b)
      total = total + (jnp.flip(y, flip) if flip else y)
      count += 1
  return total / count
