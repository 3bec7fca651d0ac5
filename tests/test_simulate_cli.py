"""The simulate command writes readable TIFFs with metadata and a matching truth table."""
import csv
import os
import subprocess
import sys

import numpy as np
import tifffile

from smlm_jax.core import tiff_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return subprocess.run([sys.executable, "-m", "smlm_jax.diffusion.simulate", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_simulate_cli_round_trip(tmp_path):
  out = tmp_path / "sim"
  r = _run("--config=configs/diffusion.py", "--num_movies=3", f"--output_dir={out}",
           "--seed=5", "--config.sim.pixel_size_nm=107", "--config.sim.frame_interval_s=0.0078",
           "--config.sim.exposure_s=0.0078")
  assert r.returncode == 0, r.stderr
  names = sorted(n for n in os.listdir(out) if n.endswith(".tif"))
  assert names == ["movie_00000.tif", "movie_00001.tif", "movie_00002.tif"]
  for n in names:
    with tifffile.TiffFile(out / n) as tif:
      data = tif.series[0].asarray()
      assert data.shape == (16, 64, 64) and data.dtype == np.uint16
      assert tif.imagej_metadata["finterval"] == 0.0078
    movie = tiff_io.read_movie(str(out / n))
    assert abs(movie.pixel_size_nm - 107) < 1e-3
    assert movie.frame_interval_s == 0.0078
    # Offset 100 ADU + background: the median pixel is close to the offset.
    assert 100 <= np.median(movie.frames) < 100 + 2 * 0.9 * 40
  with open(out / "truth.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["file"] for r in rows] == names
  assert set(rows[0]) == {"file", "D_um2_per_s", "photons", "background_photons",
                          "in_field_fraction"}
  for row in rows:
    assert 0.01 <= float(row["D_um2_per_s"]) <= 10
    assert 300 <= float(row["photons"]) <= 3000
    assert 0 <= float(row["in_field_fraction"]) <= 1
  # The brightest frame's spot carries about the truth's photons (ADU -> photons).
  movie = tiff_io.read_movie(str(out / names[0]))
  frame_photons = (movie.frames - 100.0) / (2.0 * 0.9)
  bg = float(rows[0]["background_photons"])
  spot = (frame_photons - bg).sum(axis=(1, 2)).mean()
  assert abs(spot / float(rows[0]["photons"]) - 1) < 0.15

  again = _run("--config=configs/diffusion.py", "--num_movies=1", f"--output_dir={out}")
  assert again.returncode != 0
  assert "not empty" in again.stderr and "Traceback" not in again.stderr
  forced = _run("--config=configs/diffusion.py", "--num_movies=1", f"--output_dir={out}",
                "--overwrite")
  assert forced.returncode == 0, forced.stderr
