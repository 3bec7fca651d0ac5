"""Whole-movie study: simulated full-frame movies -> analyze -> per-molecule D vs truth.

  python experiments/wholemovie_study.py --workdir=runs/default [--num_movies=3]
      [--num_frames=200] [--conditions=sparse,crowded] [--seed=0]

Movies (our own simulator, :mod:`smlm_jax.diffusion.fullmovie`, the training physics:
Brownian sub-frame motion, pixel-integrated PSF, photons, background, sCMOS noise) of
256 x 256 px with molecules of known D (log-uniform 0.01-5 um^2/s), photons and
background across the training priors (one background per movie), lifetimes 24-80
frames with random first frames (appearance / bleaching):
  sparse   15 molecules per frame, >= 30 px between molecules at their start (the
           issue's target condition)
  crowded  40 molecules per frame, >= 8 px apart
Each movie goes through :func:`smlm_jax.diffusion.analyze.analyze_movie` (the CLI's
code; model loaded and compiled once, before timing). A true molecule is recovered
when one track follows it (within 2 px) for >= 50% of its frames. On the recovered
molecules: relative RMSE of D for the model (windows combined per molecule) and for
CVE with blur correction on the same tracks, 68% interval coverage, and the analysis
throughput (frames per second, detection to CSV rows).

Last line: RESULT recovered=... model_relative_rmse=... cve_relative_rmse=...
coverage_68=... frames_per_s=...   (the sparse condition; others in the table)
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from smlm_jax.diffusion import analyze, fullmovie, predict  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Trained run folder.")
_NUM_MOVIES = flags.DEFINE_integer("num_movies", 3, "Movies per condition.")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 200, "Frames per movie.")
_CONDITIONS = flags.DEFINE_list("conditions", ["sparse", "crowded"], "Conditions to run.")
_SEED = flags.DEFINE_integer("seed", 0, "Simulation seed.")
_BIG_FRAMES = flags.DEFINE_integer(
    "big_frames", 0, "If > 0: also run the CLI on a 2048 x 2048 movie of this many frames "
    "(8 x 8 tiles of a simulated 256 x 256 movie, cycled every 64 frames) and report its "
    "peak memory.")

CONDITIONS = {"sparse": dict(molecules_per_frame=15.0, min_start_distance_px=30.0),
              "crowded": dict(molecules_per_frame=40.0, min_start_distance_px=8.0)}


def match(truth, rows, max_px=2.0, min_fraction=0.5):
  """[(molecule index, row)], one to one: each track goes to the true molecule it
  follows (within max_px) in most frames; a molecule is recovered when its track
  follows it for >= min_fraction of its frames."""
  best = {}                                  # track id -> (frames, molecule)
  for i, (t0, pos) in enumerate(zip(truth["t0"], truth["positions_px"])):
    for r in rows:
      if r.error or r.xy_track is None:
        continue
      lo, hi = max(t0, r.t_start), min(t0 + len(pos) - 1, r.t_end)
      if lo > hi:
        continue
      d = np.hypot(*(r.xy_track[lo - r.t_start:hi - r.t_start + 1]
                     - pos[lo - t0:hi - t0 + 1]).T)
      n = int(np.sum(d < max_px))
      if n > best.get(r.track_id, (0, None))[0]:
        best[r.track_id] = (n, i)
  by_id = {r.track_id: r for r in rows if not r.error}
  out = {}
  for tid, (n, i) in best.items():
    if n >= min_fraction * len(truth["positions_px"][i]) and n > out.get(i, (0, None))[0]:
      out[i] = (n, by_id[tid])
  return [(i, r) for i, (_, r) in sorted(out.items())]


def rel_rmse(est, true):
  rel = (np.asarray(est) - true) / true
  return float(np.sqrt(np.mean(rel ** 2)))


def run_condition(name, predictor, tmp, n_movies, n_frames, seed):
  spec = fullmovie.FieldSpec(num_frames=n_frames, **CONDITIONS[name])
  cfg_cam = predictor.config.sim.camera
  from smlm_jax.core.noise import Camera
  camera = Camera(model=cfg_cam.model, qe=cfg_cam.qe, gain_adu_per_e=cfg_cam.gain_adu_per_e,
                  offset_adu=cfg_cam.offset_adu, read_noise_e=cfg_cam.read_noise_e,
                  em_gain=cfg_cam.em_gain)
  D_true, D_model, lo, hi, D_cve, ok_flags = [], [], [], [], [], []
  n_true, frames, seconds = 0, 0, 0.0
  for m in range(n_movies):
    path = os.path.join(tmp, f"{name}_{m}.tif")
    truth = fullmovie.simulate_to_tiff(jax.random.fold_in(jax.random.key(seed), m), spec,
                                       camera, path)
    t0 = time.time()
    rows, _, _, info = analyze.analyze_movie(path, predictor, analyze.Options(), {},
                                             {"pixel_size_nm": 0, "frame_interval_s": 0})
    seconds += time.time() - t0
    frames += info["frames"]
    pairs = match(truth, rows)
    n_true += len(truth["t0"])
    for i, r in pairs:
      D_true.append(truth["D_um2_per_s"][i])
      D_model.append(r.D)
      lo.append(r.D_low)
      hi.append(r.D_high)
      D_cve.append(r.D_cve)
      ok_flags.append(r.flag() == "ok")
    print(f"  {name} movie {m}: {len(truth['t0'])} molecules, {len(rows)} tracks, "
          f"{len(pairs)} recovered, {info['detections']} detections, "
          f"{info['frames'] / (time.time() - t0):.1f} frames/s", flush=True)
  D_true, D_model, D_cve = map(np.asarray, (D_true, D_model, D_cve))
  lo, hi, ok_flags = np.asarray(lo), np.asarray(hi), np.asarray(ok_flags)
  both = np.isfinite(D_model) & np.isfinite(D_cve)
  return {"molecules": n_true, "recovered": len(D_true) / max(n_true, 1),
          "model_relative_rmse": rel_rmse(D_model[both], D_true[both]),
          "cve_relative_rmse": rel_rmse(D_cve[both], D_true[both]),
          "model_relative_rmse_ok": rel_rmse(D_model[both & ok_flags], D_true[both & ok_flags]),
          "model_median_abs_rel": float(np.median(np.abs(D_model[both] / D_true[both] - 1))),
          "cve_median_abs_rel": float(np.median(np.abs(D_cve[both] / D_true[both] - 1))),
          "worst": max(((abs(m / t - 1), t, m) for m, t in zip(D_model[both], D_true[both])),
                       default=(0, 0, 0)),
          "coverage_68": float(np.mean((D_true >= lo) & (D_true <= hi))),
          "ok_fraction": float(np.mean(ok_flags)), "n_compared": int(both.sum()),
          "frames_per_s": frames / seconds}


def big_movie(predictor, tmp, num_frames):
  """(seconds, peak RSS MB) of the analyze CLI on a 2048 x 2048 x num_frames movie."""
  import resource
  import subprocess
  from smlm_jax.core import tiff_io
  spec = fullmovie.FieldSpec(num_frames=64)
  small = os.path.join(tmp, "tile.tif")
  fullmovie.simulate_to_tiff(jax.random.key(777), spec, predictor.camera, small)
  from smlm_jax.core.tiff_stream import FrameStack
  with FrameStack(small) as st:
    tiles = [np.tile(st[i], (8, 8)).astype(np.uint16) for i in range(len(st))]
  path = os.path.join(tmp, "big.tif")
  tiff_io.write_frames(path, (tiles[i % 64] for i in range(num_frames)),
                       (num_frames, 2048, 2048), np.uint16, 100.0, 0.01)
  del tiles
  t0 = time.time()
  r = subprocess.run([sys.executable, "-m", "smlm_jax.diffusion.analyze",
                      f"--workdir={_WORKDIR.value}", f"--input={path}",
                      f"--output={os.path.join(tmp, 'big_out')}"], cwd=ROOT,
                     capture_output=True, text=True)
  seconds = time.time() - t0
  if r.returncode != 0:
    print(r.stderr[-2000:])
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
  print(f"2048 x 2048 x {num_frames} movie ({os.path.getsize(path) / 2**30:.1f} GiB): "
        f"analyze CLI {seconds:.0f} s, peak resident memory {peak:.0f} MB "
        f"(exit code {r.returncode}); {r.stderr.strip().splitlines()[-2]}")
  os.remove(path)


def main(_):
  from smlm_jax.core import cli
  cli.quiet_logs()
  predictor = predict.Predictor(_WORKDIR.value)
  from smlm_jax.diffusion import camera_setup
  predictor.camera, _ = camera_setup.data_camera(predictor.config.sim.camera)
  # Warm-up (compile the model and localizer) on a short movie, outside the timing.
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    warm = os.path.join(tmp, "warm.tif")
    fullmovie.simulate_to_tiff(jax.random.key(12345), fullmovie.FieldSpec(
        num_frames=40, lifetime_frames=(24, 40)), predictor.camera, warm)
    analyze.analyze_movie(warm, predictor, analyze.Options(), {},
                          {"pixel_size_nm": 0, "frame_interval_s": 0})
    for name in _CONDITIONS.value:
      results[name] = run_condition(name, predictor, tmp, _NUM_MOVIES.value,
                                    _NUM_FRAMES.value, _SEED.value)
    if _BIG_FRAMES.value:
      big_movie(predictor, tmp, _BIG_FRAMES.value)
  print("\nPer-molecule D on simulated 256x256 movies (our own simulator, "
        f"{_NUM_MOVIES.value} x {_NUM_FRAMES.value} frames per condition; model "
        f"{predictor.config.model.name} step {int(predictor.state['step'])})")
  keys = ("molecules", "recovered", "n_compared", "model_relative_rmse",
          "model_relative_rmse_ok", "cve_relative_rmse", "model_median_abs_rel",
          "cve_median_abs_rel", "coverage_68", "ok_fraction", "frames_per_s")
  print(f"{'condition':<10}" + "".join(f"{k:>23}" for k in keys))
  for name, r in results.items():
    print(f"{name:<10}" + "".join(f"{r[k]:>23.3f}" if isinstance(r[k], float)
                                  else f"{r[k]:>23}" for k in keys))
  for name, r in results.items():
    print(f"{name}: worst molecule true D {r['worst'][1]:.4g}, model {r['worst'][2]:.4g} "
          "um^2/s")
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"peak resident memory of this process: {peak_mb:.0f} MB")
  r = results.get("sparse") or next(iter(results.values()))
  print(f"RESULT recovered={r['recovered']:.3f} model_relative_rmse="
        f"{r['model_relative_rmse']:.3f} cve_relative_rmse={r['cve_relative_rmse']:.3f} "
        f"coverage_68={r['coverage_68']:.3f} frames_per_s={r['frames_per_s']:.1f}")


if __name__ == "__main__":
  from smlm_jax.core import cli
  app.run(main, flags_parser=cli.parse_flags)
