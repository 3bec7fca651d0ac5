"""Segmentation networks for movies ``[B, T, H, W, 1] -> logits [B, T, H, W, 4]``.

Two architectures, chosen by ``config.model.name``:

* ``"unet3d"``: :class:`smlm_jax.nn.UNet` with ``spatial_dims=3`` (full 3x3x3
  convolutions), as in Dotti et al. 2024 - the choice on an accelerator.
* ``"factorized"`` (CPU default): a U-Net whose 3D convolutions are factorized into a
  spatial k x k convolution followed by a temporal k x 1 x 1 one ("(2+1)D", Tran et
  al., CVPR 2018), on a grid binned ``bin`` x ``bin`` in space (space-to-depth at the
  input, a learned sub-pixel (pixel-shuffle, Shi et al., CVPR 2016) output back to
  full resolution). Why: XLA's CPU 3D convolution runs at ~1 GFLOP/s on this
  machine, 5x slower per FLOP than its 2D one, and a (2+1)D pair costs 12 C^2 instead
  of 27 C^2 multiply-adds per voxel; binning 0.2 um pixels by 2 keeps > 3.7 px per
  spark FWHM (1.5-3 um). Together one training step is ~10x cheaper on a CPU.

Both use only position-local normalization (LayerNorm over channels, or none), so
the network is a translation-equivariant function of the movie in time: an output
frame depends only on input frames within :func:`temporal_halo` frames of it, which
is what makes chunked inference on long movies exact (``smlm_jax.sparks.inference``).
Time chunks must start at multiples of :func:`time_alignment` (the product of the
temporal pooling factors) so that pooling sees the same frame groups.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from smlm_jax.nn import UNet

NORMS = ("layer", "batch", "none")
_TRUNC_STD = 0.87962566103423978      # std of a standard normal truncated to [-2, 2]


def lecun_normal_flat(key, shape, dtype=jnp.float32):
  """flax's default kernel init (LeCun truncated normal, fan-in = all but the last
  axis), drawn as a flat vector then reshaped: the same distribution, but XLA's CPU
  compiler takes ~15 s per multi-dimensional threefry draw and < 1 s per flat one."""
  fan_in = max(1, math.prod(shape[:-1]))
  flat = jax.random.truncated_normal(key, -2.0, 2.0, (math.prod(shape),), dtype)
  return (flat * (1.0 / math.sqrt(fan_in) / _TRUNC_STD)).reshape(shape)


def _norm(kind, train, name):
  if kind == "layer":
    return nn.LayerNorm(name=name)
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
  if kind == "none":
    return lambda h: h
  raise ValueError(f"model.norm must be one of {NORMS} (position-local, so chunked "
                   f"inference is exact), got {kind!r}")


class FactorizedConv(nn.Module):
  """k x k spatial conv (time folded into the batch) then a k_t temporal conv."""
  features: int
  kernel_size: int = 3
  time_kernel_size: int = 3
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    b, t, h, w, c = x.shape
    k = self.kernel_size
    y = nn.Conv(self.features, (k, k), use_bias=self.use_bias, kernel_init=lecun_normal_flat,
                name="space")(
        x.reshape(b * t, h, w, c))
    y = y.reshape(b, t, h * w, self.features)
    y = nn.Conv(self.features, (self.time_kernel_size, 1), use_bias=self.use_bias,
                kernel_init=lecun_normal_flat, name="time")(y)
    return y.reshape(b, t, h, w, self.features)


class Block(nn.Module):
  features: int
  num_convs: int = 2
  norm: str = "layer"

  @nn.compact
  def __call__(self, x, train=False):
    for i in range(self.num_convs):
      x = FactorizedConv(self.features, use_bias=self.norm == "none", name=f"conv{i}")(x)
      x = _norm(self.norm, train, f"norm{i}")(x)
      x = nn.swish(x)
    return x


class FactorizedUNet(nn.Module):
  """U-Net with (2+1)D convolutions on a spatially binned grid (see module doc).

  Attributes:
    out_channels: classes.
    depth: down-sampling steps.
    base_width: channels at the first level (doubled per level, capped at max_width).
    pool_factors: ``depth`` (t, y, x) max-pooling factors (default 2 everywhere).
    bin: space-to-depth factor at the input / pixel-shuffle factor at the output.
  """
  out_channels: int = 4
  depth: int = 2
  base_width: int = 16
  max_width: int = 64
  convs_per_level: int = 2
  norm: str = "layer"
  pool_factors: Sequence[Sequence[int]] | None = None
  bin: int = 2

  def factors(self):
    if self.pool_factors is None:
      return ((2, 2, 2),) * self.depth
    f = tuple(tuple(int(v) for v in level) for level in self.pool_factors)
    if len(f) != self.depth or any(len(level) != 3 or min(level) < 1 for level in f):
      raise ValueError(f"pool_factors must be {self.depth} triples of ints >= 1, got {f}")
    return f

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != 5:
      raise ValueError(f"expected [B, T, H, W, C], got {x.shape}")
    factors = self.factors()
    b, t, h, w, c = x.shape
    s = self.bin
    tot = [math.prod(f[d] for f in factors) for d in range(3)]
    mult = (tot[0], tot[1] * s, tot[2] * s)
    pads = [(-n) % m for n, m in zip((t, h, w), mult)]
    widths = [(0, 0)] + [(p // 2, p - p // 2) for p in pads] + [(0, 0)]
    hx = jnp.pad(x, widths, mode="reflect") if any(pads) else x
    _, tp, hp, wp, _ = hx.shape
    # Space-to-depth: [B, T, H, W, C] -> [B, T, H/s, W/s, s*s*C].
    hx = hx.reshape(b, tp, hp // s, s, wp // s, s, c).transpose(0, 1, 2, 4, 3, 5, 6)
    hx = hx.reshape(b, tp, hp // s, wp // s, s * s * c)
    width = lambda level: min(self.base_width * 2 ** level, self.max_width)
    skips = []
    for level in range(self.depth):
      hx = Block(width(level), self.convs_per_level, self.norm, name=f"enc{level}")(hx, train)
      skips.append(hx)
      hx = nn.max_pool(hx, factors[level], strides=factors[level])
    hx = Block(width(self.depth), self.convs_per_level, self.norm, name="bottleneck")(hx, train)
    for level in reversed(range(self.depth)):
      f = factors[level]
      hx = jnp.repeat(jnp.repeat(jnp.repeat(hx, f[0], 1), f[1], 2), f[2], 3)
      hx = nn.Dense(width(level), kernel_init=lecun_normal_flat, name=f"up{level}")(hx)
      hx = jnp.concatenate([skips[level], hx], axis=-1)
      hx = Block(width(level), self.convs_per_level, self.norm, name=f"dec{level}")(hx, train)
    # Pixel shuffle back to full resolution.
    k = self.out_channels
    hx = nn.Dense(s * s * k, kernel_init=lecun_normal_flat, name="head")(hx)
    hx = hx.reshape(b, tp, hp // s, wp // s, s, s, k).transpose(0, 1, 2, 4, 3, 5, 6)
    hx = hx.reshape(b, tp, hp, wp, k)
    lo = [wd[0] for wd in widths[1:4]]
    return hx[:, lo[0]:lo[0] + t, lo[1]:lo[1] + h, lo[2]:lo[2] + w]


def build_model(model_cfg, num_classes: int = 4) -> nn.Module:
  """The network named by ``model_cfg.name`` ('factorized' or 'unet3d')."""
  pools = model_cfg.get("pool_factors", None)
  pools = tuple(tuple(p) for p in pools) if pools else None
  if model_cfg.name == "factorized":
    return FactorizedUNet(out_channels=num_classes, depth=int(model_cfg.depth),
                          base_width=int(model_cfg.base_width),
                          max_width=int(model_cfg.max_width),
                          convs_per_level=int(model_cfg.convs_per_level),
                          norm=str(model_cfg.norm), pool_factors=pools,
                          bin=int(model_cfg.bin))
  if model_cfg.name == "unet3d":
    if model_cfg.norm not in NORMS:
      raise ValueError(f"model.norm must be one of {NORMS} for exact chunked inference")
    return UNet(out_channels=num_classes, spatial_dims=3, depth=int(model_cfg.depth),
                base_width=int(model_cfg.base_width), max_width=int(model_cfg.max_width),
                convs_per_level=int(model_cfg.convs_per_level), norm=str(model_cfg.norm),
                pool_factors=pools, upsample="transpose")
  raise ValueError(f"unknown model.name {model_cfg.name!r}; use 'factorized' or 'unet3d'")


def _pool_t(model_cfg):
  pools = model_cfg.get("pool_factors", None)
  depth = int(model_cfg.depth)
  return [int(p[0]) for p in pools] if pools else [2] * depth


def time_alignment(model_cfg) -> int:
  """Product of the temporal pooling factors: chunk starts must be multiples of it."""
  return int(math.prod(_pool_t(model_cfg)))


def temporal_halo(model_cfg) -> int:
  """Frames on each side of an output frame that can influence it (an upper bound on
  the half-width of the temporal receptive field, pooling-grid effects included)."""
  depth = int(model_cfg.depth)
  convs = int(model_cfg.convs_per_level)
  pools = _pool_t(model_cfg)
  k = 3
  halo, stride = 0, 1
  for level in range(depth):           # encoder blocks, then pooling
    halo += convs * (k - 1) // 2 * stride
    halo += (pools[level] - 1) * stride
    stride *= pools[level]
  halo += convs * (k - 1) // 2 * stride  # bottleneck
  for level in reversed(range(depth)):   # up-sampling and decoder blocks
    stride //= pools[level]
    halo += (pools[level] - 1) * stride
    halo += convs * (k - 1) // 2 * stride
  if model_cfg.name == "unet3d":
    first = int(model_cfg.get("first_kernel_size", 3))
    halo += (first - k) // 2
  return int(halo)
