"""Compressed TIFFs (LZW, Deflate, Zstd, PackBits; plain, ImageJ and OME-TIFF) read
through every command's reader with the same pixels and metadata as uncompressed
ones; compressed RGB is reported as `rgb`; without imagecodecs, one clear error."""
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tifffile

from smlm_jax.core import tiff_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPRESSIONS = {"lzw": tifffile.COMPRESSION.LZW, "zlib": tifffile.COMPRESSION.ADOBE_DEFLATE,
                "zstd": tifffile.COMPRESSION.ZSTD, "packbits": tifffile.COMPRESSION.PACKBITS}
T, H, W = 8, 32, 32
PIXEL_NM = 100.0


def _movie():
  """[8, 32, 32] uint16 with every pixel different from its neighbours."""
  return np.random.default_rng(0).integers(100, 4000, (T, H, W)).astype(np.uint16)


def _write(path, data, compression, kind):
  """One movie as ImageJ hyperstack, OME-TIFF, or RGB (then ``data`` is ignored)."""
  if kind == "imagej":
    tifffile.imwrite(path, data, compression=compression, imagej=True,
                     resolution=(1000.0 / PIXEL_NM, 1000.0 / PIXEL_NM),
                     metadata={"axes": "TYX", "unit": "um", "finterval": 0.01})
  elif kind == "ome":
    tifffile.imwrite(path, data, compression=compression, ome=True,
                     metadata={"axes": "TYX", "PhysicalSizeX": PIXEL_NM / 1000.0,
                               "PhysicalSizeXUnit": "µm",
                               "PhysicalSizeY": PIXEL_NM / 1000.0,
                               "PhysicalSizeYUnit": "µm"})
  else:
    rgb = np.random.default_rng(1).integers(0, 255, (H, W, 3)).astype(np.uint8)
    tifffile.imwrite(path, rgb, compression=compression, photometric="rgb")
  with tifffile.TiffFile(path) as tif:   # the file really is compressed
    assert tif.pages[0].compression == COMPRESSIONS[compression]


def _readers():
  """name -> (path -> [T, H, W] array) through the function each command reads with."""
  from smlm_jax.diffusion import calibrate
  from smlm_jax.events import predict as events_predict
  from smlm_jax.fusion import volume_io
  from smlm_jax.holly import images
  from smlm_jax.sparks import predict as sparks_predict
  sim = types.SimpleNamespace(num_frames=T, height_px=H, width_px=W)

  def calibration(path):    # skips unusable inputs with their message
    frames, skipped = calibrate.load_movies([path], sim, log=lambda *a, **k: None)
    if skipped:
      raise tiff_io.MovieError(skipped[0][1], "skipped")
    return frames[0]

  return {
      "diffusion predict/baselines": lambda p: tiff_io.read_windows(p, T, H, W)[0].frames,
      "diffusion calibrate": calibration,
      "events predict": lambda p: events_predict._read(0)(p)[0],
      "sparks predict": lambda p: sparks_predict.read_movie(p).data,
      "fusion predict": lambda p: volume_io.read_volume(p)[0],
      "holly": images.read_images}   # unit-mass images


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_every_reader_reads_compressed_tiffs(tmp_path, compression):
  data = _movie()
  readers = _readers()
  for kind in ("imagej", "ome"):
    path = str(tmp_path / f"movie_{kind}.{'ome.' if kind == 'ome' else ''}tif")
    _write(path, data, compression, kind)
    image = tiff_io.read_image(path)
    assert image.axes == "TYX" and image.data.dtype == np.uint16
    assert image.pixel_size_nm == pytest.approx(PIXEL_NM, rel=1e-4)
    for name, read in readers.items():
      got = np.asarray(read(path))
      want = data.astype(np.float32)
      if name == "holly":
        want = want / want.sum(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{name} {kind}")
      else:
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {kind}")
  path = str(tmp_path / "rgb.tif")
  _write(path, None, compression, "rgb")
  for name, read in readers.items():
    with pytest.raises(tiff_io.MovieError) as err:
      read(path)
    want = "skipped" if name == "diffusion calibrate" else "rgb"
    assert err.value.code == want and "RGB/RGBA image" in str(err.value), (name, err.value)


def test_without_imagecodecs_one_clear_error_and_rgb_still_rgb(tmp_path):
  """imagecodecs hidden in a fresh interpreter: LZW and Zstd give the missing_codec
  error naming the package, Deflate still reads, compressed RGB is still `rgb`."""
  data = _movie()
  for c in ("lzw", "zstd", "zlib"):
    _write(str(tmp_path / f"{c}.tif"), data, c, "imagej")
  _write(str(tmp_path / "rgb.tif"), None, "lzw", "rgb")
  code = (
      "import sys\nsys.modules['imagecodecs'] = None\n"
      "from smlm_jax.core import tiff_io\n"
      "for name in ('lzw', 'zstd', 'zlib', 'rgb'):\n"
      "  try:\n"
      f"    tiff_io.read_image({str(tmp_path)!r} + '/' + name + '.tif')\n"
      "    print(name, 'ok')\n"
      "  except tiff_io.MovieError as e:\n"
      "    print(name, e.code, e)\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
  assert out.returncode == 0, out.stderr
  lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
  for c in ("lzw", "zstd"):
    assert lines[c].startswith("missing_codec"), lines[c]
    assert "pip install imagecodecs" in lines[c] and c.upper() in lines[c]
  assert lines["zlib"] == "ok"
  assert lines["rgb"].startswith("rgb "), lines["rgb"]


def test_calibrate_command_reads_compressed_inputs(tmp_path):
  """End to end: the calibrate command counts an LZW ImageJ movie and a Zstd OME-TIFF
  as usable windows and skips a compressed RGB file as RGB (then stops: too few)."""
  data = _movie()
  folder = tmp_path / "in"
  folder.mkdir()
  _write(str(folder / "a.tif"), data, "lzw", "imagej")
  _write(str(folder / "b.ome.tif"), data, "zstd", "ome")
  _write(str(folder / "c.tif"), None, "packbits", "rgb")
  out = subprocess.run(
      [sys.executable, "-m", "smlm_jax.diffusion.calibrate", f"--input={folder}",
       "--config=configs/diffusion.py:tiny", f"--output={tmp_path / 'c.json'}"],
      capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
      timeout=300)
  assert out.returncode == 2, out.stderr
  assert "c.tif: RGB/RGBA image" in out.stderr
  assert "error: only 2 usable movie window(s)" in out.stderr, out.stderr
  assert "Traceback" not in out.stderr
