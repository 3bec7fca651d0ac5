"""Exact, fast shot noise and camera models.

Contract
--------
* ``poisson(key, lam)`` draws exact Poisson variates (not a Gaussian approximation)
  for any array of non-negative means ``lam`` (float32 in, float32 counts out).
* ``poisson_and_normal(key, lam)`` returns the same counts plus standard normal
  variates of the same shape, independent of the counts (used for read noise).
* ``apply_camera(key, expected_photons, camera)`` turns expected photons per pixel into
  camera counts in ADU (float32): quantum efficiency, Poisson shot noise, then the
  sCMOS or EMCCD read-out chain.
* ``expected_adu(expected_photons, camera)`` is the noiseless mean of that chain and is
  differentiable in every camera parameter.
All are pure functions of ``key`` and their inputs, jit/vmap-able, and work on sharded
arrays (element-wise arithmetic on bulk random bits; no per-element keys).

Why not ``jax.random.poisson``: it splits one key per element and runs a per-element
rejection loop, which at 100-photon means made it ~20x slower than the rest of a
simulation on CPU. On CPU the cost of a simulated movie is dominated by random bits
(threefry), so the sampler is built to use about ONE 32-bit random word per pixel:

* ``lam < 30`` (every background pixel of the default priors): inversion by
  sequential search of the CDF (Devroye 1986, X.3.3) with one 24-bit uniform u,
  unrolled ``_INVERSION_STEPS`` = 65 times so that XLA fuses it into a single
  element-wise kernel. The truncation is at a tail mass below 1e-8 (P[X > 65 | 30]),
  under the 2**-24 resolution of u, so the result is the exact inverse CDF at that
  resolution.
  The search also yields the *residual uniform*: given the drawn k, u is uniform on
  (F(k-1), F(k)], so v = (u - F(k-1)) / p(k) is Uniform(0, 1) and independent of k.
  ``ndtri(v)`` is the standard normal used for read noise: no second random word.
  (Resolution of v: 2**-24 / p(k), i.e. < 2e-6 at the mode for lam < 30.)
* ``lam >= 30`` (bright spot pixels, < 1.5% of a movie for the default priors): the
  64-element tiles holding them are gathered (1/8 of the tiles), then those elements
  (up to 1/64 of the array per round; rounds repeat while any remain, so any pattern
  is handled exactly) are drawn with PTRS, the transformed rejection
  method with squeeze of Hormann (1993), "The transformed rejection method for
  generating Poisson random variables", Insurance: Mathematics and Economics 12, 39-45
  (the algorithm numpy uses), with its own normals for read noise. PTRS accepts >= 89%
  per round; rejected draws are compacted into buffers four times smaller and redrawn
  there, recursively, until every draw is accepted.
Exactness is checked statistically in tests/test_noise.py (means, variances and
chi-square against the exact pmf from 0.1 to 3000, across the 30 boundary, and
independence of the counts and the normals).

The camera chain (all rates per pixel per frame):
  electrons  ~ Poisson(qe * photons)
  sCMOS:  ADU = gain_adu_per_e * (electrons + Normal(0, read_noise_e^2)) + offset_adu
  EMCCD:  amplified ~ Gamma(shape=electrons, scale=em_gain) (0 if electrons == 0),
          ADU = gain_adu_per_e * (amplified + Normal(0, read_noise_e^2)) + offset_adu.
The Gamma model of the EM register has variance 2 * em_gain^2 * qe * photons, i.e. the
excess noise factor F = sqrt(2) of a high-gain EMCCD (Hirsch et al. 2013, PLoS ONE 8,
e53671). ``gain_adu_per_e`` is the conversion gain of the read-out (ADU per electron
*after* EM multiplication).
"""
from __future__ import annotations

import math

import flax.struct
import jax
import jax.extend.random
import jax.numpy as jnp
import numpy as np

CAMERA_MODELS = ("scmos", "emccd")

_PTRS_MIN_LAM = 10.0          # PTRS is valid from here (its constants assume it)
_INVERSION_MAX_LAM = 30.0     # inversion below, compacted PTRS at and above
_TILE = 32                    # compaction granularity (consecutive elements)
_BIG_BUFFER_FRACTION = 8      # compaction buffer: 1/8 of the tiles
# Retry rounds are capped so a degenerate key stream can never hang a jitted step; with
# PTRS acceptance >= 0.75 per round, 200 rejections in a row have probability < 1e-120.
_MAX_ROUNDS = 200
_INVERSION_STEPS = 65
# log(k!) for k < 10, where Stirling's series is not accurate enough in float32.
_LOG_FACTORIAL_TABLE = np.array([math.lgamma(k + 1.0) for k in range(10)], np.float32)


