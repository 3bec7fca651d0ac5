"""Flax (linen) models that predict log D and its uncertainty from a movie.

Every model maps a normalized movie ``x`` [B, T, H, W] (see ``smlm_jax.diffusion.normalize``) to
``(mean, log_var)`` of the natural log of D in um^2/s, each [B], and is trained with the
Gaussian negative log-likelihood. Models are registered by name in ``MODELS`` and
built with ``build_model(config.model)``; extra fields of ``config.model`` are passed
to the constructor.

* ``resnet2d``: frames stacked as channels, a small pre-activation ResNet.
* ``park_cnn``: Park-style conv-BN-swish blocks with max pooling (frames as channels).
* ``cnn3d``: a genuinely spatio-temporal 3D CNN over (t, y, x); its time axis is
  convolved and pooled, unlike a 2D net with a dummy time axis.
* ``blurformer`` (new, default): a per-frame CNN encoder followed by a transformer
  over time. D enters a movie in two places: the *shape* of each frame (motion blur
  widens and elongates the spot as 2 D t_exp / 6 per axis) and the *displacements
  between frames* (4 D dt). The shared per-frame encoder with coordinate channels
  (CoordConv) sees the blur and encodes where the spot is; self-attention across the
  16 frame embeddings can then compare positions at every lag, as an MSD or
  covariance estimator would, and pool evidence from all frames. Sharing the encoder
  over frames makes it parameter-efficient and frame-order aware (learned temporal
  position embeddings), which a frames-as-channels network is not.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp


class _Head(nn.Module):
  hidden: int = 64

  @nn.compact
  def __call__(self, h):
    h = nn.swish(nn.Dense(self.hidden)(h))
    out = nn.Dense(2, kernel_init=nn.initializers.zeros)(h)
    # Centre the initial prediction on log D = 0 (1 um^2/s), log-var on 0.
    return out[..., 0], out[..., 1]


class ResBlock(nn.Module):
  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.GroupNorm(num_groups=min(8, self.features))
    h = nn.swish(norm()(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(self.features, (1, 1), strides=self.stride)(h)
    h = nn.Conv(self.features, (3, 3), strides=self.stride)(h)
    h = nn.swish(norm()(h))
    h = nn.Conv(self.features, (3, 3))(h)
    return shortcut + h


class ResNet2D(nn.Module):
  """Frames as channels: [B, T, H, W] -> [B, H, W, T] -> ResNet -> head."""
  widths: Sequence[int] = (32, 64, 96)

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = jnp.moveaxis(x, 1, -1)
    h = nn.Conv(self.widths[0], (3, 3), strides=2)(h)
    for i, w in enumerate(self.widths):
      h = ResBlock(w, stride=1 if i == 0 else 2)(h, train)
    h = nn.swish(nn.GroupNorm(num_groups=8)(h))
    return _Head()(jnp.mean(h, axis=(1, 2)))


class ParkCNN(nn.Module):
  """Conv-BatchNorm-swish blocks with max pooling, frames as channels."""
  widths: Sequence[int] = (32, 64, 96, 128)

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = jnp.moveaxis(x, 1, -1)
    for w in self.widths:
      h = nn.Conv(w, (3, 3), use_bias=False)(h)
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
      h = nn.swish(h)
      h = nn.max_pool(h, (2, 2), strides=(2, 2))
    h = jnp.concatenate([jnp.mean(h, axis=(1, 2)), jnp.max(h, axis=(1, 2))], axis=-1)
    return _Head()(h)


class CNN3D(nn.Module):
  """3D convolutions over (t, y, x); time is convolved and pooled like space."""
  widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = x[..., None]  # [B, T, H, W, 1]
    h = nn.Conv(self.widths[0], (3, 4, 4), strides=(1, 4, 4))(h)  # 16x16 spatial
    for w in self.widths:
      h = nn.Conv(w, (3, 3, 3))(h)
      h = nn.swish(nn.GroupNorm(num_groups=8)(h))
      h = nn.Conv(w, (3, 3, 3))(h)
      h = nn.swish(nn.GroupNorm(num_groups=8)(h))
      h = nn.max_pool(h, (2, 2, 2), strides=(2, 2, 2))
    h = jnp.mean(h, axis=(1, 2, 3))
    return _Head()(h)


class FrameEncoder(nn.Module):
  """Per-frame CNN with coordinate channels: [N, H, W] -> [N, E]."""
  widths: Sequence[int] = (16, 32, 64)
  embed: int = 64

  @nn.compact
  def __call__(self, frames):
    n, hgt, wid = frames.shape
    yy, xx = jnp.meshgrid(jnp.linspace(-1, 1, hgt), jnp.linspace(-1, 1, wid),
                          indexing="ij")
    coords = jnp.broadcast_to(jnp.stack([xx, yy], -1), (n, hgt, wid, 2))
    h = jnp.concatenate([frames[..., None], coords], axis=-1)
    h = nn.Conv(self.widths[0], (5, 5), strides=2)(h)
    for w in self.widths:
      h = nn.swish(nn.GroupNorm(num_groups=8)(h))
      h = nn.Conv(w, (3, 3), strides=2)(h)
    h = nn.swish(nn.GroupNorm(num_groups=8)(h))
    # Flatten the small map (keeps where the spot is, which pooling would lose).
    h = h.reshape(n, -1)
    return nn.Dense(self.embed)(h)


class TransformerBlock(nn.Module):
  heads: int = 4
  mlp: int = 128

  @nn.compact
  def __call__(self, h):
    a = nn.LayerNorm()(h)
    h = h + nn.MultiHeadDotProductAttention(num_heads=self.heads)(a, a)
    m = nn.LayerNorm()(h)
    m = nn.Dense(self.mlp)(m)
    return h + nn.Dense(h.shape[-1])(nn.gelu(m))


class BlurFormer(nn.Module):
  """Per-frame encoder (blur + position) and a temporal transformer (displacements)."""
  embed: int = 64
  depth: int = 2
  heads: int = 4
  encoder_widths: Sequence[int] = (16, 32, 64)

  @nn.compact
  def __call__(self, x, train: bool = False):
    b, t, hgt, wid = x.shape
    e = FrameEncoder(self.encoder_widths, self.embed)(x.reshape(b * t, hgt, wid))
    e = e.reshape(b, t, self.embed)
    pos = self.param("time_embedding", nn.initializers.normal(0.02), (t, self.embed))
    h = e + pos
    for _ in range(self.depth):
      h = TransformerBlock(self.heads, 2 * self.embed)(h)
    h = nn.LayerNorm()(h)
    return _Head()(jnp.concatenate([jnp.mean(h, axis=1), jnp.max(h, axis=1)], -1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet2d": ResNet2D,
    "park_cnn": ParkCNN,
    "cnn3d": CNN3D,
    "blurformer": BlurFormer,
}


def build_model(model_cfg: Any) -> nn.Module:
  """Builds the model named ``model_cfg.name`` with the remaining fields as kwargs."""
  cfg = dict(model_cfg)
  name = cfg.pop("name")
  if name not in MODELS:
    raise ValueError(f"unknown model.name {name!r}; choose one of {sorted(MODELS)}")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
  try:
    return MODELS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"bad fields for model {name!r}: {e}") from None
