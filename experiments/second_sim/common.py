"""Shared by the second simulators: camera digitisation, file writing and the CLI frame.

Camera model (both systems): ADU = offset + gain * photo-electrons + read noise (ADU),
rounded and clipped to uint16. Files are plain tifffile ImageJ TIFFs plus a JSON sidecar.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import tifffile


def to_adu(electrons_mean: np.ndarray, rng: np.random.Generator, offset_adu: float,
           gain_adu_per_e: float, read_noise_e: np.ndarray | float) -> np.ndarray:
  """Poisson photo-electrons of the given mean, then gain, offset and Gaussian read noise
  (``read_noise_e`` may be per pixel, broadcast against the last axes); uint16 ADU."""
  electrons = rng.poisson(np.maximum(electrons_mean, 0.0)).astype(np.float32)
  read = rng.standard_normal(electrons.shape).astype(np.float32) * np.float32(read_noise_e)
  adu = offset_adu + gain_adu_per_e * (electrons + read)
  return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)


def write_imagej(path: str, data: np.ndarray, axes: str, pixel_um: float,
                 spacing_um: float | None = None, finterval_s: float | None = None,
                 compress: bool = False):
  """An ImageJ hyperstack with pixel size (resolution, um), z spacing and frame interval;
  ``compress``: zlib (label maps shrink ~100x; Fiji/Bio-Formats and tifffile read it)."""
  metadata = {"axes": axes, "unit": "um"}
  if spacing_um is not None:
    metadata["spacing"] = float(spacing_um)
  if finterval_s is not None:
    metadata["finterval"] = float(finterval_s)
  tifffile.imwrite(path, data, imagej=True, resolution=(1.0 / pixel_um, 1.0 / pixel_um),
                   metadata=metadata, compression="zlib" if compress else None)


def write_json(path: str, meta: dict):
  with open(path, "w") as f:
    json.dump(meta, f, indent=1, default=_jsonable)


def _jsonable(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def cli(description: str, default_name: str, write_one, argv=None) -> int:
  """``--out DIR --num N --seed S [--tiny]``: writes N samples with seeds S..S+N-1 through
  ``write_one(out_dir, name, seed, tiny) -> one-line summary``. Exit 2 on bad arguments."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--out", required=True, help="output folder (created)")
  p.add_argument("--num", type=int, default=1, help="number of samples")
  p.add_argument("--seed", type=int, default=0, help="seed of the first sample")
  p.add_argument("--tiny", action="store_true", help="small shapes (tests)")
  p.add_argument("--prefix", default=default_name, help="file name prefix")
  args = p.parse_args(argv)
  if args.num < 1:
    print("error: --num must be >= 1", file=sys.stderr)
    return 2
  if args.seed < 0:
    print("error: --seed must be >= 0", file=sys.stderr)
    return 2
  try:
    os.makedirs(args.out, exist_ok=True)
  except OSError as e:
    print(f"error: cannot create --out={args.out}: {e.strerror}", file=sys.stderr)
    return 2
  for i in range(args.num):
    seed = args.seed + i
    name = f"{args.prefix}_{seed:04d}"
    print(write_one(args.out, name, seed, args.tiny), flush=True)
  return 0
