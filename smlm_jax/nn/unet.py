"""A U-Net (Ronneberger et al., MICCAI 2015) for 2D images and 3D volumes or movies.

Contract:

* Input ``x`` is channels-last, ``[B, *spatial, C]`` with ``len(spatial) ==
  spatial_dims`` (``[B, H, W, C]`` for 2D, ``[B, D, H, W, C]`` or ``[B, T, H, W, C]``
  for 3D). Output is unnormalized logits ``[B, *spatial, out_channels]`` with exactly
  the input's spatial shape, for any size, odd or even.
* Any size works because each spatial dim is first *reflect*-padded (half before,
  half after) up to a multiple of the product of its pooling factors, the net runs on
  the padded array and the result is cropped back. Reflection rather than zeros: a
  microscopy frame's background is rarely zero, and a zero border would create an
  artificial edge that the convolutions near the border, and the image-wide statistics
  of group/instance/batch norm, would see. (``jnp.pad`` reflects repeatedly when the
  pad exceeds the size, and repeats the value of a size-1 dim.)
* Level ``i`` (``0..depth``) has ``min(base_width * 2**i, max_width)`` channels; level
  ``depth`` is the bottleneck. Each level is ``convs_per_level`` x (conv, norm,
  activation), optionally with a residual shortcut (1x1 conv when the width changes).
* Down-sampling is max pooling with window = stride = the level's pooling factor, as
  in the original U-Net: parameter-free, it keeps the brightest response of a small
  spot (an emitter) intact, and a factor of 1 leaves that axis (time or z) untouched.
  ``pool_factors[i]`` is the factor of down-sampling step ``i``, one int per spatial
  dim; the default is 2 in every dim at every level.
* Up-sampling is ``"transpose"`` (transposed conv with kernel = stride = the factor),
  or ``"nearest"`` / ``"linear"`` (``jax.image.resize`` to the skip's shape, then a
  conv); skips are joined by concatenation along channels.
* Norms: ``"batch"`` (``BatchNorm``, momentum 0.9, i.e. PyTorch's 0.1, so running
  averages settle within tens of steps; call with ``train=True,
  mutable=["batch_stats"]`` to update them, ``train=False`` uses them), ``"group"``
  (the largest number of groups <= min(8, channels) that divides channels),
  ``"instance"`` (``GroupNorm`` with group size 1), ``"layer"`` (``LayerNorm`` over
  the channels of each position, as in ConvNeXt) or ``"none"`` (convs then carry
  biases). Group/instance/batch statistics include the padded border.
* ``dropout`` is applied after the bottleneck and after each decoder level; it draws
  from the ``'dropout'`` rng when ``train=True``.
* The default activation is swish (SiLU): smooth, non-saturating like ReLU but
  without dead units, which matters for sparse targets such as emitter maps where
  most pixels are background; it is also what the rest of this package uses.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NORMS = ("batch", "group", "instance", "layer", "none")
UPSAMPLES = ("transpose", "nearest", "linear")


def count_params(variables) -> int:
  """Number of trainable parameters: the sizes of all leaves of ``variables["params"]``.

  Accepts the full variables dict of ``Module.init`` (only ``"params"`` is counted,
  not ``"batch_stats"``), a params tree itself, or their ``jax.eval_shape`` version
  (leaves ``jax.ShapeDtypeStruct``), which counts without allocating anything.
  """
  tree = variables["params"] if "params" in variables else variables
  leaves = jax.tree_util.tree_leaves(tree)
  return int(sum(math.prod(leaf.shape if hasattr(leaf, "shape") else jnp.shape(leaf))
                 for leaf in leaves))


def _num_groups(channels: int) -> int:
  g = min(8, channels)
  while channels % g:
    g -= 1
  return g


def _make_norm(kind: str, channels: int, train: bool, name: str):
  if kind == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
  if kind == "group":
    return nn.GroupNorm(num_groups=_num_groups(channels), name=name)
  if kind == "instance":
    return nn.GroupNorm(num_groups=None, group_size=1, name=name)
  if kind == "layer":
    return nn.LayerNorm(name=name)
  if kind == "none":
    return lambda h: h
  raise ValueError(f"Unknown norm {kind!r}; expected one of {NORMS}.")


class ConvBlock(nn.Module):
  """``num_convs`` x (conv, norm, activation), optionally residual."""
  features: int
  num_convs: int = 2
  kernel_size: Sequence[int] = (3, 3)
  first_kernel_size: Sequence[int] | None = None
  norm: str = "group"
  activation: Callable[[jax.Array], jax.Array] = nn.swish
  residual: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    use_bias = self.norm == "none"
    h = x
    for i in range(self.num_convs):
      first = i == 0 and self.first_kernel_size is not None
      kernel = self.first_kernel_size if first else self.kernel_size
      h = nn.Conv(self.features, tuple(kernel), use_bias=use_bias, name=f"conv{i}")(h)
      h = _make_norm(self.norm, self.features, train, f"norm{i}")(h)
      if self.residual and i == self.num_convs - 1:
        shortcut = x
        if x.shape[-1] != self.features:
          ones = (1,) * len(self.kernel_size)
          shortcut = nn.Conv(self.features, ones, name="shortcut")(x)
        h = h + shortcut
      h = self.activation(h)
    return h


class UNet(nn.Module):
  """U-Net for ``[B, *spatial, C]`` inputs with ``spatial_dims`` in {2, 3}.

  Attributes:
    out_channels: channels of the output logits.
    spatial_dims: 2 or 3.
    depth: number of down-sampling steps (levels below the first).
    base_width: channels at the first level, doubled at each level.
    max_width: optional cap on the channels of any level.
    convs_per_level: convs in each encoder, bottleneck and decoder block.
    kernel_size: kernel extent (every dim) of all convs but the very first.
    first_kernel_size: kernel extent of the very first conv.
    norm: ``"batch" | "group" | "instance" | "layer" | "none"``.
    upsample: ``"transpose" | "nearest" | "linear"``.
    dropout: dropout rate at the bottleneck and decoder (0 disables).
    activation: elementwise nonlinearity (default swish; see the module docstring).
    pool_factors: ``depth`` tuples of ``spatial_dims`` ints; step ``i`` pools by
      ``pool_factors[i]``. ``None`` means 2 everywhere.
    residual: add a shortcut around each block.
    out_bias_init: initial bias of the logits, e.g. ``-log((1 - pi) / pi)`` for a
      prior foreground fraction ``pi`` with a focal loss (Lin et al. 2017).
  """
  out_channels: int
  spatial_dims: int = 2
  depth: int = 3
  base_width: int = 16
  max_width: int | None = None
  convs_per_level: int = 2
  kernel_size: int = 3
  first_kernel_size: int = 3
  norm: str = "group"
  upsample: str = "transpose"
  dropout: float = 0.0
  activation: Callable[[jax.Array], jax.Array] = nn.swish
  pool_factors: Sequence[Sequence[int]] | None = None
  residual: bool = False
  out_bias_init: float = 0.0

  def _factors(self) -> tuple[tuple[int, ...], ...]:
    if self.spatial_dims not in (2, 3):
      raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}.")
    if self.pool_factors is None:
      return ((2,) * self.spatial_dims,) * self.depth
    factors = tuple(tuple(int(f) for f in level) for level in self.pool_factors)
    if len(factors) != self.depth:
      raise ValueError(f"pool_factors has {len(factors)} levels, depth is {self.depth}.")
    for level in factors:
      if len(level) != self.spatial_dims or min(level) < 1:
        raise ValueError(f"Each pool factor must be {self.spatial_dims} ints >= 1, "
                         f"got {level}.")
    return factors

  def _width(self, level: int) -> int:
    w = self.base_width * 2 ** level
    return w if self.max_width is None else min(w, self.max_width)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.norm not in NORMS:
      raise ValueError(f"Unknown norm {self.norm!r}; expected one of {NORMS}.")
    if self.upsample not in UPSAMPLES:
      raise ValueError(f"Unknown upsample {self.upsample!r}; expected one of {UPSAMPLES}.")
    factors = self._factors()
    sd = self.spatial_dims
    if x.ndim != sd + 2:
      raise ValueError(f"Expected [B, *spatial({sd}), C], got shape {x.shape}.")
    spatial = x.shape[1:-1]

    # Reflect-pad each spatial dim up to a multiple of its total pooling factor.
    total = [math.prod(level[d] for level in factors) for d in range(sd)]
    pads = [(-n) % t for n, t in zip(spatial, total)]
    widths = [(0, 0)] + [(p // 2, p - p // 2) for p in pads] + [(0, 0)]
    h = jnp.pad(x, widths, mode="reflect") if any(pads) else x

    kernel = (self.kernel_size,) * sd
    block = lambda level, name, first=None: ConvBlock(
        self._width(level), self.convs_per_level, kernel, first, self.norm,
        self.activation, self.residual, name=name)

    skips = []
    for level in range(self.depth):
      first = (self.first_kernel_size,) * sd if level == 0 else None
      h = block(level, f"enc{level}", first)(h, train)
      skips.append(h)
      h = nn.max_pool(h, factors[level], strides=factors[level])
    first = (self.first_kernel_size,) * sd if self.depth == 0 else None
    h = block(self.depth, "bottleneck", first)(h, train)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)

    for level in reversed(range(self.depth)):
      skip = skips[level]
      width = self._width(level)
      if self.upsample == "transpose":
        h = nn.ConvTranspose(width, factors[level], strides=factors[level],
                             padding="VALID", name=f"up{level}")(h)
      else:
        method = "nearest" if self.upsample == "nearest" else "linear"
        h = jax.image.resize(h, skip.shape[:-1] + h.shape[-1:], method=method)
        h = nn.Conv(width, kernel, name=f"up{level}")(h)
      h = jnp.concatenate([skip, h], axis=-1)
      h = block(level, f"dec{level}")(h, train)
      h = nn.Dropout(self.dropout)(h, deterministic=not train)

    h = nn.Conv(self.out_channels, (1,) * sd,
                bias_init=nn.initializers.constant(self.out_bias_init), name="head")(h)
    crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(widths[1:-1], spatial))
    return h[(slice(None),) + crop + (slice(None),)]
