"""Event detection: simulated events (held-out seed) and the usable real iSIM crops.

  flock /tmp/smlm_cpu.lock python experiments/events_study.py \
      [--calibration=events_calibration.json] [--workdir=runs/events_study] \
      [--finetune_steps=200 (0: zero-shot only)] [--num_test=512] [--real=DIR] \
      [--include_unusable] [--threshold_rule=frame_max|threshold] \
      [--finetune_threshold_on=inner_crop|train_crops|inner_or_train] [--tta=choose|on|off]
      [--temporal=choose|on|off] [--finetune_seeds=1] [--edge_px=-1] [--pad_px=0]
      [--sim_steps=0] [--seed=-1]
      [--variant=tiny (a quick check)]

1. Trains the default config (configs/events.py; with ``--calibration`` the simulator
   calibrated to real movies, ``config.data.calibration``) in WORKDIR/sim (reused if
   finished there), timing it (``seconds``: the <= 10 min target on 2 CPU cores).
   Evaluates it on ``--num_test`` crops simulated (by the same simulator) from
   ``--test_seed`` (neither a training key nor the validation seed that chose the
   threshold): event-level precision / recall / F1 / F-beta at two operating points,
   both chosen on the validation set (``eval.sim_seed``), never on the test crops:
   the F1-optimal threshold (``sim_f1``) and the run's F-beta-optimal threshold
   (``sim_f1_at_fbeta_threshold``, the one ``predict`` uses).
2. Real crops (``--real``, default ``../shared/real-data/events_isim``: divisions in
   COS-7 mitochondria on an iSIM) through the event database; crops ``db add`` flags
   without structure are left out (``--include_unusable`` keeps them). Leave one crop
   out. Detection rule (``--threshold_rule``): ``frame_max`` (default) takes one
   candidate per frame, its most probable pixel, a detection when it reaches the
   threshold (a floor): a rule on the ranking inside the frame, which transfers
   between domains where the probability scale does not (real crops hold one event
   each); ``threshold`` takes every local maximum above the threshold. Per held-out
   crop, the threshold of max F0.1 on validation crops, never the held-out one:
   * zero-shot: the simulation model; validation = the OTHER crops (for a model that
     never saw real crops they are validation data);
   * fine-tuned: the simulation model fine-tuned ``--finetune_steps`` steps, source
     'mixed': the (calibrated) simulation and real windows (half around the annotated
     site, 40% hard negatives far from every annotated site, the rest anywhere),
     on-device augmentation. ``--finetune_threshold_on=inner_crop`` (default): the
     fold also holds out its validation crop (the next crop in the list) from the
     fine-tune and chooses the threshold on it, a crop the model never saw, as the
     held-out crop will be (a nested leave-one-out would need 4 more fine-tunes per
     fold; this costs none, but each fold trains on n - 2 crops); ``train_crops``
     chooses it on the fold's own training crops (the earlier choice: biased high,
     0.87-0.94, because the model has fit them); ``inner_or_train``: the inner crop's
     floor where it has evidence, else (its site never on top in any frame, F0.1 0 at
     every floor, where ``inner_crop`` takes the lowest floor) the training crops'.
   ``--tta=choose`` (default): per fold the maps are either the network's ('raw') or
   their mean over the 8 rotations / reflections ('tta', dihedral test-time
   averaging), chosen together with the threshold on the same validation crops
   (max F0.1; ties keep raw); ``on`` / ``off`` fix the view. ``--temporal=choose``
   (default) adds the same two maps averaged over each frame and its two neighbours
   ('raw_t1', 'tta_t1': a division persists over frames, a spurious maximum need
   not), chosen the same way (ties: not averaged).
   ``--finetune_seeds=K`` trains K fine-tunes per fold (seeds config.seed + k) and
   averages their probability maps (an ensemble; K = 1: one fine-tune, as before).
   ``--edge_px`` (default -1: ``sim.margin_px``, 6 px; 0: off): every map is 0 within
   that distance of the frame border before any rule (the simulator never places a
   division there; metrics.clear_edge), as ``predict --edge_px`` does.
   ``--pad_px=P`` (default 0: off): every real window is mirror-padded by P px before
   the network and its map cropped back (data.mirror_pad; the U-Net paper's border
   extrapolation), for the zero-shot and fine-tuned maps alike.
   ``--seed=S`` (default -1: the config's) trains the simulation model with seed S and
   the fine-tunes with S + k: another draw of the whole study.
   Every rule and threshold source is also scored on the same predictions and
   printed as diagnostics (study.json ``all_rules``); the reported one is fixed by
   the flags before scoring.
   Per crop: found (a detection within ``eval.radius_px`` = 8 px of the site in an
   annotated frame), false detections (farther than 8 px from the frame's site) per
   frame, frame level TP / FP / FN; pooled over crops: F0.1 and the median distance
   from the most probable pixel to the site.
Writes WORKDIR/study.json and WORKDIR/loo_examples.png (held-out frames with overlays).

Last line: RESULT sim_f1=... sim_f1_at_fbeta_threshold=... seconds=...
zero_shot_found=k/n zero_shot_false_per_frame=... zero_shot_fbeta=... real_found=k/n
real_false_per_frame=... real_fbeta=... real_median_distance_px=...
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
from smlm_jax.events import quality  # noqa: E402
from smlm_jax.events import task as task_lib  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "real-data", "events_isim")


def load_model(workdir, mesh):
  """(config, state, predict function) of a finished run."""
  config, params, stats = trainer.load_variables(workdir)
  fn = task_lib.make_predict_fn(task_lib.build_model(config.model), mesh)
  return config, {"params": params, "batch_stats": stats}, fn


VIEWS = ("raw", "tta", "raw_t1", "tta_t1")
TEMPORAL_HALF_WIDTH = 1          # the '_t1' views: each map averaged with its neighbours


def views_for(tta: str, temporal: str):
  """The candidate views of --tta / --temporal ('choose' keeps both), in tie order."""
  return tuple(v for v in VIEWS
               if (tta == "choose" or (v.startswith("tta") == (tta == "on")))
               and (temporal == "choose" or (v.endswith("_t1") == (temporal == "on"))))


def predict_views(model_config, state, fn, views, crops_windows, mesh, edge_px=0.0,
                  pad_px=0):
  """{view: {event id: [probability maps]}}: 'raw' with ``fn``, 'tta' with the
  dihedral-averaged predictor of the same model (``model_config``) and parameters;
  'raw_t1' / 'tta_t1' those maps averaged over each frame and its neighbours in the
  crop (metrics.temporal_mean). ``edge_px`` > 0: the band that close to the frame's
  border is cleared first (metrics.clear_edge); ``pad_px`` > 0: every window is
  mirror-padded by that much before the network and its map cropped back
  (data.mirror_pad)."""
  out = {}
  for v in ("raw", "tta"):
    if not any(x.split("_")[0] == v for x in views):
      continue
    f = fn if v == "raw" else task_lib.make_predict_fn(task_lib.build_model(model_config),
                                                      mesh, tta=True)
    out[v] = {e: [metrics.clear_edge(m, edge_px)
                  for m in predict_windows(f, state, w, mesh, pad_px=pad_px)]
              for e, w in crops_windows.items()}
    out[v + "_t1"] = {e: list(metrics.temporal_mean(m, TEMPORAL_HALF_WIDTH))
                      for e, m in out[v].items()}
  return {v: out[v] for v in views}


def predict_windows(fn, state, windows, mesh, batch_size=8, pad_px=0):
  padded, p = data_lib.mirror_pad(np.asarray(windows, np.float32), pad_px)
  return data_lib.unpad(trainer.batched(lambda c: fn(state["params"], state["batch_stats"], c),
                                        padded, batch_size, mesh, pad="edge"), p)


def crop_frames(crop, n):
  """(windows of every frame, truth, sites per frame)."""
  sites = [crops_lib.find_peaks(crop.truth[t]) for t in range(crop.frames.shape[0])]
  return data_lib.windows(crop.frames, n), crop.truth, sites


def sim_part(workdir, variant, num_test, test_seed, mesh, log, calibration="", steps=0,
             seed=-1):
  config = events.get_config(variant)
  config.data.calibration = calibration
  if seed >= 0:                          # --seed: another training seed
    config.seed = seed
  if steps > 0:                          # --sim_steps: another training length
    config.num_train_steps = steps
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


RULES = ("frame_max", "threshold")


def summary(prob, sites, radius, rule):
  """(near [k], away) of a frame for the event sweep. 'threshold': every pixel may
  detect (metrics.crop_summary). 'frame_max': the frame's one candidate is its most
  probable pixel, a detection when it reaches the threshold: near = that maximum for
  the site(s) whose disk holds it (else 0), away = that maximum when no site's disk
  holds it (else 0). Scale-free across domains: only the ranking inside a frame
  matters, the threshold is just a floor."""
  near, away = metrics.crop_summary(prob, sites, radius)
  if rule == "threshold":
    return near, away
  top = float(np.max(prob))
  hit = near >= top
  return np.where(hit, top, 0.0), (0.0 if hit.any() else top)


def fold_counts(prob_list, sites_list, threshold, radius, rule="threshold"):
  """Frame-level (TP, FP, FN): an annotated site is TP when the probability reaches
  the threshold within radius; a frame has one FP when it does so farther away."""
  tp = fp = fn = 0
  for p, s in zip(prob_list, sites_list):
    near, away = summary(p, s, radius, rule)
    tp += int(np.sum(near >= threshold))
    fn += int(np.sum(near < threshold))
    fp += int(away >= threshold)
  return tp, fp, fn


def false_detections(prob_list, sites_list, threshold, radius, rule="threshold"):
  """Detections farther than radius from every annotated site of their frame, summed
  over the frames: 'threshold', local maxima >= threshold (NMS within radius);
  'frame_max', at most one per frame (its maximum)."""
  if rule == "frame_max":
    return fold_counts(prob_list, sites_list, threshold, radius, rule)[1]
  count = 0
  for p, s in zip(prob_list, sites_list):
    for y, x, _ in metrics.detect(p, threshold, radius):
      count += int(all(np.hypot(y - sy, x - sx) > radius for sy, sx in s))
  return count


def rates(tp, fp, fn, beta):
  p = tp / (tp + fp) if tp + fp else 1.0
  r = tp / (tp + fn) if tp + fn else 0.0
  return p, r, float(metrics.fbeta(p, r, 1.0)), float(metrics.fbeta(p, r, beta))


def best_threshold(prob_lists, sites_lists, radius, beta, rule="threshold"):
  """Max F-beta threshold pooled over the given crops (validation, never the test).
  'frame_max' with no site found at any floor (F-beta 0 throughout: the validation
  says nothing) takes the lowest floor: every frame's maximum is a detection."""
  sweep = metrics.event_sweep([summary(p, s, radius, rule)
                               for probs, sites in zip(prob_lists, sites_lists)
                               for p, s in zip(probs, sites)], beta)
  if rule == "frame_max" and np.max(sweep["fbeta"]) <= 0:
    return float(sweep["thresholds"][0])
  return metrics.summarize(sweep)["threshold"]


