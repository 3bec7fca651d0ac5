"""Light-sheet fusion from one view (task 'fusion'): predict the fused multiview volume
from a single view with a 3D U-Net trained on volumes simulated on the device.

Modules: ``simulator`` (specimens, single-view and fused image formation), ``metrics``
(percentile normalization, 3D SSIM, N_SSIM, PSNR), ``tiling`` (overlapping tiles blended
with a smooth window), ``task`` (the trainer task), ``predict`` / ``evaluate`` (CLIs).
"""
