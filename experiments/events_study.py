"""Event detection: simulated events (held-out seed) and the six real iSIM crops.

  flock /tmp/smlm_cpu.lock python experiments/events_study.py \
      [--workdir=runs/events_study] [--finetune_steps=200] [--num_test=512] \
      [--variant=tiny (a quick check of the script)]

1. Trains the default config (configs/events.py: simulated dividing tubules) in
   WORKDIR/sim (reused if finished there), timing it (``seconds``: the <= 10 min target
   on 2 CPU cores). Evaluates it on ``--num_test`` crops simulated from
   ``--test_seed`` (neither a training key nor the validation seed that chose the
   threshold): event-level precision / recall / F1 / F-beta at two operating points,
   both chosen on the validation set (``eval.sim_seed``), never on the test crops:
   the F1-optimal threshold (``sim_f1``: the issue's F1 target) and the run's
   F-beta-optimal threshold (``sim_f1_at_fbeta_threshold``; beta = 0.1 trades recall
   for precision, so its F1 is lower: the one ``predict`` uses).
2. Real crops, leave-one-out (``../shared/real-data/events_isim``, 6 divisions in COS-7
   mitochondria on an iSIM): for each crop, fine-tunes the simulation model on the 5
   others (``--finetune_steps`` steps, source 'db', augmentation on device), picks the
   F-beta-optimal threshold on those 5 (the only labelled data it may see) and
   predicts every frame of the held-out crop. Event level per frame (a frame with
   annotation: TP if the probability reaches the threshold within ``eval.radius_px`` =
   8 px of the site; any frame: FP if it does so farther away), pooled over the 6
   folds: ``real_fbeta`` (beta 0.1); ``real_median_distance_px``: median over the
   annotated frames of the distance from the most probable pixel to the site. The same
   for the simulation model without fine-tuning (zero-shot), and the pooled sweep with
   the best single threshold chosen on the test folds themselves (an optimistic bound,
   labelled as such).
Writes WORKDIR/study.json and WORKDIR/loo_examples.png (held-out frames with overlays).

Last line: RESULT sim_f1=<float> real_fbeta=<float> real_median_distance_px=<float>
seconds=<float> sim_f1_at_fbeta_threshold=<float>
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import events  # noqa: E402
from smlm_jax.core import cli, trainer  # noqa: E402
from smlm_jax.events import crops as crops_lib  # noqa: E402
from smlm_jax.events import data as data_lib  # noqa: E402
from smlm_jax.events import db as db_lib  # noqa: E402
from smlm_jax.events import metrics  # noqa: E402
from smlm_jax.events import task as task_lib  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "real-data", "events_isim")


def load_model(workdir, mesh):
  """(config, state, predict function) of a finished run."""
  config, params, stats = trainer.load_variables(workdir)
  fn = task_lib.make_predict_fn(task_lib.build_model(config.model), mesh)
  return config, {"params": params, "batch_stats": stats}, fn


def predict_windows(fn, state, windows, mesh, batch_size=8):
  return trainer.batched(lambda c: fn(state["params"], state["batch_stats"], c),
                         np.asarray(windows, np.float32), batch_size, mesh, pad="edge")


def crop_frames(crop, n):
  """(windows of every frame, truth, sites per frame)."""
  sites = [crops_lib.find_peaks(crop.truth[t]) for t in range(crop.frames.shape[0])]
  return data_lib.windows(crop.frames, n), crop.truth, sites


def sim_part(workdir, variant, num_test, test_seed, mesh, log):
  config = events.get_config(variant)
  t0 = time.time()
  trainer.train_and_evaluate(config, workdir)
  seconds = time.time() - t0
  with open(os.path.join(workdir, task_lib.THRESHOLD_FILE)) as f:
    chosen = json.load(f)
  _, state, fn = load_model(workdir, mesh)
  task = task_lib.EventsTask(config)
  frames, _, sites = task.simulate_set(num_test, test_seed, mesh)
  probs = predict_windows(fn, state, frames, mesh, 64)
  summaries = [metrics.crop_summary(p, s, config.eval.radius_px) for p, s in zip(probs, sites)]
  sweep = metrics.event_sweep(summaries, config.eval.beta)
  at_run = metrics.summarize(sweep, chosen["threshold"])
  val_f1_thr = chosen["metrics"]["sim"]["event"]["best_f1_threshold"]
  at_f1 = metrics.summarize(sweep, val_f1_thr)
  dist = [metrics.localization_error(p, s) for p, s in zip(probs, sites) if s]
  log(f"\nsimulated test set: {num_test} crops of {config.crop_px} px, seed {test_seed}, "
      f"{sum(1 for s in sites if s)} with an event")
  log(f"{'operating point':<40}{'thr':>6}{'P':>7}{'R':>7}{'F1':>7}{'F0.1':>7}")
  for name, m in ((f"run threshold (max F{config.eval.beta:g} on val)", at_run),
                  ("F1-optimal threshold on val", at_f1)):
    log(f"{name:<40}{m['threshold']:>6.2f}{m['precision']:>7.3f}{m['recall']:>7.3f}"
        f"{m['f1']:>7.3f}{m['fbeta']:>7.3f}")
  log(f"median distance most probable pixel -> site: {np.median(dist):.2f} px")
  return {"seconds": seconds, "run_threshold": at_run, "val_f1_threshold": at_f1,
          "median_distance_px": float(np.median(dist))}, state, fn


def fold_counts(prob_list, sites_list, threshold, radius):
  tp = fp = fn = 0
  for p, s in zip(prob_list, sites_list):
    near, away = metrics.crop_summary(p, s, radius)
    tp += int(np.sum(near >= threshold))
    fn += int(np.sum(near < threshold))
    fp += int(away >= threshold)
  return tp, fp, fn


def rates(tp, fp, fn, beta):
  p = tp / (tp + fp) if tp + fp else 1.0
  r = tp / (tp + fn) if tp + fn else 0.0
  return p, r, float(metrics.fbeta(p, r, 1.0)), float(metrics.fbeta(p, r, beta))


def real_part(workdir, variant, sim_dir, sim_state, sim_fn, steps, lr, mesh, log):
  db_path = os.path.join(workdir, "events.db")
  with db_lib.EventDB(db_path) as database:
    database.add([db_lib.read_folder(f) for f in db_lib.find_folders([SHARED])[0]])
    records = database.query(["microscope=isim"])
  crops = [data_lib.load_crop(r) for r in records]
  base = events.get_config(variant)
  n, radius, beta = base.data.num_frames, base.eval.radius_px, base.eval.beta
  with open(os.path.join(sim_dir, task_lib.THRESHOLD_FILE)) as f:
    sim_threshold = json.load(f)["threshold"]
  per_crop = {c.event_id: crop_frames(c, n) for c in crops}
  rows, pooled, pooled_zero, held_probs, examples = [], [0, 0, 0], [0, 0, 0], [], []
  dists, dists_zero = [], []
  for crop in crops:
    eid = crop.event_id
    fold = os.path.join(workdir, f"fold_{eid}")
    cfg = events.get_config(variant)
    cfg.init_from = sim_dir
    cfg.data.update(source="db", db=db_path, query=f"microscope=isim; event_id!={eid}",
                    val_fraction=0.0)
    cfg.eval.num_sim = 0
    cfg.update(num_train_steps=steps, learning_rate=lr, warmup_steps=min(20, steps),
               eval_every_steps=steps, checkpoint_every_steps=steps, log_every_steps=25)
    t0 = time.time()
    trainer.train_and_evaluate(cfg, fold)
    _, state, fn = load_model(fold, mesh)
    # Threshold: max F-beta on the fold's own training crops.
    train_probs, train_sites = [], []
    for other in crops:
      if other.event_id != eid:
        w, _, s = per_crop[other.event_id]
        train_probs += list(predict_windows(fn, state, w, mesh))
        train_sites += s
    sweep = metrics.event_sweep([metrics.crop_summary(p, s, radius)
                                 for p, s in zip(train_probs, train_sites)], beta)
    thr = metrics.summarize(sweep)["threshold"]
    w, truth, sites = per_crop[eid]
    probs = list(predict_windows(fn, state, w, mesh))
    zero = list(predict_windows(sim_fn, sim_state, w, mesh))
    counts = fold_counts(probs, sites, thr, radius)
    counts_zero = fold_counts(zero, sites, sim_threshold, radius)
    pooled = [a + b for a, b in zip(pooled, counts)]
    pooled_zero = [a + b for a, b in zip(pooled_zero, counts_zero)]
    d = [metrics.localization_error(p, s) for p, s in zip(probs, sites) if s]
    dz = [metrics.localization_error(p, s) for p, s in zip(zero, sites) if s]
    dists += d
    dists_zero += dz
    held_probs.append((probs, sites))
    t_show = next((t for t, s in enumerate(sites) if s), 0)
    examples.append((w[t_show][-1], probs[t_show], sites[t_show], thr,
                     f"{eid[-6:]} t{t_show} (thr {thr:.2f})"))
    rows.append({"event_id": eid, "frames": len(sites), "annotated": sum(1 for s in sites if s),
                 "threshold": thr, "tp": counts[0], "fp": counts[1], "fn": counts[2],
                 "median_distance_px": float(np.median(d)) if d else float("nan"),
                 "zero_shot_tp": counts_zero[0], "zero_shot_fp": counts_zero[1],
                 "zero_shot_median_distance_px": float(np.median(dz)) if dz else float("nan"),
                 "seconds": time.time() - t0})
    r = rows[-1]
    log(f"fold {eid}: {r['annotated']}/{r['frames']} annotated frames, threshold "
        f"{thr:.2f}: TP {counts[0]} FP {counts[1]} FN {counts[2]}, median distance "
        f"{r['median_distance_px']:.1f} px ({r['seconds']:.0f} s)")
  p, r, f1, fb = rates(*pooled, beta)
  pz, rz, f1z, fbz = rates(*pooled_zero, beta)
  oracle = metrics.event_sweep([metrics.crop_summary(pp, s, radius) for probs, sites in
                                held_probs for pp, s in zip(probs, sites)], beta)
  best = metrics.summarize(oracle)
  log(f"\nreal crops, leave-one-out ({len(crops)} folds, {sum(x['frames'] for x in rows)} "
      f"frames, {sum(x['annotated'] for x in rows)} annotated)")
  log(f"{'model':<44}{'TP':>4}{'FP':>4}{'FN':>4}{'P':>7}{'R':>7}{'F1':>7}{'F0.1':>7}"
      f"{'med. dist px':>14}")
  for name, c, m, d in (("fine-tuned, threshold from its 5 crops", pooled, (p, r, f1, fb), dists),
                        ("simulation only (zero-shot), run threshold", pooled_zero,
                         (pz, rz, f1z, fbz), dists_zero)):
    log(f"{name:<44}{c[0]:>4}{c[1]:>4}{c[2]:>4}{m[0]:>7.3f}{m[1]:>7.3f}{m[2]:>7.3f}"
        f"{m[3]:>7.3f}{np.median(d):>14.1f}")
  log(f"{'fine-tuned, best pooled threshold (optimistic)':<44}{best['tp']:>4.0f}"
      f"{best['fp']:>4.0f}{best['fn']:>4.0f}{best['precision']:>7.3f}{best['recall']:>7.3f}"
      f"{best['f1']:>7.3f}{best['fbeta']:>7.3f}   (thr {best['threshold']:.2f})")
  metrics.plot_examples([e[0] for e in examples], [e[1] for e in examples],
                        [e[2] for e in examples], float(np.median([e[3] for e in examples])),
                        radius, os.path.join(workdir, "loo_examples.png"),
                        [e[4] for e in examples])
  return {"folds": rows, "precision": p, "recall": r, "f1": f1, "fbeta": fb,
          "median_distance_px": float(np.median(dists)),
          "zero_shot": {"precision": pz, "recall": rz, "f1": f1z, "fbeta": fbz,
                        "median_distance_px": float(np.median(dists_zero))},
          "best_pooled_threshold": best}


def main(argv):
  del argv
  f = flags.FLAGS
  cli.quiet_logs()
  if not os.path.isdir(SHARED):
    cli.fail(f"{SHARED} not found (the shared iSIM crops)")
  os.makedirs(f.workdir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(f.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
  t0 = time.time()
  mesh = trainer.make_mesh()
  sim_dir = os.path.join(f.workdir, "sim")
  sim, sim_state, sim_fn = sim_part(sim_dir, f.variant, f.num_test, f.test_seed, mesh, print)
  real = real_part(f.workdir, f.variant, sim_dir, sim_state, sim_fn, f.finetune_steps, f.finetune_lr,
                   mesh, print)
  result = {"sim": sim, "real": real, "total_seconds": time.time() - t0}
  cli.atomic_write_text(os.path.join(f.workdir, "study.json"),
                        json.dumps(result, indent=1, default=float))
  print(f"\ndefault config trained in {sim['seconds']:.0f} s on {len(jax.devices())} "
        f"{jax.devices()[0].platform} device(s); whole study {result['total_seconds']:.0f} s")
  print(f"RESULT sim_f1={sim['val_f1_threshold']['f1']:.4f} real_fbeta={real['fbeta']:.4f} "
        f"real_median_distance_px={real['median_distance_px']:.2f} "
        f"seconds={sim['seconds']:.1f} "
        f"sim_f1_at_fbeta_threshold={sim['run_threshold']['f1']:.4f}")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", "runs/events_study", "Folder of the study's runs.")
  flags.DEFINE_string("variant", None, "configs/events.py variant (default: the CPU one; "
                      "'tiny' for a quick check of this script).")
  flags.DEFINE_integer("num_test", 512, "Simulated test crops.")
  flags.DEFINE_integer("test_seed", 777, "Seed of the simulated test crops.")
  flags.DEFINE_integer("finetune_steps", 200, "Fine-tuning steps per real fold.")
  flags.DEFINE_float("finetune_lr", 5e-4, "Fine-tuning peak learning rate.")
  app.run(main)