def _random_words(key, n: int):
  """n random uint32 words: counter-mode threefry2x32 (one hash per two words).

  The same hash and construction as JAX's original (non-partitionable) random bits:
  the counters 0..n-1 are split in two halves that form the hash's input pairs under
  the key. ``jax.random.bits`` in its partitionable form hashes once per word, which
  on CPU made random bits the largest cost of a simulated movie. Keys of another
  implementation fall back to ``jax.random.bits``.
  """
  data = jax.random.key_data(key)
  if data.shape != (2,) or data.dtype != jnp.uint32:
    return jax.random.bits(key, (n,), jnp.uint32)
  m = n + n % 2
  return jax.extend.random.threefry_2x32(data, jnp.arange(m, dtype=jnp.uint32))[:n]


def _uniform24(key, shape):
  """Uniforms strictly inside (0, 1) with 24-bit resolution from one uint32 each."""
  n = int(np.prod(shape))
  bits = _random_words(key, n).reshape(shape)
  return ((bits >> 8).astype(jnp.float32) + 0.5) * (2.0 ** -24)


def _poisson_inversion(u, lam):
  """Sequential-search inversion, exact to float32 resolution for lam < 30.

  Returns (k, v): the Poisson variate and the residual uniform v = (u - F(k-1)) / p(k),
  which is Uniform(0, 1) and independent of k.
  """
  p = jnp.exp(-lam)
  cdf = p
  count = jnp.zeros_like(lam)
  lo = jnp.zeros_like(lam)       # F(k - 1)
  pk = p                         # p(k)
  for j in range(1, _INVERSION_STEPS + 1):
    above = u > cdf              # k >= j
    p = p * (lam * (1.0 / j))    # p(j)
    count = count + above.astype(lam.dtype)
    lo = jnp.where(above, cdf, lo)
    pk = jnp.where(above, p, pk)
    cdf = cdf + p
  v = (u - lo) / jnp.maximum(pk, 1e-30)
  # Rounding can put v at or just past 1 (u = F(k)); 1 - 2**-24 is the largest float32
  # below 1 (1 - 2**-25 would round to 1.0, where ndtri is infinite).
  return count, jnp.clip(v, 2.0 ** -25, 1.0 - 2.0 ** -24)


def _log_factorial(k):
  """log(k!) for float k >= 0, accurate to float32 precision."""
  kk = jnp.maximum(k, 10.0)
  inv = 1.0 / kk
  inv2 = inv * inv
  stirling = ((kk + 0.5) * jnp.log(kk) - kk + 0.5 * math.log(2 * math.pi)
              + inv * (1 / 12 - inv2 * (1 / 360 - inv2 / 1260)))
  small = jnp.take(_LOG_FACTORIAL_TABLE, jnp.clip(k, 0, 9).astype(jnp.int32))
  return jnp.where(k < 10, small, stirling)


def _log_poisson_pmf(k, lam):
  """log P(X = k | lam) computed stably for large k and lam (float32)."""
  # -lam + k log(lam) - log(k!) with the large, cancelling terms k log(lam) and
  # log(k!) combined through log1p; for k >= 10 Stirling's series is used.
  kk = jnp.maximum(k, 10.0)
  inv = 1.0 / kk
  inv2 = inv * inv
  delta = (kk - lam) / lam
  large = ((kk - lam) - kk * jnp.log1p(delta) - 0.5 * jnp.log(2 * math.pi * kk)
           - inv * (1 / 12 - inv2 * (1 / 360 - inv2 / 1260)))
  small = -lam + k * jnp.log(lam) - _log_factorial(k)
  return jnp.where(k < 10, small, large)


def _ptrs_round(u, v, lam):
  """One PTRS proposal per element; returns (k, accepted). Valid for lam >= 10."""
  slam = jnp.sqrt(lam)
  b = 0.931 + 2.53 * slam
  a = -0.059 + 0.02483 * b
  inv_alpha = 1.1239 + 1.1328 / (b - 3.4)
  v_r = 0.9277 - 3.6224 / (b - 2.0)
  u = u - 0.5
  us = 0.5 - jnp.abs(u)
  us_safe = jnp.maximum(us, 1e-12)
  k = jnp.floor((2.0 * a / us_safe + b) * u + lam + 0.43)
  quick = (us >= 0.07) & (v <= v_r)
  k_safe = jnp.maximum(k, 0.0)
  lhs = jnp.log(jnp.maximum(v, 1e-38)) + jnp.log(inv_alpha) - jnp.log(a / (us_safe * us_safe) + b)
  slow = (k >= 0) & ~((us < 0.013) & (v > us)) & (lhs <= _log_poisson_pmf(k_safe, lam))
  return k_safe, quick | slow


