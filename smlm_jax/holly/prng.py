"""``fast_prng``: trace a function's random draws with non-partitionable threefry.

With jax 0.10's default (``jax_threefry_partitionable=True``), XLA:CPU took 7-60 s
to compile *each* random draw of a new shape on our 2-core machines (measured: a
single ``jax.random.normal(key, (3, 3, 8, 9))`` under jit, 50 s), against ~1 s with
the non-partitionable lowering. Every draw of this package is per example (vmapped
over per-image keys) or tiny, so nothing is lost for sharding. The draws stay a pure
function of the key (they differ from the partitionable stream). The switch is a
context manager active only while tracing the decorated function, so no other
system's random streams change.
"""
from __future__ import annotations

import functools

import jax


def fast_prng(fn):
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.threefry_partitionable(False):
      return fn(*args, **kwargs)
  return wrapped
