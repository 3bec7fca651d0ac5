"""Shared output writing (smlm_jax.core.cli / tiff_io): atomic files with normal
permissions, streamed TIFF stacks with their metadata."""
import os

import numpy as np
import pytest


def test_atomic_outputs_get_normal_permissions_and_no_leftovers(tmp_path):
  """Files written through cli.atomic_path are readable like any new file (mkstemp alone
  makes them owner-only), and a failed write leaves neither the file nor a temporary."""
  import stat
  from smlm_jax.core import cli, tiff_io
  umask = os.umask(0o022)
  try:
    cli.atomic_write_text(str(tmp_path / "a.csv"), "x\n")
    tiff_io.write_frames(str(tmp_path / "m.tif"), (np.full((4, 5), i, np.float32)
                                                   for i in range(3)), (3, 4, 5),
                         np.float32, pixel_size_nm=100.0, frame_interval_s=0.5)
  finally:
    os.umask(umask)
  for name in ("a.csv", "m.tif"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644
  image = tiff_io.read_image(str(tmp_path / "m.tif"))
  assert image.data.shape == (3, 4, 5) and image.data[2, 0, 0] == 2.0
  assert abs(image.pixel_size_nm - 100.0) < 1e-3 and abs(image.frame_interval_s - 0.5) < 1e-6
  with pytest.raises(RuntimeError):
    with cli.atomic_path(str(tmp_path / "b.tif")) as tmp:
      open(tmp, "w").write("half")
      raise RuntimeError("writer failed")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "m.tif"]


def test_take_channel_picks_one_channel_or_says_why_not(tmp_path):
  """tiff_io.take_channel (sparks predict --channel, events' read_frames): the C axis
  taken at the channel and removed; a missing channel, or several channels and no
  choice, is a MovieError 'bad_channel' naming the choices."""
  import numpy as np
  import pytest
  import tifffile
  from smlm_jax.core import tiff_io
  from smlm_jax.sparks import predict
  rng = np.random.default_rng(0)
  movie = (100 + rng.poisson(20, (12, 2, 16, 24)) * np.array([1, 3])[None, :, None, None])
  path = str(tmp_path / "two.tif")
  tifffile.imwrite(path, movie.astype(np.uint16), imagej=True, metadata={"axes": "TCYX"})
  image = tiff_io.read_image(path)
  assert image.axes == "TCYX"
  for c in (0, 1):
    data, axes = tiff_io.take_channel(image.data, image.axes, c, path)
    assert axes == "TYX"
    np.testing.assert_array_equal(data, movie[:, c])
    np.testing.assert_array_equal(predict.read_movie(path, 0.0, c).data, movie[:, c])
  for bad, match in ((None, r"2 channels.*--channel=0\.\.1"), (2, "has 2")):
    with pytest.raises(tiff_io.MovieError, match=match) as e:
      predict.read_movie(path, 0.0, bad)
    assert e.value.code == "bad_channel"
  one = str(tmp_path / "one.tif")
  tifffile.imwrite(one, movie[:, 0].astype(np.uint16))
  for c in (None, 0):
    assert predict.read_movie(one, 0.0, c).data.shape == (12, 16, 24)
  with pytest.raises(tiff_io.MovieError, match="has 1"):
    predict.read_movie(one, 0.0, 1)


def test_frame_stack_reads_one_channel_of_any_layout(tmp_path):
  """tiff_stream.FrameStack(path, channel) (analyze's whole movies): T/C in either order,
  memory-mapped or page by page (compressed), frame for frame what read_movie gives."""
  import numpy as np
  import pytest
  import tifffile
  from smlm_jax.core import tiff_io
  from smlm_jax.core.tiff_stream import FrameStack
  m = np.random.default_rng(0).integers(0, 1000, (7, 3, 10, 12)).astype(np.uint16)
  ct = m.transpose(1, 0, 2, 3).copy()
  cases = (("tc.tif", m, {"imagej": True, "metadata": {"axes": "TCYX"}}, True),
           ("tc_zlib.tif", m, {"compression": "zlib", "photometric": "minisblack",
                               "metadata": {"axes": "TCYX"}}, False),
           ("ct.tif", ct, {"photometric": "minisblack", "metadata": {"axes": "CTYX"}}, True),
           ("ct_zlib.tif", ct, {"compression": "zlib", "photometric": "minisblack",
                                "metadata": {"axes": "CTYX"}}, False))
  for name, data, kw, mapped in cases:
    path = str(tmp_path / name)
    tifffile.imwrite(path, data, **kw)
    for c in range(3):
      with FrameStack(path, c) as stack:
        assert stack.shape == (7, 10, 12) and (stack._data is not None) == mapped
        got = np.stack([stack[i] for i in range(len(stack))])
      np.testing.assert_array_equal(got, m[:, c])
      np.testing.assert_array_equal(tiff_io.read_movie(path, c).frames, m[:, c])
    for bad in (None, 3):
      with pytest.raises(tiff_io.MovieError) as e:
        FrameStack(path, bad)
      assert e.value.code == "bad_channel"
