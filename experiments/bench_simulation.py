"""Simulation throughput: jitted JAX simulator vs. a plain NumPy reference.

  python experiments/bench_simulation.py [--batch_sizes=16,64,256] [--numpy_movies=10]

Movies of 16x64x64 px, S=10 sub-steps, sCMOS noise, priors of configs/diffusion.py.
On CPU the batch is sharded over one forced host device per core (data parallel, as
in training). The NumPy reference renders each sub-step on a 5x oversampled grid and
bins it, the straightforward way. Last line:
RESULT movies_per_s=<best JAX> numpy_movies_per_s=<ref> backend=<cpu|gpu|tpu>
"""
import os
import sys

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={os.cpu_count()}")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import time

from absl import app, flags
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import diffusion
from smlm_jax.diffusion import simulator as sim_lib

_BATCHES = flags.DEFINE_list("batch_sizes", ["16", "64", "256"], "Batch sizes to time.")
_NUMPY = flags.DEFINE_integer("numpy_movies", 10, "Movies for the NumPy reference.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per batch size.")


def numpy_reference_movie(rng, s: sim_lib.Simulator, oversample=5):
  """The same physics written the straightforward way in NumPy."""
  g, p, c = s.geometry, s.priors, s.camera
  D = np.exp(rng.uniform(*np.log(p.D_um2_per_s)))
  photons = np.exp(rng.uniform(*np.log(p.photons)))
  bg = np.exp(rng.uniform(*np.log(p.background_photons)))
  fwhm = rng.uniform(*p.psf_fwhm_nm)
  sigma = fwhm / sim_lib.FWHM_PER_SIGMA
  w_nm, h_nm = g.field_nm
  half = 0.5 * p.start_region_fraction * np.array([w_nm, h_nm])
  pos = np.array([w_nm, h_nm]) / 2 + rng.uniform(-1, 1, 2) * half
  fine = (np.arange(g.width_px * oversample) + 0.5) * g.pixel_size_nm / oversample
  fy = (np.arange(g.height_px * oversample) + 0.5) * g.pixel_size_nm / oversample
  frames = np.zeros(g.shape)
  dt_gap = g.frame_interval_s - g.exposure_s + g.substep_dt_s
  for t in range(g.num_frames):
    hi = np.zeros((g.height_px * oversample, g.width_px * oversample))
    for s_ in range(g.substeps):
      if t or s_:
        dt = g.substep_dt_s if s_ else dt_gap
        pos = pos + rng.normal(0, np.sqrt(2 * D * 1e6 * dt), 2)
      xx, yy = np.meshgrid(fine, fy)
      psf = np.exp(-((xx - pos[0]) ** 2 + (yy - pos[1]) ** 2) / (2 * sigma**2))
      hi += psf / psf.sum() * photons / g.substeps
    binned = hi.reshape(g.height_px, oversample, g.width_px, oversample).sum((1, 3))
    frames[t] = binned + bg
  electrons = rng.poisson(c.qe * frames)
  read = rng.normal(0, c.read_noise_e, frames.shape)
  return c.gain_adu_per_e * (electrons + read) + c.offset_adu


def main(argv):
  del argv
  s = sim_lib.simulator_from_config(diffusion.get_config().sim)
  backend = jax.default_backend()
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  print(f"backend={backend} devices={len(devices)} movie={s.geometry.shape} "
        f"S={s.geometry.substeps} camera={s.camera.model}")
  print(f"{'impl':<10} {'batch':>6} {'ms/call':>9} {'movies/s':>10}")
  best = 0.0
  for impl in ("threefry2x32",):
    for b in [int(x) for x in _BATCHES.value]:
      if b % len(devices):
        continue
      base = jax.random.key(0, impl=impl)

      @jax.jit
      def step(i):
        keys = jax.lax.with_sharding_constraint(sim_lib.movie_keys(base, i), sharding)
        frames, truth = s.from_keys(keys)
        return frames, truth["D_um2_per_s"]

      idx = jax.device_put(np.arange(b), sharding)
      jax.block_until_ready(step(idx))
      t0 = time.perf_counter()
      for r in range(_REPEATS.value):
        out = step(idx + (r + 1) * b)
      jax.block_until_ready(out)
      dt = (time.perf_counter() - t0) / _REPEATS.value
      rate = b / dt
      if impl == "threefry2x32":
        best = max(best, rate)
      print(f"{impl:<10} {b:>6} {dt * 1e3:>9.1f} {rate:>10.1f}")
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  for _ in range(_NUMPY.value):
    numpy_reference_movie(rng, s)
  np_rate = _NUMPY.value / (time.perf_counter() - t0)
  print(f"{'numpy-ref':<10} {1:>6} {1e3 / np_rate:>9.1f} {np_rate:>10.1f}")
  print(f"speed-up over NumPy (threefry, best batch): {best / np_rate:.0f}x")
  print(f"RESULT movies_per_s={best:.1f} numpy_movies_per_s={np_rate:.2f} backend={backend}")


if __name__ == "__main__":
  from smlm_jax.core import cli
  app.run(main, flags_parser=cli.parse_flags)