def score_crop(probs, sites, thr, radius, rule="threshold"):
  tp, fp, fn = fold_counts(probs, sites, thr, radius, rule)
  d = [metrics.localization_error(p, s) for p, s in zip(probs, sites) if s]
  return {"threshold": thr, "found": tp > 0, "tp": tp, "fp": fp, "fn": fn,
          "false_detections": false_detections(probs, sites, thr, radius, rule),
          "frames": len(sites), "annotated": sum(1 for s in sites if s),
          "median_distance_px": float(np.median(d)) if d else float("nan")}


def pooled(rows, beta):
  tp, fp, fn = (sum(r[k] for r in rows) for k in ("tp", "fp", "fn"))
  p, r, f1, fb = rates(tp, fp, fn, beta)
  return {"found": sum(r_["found"] for r_ in rows), "crops": len(rows),
          "false_detections_per_frame": sum(r_["false_detections"] for r_ in rows)
          / max(1, sum(r_["frames"] for r_ in rows)),
          "tp": tp, "fp": fp, "fn": fn, "precision": p, "recall": r, "f1": f1, "fbeta": fb,
          "median_distance_px": float(np.nanmedian([r_["median_distance_px"] for r_ in rows]))}


def load_real(workdir, real_dir, include_unusable, log):
  db_path = os.path.join(workdir, "events.db")
  with db_lib.EventDB(db_path) as database:
    records = [db_lib.read_folder(f) for f in db_lib.find_folders([real_dir])[0]]
    database.add(records)
    quality.report_unusable(records, sys.stdout)
    used = database.query(["microscope=isim"], usable_only=not include_unusable)
  log(f"real crops: {len(records)} in {real_dir}, {len(used)} used"
      + ("" if include_unusable else " (flagged unusable left out)"))
  if len(used) < 2:
    raise SystemExit(f"error: {real_dir}: {len(used)} usable crop(s); leave-one-out needs 2")
  return db_path, [data_lib.load_crop(r) for r in used]