def _ptrs_finish(key, lam, k, accepted, level=0):
  """Complete PTRS on a flat array: redraw every not-yet-accepted element.

  The rejected elements (<= 25% at lam = 10, ~12% at large lam) are compacted into a
  buffer four times smaller, given one fresh proposal there, and that buffer is
  finished recursively; the loop at each level only repeats if its buffer overflowed.
  So the expected cost is ~1/3 of a full round plus one compaction, and the result is
  exactly Poisson whatever the rejection pattern.
  """
  n = lam.shape[0]
  buffer = n // 4
  if level >= 4 or buffer < 64:
    def body(state):
      i, k, acc = state
      u, v = jax.random.uniform(jax.random.fold_in(key, i), (2, n))
      k_new, acc_new = _ptrs_round(u, v, lam)
      return i + 1, jnp.where(acc, k, k_new), acc | acc_new
    state = (jnp.zeros((), jnp.int32), k, accepted)
    return jax.lax.while_loop(lambda s: ~jnp.all(s[2]) & (s[0] < _MAX_ROUNDS), body,
                              state)[1]

  def body(state):
    i, k, acc = state
    (idx,) = jnp.nonzero(~acc, size=buffer, fill_value=n)
    valid = idx < n
    sub_lam = jnp.where(valid, lam[jnp.minimum(idx, n - 1)], _PTRS_MIN_LAM)
    sub_key = jax.random.fold_in(key, i)
    u, v = jax.random.uniform(jax.random.fold_in(sub_key, 0), (2, buffer))
    sub_k, sub_acc = _ptrs_round(u, v, sub_lam)
    sub_k = _ptrs_finish(jax.random.fold_in(sub_key, 1), sub_lam, sub_k,
                         sub_acc | ~valid, level + 1)
    return i + 1, k.at[idx].set(sub_k, mode="drop"), acc.at[idx].set(True, mode="drop")

  state = (jnp.zeros((), jnp.int32), k, accepted)
  return jax.lax.while_loop(lambda s: ~jnp.all(s[2]) & (s[0] < _MAX_ROUNDS), body,
                            state)[1]


