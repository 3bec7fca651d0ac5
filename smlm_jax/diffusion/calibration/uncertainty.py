"""Standard errors: a bootstrap over movies (Efron & Tibshirani 1993).

With ``--bootstrap`` resamples (default 200), the camera is re-solved in closed form
on every resample. The simulator fit is not re-run: each resample's change of the real
quantiles (movies resampled, their photons converted with that resample's camera) and
of the simulated quantiles (simulated movies resampled, which stands in for another
seed of the simulated set) is mapped to a parameter change through the Gauss-Newton
inverse of the fit's Jacobian (a linearized bootstrap; one Jacobian, ~7 simulator
passes). Fixed values have standard error 0.

``bootstrap_indices`` draws the resamples (shared by both stages);
``linearized_bootstrap`` maps them through the simulator fit's Jacobian.
"""
from __future__ import annotations

import numpy as np

from smlm_jax.diffusion.calibration.parameters import reported
from smlm_jax.diffusion.calibration.statistics import NUM_QUANTILES, quantiles


def bootstrap_indices(num_movies: int, num_bootstrap: int, seed: int = 0):
  """[B, M] movie indices drawn with replacement (host-side statistics, not physics)."""
  if num_bootstrap < 2:
    return None
  rng = np.random.default_rng(seed)
  return rng.integers(0, num_movies, size=(num_bootstrap, num_movies))


def linearized_bootstrap(sim_stats, params, trainable, real_stats, scale, camera_value,
                         camera_boot, qe, boot_idx, seed=0, fit_D=False) -> dict:
  """Standard errors of the stage-2 numbers without refitting (see the module docstring).

  Each resample b moves the real quantiles (movies ``boot_idx[b]``, converted with
  that resample's offset and gain ``camera_boot[b]``) and the simulated quantiles
  (simulated movies resampled); the optimum moves by the Gauss-Newton step
  pinv(J / scale) (delta_real - delta_sim) / scale with J = d sim quantiles / d params.
  """
  import jax
  import jax.numpy as jnp
  shapes = [(n, params[n].shape, int(np.prod(params[n].shape))) for n in trainable]
  v0 = jnp.concatenate([jnp.ravel(params[n]) for n in trainable])

  def unflat(vec):
    out, i = dict(params), 0
    for name, shape, size in shapes:
      out[name] = vec[i:i + size].reshape(shape)
      i += size
    return out

  jvp = jax.jit(lambda vec, t: jax.jvp(lambda x: quantiles(sim_stats(unflat(x))),
                                       (vec,), (t,))[1])
  eye = np.eye(v0.size, dtype=np.float32)
  jac = np.stack([np.asarray(jvp(v0, jnp.asarray(e))).reshape(-1) for e in eye], axis=1)
  s = np.tile(np.asarray(scale, np.float64), NUM_QUANTILES)          # [Q * 4]
  step = np.linalg.pinv(jac / s[:, None], rcond=1e-6)                # [P, Q * 4]
  levels = (np.arange(NUM_QUANTILES) + 0.5) / NUM_QUANTILES
  real = np.asarray(real_stats, np.float64)
  sim = np.asarray(sim_stats(params), np.float64)
  real_q0 = np.quantile(real, levels, axis=0)
  sim_q0 = np.quantile(sim, levels, axis=0)
  o, g = camera_value["offset_adu"], camera_value["gain_adu_per_e"]
  bg_adu = np.exp(real[:, 0]) * g * qe + o
  spot_adu = np.exp(real[:, 1]) * g * qe
  rng = np.random.default_rng(seed + 1)
  base = np.asarray(v0, np.float64)
  draws = []
  for b, idx in enumerate(boot_idx):
    r = real[idx].copy()
    ob, gb = camera_boot[b]
    r[:, 0] = np.log(np.maximum((bg_adu[idx] - ob) / (gb * qe), 1e-3))
    r[:, 1] = np.log(np.maximum(spot_adu[idx] / (gb * qe), 1.0))
    sim_b = sim[rng.integers(0, sim.shape[0], sim.shape[0])]
    delta = ((np.quantile(r, levels, axis=0) - real_q0)
             - (np.quantile(sim_b, levels, axis=0) - sim_q0))
    theta = base + step @ (delta.reshape(-1) / s)
    draws.append(reported(unflat(jnp.asarray(theta, jnp.float32)), fit_D))
  return {k: float(np.std([d[k] for d in draws], ddof=1)) for k in draws[0]}
