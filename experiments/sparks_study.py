"""Sparks study: train the default config, then score it on unseen simulated movies.

  flock /tmp/smlm_cpu.lock python experiments/sparks_study.py [--workdir=/tmp/sparks_study] \
      [--config=configs/sparks.py] [--num_movies=96] [--seed=777] [--skip_training] \
      [--num_val=32] [--val_seed=4242] [--second_sim_dir=DIR] [--third_sim_dir=DIR]

1. Trains ``--config`` (default: the CPU default) in ``--workdir`` with the shared
   trainer and times it (wall clock, compilation and validation included; a finished
   run in the workdir is reused unless --retrain).
2. Simulates ``--num_movies`` test movies from ``--seed`` (training uses the keys
   fold_in(key(config.seed), step), validation key(config.eval_seed), where the
   confidence filter is chosen: the test seed is never seen) and segments them with
   the run's event extraction; events are matched by IoMin >= 0.5.
3. Prints per-class precision / recall / F1, the confusion matrix of matched classes,
   F1 against the true peak dF/F0 (where detection fails), and ends with
   RESULT f1_sparks=.. f1_waves=.. f1_puffs=.. seconds=.. classical_f1_sparks=..
   classical_f1_waves=.. classical_f1_puffs=..
   (seconds = training wall-clock time; ...). With --skip_training and no trained run in
   --workdir only the classical detector is scored (its keys only).
4. The classical detector (smlm_jax.sparks.classical: smoothed dF/F0, thresholds in
   noise SDs, hysteresis, components, duration / extent rules) with its thresholds
   chosen on --num_val movies of the validation seed --val_seed (default the config's
   eval_seed 4242; never the test seed), scored on the same test movies by the same
   extraction and IoMin matching.
   The detector's movies come from --config's simulator, the model's own test movies
   from the run's saved config: with --skip_training pass the --config the run was
   trained with (e.g. configs/sparks.py:randomized), or the two rows differ in data;
   or --test_priors=config to draw the model's test movies from --config too (a
   fine-tuned randomized run on the default priors' test set).
5. --second_sim_dir=DIR: movies of an independent simulator, NAME.tif (uint16 ADU),
   NAME_labels.tif (0-4), NAME_instances.tif (event ids), NAME.json (pixel_size_nm,
   frame_interval_s, camera_offset_adu, camera_gain_adu_per_e): the model through
   ``smlm_jax.sparks.evaluate``'s annotated-movie path, the classical detector (the
   parameters tuned in 4) through the same matching; adds f1_*_second_sim and
   classical_f1_*_second_sim to the RESULT line. --third_sim_dir=DIR: the same for a
   third independent simulator (experiments/third_sim), keys *_third_sim.
   (seconds = training wall-clock time; the process CPU time is printed too, since on a
   shared host the wall clock includes waiting for other processes). Writes metrics.json and f1_vs_amplitude.png
   to WORKDIR/study.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from smlm_jax.core import cli, trainer  # noqa: E402
from smlm_jax.sparks import evaluate as evaluate_lib  # noqa: E402

with cli.config_override_errors():
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/sparks.py", "Training config.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/sparks_study", "Run folder.")
_NUM = flags.DEFINE_integer("num_movies", 96, "Test movies.")
_SEED = flags.DEFINE_integer("seed", evaluate_lib.TEST_SEED, "Test seed.")
_SKIP = flags.DEFINE_bool("skip_training", False, "Only evaluate the run in --workdir.")
_RETRAIN = flags.DEFINE_bool("retrain", False, "Delete --workdir and train from scratch.")
_NUM_VAL = flags.DEFINE_integer("num_val", 32, "Validation movies to tune the classical "
                                "detector on.")
_VAL_SEED = flags.DEFINE_integer("val_seed", None, "Validation seed (default eval_seed).")
_TEST_PRIORS = flags.DEFINE_enum("test_priors", "run", ["run", "config"], "Priors of the "
                                 "model's test movies: the run's own, or --config's (e.g. a "
                                 "randomized run on the default priors' test set).")
_SECOND = flags.DEFINE_string("second_sim_dir", None, "Folder of independently simulated "
                              "movies (NAME.tif, NAME_labels.tif, NAME_instances.tif, "
                              "NAME.json) to score the model and the detector on.")
_THIRD = flags.DEFINE_string("third_sim_dir", None, "Folder of movies of a third "
                             "independent simulator (same files as --second_sim_dir).")


def second_sim_items(folder):
  """[(name, movie ADU path, labels path, instances path or None, metadata)]."""
  if not os.path.isdir(folder):
    cli.fail(f"{folder}: no such folder of simulated movies")
  out = []
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".json"):
      continue
    stem = name[:-5]
    movie = os.path.join(folder, stem + ".tif")
    if not os.path.exists(movie):
      continue
    inst = os.path.join(folder, stem + "_instances.tif")
    out.append((stem, movie, os.path.join(folder, stem + "_labels.tif"),
                inst if os.path.exists(inst) else None,
                json.load(open(os.path.join(folder, name)))))
  if not out:
    cli.fail(f"--second_sim_dir={folder}: no NAME.json with NAME.tif found")
  return out


AMPLITUDE_KEYS = ("peak_dF_F0", "peak_dff")     # the two independent simulators' names


def event_amplitudes(meta) -> dict:
  """{instance id: true peak dF/F0} from a movie's JSON ``events`` list (empty when it
  has none): recall by true amplitude in the study's F1-vs-amplitude table."""
  out = {}
  for e in meta.get("events", []) or []:
    a = next((e[k] for k in AMPLITUDE_KEYS if k in e), None)
    if a is not None and "id" in e:
      out[int(e["id"])] = float(a)
  return out


