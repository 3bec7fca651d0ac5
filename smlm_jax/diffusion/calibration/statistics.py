"""Stage 2's summary statistics and the distance between two sets of movies.

A pixel-by-pixel comparison of one real and one simulated movie is meaningless
(different trajectories, different noise). Instead each movie is reduced to four
statistics (``STAT_NAMES``) that do not depend on where the molecule happens to be,
and their *distributions* over movies are matched:
   log background     median of 4x4 block means of the time-averaged movie
   log spot photons   background-subtracted photons in a 15x15 px window around the
                      brightest 3x3 box, averaged over frames
   shape              spatial autocorrelation of the windowed, background-subtracted
                      spot at 2 px lag / at 1 px lag, summed over frames
                      (exp(-3/(4 sigma^2)) for a static Gaussian of sigma px; blur
                      within the exposure widens it)
   motion             overlap of consecutive frames (temporal lag 1, no spatial lag)
                      / spatial lag-1 autocorrelation (exp(1/(4 sigma^2)) for an
                      immobile molecule, falling with D)
Pixel noise is independent between pixels and frames, so no product in these ratios
has a noise term on average: they need no noise model and no lag-0 correction (which
would depend on the fitted offset). The distance (``stat_distance``) is the mean over
statistics of the squared difference of 32 quantiles (a 1D Wasserstein-2 distance),
each scaled by the real statistic's robust spread (``robust_scale``). ``Noise`` is
the pixel noise in photon units that the simulated movies get.
"""
from __future__ import annotations

import dataclasses

import numpy as np

STAT_NAMES = ("log background", "log spot photons", "shape", "motion")
NUM_QUANTILES = 32
WINDOW_PX = 15


@dataclasses.dataclass(frozen=True)
class Noise:
  """Pixel noise in photon units: var = excess * p / qe + (read_e / qe)^2."""
  qe: float
  excess: float
  read_e: float

  def variance(self, photons):
    import jax.numpy as jnp
    return (self.excess * jnp.maximum(photons, 0.0) / self.qe
            + (self.read_e / self.qe) ** 2)


def _background(photons, block: int = 4):
  """Median over 4x4-pixel blocks of the time-averaged movie (photons/pixel/frame)."""
  import jax.numpy as jnp
  m, t, h, w = photons.shape
  hb, wb = h // block, w // block
  mean = photons[..., : hb * block, : wb * block].mean(axis=1)
  blocks = mean.reshape(m, hb, block, wb, block).mean(axis=(2, 4)).reshape(m, -1)
  return jnp.median(blocks, axis=-1)


def movie_statistics(photons):
  """[M, T, H, W] photons -> [M, 4] statistics (see STAT_NAMES), differentiable."""
  import jax
  import jax.numpy as jnp
  from smlm_jax.diffusion import normalize
  bg = _background(photons)                                          # [M]
  d = photons - bg[:, None, None, None]
  t, h, w = photons.shape[1:]
  py, px, _ = normalize.brightest_box(d)
  win = normalize.square_mask(py, px, WINDOW_PX // 2, h, w).astype(photons.dtype)
  win = jax.lax.stop_gradient(win)
  s = d * win                                                       # [M, T, H, W]
  spot = s.sum(axis=(-1, -2)).mean(-1)
  # Spatial lag-1 and lag-2 products (x and y averaged) and the temporal lag-1 product;
  # pixel noise is independent, so none of them has a noise term on average and the
  # ratios need no noise model.
  def lag(k):
    return 0.5 * ((s[..., k:, :] * s[..., :-k, :]).sum(axis=(1, 2, 3))
                  + (s[..., :, k:] * s[..., :, :-k]).sum(axis=(1, 2, 3)))
  a1, a2 = lag(1), lag(2)
  c1 = (s[:, 1:] * s[:, :-1]).sum(axis=(1, 2, 3)) * t / (t - 1)
  denom = jnp.maximum(a1, 1e-3 * jnp.abs(a1).max())
  return jnp.stack([jnp.log(jnp.maximum(bg, 1e-3)), jnp.log(jnp.maximum(spot, 1.0)),
                    jnp.clip(a2 / denom, -0.5, 1.5), jnp.clip(c1 / denom, -0.5, 2.5)],
                   axis=-1)


def quantiles(stats):
  import jax.numpy as jnp
  levels = (jnp.arange(NUM_QUANTILES) + 0.5) / NUM_QUANTILES
  return jnp.quantile(stats, levels, axis=0)                         # [Q, 4]


def stat_distance(sim_q, real_q, scale):
  """Mean over statistics of the scaled squared quantile differences (W2^2 / spread^2)."""
  import jax.numpy as jnp
  return jnp.mean(((sim_q - real_q) / scale) ** 2)


def robust_scale(x):
  q25, q75 = np.quantile(x, [0.25, 0.75], axis=0)
  return np.maximum((q75 - q25) / 1.349, 1e-3)
