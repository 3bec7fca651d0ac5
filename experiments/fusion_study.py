"""Fusion study: train the default config, then score it and a tuned Gaussian filter on
simulated volumes from an unseen seed.

  flock /tmp/smlm_cpu.lock env PYTHONPATH=. python experiments/fusion_study.py \
      --workdir=/tmp/fusion_study [--config=configs/fusion.py] \
      [--test_config=configs/fusion.py:narrow] [--num_volumes=16] \
      [--test_shape=24,80,80] [--tile=24,48,48] [--plot=fusion_study.png] \
      [--num_val=16] [--val_seed=4242] [--skip_training] [--second_sim_dir=DIR]
      [--second_sim_val_dir=DIR] [--third_sim_dir=DIR] [--third_sim_val_dir=DIR]

1. Trains ``configs/fusion.py`` (default variant) in --workdir, timed (``seconds``: wall
   time of train_and_evaluate, compilation and periodic evaluation included); an
   existing finished run there is reused (its recorded time is reported).
2. Simulates ``--num_volumes`` test volumes of ``--test_shape`` voxels (larger than the
   training patches, so prediction goes through the blended tiles) with our simulator
   and the priors of ``--test_config`` (default ``configs/fusion.py:narrow``: the
   literature priors, not the wider randomized ones the default trains on), seed
   ``--test_seed``, never used in training or validation.
3. Scores the U-Net prediction (with the run's ``predict.tta`` self-ensemble; the
   column ``1-pass`` is the same network without it) and two classical baselines
   (:mod:`smlm_jax.fusion.baselines`) with the challenge metric
   (:mod:`smlm_jax.fusion.metrics`): a Gaussian filter of the view and Richardson-Lucy
   deconvolution with the simulator's PSF (middle of its ranges, at the nominal depth)
   plus depth-attenuation correction. Both are tuned on ``--num_val`` VALIDATION
   volumes of ``--val_seed`` (default the config's eval_seed; never the test seed).
4. ``--second_sim_dir=DIR``: volumes of an independent simulator, NAME_view.tif (uint16
   ADU), NAME_fused.tif (target), NAME.json (voxel_size_um, camera_offset_adu,
   camera_gain_adu_per_e): the model, RL and the Gaussian (parameters tuned in 3, PSF
   from our simulator's mid-range model: only what a user knows) scored there too.
   ``--third_sim_dir=DIR``: the same for a third simulator (``*_third_sim`` keys).
   ``--second_sim_val_dir`` / ``--third_sim_val_dir``: OTHER volumes of that simulator
   (another seed); the baselines are also re-tuned there (``*_tuned`` keys: what a
   classical method reaches when tuned on data of that microscope, which the model
   never gets).
With ``--skip_training`` and no trained run in --workdir only the baselines are scored.
Prints a table per channel and one line
  RESULT n_ssim=... gaussian_n_ssim=... rl_n_ssim=... seconds=...
  [n_ssim_second_sim=... rl_n_ssim_second_sim=... gaussian_n_ssim_second_sim=...
   rl_n_ssim_second_sim_tuned=... gaussian_n_ssim_second_sim_tuned=...] [..._third_sim...]
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
_CONFIG = flags.DEFINE_string("config", "configs/fusion.py", "Config file[:variant] to train.")
_TEST_CONFIG = flags.DEFINE_string(
    "test_config", "configs/fusion.py:narrow", "Config whose simulator priors draw the "
    "own-simulator test and validation volumes (default: the literature priors, not the "
    "randomized training priors; give the training config to test on those).")
_NUM = flags.DEFINE_integer("num_volumes", 16, "Test volumes.")
_SEED = flags.DEFINE_integer("test_seed", 777, "Seed of the test volumes (unseen).")
_SHAPE = flags.DEFINE_string("test_shape", "24,80,80", "Test volume shape z,y,x.")
_TILE = flags.DEFINE_string("tile", "24,48,48", "Prediction tile z,y,x.")
_OVERLAP = flags.DEFINE_string("overlap", "8,16,16", "Tile overlap z,y,x.")
_HALO = flags.DEFINE_string("halo", "2,4,4", "Discarded tile border z,y,x.")
_PLOT = flags.DEFINE_string("plot", "fusion_study.png", "Orthogonal-slices PNG.")
_OVERRIDES = flags.DEFINE_multi_string("set", [], "Config overrides key=python_value.")
_NUM_VAL = flags.DEFINE_integer("num_val", 16, "Validation volumes to tune baselines on.")
_VAL_SEED = flags.DEFINE_integer("val_seed", None, "Validation seed (default eval_seed).")
_SKIP = flags.DEFINE_bool("skip_training", False, "Never train: score the run in "
                          "--workdir if there is one, else the baselines only.")
_SECOND = flags.DEFINE_string("second_sim_dir", None, "Folder of independently simulated "
                              "volumes (NAME_view.tif, NAME_fused.tif, NAME.json).")
_SECOND_VAL = flags.DEFINE_string("second_sim_val_dir", None, "Other volumes of the second "
                                  "simulator: the baselines are re-tuned there too.")
_THIRD = flags.DEFINE_string("third_sim_dir", None, "Folder of a third independent "
                             "simulator's volumes (same layout).")
_THIRD_VAL = flags.DEFINE_string("third_sim_val_dir", None, "Other volumes of the third "
                                 "simulator: the baselines are re-tuned there too.")


def load_config(spec_value=None, overrides=True):
  import importlib.util
  path, _, variant = (spec_value or _CONFIG.value).partition(":")
  spec = importlib.util.spec_from_file_location("fusion_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config(variant or None)
  for kv in (_OVERRIDES.value if overrides else []):
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


def read_second_sim(folder):
  """[(name, view ADU, fused, metadata)] of a second simulator's folder."""
  from smlm_jax.fusion import volume_io
  out = []
  for name in sorted(os.listdir(folder)):
    if name.endswith(".json") and os.path.exists(os.path.join(folder, name[:-5] + "_view.tif")):
      stem = os.path.join(folder, name[:-5])
      out.append((name[:-5], volume_io.read_volume(stem + "_view.tif")[0],
                  volume_io.read_volume(stem + "_fused.tif")[0],
                  json.load(open(stem + ".json"))))
  if not out:
    raise app.UsageError(f"--second_sim_dir={folder}: no NAME.json with NAME_view.tif")
  return out


