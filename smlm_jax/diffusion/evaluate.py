"""Re-evaluates the latest checkpoint of a run on a fresh, seeded simulated test set.

  python -m smlm_jax.diffusion.evaluate --workdir=runs/default [--num_movies=2048] [--seed=777]

Writes DIR/eval/metrics.json (relative_rmse, median_relative_error, rmse_log10_D,
coverage_68, per-decade values) and two PNG plots: predicted vs. true D on log axes
(with 68% intervals) and relative error vs. D.
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

import json
import os

from absl import app, flags
import numpy as np

from smlm_jax.core import cli
from smlm_jax.diffusion import metrics as metrics_lib



def evaluate_run(workdir: str, num_movies: int, seed: int) -> dict:
  from smlm_jax.core import trainer
  mesh = trainer.make_mesh()
  config, task, state = trainer.load_run(workdir, mesh)
  x, D_true = task.simulate_set(num_movies, seed, mesh)
  mean, log_var = task.predict(state, x, mesh)
  metrics = metrics_lib.d_metrics(D_true, mean, log_var)
  metrics["step"] = int(state["step"])
  metrics["seed"] = seed
  out = os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  cli.atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1))
  plot_predictions(D_true, mean, log_var, out, title=f"{config.model.name}, step "
                   f"{metrics['step']}, {num_movies} test movies")
  print(metrics_lib.summary_table(metrics, title=f"test set ({num_movies} movies, seed {seed})"))
  print(f"wrote {out}/metrics.json, {out}/pred_vs_true.png, {out}/relative_error.png")
  return metrics


def plot_predictions(D_true, mean, log_var, out_dir, title=""):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  D_pred, lo, hi = metrics_lib.point_and_interval(mean, log_var)
  fig, ax = plt.subplots(figsize=(5.5, 5))
  ax.errorbar(D_true, D_pred, yerr=[D_pred - lo, hi - D_pred], fmt=".", ms=3, alpha=0.35,
              elinewidth=0.5, label="prediction, 68% interval")
  lim = [min(D_true.min(), D_pred.min()) / 1.5, max(D_true.max(), D_pred.max()) * 1.5]
  ax.plot(lim, lim, "k--", lw=1, label="y = x")
  ax.set(xscale="log", yscale="log", xlim=lim, ylim=lim, xlabel="true D (um$^2$/s)",
         ylabel="predicted D (um$^2$/s)", title=title)
  ax.legend(loc="upper left")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "pred_vs_true.png"), dpi=120)
  plt.close(fig)
  rel = metrics_lib.relative_errors(D_true, D_pred)
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(D_true, rel, ".", ms=3, alpha=0.4)
  bins = np.logspace(np.log10(D_true.min()), np.log10(D_true.max()), 13)
  centers, rmse = [], []
  for a, b in zip(bins[:-1], bins[1:]):
    m = (D_true >= a) & (D_true < b)
    if m.sum() > 3:
      centers.append(np.sqrt(a * b))
      rmse.append(np.sqrt(np.mean(rel[m] ** 2)))
  ax.plot(centers, rmse, "r-o", label="relative RMSE per bin")
  ax.axhline(0, color="k", lw=0.8)
  ax.set(xscale="log", xlabel="true D (um$^2$/s)", ylabel="(D_pred - D) / D", title=title,
         ylim=(-1.5, 3))
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "relative_error.png"), dpi=120)
  plt.close(fig)


def _define_flags():
  """Flags exist only when run as a command (importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "Training run folder.")
  flags.DEFINE_integer("num_movies", 2048, "Test movies to simulate.")
  flags.DEFINE_integer("seed", 777, "Test-set seed (differs from validation).")


def main(argv):
  cli.quiet_logs()
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS.workdir:
    cli.fail("--workdir is required")
  if flags.FLAGS.num_movies < 1:
    cli.fail("--num_movies must be >= 1")
  if not os.path.isdir(flags.FLAGS.workdir):
    cli.fail(f"--workdir={flags.FLAGS.workdir}: no such folder (a trained run)")
  cli.check_writable(os.path.join(flags.FLAGS.workdir, "eval"), "workdir", folder=True)
  try:
    evaluate_run(flags.FLAGS.workdir, flags.FLAGS.num_movies, flags.FLAGS.seed)
  except FileNotFoundError as e:
    cli.fail(str(e))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
