"""How good is the model? Side by side with classical estimators and the Cramér-Rao bound.

  python experiments/accuracy_study.py --workdir=runs/default [--num_movies=2048]

On a seeded simulated test set drawn from the run's own priors (D log-uniform over
0.01-10 um^2/s, photons and background over their ranges), per D bin:
  model                the trained network (posterior median)
  cve_localizations    MLE localization of every frame + CVE (motion-blur R)
  msd_localizations    the same localizations + MSD fit with the optimal points
  cve_true_positions   CVE on the true blurred frame positions (no localization
                       error: what is lost to the localization step)
  crlb                 the track Cramér-Rao bound at each movie's own conditions
                       (N = T positions, its localization CRLB, R); reported as the
                       relative standard error, with bias 0
relative_bias = mean((D_est - D) / D), relative_rmse = sqrt(mean(((D_est - D) / D)^2))
over the movies whose estimate is finite (n). Writes DIR/accuracy/accuracy.csv
(D_low, D_high, estimator, n, relative_bias, relative_rmse), accuracy.md and
accuracy.png (relative RMSE vs D with the CRLB curve).

Last line: RESULT model_relative_rmse=<float> cve_relative_rmse=<float>
crlb_relative_se=<float> (over the whole test set).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import csv  # noqa: E402
import io  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from smlm_jax.core import cli, noise, trainer  # noqa: E402
from smlm_jax.diffusion import baselines, camera_setup, metrics, normalize  # noqa: E402
from smlm_jax.diffusion import simulator as sim_lib  # noqa: E402


ESTIMATORS = ("model", "cve_localizations", "msd_localizations", "cve_true_positions",
              "crlb")


def run_study(workdir, num_movies, seed, num_bins, chunk, log=print):
  mesh = trainer.make_mesh()
  config, task, state = trainer.load_run(workdir, mesh)
  simulator = task.simulator
  predict_fn = task.predict_fn(mesh)
  geo = simulator.geometry
  R = geo.exposure_s / (6 * geo.frame_interval_s)
  fwhm = float(np.mean(simulator.priors.psf_fwhm_nm))
  cam = simulator.camera
  read_in = float(camera_setup.data_camera(config.sim.camera)[0].read_noise_e)
  chunk = trainer.divisible_batch(chunk, mesh)

  @jax.jit
  def make(idx):
    keys = sim_lib.movie_keys(jax.random.key(seed), idx)
    frames, truth = simulator.from_keys(keys)
    x, _, _ = normalize.model_input(frames, cam)
    return frames, x, truth

  out = {k: [] for k in ("D", "model", "cve", "msd", "cve_true", "crlb")}
  bar = cli.progress(total=num_movies, desc="accuracy study", unit="movie")
  for start in range(0, num_movies, chunk):
    frames, x, truth = make(jnp.arange(start, start + chunk))
    mean, log_var = predict_fn(state, x)
    D_model, _, _ = metrics.point_and_interval(np.asarray(mean), np.asarray(log_var))
    photons = noise.adu_to_photons(frames, cam)
    est = baselines.estimate_movies(photons, geo.pixel_size_nm, geo.frame_interval_s,
                                    geo.exposure_s, fwhm, float(cam.qe), read_in)
    true_pos = baselines.frame_positions_nm(truth["positions_nm"], geo.num_frames)
    valid = jnp.ones(true_pos.shape[:2], bool)
    D_true_cve, _, _ = jax.vmap(lambda p, v: baselines.cve(p, v, geo.frame_interval_s, R))(
        true_pos, valid)
    D = np.asarray(truth["D_um2_per_s"])
    crlb = np.asarray(baselines.crlb_D(jnp.asarray(D), jnp.asarray(
        est["crlb_localization_se_nm"]), geo.frame_interval_s, R, geo.num_frames))
    n = min(chunk, num_movies - start)
    for k, v in (("D", D), ("model", D_model), ("cve", est["D_cve_um2_per_s"]),
                 ("msd", est["D_msd_um2_per_s"]), ("cve_true", np.asarray(D_true_cve)),
                 ("crlb", crlb)):
      out[k].append(np.asarray(v)[:n])
    bar.update(n)
  bar.close()
  data = {k: np.concatenate(v) for k, v in out.items()}
  lo, hi = simulator.priors.D_um2_per_s
  edges = np.logspace(np.log10(lo), np.log10(hi), num_bins + 1)
  edges[-1] *= 1.000001
  rows = []
  for a, b in list(zip(edges[:-1], edges[1:])) + [(lo, hi * 1.000001)]:
    m = (data["D"] >= a) & (data["D"] < b)
    for name, key in zip(ESTIMATORS, ("model", "cve", "msd", "cve_true", "crlb")):
      D = data["D"][m]
      if key == "crlb":
        rel_se = data["crlb"][m] / D
        ok = np.isfinite(rel_se)
        rows.append((a, b, name, int(ok.sum()), 0.0, float(np.sqrt(np.mean(rel_se[ok] ** 2)))))
        continue
      e = data[key][m]
      ok = np.isfinite(e)
      rel = (e[ok] - D[ok]) / D[ok]
      rows.append((a, b, name, int(ok.sum()), float(rel.mean()) if rel.size else np.nan,
                   float(np.sqrt(np.mean(rel ** 2))) if rel.size else np.nan))
  return rows, data, config


def write_outputs(rows, out_dir, title):
  os.makedirs(out_dir, exist_ok=True)
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(("D_low", "D_high", "estimator", "n", "relative_bias", "relative_rmse"))
  for r in rows:
    w.writerow((f"{r[0]:.4g}", f"{r[1]:.4g}", r[2], r[3], f"{r[4]:.4f}", f"{r[5]:.4f}"))
  cli.atomic_write_text(os.path.join(out_dir, "accuracy.csv"), buf.getvalue())
  md = [f"### {title}", "", "relative RMSE (relative bias) per D bin; CRLB = relative "
        "standard error bound", ""]
  bins = sorted({(r[0], r[1]) for r in rows}, key=lambda ab: (ab[1] / ab[0] > 100, ab[0]))
  md.append("| D (um^2/s) | " + " | ".join(ESTIMATORS) + " |")
  md.append("|---" * (len(ESTIMATORS) + 1) + "|")
  for a, b in bins:
    cells = []
    for name in ESTIMATORS:
      r = next(r for r in rows if (r[0], r[1], r[2]) == (a, b, name))
      cells.append(f"{r[5]:.3f}" if name == "crlb" else f"{r[5]:.3f} ({r[4]:+.3f})")
    label = "all" if (a, b) == bins[-1] and b / a > 100 else f"{a:.3g}-{b:.3g}"
    md.append(f"| {label} | " + " | ".join(cells) + " |")
  text = "\n".join(md) + "\n"
  cli.atomic_write_text(os.path.join(out_dir, "accuracy.md"), text)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  per_bin = [r for r in rows if r[1] / r[0] < 100]
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for name, style in zip(ESTIMATORS, ("o-", "s-", "^-", "v--", "k-")):
    pts = [(np.sqrt(r[0] * r[1]), r[5]) for r in per_bin if r[2] == name]
    xs, ys = zip(*pts)
    ax.plot(xs, ys, style, label="CRLB (relative SE)" if name == "crlb" else name,
            lw=2.5 if name == "crlb" else 1.2)
  ax.set(xscale="log", yscale="log", xlabel="true D (um$^2$/s)", ylabel="relative RMSE",
         title=title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "accuracy.png"), dpi=120)
  plt.close(fig)
  return text


def _define_flags():
  """Flags exist only when run as a command (importing this module defines none)."""
  flags.DEFINE_string("workdir", "runs/default", "Trained run folder.")
  flags.DEFINE_integer("num_movies", 2048, "Test movies.")
  flags.DEFINE_integer("seed", 2024, "Test-set seed.")
  flags.DEFINE_integer("bins", 6, "Log-spaced D bins over the prior range.")
  flags.DEFINE_integer("chunk", 128, "Movies per device call.")


def main(argv):
  del argv
  cli.quiet_logs()
  if not os.path.isdir(os.path.join(flags.FLAGS.workdir, "checkpoints")):
    cli.fail(f"--workdir={flags.FLAGS.workdir}: no trained run there; train one first")
  if flags.FLAGS.num_movies < 2 * flags.FLAGS.bins:
    cli.fail("--num_movies must be at least twice --bins")
  t0 = time.time()
  rows, data, config = run_study(flags.FLAGS.workdir, flags.FLAGS.num_movies, flags.FLAGS.seed, flags.FLAGS.bins,
                                 flags.FLAGS.chunk)
  out_dir = os.path.join(flags.FLAGS.workdir, "accuracy")
  text = write_outputs(rows, out_dir, f"{config.model.name}, {flags.FLAGS.num_movies} test movies "
                       f"(seed {flags.FLAGS.seed})")
  print(text)
  print(f"wrote {out_dir}/accuracy.csv, accuracy.md, accuracy.png in {time.time() - t0:.0f} s")
  total = {r[2]: r for r in rows if r[1] / r[0] > 100}
  print(f"RESULT model_relative_rmse={total['model'][5]:.4f} "
        f"cve_relative_rmse={total['cve_localizations'][5]:.4f} "
        f"crlb_relative_se={total['crlb'][5]:.4f}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