def score_independent(tag, folder, val_folder, sigma, rl_params, psf, depth, sc, predictor,
                      tri) -> str:
  """Scores the model and the baselines (parameters tuned on our validation volumes) on
  an independent simulator's folder; with ``val_folder`` (other volumes of the same
  simulator) the baselines are also re-tuned there: the best a classical method gets
  with data from that microscope. Returns the RESULT fields ``*_TAG[_tuned]``."""
  from smlm_jax.fusion import baselines, metrics
  cam = sc.camera
  meta_of = lambda meta: (tuple(float(x) for x in meta.get("voxel_size_um", sc.voxel_size_um)),
                          float(meta.get("camera_offset_adu", cam.offset_adu)),
                          float(meta.get("camera_gain_adu_per_e", cam.gain_adu_per_e)))

  def rl_fn(v, meta, params):
    vox, off, gain = meta_of(meta)
    return baselines.restore(v, vox, psf, depth, off, gain, params)

  items = read_second_sim(folder)
  tuned = None
  if val_folder:
    val = read_second_sim(val_folder)
    t0 = time.perf_counter()
    g_sigma, _ = baselines.tune_gaussian([v for _, v, _, _ in val], [f for _, _, f, _ in val])
    vox, off, gain = zip(*[meta_of(m) for *_, m in val])    # per volume
    rl_tuned, _, _ = baselines.tune_restore(
        [v for _, v, _, _ in val], [f for _, _, f, _ in val], list(vox), psf,
        [depth] * len(val), list(off), list(gain))
    tuned = (g_sigma, rl_tuned)
    print(f"\n{tag}: baselines re-tuned on {len(val)} volumes of {val_folder} in "
          f"{time.perf_counter() - t0:.0f} s: Gaussian {g_sigma}, RL {rl_tuned}")
  s_g, s_rl, s_m, t_g, t_rl = [], [], [], [], []
  print(f"\n{tag}: {len(items)} volumes in {folder}")
  print(f"{'volume':<24} {'input SSIM':>10} {'gauss NSSIM':>11} {'RL NSSIM':>10} "
        f"{'unet NSSIM':>10}" + (f" {'gauss tuned':>11} {'RL tuned':>10}" if tuned else ""))
  for name, v, f, meta in items:
    s_g.append(metrics.compare(baselines.gaussian(v, *sigma), f, v))
    s_rl.append(metrics.compare(rl_fn(v, meta, rl_params), f, v))
    line = ""
    if tuned:
      t_g.append(metrics.compare(baselines.gaussian(v, *tuned[0]), f, v))
      t_rl.append(metrics.compare(rl_fn(v, meta, tuned[1]), f, v))
      line = f" {t_g[-1]['n_ssim']:>11.3f} {t_rl[-1]['n_ssim']:>10.3f}"
    if predictor is not None:
      p, _ = predictor.predict(v, voxel_size_um=meta_of(meta)[0], tile=tri(_TILE.value),
                               overlap=tri(_OVERLAP.value), halo=tri(_HALO.value),
                               resample=True)     # as smlm_jax.fusion.predict does
      s_m.append(metrics.compare(p, f, v))
    um = s_m[-1]["n_ssim"] if s_m else float("nan")
    print(f"{name:<24} {s_g[-1]['input_ssim']:>10.3f} {s_g[-1]['n_ssim']:>11.3f} "
          f"{s_rl[-1]['n_ssim']:>10.3f} {um:>10.3f}" + line)
  mean = lambda ms: float(np.mean([m["n_ssim"] for m in ms]))
  out = f" n_ssim_{tag}={mean(s_m):.4f}" if s_m else ""
  out += f" rl_n_ssim_{tag}={mean(s_rl):.4f} gaussian_n_ssim_{tag}={mean(s_g):.4f}"
  if tuned:
    out += f" rl_n_ssim_{tag}_tuned={mean(t_rl):.4f} gaussian_n_ssim_{tag}_tuned={mean(t_g):.4f}"
  return out