def _poisson_ptrs_compacted(key, lam, todo):
  """PTRS counts and standard normals for the elements of a flat array where ``todo``.

  Two-stage compaction, because a prefix sum over every element is the slow part of
  compaction on CPU: the tiles of ``_TILE`` consecutive elements holding any ``todo``
  element are gathered (at most 1/8 of the tiles per round), then the ``todo``
  elements among them (at most 1/64 of all elements per round) get a PTRS draw and a
  normal and are scattered back. The first round runs unconditionally; further rounds
  (a while loop that is normally never entered) take what did not fit, so every
  pattern is handled exactly. Outputs where not ``todo`` are 0.
  """
  n = lam.shape[0]
  num_tiles = -(-n // _TILE)
  pad = num_tiles * _TILE - n
  size = num_tiles * _TILE
  lam_p = jnp.pad(lam, (0, pad), constant_values=_PTRS_MIN_LAM)
  tile_buffer = max(1, num_tiles // _BIG_BUFFER_FRACTION)
  element_buffer = max(64, tile_buffer * _TILE // 4)

  def one_round(i, todo):
    tiles_todo = jnp.any(todo.reshape(num_tiles, _TILE), axis=1)
    (tiles,) = jnp.nonzero(tiles_todo, size=tile_buffer, fill_value=num_tiles)
    take = jnp.minimum(tiles, num_tiles - 1)
    in_tiles = todo.reshape(num_tiles, _TILE)[take] & (tiles < num_tiles)[:, None]
    (local,) = jnp.nonzero(in_tiles.reshape(-1), size=element_buffer,
                           fill_value=tile_buffer * _TILE)
    valid = local < tile_buffer * _TILE
    local = jnp.minimum(local, tile_buffer * _TILE - 1)
    pos = jnp.where(valid, take[local // _TILE] * _TILE + local % _TILE, size)
    sub_lam = jnp.where(valid, lam_p[jnp.minimum(pos, size - 1)], _PTRS_MIN_LAM)
    sub_key = jax.random.fold_in(key, i)
    u, v = jax.random.uniform(jax.random.fold_in(sub_key, 0), (2, element_buffer))
    sub_k, sub_acc = _ptrs_round(u, v, sub_lam)
    sub_k = _ptrs_finish(jax.random.fold_in(sub_key, 1), sub_lam, sub_k, sub_acc | ~valid)
    sub_z = jax.random.normal(jax.random.fold_in(sub_key, 2), (element_buffer,))
    return pos, sub_k, sub_z

  todo = jnp.pad(todo, (0, pad))
  pos, sub_k, sub_z = one_round(0, todo)
  zeros = jnp.zeros((size,), jnp.float32)
  k = zeros.at[pos].set(sub_k, mode="drop")
  z = zeros.at[pos].set(sub_z, mode="drop")
  todo = todo.at[pos].set(False, mode="drop")

  def body(state):
    i, k, z, todo = state
    pos, sub_k, sub_z = one_round(i, todo)
    return (i + 1, k.at[pos].set(sub_k, mode="drop"), z.at[pos].set(sub_z, mode="drop"),
            todo.at[pos].set(False, mode="drop"))

  state = (jnp.ones((), jnp.int32), k, z, todo)
  _, k, z, _ = jax.lax.while_loop(lambda s: jnp.any(s[3]), body, state)
  return k[:n], z[:n]


def poisson_and_normal(key: jax.Array, lam: jax.Array):
  """(Exact Poisson counts with means ``lam``, independent standard normals), same shape.

  About one random 32-bit word per element when most means are below 30 (see the module
  docstring). Negative or NaN means are an error of the caller; they are clipped to 0
  here so that jitted code never loops forever.
  """
  lam = jnp.asarray(lam, jnp.float32)
  shape = lam.shape
  flat = jnp.nan_to_num(lam.reshape(-1), nan=0.0, posinf=0.0)
  flat = jnp.maximum(flat, 0.0)
  if flat.size == 0:
    return lam, lam
  k_u, k_big = jax.random.split(key)
  small = flat < _INVERSION_MAX_LAM
  u = _uniform24(k_u, flat.shape)
  k_small, v = _poisson_inversion(u, jnp.where(small, flat, 0.0))
  k_large, z_large = _poisson_ptrs_compacted(k_big, flat, ~small)
  counts = jnp.where(small, k_small, k_large)
  normals = jnp.where(small, jax.scipy.special.ndtri(v), z_large)
  return counts.reshape(shape), normals.reshape(shape)


def poisson(key: jax.Array, lam: jax.Array) -> jax.Array:
  """Exact Poisson draws with means ``lam`` (any shape, float, >= 0), float32 counts."""
  return poisson_and_normal(key, lam)[0]


@flax.struct.dataclass
class Camera:
  """Camera read-out parameters (a pytree: every number is differentiable).

  model: 'scmos' or 'emccd' (static).
  qe: quantum efficiency (electrons per incident photon).
  gain_adu_per_e: conversion gain of the read-out, ADU per electron (after EM gain).
  offset_adu: camera baseline in ADU.
  read_noise_e: Gaussian read noise standard deviation, electrons (after EM gain).
  em_gain: electron-multiplication gain (EMCCD only; ignored for sCMOS).
  """
  qe: jax.Array | float = 0.9
  gain_adu_per_e: jax.Array | float = 0.5
  offset_adu: jax.Array | float = 100.0
  read_noise_e: jax.Array | float = 1.6
  em_gain: jax.Array | float = 1.0
  model: str = flax.struct.field(pytree_node=False, default="scmos")

  def __post_init__(self):
    if self.model not in CAMERA_MODELS:
      raise ValueError(f"camera model must be one of {CAMERA_MODELS}, got {self.model!r}")

  @property
  def adu_per_electron_in(self):
    """ADU per photo-electron, including EM gain for an EMCCD."""
    if self.model == "emccd":
      return self.gain_adu_per_e * self.em_gain
    return self.gain_adu_per_e

  @property
  def adu_per_photon(self):
    return self.qe * self.adu_per_electron_in


def expected_adu(expected_photons: jax.Array, camera: Camera) -> jax.Array:
  """Noiseless mean camera output in ADU for expected photons per pixel."""
  return expected_photons * camera.adu_per_photon + camera.offset_adu


def adu_to_photons(frames_adu, camera: Camera):
  """Inverse of :func:`expected_adu`: camera counts -> photons (numpy or jax arrays)."""
  return (frames_adu - camera.offset_adu) / camera.adu_per_photon


def apply_camera(key: jax.Array, expected_photons: jax.Array, camera: Camera) -> jax.Array:
  """Shot noise + camera read-out: expected photons per pixel -> noisy ADU (float32).

  The read noise uses the normals that come with the Poisson counts (independent of
  them), so a frame costs about one random word per pixel (plus the EM register's
  Gamma draws for an EMCCD).
  """
  k_shot, k_em = jax.random.split(key)
  electrons, z = poisson_and_normal(k_shot, camera.qe * expected_photons)
  if camera.model == "emccd":
    shape = jnp.maximum(electrons, 1.0)
    amplified = jax.random.gamma(k_em, shape) * camera.em_gain
    electrons = jnp.where(electrons > 0, amplified, 0.0)
  read = camera.read_noise_e * z
  return (camera.gain_adu_per_e * (electrons + read) + camera.offset_adu).astype(jnp.float32)
