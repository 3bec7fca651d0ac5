"""Fusion study: train the default config, then score it and a tuned Gaussian filter on
simulated volumes from an unseen seed.

  flock /tmp/smlm_cpu.lock env PYTHONPATH=. python experiments/fusion_study.py \
      --workdir=/tmp/fusion_study [--config=configs/fusion.py] [--num_volumes=16] \
      [--test_shape=24,80,80] [--tile=24,48,48] [--plot=fusion_study.png]

1. Trains ``configs/fusion.py`` (default variant) in --workdir, timed (``seconds``: wall
   time of train_and_evaluate, compilation and periodic evaluation included); an
   existing finished run there is reused (its recorded time is reported).
2. Simulates ``--num_volumes`` test volumes of ``--test_shape`` voxels (larger than the
   training patches, so prediction goes through the blended tiles) with the training
   physics but seed ``--test_seed``, never used in training or validation.
3. Scores the U-Net prediction (with the run's ``predict.tta`` self-ensemble; the
   column ``1-pass`` is the same network without it) and a Gaussian filter of the view whose (sigma_z,
   sigma_xy) is tuned on these same test volumes (an oracle choice, generous to the
   baseline) with the challenge metric (:mod:`smlm_jax.fusion.metrics`).
Prints a table per channel and one line
  RESULT n_ssim=... gaussian_n_ssim=... seconds=...
and writes --plot: orthogonal slices (view, Gaussian, prediction, fused) of one nucleus
and one membrane volume.
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

import dataclasses
import json
import os
import time

from absl import app, flags
import numpy as np

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/fusion_study", "Training run folder.")
_CONFIG = flags.DEFINE_string("config", "configs/fusion.py", "Config file[:variant].")
_NUM = flags.DEFINE_integer("num_volumes", 16, "Test volumes.")
_SEED = flags.DEFINE_integer("test_seed", 777, "Seed of the test volumes (unseen).")
_SHAPE = flags.DEFINE_string("test_shape", "24,80,80", "Test volume shape z,y,x.")
_TILE = flags.DEFINE_string("tile", "24,48,48", "Prediction tile z,y,x.")
_OVERLAP = flags.DEFINE_string("overlap", "8,16,16", "Tile overlap z,y,x.")
_HALO = flags.DEFINE_string("halo", "2,4,4", "Discarded tile border z,y,x.")
_PLOT = flags.DEFINE_string("plot", "fusion_study.png", "Orthogonal-slices PNG.")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Config overrides key=python_value.")

SIGMAS_Z = (0.0, 0.5, 1.0, 1.5, 2.0)
SIGMAS_XY = (0.0, 0.5, 0.75, 1.0, 1.5)


def load_config():
  import importlib.util
  path, _, variant = _CONFIG.value.partition(":")
  spec = importlib.util.spec_from_file_location("fusion_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config(variant or None)
  for kv in _OVERRIDES.value:
    key, value = kv.split("=", 1)
    target = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = eval(value)    # noqa: S307 (a study script's own flag)
  return cfg


def train(cfg, workdir) -> float:
  from smlm_jax.core import trainer
  timing = os.path.join(workdir, "study_train_seconds.json")
  if os.path.exists(timing):
    return json.load(open(timing))["seconds"]
  t0 = time.perf_counter()
  trainer.train_and_evaluate(cfg, workdir)
  seconds = time.perf_counter() - t0
  with open(timing, "w") as f:
    json.dump({"seconds": seconds}, f)
  return seconds


def simulate_test_set(cfg, shape, num, seed):
  import jax
  import jax.numpy as jnp
  from smlm_jax.fusion import simulator as sim_lib
  sc = dataclasses.replace(sim_lib.sim_config(cfg.sim), shape=shape)
  fn = jax.jit(lambda k: sim_lib.simulate(k, sc))
  views, fused, membrane = [], [], []
  for i in range(num):
    ex = jax.device_get(fn(jax.random.fold_in(jax.random.key(seed), i)))
    views.append(np.asarray(ex["view"]))
    fused.append(np.asarray(ex["fused"]))
    membrane.append(bool(ex["cond"]["membrane"]))
  return views, fused, np.array(membrane), sc


def main(argv):
  del argv
  from scipy import ndimage
  from smlm_jax.core import plotting
  from smlm_jax.fusion import metrics
  from smlm_jax.fusion.predict import Predictor
  cfg = load_config()
  shape = tuple(int(s) for s in _SHAPE.value.split(","))
  seconds = train(cfg, _WORKDIR.value)
  print(f"training: {seconds:.0f} s ({cfg.num_train_steps} steps of {cfg.batch_size} "
        f"volumes {tuple(cfg.sim.shape)})")
  views, fused, membrane, sc = simulate_test_set(cfg, shape, _NUM.value, _SEED.value)
  predictor = Predictor(_WORKDIR.value)
  tta = bool(predictor.config.predict.get("tta", False))
  triple = lambda t: tuple(int(v) for v in t.split(","))

  def predict_all(pr):
    t0 = time.perf_counter()
    out, n = [], 0
    for v in views:
      p, n = pr.predict(v, tile=triple(_TILE.value), overlap=triple(_OVERLAP.value),
                        halo=triple(_HALO.value))
      out.append(p)
    return out, n, (time.perf_counter() - t0) / len(views)

  preds, n_tiles, pred_s = predict_all(predictor)
  unet = [metrics.compare(p, f, v) for p, f, v in zip(preds, fused, views)]
  # The same network without the self-ensemble (one pass per tile), for reference.
  plain = unet
  if tta:
    plain_preds, _, _ = predict_all(Predictor(_WORKDIR.value, tta=False))
    plain = [metrics.compare(p, f, v) for p, f, v in zip(plain_preds, fused, views)]

  best = None
  for sz in SIGMAS_Z:
    for sxy in SIGMAS_XY:
      ms = [metrics.compare(ndimage.gaussian_filter(v, (sz, sxy, sxy)), f, v)
            for v, f in zip(views, fused)]
      score = np.mean([m["n_ssim"] for m in ms])
      if best is None or score > best[0]:
        best = (score, (sz, sxy), ms)
  _, sigma, gauss = best

  def row(name, sel):
    g = lambda ms, k: np.mean([m[k] for m, s in zip(ms, sel) if s])
    return (f"{name:<10} {int(sel.sum()):>3} {g(unet, 'input_ssim'):>10.3f} "
            f"{g(gauss, 'ssim'):>10.3f} {g(gauss, 'n_ssim'):>10.3f} {g(unet, 'ssim'):>10.3f} "
            f"{g(unet, 'n_ssim'):>10.3f} {g(plain, 'n_ssim'):>10.3f} "
            f"{g(unet, 'input_psnr'):>9.2f} {g(unet, 'psnr'):>9.2f}")

  print(f"\ntest: {len(views)} simulated volumes {shape} (z, y, x) of "
        f"{sc.voxel_size_um} um voxels, seed {_SEED.value}; Gaussian sigma (z, xy) = "
        f"{sigma} voxels (tuned on the test set); U-Net {pred_s:.1f} s/volume "
        f"({n_tiles} blended tiles of {_TILE.value}, self-ensemble of 8 flips/transposes: "
        f"{'on' if tta else 'off'}; 1-pass NSSIM: without it)")
  print(f"{'channel':<10} {'n':>3} {'input SSIM':>10} {'gauss SSIM':>10} {'gauss NSSIM':>10} "
        f"{'unet SSIM':>10} {'unet NSSIM':>10} {'1-pass':>10} {'in PSNR':>9} {'unet PSNR':>9}")
  print(row("nuclei", ~membrane))
  print(row("membranes", membrane))
  print(row("all", np.ones_like(membrane)))

  if _PLOT.value:
    idx = [i for i in (int(np.argmin(membrane)), int(np.argmax(membrane)))]
    vols, titles = [], []
    for i in dict.fromkeys(idx):
      kind = "membranes" if membrane[i] else "nuclei"
      g = ndimage.gaussian_filter(views[i], (sigma[0], sigma[1], sigma[1]))
      vols += [views[i], g, preds[i], fused[i]]
      titles += [f"{kind} view", f"Gaussian {sigma}", f"U-Net N_SSIM {unet[i]['n_ssim']:.2f}",
                 "fused (target)"]
    fig = plotting.orthogonal_slices(vols, titles,
                                     z_aspect=sc.voxel_size_um[0] / sc.voxel_size_um[1])
    plotting.save(fig, _PLOT.value)
    print(f"wrote {_PLOT.value}")
  n_ssim = float(np.mean([m["n_ssim"] for m in unet]))
  g_ssim = float(np.mean([m["n_ssim"] for m in gauss]))
  print(f"RESULT n_ssim={n_ssim:.4f} gaussian_n_ssim={g_ssim:.4f} seconds={seconds:.0f}")


if __name__ == "__main__":
  app.run(main)