def classical_second_sim(items, config, params):
  import numpy as np
  from smlm_jax.core import tiff_io
  from smlm_jax.sparks import classical, events as events_lib
  rows = []
  for _, movie, labels, inst, meta in items:
    adu = np.asarray(tiff_io.read_image(movie).data, np.float32)
    photons = ((adu - float(meta.get("camera_offset_adu", 100.0)))
               / float(meta.get("camera_gain_adu_per_e", 1.0)))
    rows.append((photons, tiff_io.read_image(labels).data,
                 None if inst is None else tiff_io.read_image(inst).data,
                 float(meta["pixel_size_nm"]) / 1000, float(meta["frame_interval_s"]) * 1000))
  spec_for = lambda px, dt: events_lib.spec_from_config(config, px, dt)
  return classical.score_annotated(rows, spec_for, params)


def tune_classical(config, mesh):
  from smlm_jax.sparks import classical, events as events_lib, task as task_lib
  seed = int(config.eval_seed) if _VAL_SEED.value is None else _VAL_SEED.value
  if seed == _SEED.value:
    cli.fail(f"--val_seed={seed} is the test seed")
  task = task_lib.SparksTask(config)
  spec = events_lib.spec_from_config(config)
  data = task.simulate_set(_NUM_VAL.value, seed, mesh)
  t0 = time.time()
  params, m, _ = classical.tune(data["x"][..., 0], data, spec)
  print(f"classical detector tuned on {_NUM_VAL.value} validation movies of seed {seed} "
        f"({time.time() - t0:.0f} s): {params}; validation mean F1 {classical.mean_f1(m):.3f}")
  return params, task, spec


