"""Writes simulated movies as TIFFs plus a ground-truth table.

  python -m smlm_jax.diffusion.simulate --config=configs/diffusion.py --num_movies=100 \
      --output_dir=/tmp/sim [--seed=0] [--overwrite] [--config.sim.camera.model=emccd]

Each movie is DIR/movie_00000.tif (T x H x W uint16 ADU, ImageJ metadata with pixel
size and frame interval); DIR/truth.csv has one row per movie with the file name,
D_um2_per_s, photons, background (photons/pixel/frame) and the in-field fraction.
"""
from __future__ import annotations

import csv
import io
import os

from absl import flags
from ml_collections import config_flags
import jax
import numpy as np

from smlm_jax.core import cli
from smlm_jax.diffusion import simulator as sim_lib
from smlm_jax.core import tiff_io



def _define_flags():
  """Flags exist only when run as a command (importing this module defines none)."""
  config_flags.DEFINE_config_file("config", cli.config_path("diffusion"),
                                  "Config file with a `sim` section (default: this "
                                  "checkout's configs/diffusion.py).")
  flags.DEFINE_integer("num_movies", 100, "Number of movies to write.")
  flags.DEFINE_string("output_dir", None, "Folder for the TIFFs and truth.csv.")
  flags.DEFINE_integer("seed", None, "Random seed (default: config.seed).")
  flags.DEFINE_bool("overwrite", False, "Allow writing into a non-empty folder.")
  flags.DEFINE_integer("chunk", 256, "Movies simulated per device call.")


TRUTH_COLUMNS = ("file", "D_um2_per_s", "photons", "background_photons",
                 "in_field_fraction")


def write_simulated_movies(simulator: sim_lib.Simulator, num_movies: int, output_dir: str,
                           seed: int, chunk: int = 256) -> list[dict]:
  """Simulates ``num_movies`` movies (movie i from fold_in(key(seed), i)) and writes them."""
  g = simulator.geometry
  key = jax.random.key(seed)
  make = jax.jit(lambda keys: simulator.from_keys(keys))
  rows = []
  with cli.progress(total=num_movies, desc="simulate", unit="movie") as bar:
    for start in range(0, num_movies, chunk):
      n = min(chunk, num_movies - start)
      idx = np.arange(start, start + chunk)  # fixed shape: one compilation
      frames, truth = jax.device_get(make(sim_lib.movie_keys(key, idx)))
      for j in range(n):
        name = f"movie_{start + j:05d}.tif"
        tiff_io.write_movie(os.path.join(output_dir, name), frames[j], g.pixel_size_nm,
                            g.frame_interval_s)
        rows.append({
            "file": name,
            "D_um2_per_s": float(truth["D_um2_per_s"][j]),
            "photons": float(truth["photons"][j]),
            "background_photons": float(truth["background_photons"][j]),
            "in_field_fraction": float(truth["in_field_fraction"][j]),
        })
      bar.update(n)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=TRUTH_COLUMNS)
  writer.writeheader()
  for r in rows:
    writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
  cli.atomic_write_text(os.path.join(output_dir, "truth.csv"), buf.getvalue())
  return rows


def main(argv):
  cli.quiet_logs()
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  config = f.config
  if f.output_dir is None:
    cli.fail("--output_dir is required")
  if f.num_movies < 1:
    cli.fail("--num_movies must be >= 1")
  cli.require_positive(f, ("chunk",))
  out = f.output_dir
  if os.path.exists(out) and not os.path.isdir(out):
    cli.fail(f"--output_dir {out} exists and is not a folder")
  if os.path.isdir(out) and os.listdir(out) and not f.overwrite:
    cli.fail(f"--output_dir {out} is not empty; pass --overwrite to write into it")
  cli.check_writable(out, "output_dir", folder=True)
  os.makedirs(out, exist_ok=True)
  try:
    simulator = sim_lib.simulator_from_config(config.sim)
  except ValueError as e:
    cli.fail(f"bad config: {e}")
  seed = config.seed if f.seed is None else f.seed
  write_simulated_movies(simulator, f.num_movies, out, seed, min(f.chunk, f.num_movies))
  print(f"wrote {f.num_movies} movies and truth.csv to {out}")


if __name__ == "__main__":
  cli.run_app(main, _define_flags)
