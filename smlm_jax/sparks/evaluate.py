"""Scores a trained run: event precision / recall / F1 per class (IoMin >= 0.5).

Simulated test movies (a seed never used in training or validation):

  python -m smlm_jax.sparks.evaluate --workdir=runs/sparks [--num_movies=96] [--seed=777]

Your annotated movie(s): a movie TIFF [T, H, W] and a label TIFF of the same shape
(0 background, 1 spark, 2 wave, 3 puff, 4 ignore; events = 26-connected components
per class unless --instances gives an instance-id TIFF):

  python -m smlm_jax.sparks.evaluate --workdir=runs/sparks --movie=cell1.tif \
      --labels=cell1_labels.tif [--instances=cell1_ids.tif] [--movie=... --labels=...] \
      [--pixel_size_nm=200 --frame_interval_s=0.0068 --camera_offset_adu=100]

Re-choose the run's confidence filter (training does it on its validation movies) on
more or other simulated validation movies:

  python -m smlm_jax.sparks.evaluate --workdir=runs/sparks --tune [--num_movies=144] [--seed=4243]

Writes to --output (default WORKDIR/eval): metrics.json (per class precision, recall,
F1, TP/FP/FN; voxel IoU; the confusion matrix of matched classes; F1 vs dF/F0) and
f1_vs_amplitude.png, and prints the tables. Simulated movies use the run's own
priors (config.sim) and are segmented whole (they fit in one chunk); annotated
movies go through the same chunked inference and event extraction as predict.
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

import json
import os
import sys

from absl import app, flags
import numpy as np

from smlm_jax.core import cli
from smlm_jax.core import tiff_io
from smlm_jax.sparks import predict as predict_lib

TEST_SEED = 777


def evaluate_simulated(workdir: str, num_movies: int, seed: int, output: str | None = None,
                       log=print, events_config=None, sim_config=None,
                       max_puff_volume_um2_ms=None) -> dict:
  """Scores the run on ``num_movies`` movies simulated from ``seed`` with its own priors;
  ``events_config`` (a ``config.events`` ConfigDict) replaces the run's event-extraction
  settings (post-processing only: the network is unchanged); without it the run's own
  settings are used, with the confidence filter it chose on its validation movies.
  ``sim_config`` (a ``config.sim``) draws the movies from other priors than the run's
  (e.g. a fine-tuned, domain-randomized run scored on the default priors' test set).
  ``max_puff_volume_um2_ms``: the puff volume ceiling instead of the run's (0 = none)."""
  from smlm_jax.core import trainer
  from smlm_jax.sparks import events as events_lib
  mesh = trainer.make_mesh()
  config, task, state = trainer.load_run(workdir, mesh)
  if events_config is not None:
    config.events = events_config
    task.config.events = events_config
    events_lib.set_puff_ceiling(task.config, max_puff_volume_um2_ms)
  else:
    log(events_lib.use_run_filter(task.config, workdir, max_puff_volume_um2_ms))
  if seed in (int(config.eval_seed),):
    log(f"warning: --seed={seed} is the validation seed of this run", file=sys.stderr)
  if sim_config is None:
    data = task.simulate_set(num_movies, seed, mesh)
  else:
    from smlm_jax.sparks.task import SparksTask
    other = config.copy_and_resolve_references()
    other.sim, other.init_from = sim_config, ""
    data = SparksTask(other).simulate_set(num_movies, seed, mesh)
  probs = task.predict(state, data["x"], mesh)
  metrics = task.score_set(probs, data)
  metrics.update(step=int(state["step"]), seed=seed, num_movies=num_movies, source="simulated")
  _write(metrics, output or os.path.join(workdir, "eval"),
         f"{num_movies} simulated movies (seed {seed}), step {metrics['step']}", log)
  return metrics


def tune_run(workdir: str, num_movies: int, seed: int | None = None, log=print,
             snr_floor: bool | None = None, max_puff_volume_um2_ms=None) -> dict:
  """Chooses the run's confidence filter on ``num_movies`` simulated validation movies
  (``seed``, default the run's ``eval_seed``; never the test seed) and writes it to
  WORKDIR/events_filter.json (what training writes after its last validation).
  ``snr_floor``: also try floors on the peak over the noise (None: the run's
  ``config.events.tune_snr_floor``); ``max_puff_volume_um2_ms``: the puff volume ceiling
  the filter is chosen under, instead of the run's (0 = none; evaluate and predict take
  the ceiling it was chosen under from the filter file unless their own flag says
  otherwise)."""
  from smlm_jax.core import trainer
  from smlm_jax.sparks import events as events_lib
  mesh = trainer.make_mesh()
  config, task, state = trainer.load_run(workdir, mesh)
  events_lib.set_puff_ceiling(config, max_puff_volume_um2_ms)
  seed = int(config.eval_seed) if seed is None else int(seed)
  if seed == TEST_SEED:
    raise predict_lib.UsageError(
        f"--seed={seed} is the test seed: choose the filter on validation movies (e.g. "
        f"the run's eval_seed {int(config.eval_seed)})")
  data = task.simulate_set(num_movies, seed, mesh)
  probs = task.predict(state, data["x"], mesh)
  chosen = events_lib.tune_simulated(probs, data, events_lib.spec_from_config(config),
                                     **events_lib.choice_options(config.events, snr_floor))
  record = events_lib.save_filter(workdir, chosen, int(state["step"]), seed, num_movies)
  log(f"confidence filter chosen on {num_movies} movies of seed {seed} (step "
      f"{record['step']}): mean probability >= {chosen['min_probability']}, volume >= "
      f"{chosen['min_volume_um2_ms']} um^2 ms, estimated peak dF/F0 >= "
      f"{chosen['min_amplitude_dff']}, peak / noise >= {chosen['min_snr']} (spark, wave, "
      f"puff)")
  for name in events_lib.NAMES.values():
    log(f"  {name:<6} F1 {chosen['unfiltered_f1'][name]:.3f} unfiltered -> "
        f"{chosen['f1'][name]:.3f} (P {chosen['precision'][name]:.3f}, R "
        f"{chosen['recall'][name]:.3f})")
  log(f"wrote {os.path.join(workdir, events_lib.FILTER_FILE)}")
  return record


def evaluate_annotated(workdir, movies, labels, instances=(), pixel_size_nm=None,
                       frame_interval_s=None, camera_offset_adu=None, output=None,
                       log=print, amplitudes=(), max_puff_volume_um2_ms=None,
                       channel=None) -> dict:
  """Scores the run on annotated movies. ``amplitudes`` (optional, one per movie): {true
  instance id: its true peak dF/F0}, e.g. from a simulator's metadata; with them the
  F1-vs-amplitude table also bins the true events (recall by true amplitude)."""
  from smlm_jax.sparks import events as events_lib
  seg = predict_lib.Segmenter(workdir, camera_offset_adu=camera_offset_adu,
                              max_puff_volume_um2_ms=max_puff_volume_um2_ms)
  cfg = seg.config
  log(seg.filter_note)
  scorer = None
  for i, (mpath, lpath) in enumerate(zip(movies, labels)):
    image = predict_lib.read_movie(mpath, float(seg.camera.offset_adu), channel)
    lab, inst, cls_of, true_amp = annotated_truth(
        lpath, instances[i] if i < len(instances) else None, image.data.shape,
        amplitudes[i] if i < len(amplitudes) else None)
    px_nm, dt_s, missing = tiff_io.resolve_geometry(
        image, pixel_size_nm, frame_interval_s, cfg.sim.pixel_size_um * 1000,
        cfg.sim.frame_interval_ms / 1000)
    for m in missing:
      log(f"note: {mpath}: {m} ASSUMED (training value)", file=sys.stderr)
    spec = events_lib.spec_from_config(cfg, px_nm / 1000, dt_s * 1000)
    if scorer is None:
      scorer = events_lib.Scorer(spec)
    scorer.spec = spec
    probs, x, _ = seg.probabilities(image.data, desc=os.path.basename(mpath))
    scorer.add(probs, x[..., 0], lab, inst, cls_of, true_amp)
  metrics = scorer.metrics()
  metrics.update(step=int(seg.state["step"]), movies=list(movies), source="annotated")
  _write(metrics, output or os.path.join(workdir, "eval_annotated"),
         f"{len(movies)} annotated movie(s), step {metrics['step']}", log)
  return metrics


def annotated_truth(labels_path, instances_path, shape, amplitudes=None):
  """(labels, instances, class of each instance, true peak dF/F0 per instance or None)
  of one annotated movie of ``shape``; ``amplitudes``: {instance id: peak dF/F0}."""
  from smlm_jax.sparks import events as events_lib
  lab = _read_volume(labels_path, shape, "labels")
  if lab.min() < 0 or lab.max() > 4:
    raise tiff_io.MovieError(f"{labels_path}: label values must be 0-4 (0 background, "
                             f"1 spark, 2 wave, 3 puff, 4 ignore), found "
                             f"{lab.min()}-{lab.max()}", "bad_labels")
  inst = _read_volume(instances_path, shape, "instances") if instances_path else None
  inst, cls_of = events_lib.annotated_instances(lab, inst)
  true_amp = None
  if amplitudes:
    true_amp = np.full(len(cls_of), np.nan)
    for j, a in amplitudes.items():
      if 0 < int(j) < len(true_amp):
        true_amp[int(j)] = float(a)
  return lab, inst, cls_of, true_amp


def _read_volume(path, shape, what):
  image = tiff_io.read_image(path)
  data = np.asarray(image.data)
  if data.shape != tuple(shape):
    raise tiff_io.MovieError(f"{path}: {what} of shape {data.shape} do not match the movie "
                             f"{tuple(shape)}", "wrong_size")
  if data.dtype.kind == "f":
    if not np.all(data == np.round(data)):
      raise tiff_io.MovieError(f"{path}: {what} must be integers", "bad_labels")
  return data.astype(np.int64)


def plot_amplitude(table: dict, path: str, title: str = ""):
  from smlm_jax.core import plotting
  plt = plotting.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, rows in table.items():
    rows = [r for r in rows if r["n_true"] > 0]
    if not rows:
      continue
    centers = [0.5 * (r["lo"] + min(r["hi"], 2.0)) for r in rows]
    ax.plot(centers, [r["f1"] for r in rows], "-o", label=f"{name} F1")
    ax.plot(centers, [r["recall"] for r in rows], ":", alpha=0.6, label=f"{name} recall")
  ax.axhline(0.9, color="0.6", lw=0.8, ls="--")
  ax.set(xlabel="true peak dF/F0", ylabel="F1 / recall", ylim=(0, 1.05), title=title)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  else:
    ax.text(0.5, 0.5, "no true events", ha="center", transform=ax.transAxes)
  plotting.save(fig, path)


def _write(metrics, out_dir, title, log):
  from smlm_jax.sparks import events as events_lib
  os.makedirs(out_dir, exist_ok=True)
  cli.atomic_write_text(os.path.join(out_dir, "metrics.json"),
                        json.dumps(metrics, indent=1, default=float))
  plot_amplitude(metrics["f1_vs_amplitude"], os.path.join(out_dir, "f1_vs_amplitude.png"),
                 title)
  log(events_lib.summary_table(metrics, title=title))
  log("F1 vs amplitude (true events by true dF/F0; unmatched predictions by estimated "
      "dF/F0)")
  log(events_lib.amplitude_table_text(metrics["f1_vs_amplitude"]))
  log(f"wrote {out_dir}/metrics.json, {out_dir}/f1_vs_amplitude.png")


def _define_flags():
  flags.DEFINE_string("workdir", None, "Training run folder.")
  flags.DEFINE_integer("num_movies", 96, "Simulated test movies.")
  flags.DEFINE_integer("seed", TEST_SEED, "Test-set seed (never used in training).")
  flags.DEFINE_multi_string("movie", [], "Annotated movie TIFF (repeat; pairs with --labels).")
  flags.DEFINE_multi_string("labels", [], "Label TIFF (0-4) of each --movie.")
  flags.DEFINE_multi_string("instances", [], "Optional instance-id TIFF of each --movie.")
  flags.DEFINE_float("pixel_size_nm", None, "Pixel size (nm); overrides file metadata.")
  flags.DEFINE_float("frame_interval_s", None, "Frame interval (s); overrides metadata.")
  flags.DEFINE_float("camera_offset_adu", None, "Detector offset (ADU).")
  flags.DEFINE_string("output", None, "Output folder (default WORKDIR/eval[_annotated]).")
  flags.DEFINE_bool("tune", False, "Instead of scoring: choose the run's confidence filter "
                    "on --num_movies simulated validation movies (--seed, default the "
                    "run's eval_seed) and write WORKDIR/events_filter.json.")
  flags.DEFINE_enum("snr_floor", "run", ["run", "on", "off"], "With --tune: also try "
                    "floors on the event's peak over the movie's noise (run: the run's "
                    "config.events.tune_snr_floor).")
  cli.define_channel_flag("--movie files")
  flags.DEFINE_float("max_puff_volume_um2_ms", None, "Drop predicted puffs larger than this "
                     "(um^2 x ms; 0 = no ceiling; default: the run's "
                     "config.events.max_volume_um2_ms, or the one its filter was "
                     "re-chosen under). With --tune: the ceiling to choose the filter "
                     "under (saved with it; predict and evaluate then use it).")


def main(argv):
  cli.quiet_logs()
  f = flags.FLAGS
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not f.workdir:
    cli.fail("--workdir is required")
  if len(f.movie) != len(f.labels):
    cli.fail(f"give one --labels per --movie ({len(f.movie)} movies, {len(f.labels)} labels)")
  if f.instances and len(f.instances) != len(f.movie):
    cli.fail("give one --instances per --movie (or none)")
  if f.num_movies < 1:
    cli.fail("--num_movies must be >= 1")
  cli.require_nonnegative(f, ("max_puff_volume_um2_ms",))
  if not os.path.isdir(f.workdir):
    cli.fail(f"--workdir={f.workdir}: no such folder (a trained run)")
  if f.tune:
    cli.check_writable(f.workdir, "workdir", folder=True)
  else:
    cli.check_writable(f.output or os.path.join(
        f.workdir, "eval_annotated" if f.movie else "eval"), "output", folder=True)
  try:
    if f.tune:
      tune_run(f.workdir, f.num_movies, None if f["seed"].using_default_value else f.seed,
               snr_floor={"run": None, "on": True, "off": False}[f.snr_floor],
               max_puff_volume_um2_ms=f.max_puff_volume_um2_ms)
    elif f.movie:
      evaluate_annotated(f.workdir, f.movie, f.labels, f.instances, f.pixel_size_nm,
                         f.frame_interval_s, f.camera_offset_adu, f.output,
                         max_puff_volume_um2_ms=f.max_puff_volume_um2_ms,
                         channel=cli.channel_flag(f))
    else:
      evaluate_simulated(f.workdir, f.num_movies, f.seed, f.output,
                         max_puff_volume_um2_ms=f.max_puff_volume_um2_ms)
  except FileNotFoundError as e:
    cli.fail(str(e))
  except (tiff_io.MovieError, predict_lib.UsageError) as e:
    cli.fail(str(e))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