def main(argv):
  del argv
  cli.quiet_logs()
  config = _CONFIG.value
  workdir = _WORKDIR.value
  # Other simulators' movies: checked before any training.
  others = [(tag, folder, second_sim_items(folder))
            for tag, folder in (("second_sim", _SECOND.value), ("third_sim", _THIRD.value))
            if folder]
  timing = os.path.join(workdir, "train_seconds.json")
  if _RETRAIN.value and os.path.isdir(workdir):
    import shutil
    shutil.rmtree(workdir)
  print(f"backend={jax.default_backend()} devices={len(jax.devices())} cpus={os.cpu_count()} "
        f"movie={config.sim.num_frames}x{config.sim.height_px}x{config.sim.width_px} "
        f"model={config.model.name} depth={config.model.depth} base={config.model.base_width} "
        f"steps={config.num_train_steps} batch={config.batch_size} loss={config.loss.name}")
  if not _SKIP.value and not os.path.exists(timing):
    t0, c0 = time.time(), time.process_time()
    trainer.train_and_evaluate(config, workdir)
    seconds, cpu = time.time() - t0, time.process_time() - c0
    cli.atomic_write_text(timing, json.dumps({"seconds": seconds, "cpu_seconds": cpu}))
  t = json.load(open(timing)) if os.path.exists(timing) else {}
  seconds = t.get("seconds", float("nan"))
  cpu = t.get("cpu_seconds", float("nan"))
  # CPU time of this process (all threads) / 2 cores: what the training costs on 2 free
  # cores; the wall clock includes waiting for other users' processes on a shared host.
  print(f"training wall-clock: {seconds:.0f} s; process CPU time: {cpu:.0f} s "
        f"(= {cpu / 2:.0f} s on 2 fully used cores)")
  from smlm_jax.sparks import classical, events as events_lib
  mesh = trainer.make_mesh()
  params, task, spec = tune_classical(config, mesh)
  test = task.simulate_set(_NUM.value, _SEED.value, mesh)
  cm = classical.score_simulated(test["x"][..., 0], test, spec, params)
  print(events_lib.summary_table(cm, title=f"classical detector, {_NUM.value} test movies "
                                 f"(seed {_SEED.value})"))
  keys = " ".join(f"classical_f1_{n}s={cm[n]['f1']:.3f}" for n in ("spark", "wave", "puff"))
  for tag, folder, items in others:
    c2 = classical_second_sim(items, config, params)
    print(events_lib.summary_table(c2, title=f"classical detector, {len(items)} movies of "
                                   f"{folder} ({tag.replace('_', ' ')}ulator)"))
    keys += " " + " ".join(f"classical_f1_{n}s_{tag}={c2[n]['f1']:.3f}"
                           for n in ("spark", "wave", "puff"))
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    print(f"no trained run in {workdir}: classical detector only")
    print(f"RESULT {keys}")
    return
  t0 = time.time()
  # The run's own event extraction, with the confidence filter that training chose on
  # its validation movies (WORKDIR/events_filter.json; evaluate_simulated prints it).
  m = evaluate_lib.evaluate_simulated(
      workdir, _NUM.value, _SEED.value, os.path.join(workdir, "study"),
      sim_config=config.sim if _TEST_PRIORS.value == "config" else None)
  print(f"test evaluation: {time.time() - t0:.0f} s")
  for tag, _, items in others:
    meta = items[0][4]
    m2 = evaluate_lib.evaluate_annotated(
        workdir, [i[1] for i in items], [i[2] for i in items],
        [i[3] for i in items] if all(i[3] for i in items) else (),
        float(meta["pixel_size_nm"]), float(meta["frame_interval_s"]),
        float(meta.get("camera_offset_adu", 100.0)),
        os.path.join(workdir, f"study_{tag}"),
        amplitudes=[event_amplitudes(i[4]) for i in items])
    keys += " " + " ".join(f"f1_{n}s_{tag}={m2[n]['f1']:.3f}"
                           for n in ("spark", "wave", "puff"))
  print(f"RESULT f1_sparks={m['spark']['f1']:.3f} f1_waves={m['wave']['f1']:.3f} "
        f"f1_puffs={m['puff']['f1']:.3f} seconds={seconds:.0f} {keys}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