def finetune_config(variant, sim_dir, db_path, excluded, steps, lr, calibration):
  """Fine-tuning of the simulation model on the crops not in ``excluded`` (the
  held-out one and the fold's threshold-validation crop): 'mixed' source (calibrated
  simulation + real windows: half around the site, 40% hard negatives)."""
  cfg = events.get_config(variant)
  cfg.init_from = sim_dir
  query = "; ".join(["microscope=isim"] + [f"event_id!={e}" for e in excluded])
  cfg.data.update(source="mixed", db=db_path, query=query,
                  val_fraction=0.0, real_fraction=0.5, positive_fraction=0.5,
                  negative_fraction=0.4, calibration=calibration or "")
  cfg.eval.num_sim = 0
  cfg.update(num_train_steps=steps, learning_rate=lr, warmup_steps=min(20, steps),
             eval_every_steps=steps, checkpoint_every_steps=steps, log_every_steps=50)
  return cfg


def choose_and_score(probs, sites, held_out, validation, radius, beta, rule):
  """Row of the held-out crop. ``probs``: {view: {event id: maps}}; the view (raw /
  tta) and the threshold are chosen together, max F-beta pooled over the
  ``validation`` crops (ties: the first view, raw)."""
  best = None
  for view, pv in probs.items():
    thr = best_threshold([pv[x] for x in validation], [sites[x] for x in validation],
                         radius, beta, rule)
    counts = [fold_counts(pv[x], sites[x], thr, radius, rule) for x in validation]
    val_fbeta = rates(*(sum(c[i] for c in counts) for i in range(3)), beta)[3]
    if best is None or val_fbeta > best[0]:
      best = (val_fbeta, view, thr)
  val_fbeta, view, thr = best
  return {"event_id": held_out, "view": view, "validation_fbeta": val_fbeta,
          **score_crop(probs[view][held_out], sites[held_out], thr, radius, rule)}


