"""Reusable networks and losses: a 2D/3D U-Net and dense-prediction losses/metrics.

* ``UNet``: channels-last ``[B, *spatial, C]`` -> logits ``[B, *spatial, K]`` of the
  same spatial shape for any input size (see ``smlm_jax.nn.unet``).
* Losses (``smlm_jax.nn.losses``): pure, jit-able functions reducing to a scalar
  weighted mean over valid elements, except the elementwise ``gaussian_nll`` and the
  per-image ``ssim``/``psnr``.
"""
from __future__ import annotations

from smlm_jax.nn.losses import (binary_cross_entropy, dice_loss, gaussian_nll, l1_loss,
                                lovasz_softmax, multiclass_dice_loss, psnr,
                                soft_focal_loss, softmax_cross_entropy,
                                softmax_focal_loss, ssim, ssim_loss)
from smlm_jax.nn.unet import UNet, count_params

__all__ = [
    "UNet", "count_params", "binary_cross_entropy", "dice_loss", "gaussian_nll",
    "l1_loss", "lovasz_softmax", "multiclass_dice_loss", "psnr", "soft_focal_loss",
    "softmax_cross_entropy", "softmax_focal_loss", "ssim", "ssim_loss",
]
