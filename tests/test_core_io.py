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