def inner_or_train(inner_row, train_row):
  """The fold's row under ``--finetune_threshold_on=inner_or_train``: the inner crop's
  where its validation F-beta is > 0, else (its site never on top at any floor) the
  training crops'."""
  return inner_row if inner_row["validation_fbeta"] > 0 else train_row


def edge_px(f, config) -> float:
  """--edge_px, or (negative) the simulator's sim.margin_px."""
  return float(config.sim.margin_px) if f.edge_px < 0 else float(f.edge_px)


def real_part(workdir, variant, sim_dir, sim_state, sim_fn, f, mesh, log):
  db_path, crops = load_real(workdir, f.real, f.include_unusable, log)
  base = events.get_config(variant)
  n, radius, beta = base.data.num_frames, base.eval.radius_px, base.eval.beta
  rule = f.threshold_rule
  per_crop = {c.event_id: crop_frames(c, n) for c in crops}
  ids = [c.event_id for c in crops]
  sites = {e: per_crop[e][2] for e in ids}
  inner = f.finetune_threshold_on in ("inner_crop", "inner_or_train")
  if inner and len(ids) < 3:
    raise SystemExit(f"error: --finetune_threshold_on={f.finetune_threshold_on} needs >= 3 "
                     "usable crops")
  # Zero-shot: the simulation model; per held-out crop the threshold of max F0.1 on
  # the OTHER crops (validation data for a model that never saw real crops). Every
  # rule is scored (the same predictions); --threshold_rule is the one reported.
  views = views_for(f.tta, f.temporal)
  windows = {e: per_crop[e][0] for e in ids}
  edge = edge_px(f, base)
  zero = predict_views(base.model, sim_state, sim_fn, VIEWS, windows, mesh, edge, f.pad_px)
  others = {e: [x for x in ids if x != e] for e in ids}
  zero_by = {r: [choose_and_score({v: zero[v] for v in views}, sites, e, others[e], radius,
                                  beta, r) for e in ids] for r in RULES}
  # Diagnostics: each view on its own (the reported one is fixed by --tta beforehand).
  zero_views = {f"{r}/{v}": [choose_and_score({v: zero[v]}, sites, e, others[e], radius, beta, r)
                             for e in ids] for r in RULES for v in VIEWS}
  zero_rows = zero_by[rule]
  ft_by = {f"{r}/{on}": [] for r in RULES
           for on in ("inner_crop", "train_crops", "inner_or_train")}
  ft_views = {f"{r}/{on}/{v}": [] for r in RULES for on in ("inner_crop", "train_crops")
              for v in VIEWS}
  rows, examples = [], []
  if f.finetune_steps > 0:
    for i, e in enumerate(ids):
      t0 = time.time()
      # The fold's threshold-validation crop (inner_crop): the next crop, held out of
      # the fine-tune too, so the threshold is chosen on a crop the model never saw.
      val = ids[(i + 1) % len(ids)]
      all_probs = None
      for k in range(f.finetune_seeds):
        # Member k of the fold's ensemble: the same fine-tune with seed + k (data
        # order, augmentation, simulated examples); k = 0 is the single fine-tune.
        fold = os.path.join(workdir, f"fold_{e}" + (f"_seed{k}" if k else ""))
        cfg = finetune_config(variant, sim_dir, db_path, [e] + ([val] if inner else []),
                              f.finetune_steps, f.finetune_lr, f.calibration)
        cfg.seed = (int(cfg.seed) if f.seed < 0 else f.seed) + k
        if f.finetune_ema_decay >= 0:
          cfg.ema_decay = float(f.finetune_ema_decay)
        trainer.train_and_evaluate(cfg, fold)
        fold_config, state, fn = load_model(fold, mesh)
        member = predict_views(fold_config.model, state, fn, VIEWS, windows, mesh, edge,
                               f.pad_px)
        all_probs = member if all_probs is None else {
            v: {x: [a + b for a, b in zip(all_probs[v][x], member[v][x])] for x in ids}
            for v in VIEWS}
      if f.finetune_seeds > 1:     # the members' mean (temporal_mean is linear)
        all_probs = {v: {x: [m / f.finetune_seeds for m in all_probs[v][x]] for x in ids}
                     for v in VIEWS}
      trained = [x for x in ids if x != e and not (inner and x == val)]
      probs = {v: all_probs[v] for v in views}
      for r in RULES:
        # train_crops: the crops the fold trained on (optimistic: the old choice).
        ft_by[f"{r}/train_crops"].append(
            choose_and_score(probs, sites, e, trained, radius, beta, r))
        if inner:
          ft_by[f"{r}/inner_crop"].append(
              choose_and_score(probs, sites, e, [val], radius, beta, r))
          # inner_or_train: the inner crop's floor where it says something (F-beta > 0
          # at its best floor); where it never has its site on top (F-beta 0 at every
          # floor, so inner_crop falls back to the lowest floor: every frame's maximum
          # a detection), the floor chosen on the fold's training crops instead.
          ft_by[f"{r}/inner_or_train"].append(
              inner_or_train(ft_by[f"{r}/inner_crop"][-1], ft_by[f"{r}/train_crops"][-1]))
        for v in VIEWS:
          ft_views[f"{r}/train_crops/{v}"].append(
              choose_and_score({v: all_probs[v]}, sites, e, trained, radius, beta, r))
          if inner:
            ft_views[f"{r}/inner_crop/{v}"].append(
                choose_and_score({v: all_probs[v]}, sites, e, [val], radius, beta, r))
      row = ft_by[f"{rule}/{f.finetune_threshold_on}"][-1]
      rows.append({**row, "validation_crop": val if inner else None,
                   "seconds": time.time() - t0})
      thr = row["threshold"]
      t_show = next((t for t, s in enumerate(sites[e]) if s), 0)
      examples.append((per_crop[e][0][t_show][-1], probs[row["view"]][e][t_show],
                       sites[e][t_show], thr, f"{e[-6:]} t{t_show} ({row['view']}, thr {thr:.2f})"))
  log(f"\nreal crops, leave one crop out ({len(ids)} crops, "
      f"{sum(len(sites[e]) for e in ids)} frames); rule {rule}; fine-tuned threshold on "
      f"{f.finetune_threshold_on}; found = the site reached within {radius:g} px in an "
      "annotated frame; false det. = detections farther away")
  log(f"{'crop':<26}{'model':<12}{'view':>5}{'thr':>5}{'found':>6}{'TP':>4}{'FP':>4}{'FN':>4}"
      f"{'false det./frame':>18}{'med. dist px':>13}")
  for name, table in (("zero-shot", zero_rows), ("fine-tuned", rows)):
    for r in table:
      log(f"{r['event_id']:<26}{name:<12}{r['view']:>5}{r['threshold']:>5.2f}"
          f"{'yes' if r['found'] else 'no':>6}"
          f"{r['tp']:>4}{r['fp']:>4}{r['fn']:>4}{r['false_detections'] / r['frames']:>18.2f}"
          f"{r['median_distance_px']:>13.1f}")
  summary_ = {"rule": rule, "finetune_threshold_on": f.finetune_threshold_on,
              "finetune_ema_decay": f.finetune_ema_decay,
              "zero_shot": pooled(zero_rows, beta), "zero_shot_folds": zero_rows,
              "all_rules": {f"zero_shot/{r}": pooled(v, beta) for r, v in zero_by.items()}}
  summary_["all_rules"].update({f"zero_shot/{k}": pooled(v, beta) for k, v in zero_views.items()})
  if rows:
    summary_.update(finetuned=pooled(rows, beta), finetuned_folds=rows)
    summary_["all_rules"].update({f"finetuned/{k}": pooled(v, beta)
                                  for k, v in ft_by.items() if v})
    summary_["all_rules"].update({f"finetuned/{k}": pooled(v, beta)
                                  for k, v in ft_views.items() if v})
    metrics.plot_examples([x[0] for x in examples], [x[1] for x in examples],
                          [x[2] for x in examples], float(np.median([x[3] for x in examples])),
                          radius, os.path.join(workdir, "loo_examples.png"),
                          [x[4] for x in examples])
  log(f"\n{'model':<12}{'found':>8}{'false det./frame':>18}{'P':>7}{'R':>7}{'F1':>7}"
      f"{'F0.1':>7}{'med. dist px':>13}")
  for name in ("zero_shot", "finetuned"):
    if name in summary_:
      m = summary_[name]
      log(f"{name:<12}{m['found']:>5}/{m['crops']:<2}{m['false_detections_per_frame']:>18.2f}"
          f"{m['precision']:>7.3f}{m['recall']:>7.3f}{m['f1']:>7.3f}{m['fbeta']:>7.3f}"
          f"{m['median_distance_px']:>13.1f}")
  log("\nthe same predictions under every rule / threshold source (diagnostics: only "
      f"{rule} / {f.finetune_threshold_on} was fixed before scoring)")
  for name, m in summary_["all_rules"].items():
    log(f"{name:<34}{m['found']:>3}/{m['crops']:<2} false/frame "
        f"{m['false_detections_per_frame']:6.2f}  F0.1 {m['fbeta']:.3f}")
  return summary_