def main(argv):
  del argv
  for name, path in (("second_sim_dir", _SECOND.value), ("second_sim_val_dir", _SECOND_VAL.value),
                     ("third_sim_dir", _THIRD.value), ("third_sim_val_dir", _THIRD_VAL.value)):
    if path and not os.path.isdir(path):
      raise app.UsageError(f"--{name}={path}: no such folder")
  for tag, folder, val_folder in (("second_sim", _SECOND.value, _SECOND_VAL.value),
                                  ("third_sim", _THIRD.value, _THIRD_VAL.value)):
    if folder and val_folder and os.path.samefile(val_folder, folder):
      raise app.UsageError(f"--{tag}_val_dir must hold other volumes than --{tag}_dir")
  from smlm_jax.core import plotting
  from smlm_jax.fusion import baselines, metrics
  cfg = load_config()
  test_cfg = load_config(_TEST_CONFIG.value, overrides=False)
  shape = tuple(int(s) for s in _SHAPE.value.split(","))
  have_run = os.path.isdir(os.path.join(_WORKDIR.value, "checkpoints"))
  seconds = float("nan")
  if not _SKIP.value or have_run:
    seconds = train(cfg, _WORKDIR.value)
    have_run = True
    print(f"training: {seconds:.0f} s ({cfg.num_train_steps} steps of {cfg.batch_size} "
          f"volumes {tuple(cfg.sim.shape)})")
  val_seed = int(test_cfg.eval_seed) if _VAL_SEED.value is None else _VAL_SEED.value
  if val_seed == _SEED.value:
    raise app.UsageError("--val_seed must differ from --test_seed")
  views, fused, membrane, sc = simulate_test_set(test_cfg, shape, _NUM.value, _SEED.value)
  vviews, vfused, _, _ = simulate_test_set(test_cfg, shape, _NUM_VAL.value, val_seed)
  cam = sc.camera
  psf, depth = baselines.nominal_psf(sc)
  t0 = time.perf_counter()
  sigma, g_val = baselines.tune_gaussian(vviews, vfused)
  rl_params, rl_val, _ = baselines.tune_restore(
      vviews, vfused, sc.voxel_size_um, psf, [depth] * len(vviews), cam.offset_adu,
      cam.gain_adu_per_e)
  print(f"baselines tuned on {len(vviews)} validation volumes (seed {val_seed}) in "
        f"{time.perf_counter() - t0:.0f} s: Gaussian sigma (z, xy) = {sigma} voxels "
        f"(N_SSIM {g_val:.3f}); RL {rl_params} with {psf}, depth {depth:.1f} um "
        f"(N_SSIM {rl_val:.3f})")
  rl_fn = lambda v, vox, off, gain: baselines.restore(v, vox, psf, depth, off, gain,
                                                      rl_params)
  gauss = [metrics.compare(baselines.gaussian(v, *sigma), f, v) for v, f in zip(views, fused)]
  rl_preds = [rl_fn(v, sc.voxel_size_um, cam.offset_adu, cam.gain_adu_per_e) for v in views]
  rl = [metrics.compare(p, f, v) for p, f, v in zip(rl_preds, fused, views)]
  tri = lambda t: tuple(int(v) for v in t.split(","))
  unet = plain = preds = None
  pred_s, n_tiles, tta = 0.0, 0, False
  if have_run:
    from smlm_jax.fusion.predict import Predictor
    predictor = Predictor(_WORKDIR.value)
    tta = bool(predictor.config.predict.get("tta", False))

    def predict_all(pr, vols):
      t0 = time.perf_counter()
      out, n = [], 0
      for v in vols:
        p, n = pr.predict(v, tile=tri(_TILE.value), overlap=tri(_OVERLAP.value),
                          halo=tri(_HALO.value))
        out.append(p)
      return out, n, (time.perf_counter() - t0) / len(vols)

    preds, n_tiles, pred_s = predict_all(predictor, views)
    unet = [metrics.compare(p, f, v) for p, f, v in zip(preds, fused, views)]
    plain = unet
    if tta:
      plain_preds, _, _ = predict_all(Predictor(_WORKDIR.value, tta=False), views)
      plain = [metrics.compare(p, f, v) for p, f, v in zip(plain_preds, fused, views)]

  nan = {"ssim": float("nan"), "n_ssim": float("nan"), "psnr": float("nan")}
  unet_rows = unet or [dict(nan, input_ssim=g["input_ssim"], input_psnr=g["input_psnr"])
                       for g in gauss]
  plain = plain or unet_rows

  def row(name, sel):
    g = lambda ms, k: np.mean([m[k] for m, s in zip(ms, sel) if s])
    return (f"{name:<10} {int(sel.sum()):>3} {g(unet_rows, 'input_ssim'):>10.3f} "
            f"{g(gauss, 'n_ssim'):>10.3f} {g(rl, 'n_ssim'):>10.3f} "
            f"{g(unet_rows, 'ssim'):>10.3f} {g(unet_rows, 'n_ssim'):>10.3f} "
            f"{g(plain, 'n_ssim'):>10.3f} {g(unet_rows, 'input_psnr'):>9.2f} "
            f"{g(rl, 'psnr'):>9.2f} {g(unet_rows, 'psnr'):>9.2f}")

  print(f"\ntest (own simulator): {len(views)} simulated volumes {shape} (z, y, x) of "
        f"{sc.voxel_size_um} um voxels, seed {_SEED.value}; baselines tuned on validation "
        f"seed {val_seed}; U-Net {pred_s:.1f} s/volume ({n_tiles} blended tiles of "
        f"{_TILE.value}, self-ensemble of 8 flips/transposes: {'on' if tta else 'off'}; "
        f"1-pass NSSIM: without it)")
  print(f"{'channel':<10} {'n':>3} {'input SSIM':>10} {'gauss NSSIM':>10} {'RL NSSIM':>10} "
        f"{'unet SSIM':>10} {'unet NSSIM':>10} {'1-pass':>10} {'in PSNR':>9} {'RL PSNR':>9} "
        f"{'unet PSNR':>9}")
  print(row("nuclei", ~membrane))
  print(row("membranes", membrane))
  print(row("all", np.ones_like(membrane)))

  mean = lambda ms: float(np.mean([m["n_ssim"] for m in ms]))
  result = (f"gaussian_n_ssim={mean(gauss):.4f} rl_n_ssim={mean(rl):.4f} "
            f"seconds={seconds:.0f}")
  if unet:
    result = f"n_ssim={mean(unet):.4f} " + result
  for tag, folder, val_folder in (("second_sim", _SECOND.value, _SECOND_VAL.value),
                                  ("third_sim", _THIRD.value, _THIRD_VAL.value)):
    if folder:
      result += score_independent(tag, folder, val_folder, sigma, rl_params, psf, depth, sc,
                                  predictor if have_run else None, tri)

  if _PLOT.value:
    idx = [i for i in (int(np.argmin(membrane)), int(np.argmax(membrane)))]
    vols, titles = [], []
    for i in dict.fromkeys(idx):
      kind = "membranes" if membrane[i] else "nuclei"
      vols += [views[i], baselines.gaussian(views[i], *sigma), rl_preds[i]]
      titles += [f"{kind} view", f"Gaussian {sigma}", f"RL N_SSIM {rl[i]['n_ssim']:.2f}"]
      if preds is not None:
        vols.append(preds[i])
        titles.append(f"U-Net N_SSIM {unet[i]['n_ssim']:.2f}")
      vols.append(fused[i])
      titles.append("fused (target)")
    fig = plotting.orthogonal_slices(vols, titles,
                                     z_aspect=sc.voxel_size_um[0] / sc.voxel_size_um[1])
    plotting.save(fig, _PLOT.value)
    print(f"wrote {_PLOT.value}")
  print(f"RESULT {result}")


if __name__ == "__main__":
  from smlm_jax.core import cli
  app.run(main, flags_parser=cli.parse_flags)
