"""Scores predicted fused volumes against real fused volumes: SSIM, PSNR, N_SSIM.

  python -m smlm_jax.fusion.evaluate --pred=PRED.tif --target=FUSED.tif [--input=VIEW.tif]
  python -m smlm_jax.fusion.evaluate --pred=out/ --target=fused/ [--input=views/] \
      [--output=scores.csv]

Every volume is percentile-normalized on its own (2nd / 99.8th percentile) and compared
with the challenge's 3D SSIM (:mod:`smlm_jax.fusion.metrics`: 7^3 uniform window,
data_range 1); with the single view (``--input``) also its SSIM to the target and
N_SSIM = (SSIM(pred, fused) - SSIM(view, fused)) / (1 - SSIM(view, fused)).

Files or folders: with folders, predictions are paired with targets (and inputs) by
name, ``X_fused.tif`` (what smlm_jax.fusion.predict writes) or ``X.tif`` <-> ``X.tif``.
Prints one line per pair and the mean; ``--output`` also writes them as CSV:
  pred, target, input, ssim, psnr_db, input_ssim, input_psnr_db, n_ssim, flag
flag is ``ok``, ``input_equals_target`` (the view is the target: N_SSIM undefined, left
empty and out of the mean) or ``error:<code>`` (not_found, unreadable, truncated, not_3d,
bad_shape, bad_dtype, rgb, nan_or_inf, shape_mismatch, no_match, constant_input - a
constant target). A missing --pred/--target/--input path or an --output that cannot be
written ends the command at once (one line, exit 2). A bad pair gets one ``error:`` line on stderr
and its row; the others are still scored; the exit code is 1 if any pair failed.
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

import os
import sys

from absl import app, flags
import numpy as np

from smlm_jax.core import cli
from smlm_jax.core import tiff_io
from smlm_jax.core.tiff_io import MovieError
from smlm_jax.fusion import volume_io

COLUMNS = ("pred", "target", "input", "ssim", "psnr_db", "input_ssim", "input_psnr_db",
           "n_ssim", "flag")


def _key(path: str) -> str:
  s = volume_io.stem(path)
  return s[:-len("_fused")] if s.endswith("_fused") else s


def pair_paths(pred: str, target: str, view: str | None):
  """[(pred, target, view | None, error | None)] for files or folders (matched by name)."""
  for flag, path in (("pred", pred), ("target", target), ("input", view)):
    if path and not os.path.exists(path):
      raise ValueError(f"--{flag}={path}: no such file or folder")
  if not os.path.isdir(pred):
    if os.path.isdir(target) or (view and os.path.isdir(view)):
      raise ValueError("--pred is a file, so --target and --input must be files too")
    return [(pred, target, view, None)]
  if not os.path.isdir(target) or (view and not os.path.isdir(view)):
    raise ValueError("--pred is a folder, so --target (and --input) must be folders too")

  def index(folder):
    files, _ = tiff_io.find_movies([folder])
    return {_key(f): f for f in files}

  preds, targets = index(pred), index(target)
  views = index(view) if view else {}
  if not preds:
    raise ValueError(f"{pred}: folder contains no .tif/.tiff files")
  out = []
  for k, p in sorted(preds.items()):
    t = targets.get(k)
    v = views.get(k) if view else None
    if t is None or (view and v is None):
      missing = "target" if t is None else "input"
      out.append((p, t or "", v or "", (f"{p}: no {missing} file named {k}.tif", "no_match")))
    else:
      out.append((p, t, v, None))
  return out


def score_pair(pred_path: str, target_path: str, view_path: str | None) -> dict:
  """Metrics of one pair (raises MovieError for unusable files or shape mismatches)."""
  from smlm_jax.fusion import metrics
  pred, _ = volume_io.read_volume(pred_path)
  target, _ = volume_io.read_volume(target_path, reject_constant=True)
  view = volume_io.read_volume(view_path)[0] if view_path else None
  for name, (path, vol) in (("prediction", (pred_path, pred)),
                            ("input", (view_path, view))):
    if vol is not None and vol.shape != target.shape:
      raise MovieError(f"{path}: {name} shape {vol.shape} differs from the target's "
                       f"{target.shape} ({target_path})", "shape_mismatch")
  if min(target.shape) < metrics.WIN_SIZE:
    raise MovieError(f"{target_path}: volume {target.shape} is smaller than the SSIM "
                     f"window ({metrics.WIN_SIZE} voxels per side)", "not_3d")
  return metrics.compare(pred, target, view)


def run(pred, target, view=None, output=None, log=print) -> int:
  pairs = pair_paths(pred, target, view)
  rows, results, failed = [], [], 0
  num = cli.number
  bar = cli.progress(total=len(pairs), desc="evaluate", unit="pair")
  for p, t, v, error in pairs:
    bar.update(1)
    if error is None:
      try:
        m = score_pair(p, t, v or None)
      except MovieError as e:
        error = (str(e), e.code)
    if error is not None:
      failed += 1
      log(f"error: {error[0]}", file=sys.stderr)
      rows.append([p, t, v or "", "", "", "", "", "", f"error:{error[1]}"])
      continue
    results.append(m)
    flag = "ok"
    if "n_ssim" in m and not np.isfinite(m["n_ssim"]):
      flag = "input_equals_target"
      log(f"warning: {v}: the input view equals the target (SSIM 1): N_SSIM is undefined "
          "(left empty)", file=sys.stderr)
    rows.append([p, t, v or "", num(m["ssim"], ".4f"), num(m["psnr"], ".2f"),
                 num(m.get("input_ssim", np.nan), ".4f"),
                 num(m.get("input_psnr", np.nan), ".2f"),
                 num(m.get("n_ssim", np.nan), ".4f"), flag])
  bar.close()
  for r in rows:
    if not r[-1].startswith("error:"):
      line = f"{os.path.basename(r[0])}: SSIM {r[3]}  PSNR {r[4]} dB"
      if r[5]:
        line += f"  input SSIM {r[5]}  input PSNR {r[6]} dB  N_SSIM {r[7]}"
      log(line)
  if results:
    mean = lambda k: float(np.nanmean([m[k] for m in results])) if any(
        np.isfinite(m[k]) for m in results) else float("nan")
    line = f"mean over {len(results)} pair(s): SSIM {mean('ssim'):.4f}  PSNR {mean('psnr'):.2f} dB"
    if "n_ssim" in results[0]:
      line += f"  input SSIM {mean('input_ssim'):.4f}  N_SSIM {mean('n_ssim'):.4f}"
    log(line)
  if output:
    cli.atomic_write_text(output, cli.csv_text(COLUMNS, rows, [
        "smlm_jax.fusion.evaluate: 3D SSIM (7^3 uniform window, data_range 1) of "
        "percentile-normalized (2, 99.8) volumes; N_SSIM = (SSIM - input SSIM) / "
        "(1 - input SSIM)"]))
    log(f"wrote {output}", file=sys.stderr)
  return 1 if failed else 0


def _define_flags():
  flags.DEFINE_string("pred", None, "Predicted fused volume (TIFF) or folder.")
  flags.DEFINE_string("target", None, "Real fused volume (TIFF) or folder.")
  flags.DEFINE_string("input", None, "Optional single view (TIFF) or folder: N_SSIM.")
  flags.DEFINE_string("output", None, "Optional CSV file for the scores.")


def main(argv):
  cli.quiet_logs()
  f = flags.FLAGS
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not f.pred or not f.target:
    cli.fail("--pred and --target are required (TIFF files or folders)")
  if f.output:
    cli.check_writable(f.output)
  try:
    code = run(f.pred, f.target, f.input, f.output)
  except ValueError as e:
    cli.fail(str(e))
  sys.exit(code)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