def main(argv):
  del argv
  f = flags.FLAGS
  cli.quiet_logs()
  if not os.path.isdir(f.real):
    cli.fail(f"--real={f.real} not found (the shared iSIM crops)")
  if f.sim_steps < 0:
    cli.fail(f"--sim_steps={f.sim_steps}: must be >= 0 (0: the config's)")
  if f.finetune_seeds < 1:
    cli.fail(f"--finetune_seeds={f.finetune_seeds}: must be >= 1")
  if f.finetune_ema_decay >= 1:
    cli.fail(f"--finetune_ema_decay={f.finetune_ema_decay}: must be < 1 (0: off)")
  if f.calibration and not os.path.isfile(f.calibration):
    cli.fail(f"--calibration={f.calibration}: no such file")
  os.makedirs(f.workdir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.join(f.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
  t0 = time.time()
  mesh = trainer.make_mesh()
  sim_dir = os.path.join(f.workdir, "sim")
  calibration = os.path.abspath(f.calibration) if f.calibration else ""
  sim, sim_state, sim_fn = sim_part(sim_dir, f.variant, f.num_test, f.test_seed, mesh, print,
                                    calibration, f.sim_steps, f.seed)
  real = real_part(f.workdir, f.variant, sim_dir, sim_state, sim_fn, f, mesh, print)
  result = {"sim": sim, "real": real, "calibration": calibration,
            "total_seconds": time.time() - t0}
  cli.atomic_write_text(os.path.join(f.workdir, "study.json"),
                        json.dumps(result, indent=1, default=float))
  print(f"\ndefault config trained in {sim['seconds']:.0f} s on {len(jax.devices())} "
        f"{jax.devices()[0].platform} device(s); whole study {result['total_seconds']:.0f} s")
  z, ft = real["zero_shot"], real.get("finetuned")
  line = (f"RESULT sim_f1={sim['val_f1_threshold']['f1']:.4f} "
          f"sim_f1_at_fbeta_threshold={sim['run_threshold']['f1']:.4f} seconds={sim['seconds']:.1f} "
          f"zero_shot_found={z['found']}/{z['crops']} "
          f"zero_shot_false_per_frame={z['false_detections_per_frame']:.2f} "
          f"zero_shot_fbeta={z['fbeta']:.4f}")
  if ft:
    line += (f" real_found={ft['found']}/{ft['crops']} "
             f"real_false_per_frame={ft['false_detections_per_frame']:.2f} "
             f"real_fbeta={ft['fbeta']:.4f} real_median_distance_px={ft['median_distance_px']:.2f}")
  print(line)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", "runs/events_study", "Folder of the study's runs.")
  flags.DEFINE_string("variant", None, "configs/events.py variant (default: the CPU one; "
                      "'tiny' for a quick check of this script).")
  flags.DEFINE_string("real", SHARED, "Folder of the real crop folders.")
  flags.DEFINE_string("calibration", None, "Simulator calibration JSON (python -m "
                      "smlm_jax.events.calibrate) for training and the simulated sets.")
  flags.DEFINE_bool("include_unusable", False, "Keep crops flagged without structure.")
  flags.DEFINE_integer("num_test", 512, "Simulated test crops.")
  flags.DEFINE_integer("test_seed", 777, "Seed of the simulated test crops.")
  flags.DEFINE_integer("sim_steps", 0, "Training steps of the simulation model (0: the "
                       "config's num_train_steps, 800).")
  flags.DEFINE_integer("seed", -1, "Training seed of the simulation model and of the "
                       "fine-tunes (negative, the default: the config's seed).")
  flags.DEFINE_integer("finetune_steps", 200, "Fine-tuning steps per real fold (0: "
                       "zero-shot only).")
  flags.DEFINE_float("finetune_lr", 5e-4, "Fine-tuning peak learning rate.")
  flags.DEFINE_float("finetune_ema_decay", -1.0, "Averaged weights for the fine-tunes "
                     "(config.ema_decay; negative, the default: configs/events.py's). The "
                     "trajectory is the same whatever the value, so fine-tunes with and "
                     "without differ only in the weights used.")
  flags.DEFINE_integer("finetune_seeds", 1, "Fine-tunes per fold (seeds config.seed + k, "
                       "WORKDIR/fold_<id>[_seed<k>]); their probability maps are averaged.")
  flags.DEFINE_enum("threshold_rule", "frame_max", list(RULES), "frame_max: one "
                    "candidate per frame, its most probable pixel, above a floor; "
                    "threshold: every local maximum above the threshold.")
  flags.DEFINE_enum("tta", "choose", ["choose", "on", "off"], "Dihedral test-time "
                    "averaging (the 8 rotations / reflections): 'choose' picks raw or "
                    "averaged maps per fold with the threshold, on that fold's validation "
                    "crops (ties: raw); 'on' / 'off' fix it.")
  flags.DEFINE_enum("temporal", "choose", ["choose", "on", "off"], "Maps averaged over "
                    "each frame and its two neighbours ('_t1' views): 'choose' lets each "
                    "fold pick with the view and threshold on its validation crops (ties: "
                    "not averaged); 'on' / 'off' fix it.")
  flags.DEFINE_float("edge_px", -1.0, "Detections are not taken within this distance "
                     "(px) of a frame's border (the maps are cleared there; negative, the "
                     "default: the simulator's sim.margin_px, where it never places a "
                     "site; 0: off).")
  flags.DEFINE_integer("pad_px", 0, "Mirror-pad every real window by this many px "
                       "before the network and crop its map back (0: off).")
  flags.DEFINE_enum("finetune_threshold_on", "inner_crop",
                    ["inner_crop", "train_crops", "inner_or_train"],
                    "Fine-tuned threshold: max F0.1 on one more crop held out of the "
                    "fine-tune (the next one), or on the fold's training crops (biased "
                    "high: the model has seen them); inner_or_train: the inner crop's, "
                    "or the training crops' where the inner crop never has its site on "
                    "top (F0.1 0 at every floor).")
  app.run(main, flags_parser=cli.parse_flags)
