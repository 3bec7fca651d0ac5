"""How good is the model? Side by side with classical estimators and the Cramér-Rao bound.

  python experiments/accuracy_study.py --workdir=runs/default [--num_movies=2048] \
      [--simulator=project|independent] [--bins=6] [--seed=2024]

On a seeded simulated test set drawn from the run's own priors (D log-uniform over
0.01-10 um^2/s, photons, background and FWHM over their ranges), per D bin:
  model                the trained network; point estimate = what predict reports, the
                       posterior median exp(mean) (``metrics.point_and_interval``)
  cve_localizations    MLE localization of every frame (``baselines.localize``) + CVE
                       with the motion-blur R (Vestergaard et al. 2014)
  msd_localizations    the same localizations + MSD fit with the optimal points
  cve_true_positions   CVE on the true blurred frame positions (no localization
                       error: what is lost to the localization step)
  crlb                 the track Cramér-Rao bound at each movie's own conditions
                       (N = T positions, its localization CRLB, R); reported as the
                       relative standard error, with bias 0
Test sets: ``--simulator=project`` (default) uses the run's own JAX simulator with a
seed never used in training; ``--simulator=independent`` draws the same priors with a
separate numpy implementation (float64, 50 sub-steps per exposure instead of 10,
numpy's Poisson sampler, a different background-tilt draw), i.e. movies the model
was not trained on, as a new user's simulator would make them.

Per estimator and bin (over the movies whose estimate is finite, n):
  relative_bias = mean(r), relative_rmse = sqrt(mean(r^2)), r = (D_est - D) / D;
  median_abs_relative_error = median(|r|);
  rmse_lnD = sqrt(mean((ln max(D_est, D_low / 10) - ln D)^2)) (CVE/MSD can return
             D <= 0; those are floored at a tenth of the prior's lower bound);
  over_cve = relative_rmse / relative_rmse of cve_localizations;
  over_crlb = relative_rmse / CRLB relative SE.
For the crlb row, median_abs_relative_error and rmse_lnD are those of an unbiased
Gaussian estimator at the bound (0.674 x and 1 x the relative SE). The model row also
gets the coverage of its 68% interval.

Writes DIR/accuracy/ (DIR/accuracy_independent/ for the independent simulator):
accuracy.csv (D_low, D_high, estimator, n, relative_bias, relative_rmse),
accuracy_data.npz (per movie: true D, every estimate, the model's mean and log-variance
of ln D, the CRLB),
accuracy_stats.csv (those and median_abs_relative_error, rmse_lnD, over_cve,
over_crlb, coverage_68), accuracy.md (relative RMSE table with model/CVE and
model/CRLB, median |rel| and RMSE ln D tables, the issue-11 table per decade) and
accuracy.png.

Last line: RESULT model_relative_rmse=<float> cve_relative_rmse=<float>
crlb_relative_se=<float> worst_bin_model_over_cve=<float> model_coverage_68=<float>
(the first three and the coverage over the whole test set; worst_bin = the largest
model/CVE ratio of relative RMSE over the bins).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import csv  # noqa: E402
import io  # noqa: E402
import math  # noqa: E402
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
KEYS = dict(zip(ESTIMATORS, ("model", "cve", "msd", "cve_true", "crlb")))
COLUMNS = ("D_low", "D_high", "estimator", "n", "relative_bias", "relative_rmse",
           "median_abs_relative_error", "rmse_lnD", "over_cve", "over_crlb", "coverage_68")
SIMULATORS = ("project", "independent")


# ----------------------------------------------------------- independent simulator
def independent_movies(rng, num, simulator, substeps=50):
  """Movies [num, T, H, W] in ADU from a separate numpy implementation of the physics.

  Same priors and camera as ``simulator`` but written independently: float64,
  ``substeps`` sub-steps per exposure, the PSF integrated over each pixel with
  math.erf differences, numpy's Poisson sampler, Gaussian read noise. Returns
  (frames, D [num], frame positions [num, T, 2] nm = mean of each frame's sub-steps).
  """
  from scipy.special import erf
  geo, pri, cam = simulator.geometry, simulator.priors, simulator.camera
  T, H, W, a = geo.num_frames, geo.height_px, geo.width_px, geo.pixel_size_nm
  lu = lambda lo_hi, n: np.exp(rng.uniform(np.log(lo_hi[0]), np.log(lo_hi[1]), n))
  D = lu(pri.D_um2_per_s, num)
  photons = lu(pri.photons, num)
  bg = lu(pri.background_photons, num)
  fwhm = rng.uniform(pri.psf_fwhm_nm[0], pri.psf_fwhm_nm[1], num)
  grad = rng.uniform(-pri.background_gradient_max, pri.background_gradient_max, (num, 2))
  field = np.array([W * a, H * a])
  start = field / 2 + rng.uniform(-1, 1, (num, 2)) * 0.5 * pri.start_region_fraction * field
  # Sub-step times: centres of `substeps` slices of each exposure, frames every interval.
  t = (np.arange(T)[:, None] * geo.frame_interval_s
       + (np.arange(substeps)[None, :] + 0.5) * geo.exposure_s / substeps).reshape(-1)
  dt = np.diff(t)
  steps = rng.standard_normal((num, dt.size, 2)) * np.sqrt(2 * D[:, None, None] * 1e6
                                                            * dt[None, :, None])
  path = start[:, None] + np.concatenate([np.zeros((num, 1, 2)), np.cumsum(steps, 1)], 1)
  path = path.reshape(num, T, substeps, 2)
  sigma = fwhm / (2 * math.sqrt(2 * math.log(2)))
  edges_x, edges_y = np.arange(W + 1) * a, np.arange(H + 1) * a
  cdf = lambda e, c, s: 0.5 * (1 + erf((e - c[..., None]) / (math.sqrt(2) * s[:, None, None, None])))
  px = np.diff(cdf(edges_x, path[..., 0], sigma), axis=-1)           # [num, T, S, W]
  py = np.diff(cdf(edges_y, path[..., 1], sigma), axis=-1)           # [num, T, S, H]
  spot = np.einsum("ntsh,ntsw->nthw", py, px) * (photons / substeps)[:, None, None, None]
  xs = (np.arange(W) + 0.5) / W - 0.5
  ys = (np.arange(H) + 0.5) / H - 0.5
  tilt = 1 + grad[:, 0, None, None] * xs[None, None, :] + grad[:, 1, None, None] * ys[None, :, None]
  expected = spot + (bg[:, None, None] * tilt)[:, None]
  electrons = rng.poisson(float(cam.qe) * expected).astype(np.float64)
  if cam.model == "emccd":
    electrons = np.where(electrons > 0, rng.gamma(np.maximum(electrons, 1)) * float(cam.em_gain),
                         0.0)
  adu = float(cam.gain_adu_per_e) * (electrons + float(cam.read_noise_e)
                                     * rng.standard_normal(electrons.shape)) + float(cam.offset_adu)
  return adu.astype(np.float32), D, path.mean(axis=2)


# ------------------------------------------------------------------------- study
def run_study(workdir, num_movies, seed, num_bins, chunk, simulator_name="project",
              log=print):
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
  rng = np.random.default_rng(seed)

  @jax.jit
  def make(idx):
    keys = sim_lib.movie_keys(jax.random.key(seed), idx)
    frames, truth = simulator.from_keys(keys)
    return (frames, truth["D_um2_per_s"],
            baselines.frame_positions_nm(truth["positions_nm"], geo.num_frames))

  model_input = jax.jit(lambda frames: normalize.model_input(frames, cam)[0])

  out = {k: [] for k in ("D", "model", "lo", "hi", "cve", "msd", "cve_true", "crlb",
                         "mean_lnD", "log_var")}
  bar = cli.progress(total=num_movies, desc=f"accuracy study ({simulator_name})",
                     unit="movie")
  for start in range(0, num_movies, chunk):
    if simulator_name == "independent":
      frames, D, true_pos = independent_movies(rng, chunk, simulator)
      frames, true_pos = jnp.asarray(frames), jnp.asarray(true_pos, jnp.float32)
    else:
      frames, D, true_pos = make(jnp.arange(start, start + chunk))
    mean, log_var = predict_fn(state, model_input(frames))
    D_model, lo, hi = metrics.point_and_interval(np.asarray(mean), np.asarray(log_var))
    photons = noise.adu_to_photons(frames, cam)
    est = baselines.estimate_movies(photons, geo.pixel_size_nm, geo.frame_interval_s,
                                    geo.exposure_s, fwhm, float(cam.qe), read_in)
    valid = jnp.ones(true_pos.shape[:2], bool)
    D_true_cve, _, _ = jax.vmap(lambda p, v: baselines.cve(p, v, geo.frame_interval_s, R))(
        true_pos, valid)
    D = np.asarray(D)
    crlb = np.asarray(baselines.crlb_D(jnp.asarray(D), jnp.asarray(
        est["crlb_localization_se_nm"]), geo.frame_interval_s, R, geo.num_frames))
    n = min(chunk, num_movies - start)
    for k, v in (("D", D), ("model", D_model), ("lo", lo), ("hi", hi),
                 ("cve", est["D_cve_um2_per_s"]), ("msd", est["D_msd_um2_per_s"]),
                 ("cve_true", np.asarray(D_true_cve)), ("crlb", crlb),
                 ("mean_lnD", mean), ("log_var", log_var)):
      out[k].append(np.asarray(v, np.float64)[:n])
    bar.update(n)
  bar.close()
  data = {k: np.concatenate(v) for k, v in out.items()}
  return bin_rows(data, simulator.priors.D_um2_per_s, num_bins), data, config


def estimator_stats(D, est, floor):
  """(n, bias, relative RMSE, median |rel|, RMSE ln D) over finite estimates."""
  ok = np.isfinite(est)
  if not ok.any():
    return 0, np.nan, np.nan, np.nan, np.nan
  rel = (est[ok] - D[ok]) / D[ok]
  dln = np.log(np.maximum(est[ok], floor)) - np.log(D[ok])
  return (int(ok.sum()), float(rel.mean()), float(np.sqrt(np.mean(rel ** 2))),
          float(np.median(np.abs(rel))), float(np.sqrt(np.mean(dln ** 2))))


def bin_rows(data, D_range, num_bins):
  """One row per (bin, estimator) plus the whole range: a dict per COLUMNS."""
  lo, hi = D_range
  edges = np.logspace(np.log10(lo), np.log10(hi), num_bins + 1)
  edges[-1] *= 1.000001
  rows = []
  for a, b in list(zip(edges[:-1], edges[1:])) + [(lo, hi * 1.000001)]:
    m = (data["D"] >= a) & (data["D"] < b)
    D = data["D"][m]
    stats = {}
    for name in ESTIMATORS:
      if name == "crlb":
        se = data["crlb"][m] / D
        se = se[np.isfinite(se)]
        r = float(np.sqrt(np.mean(se ** 2))) if se.size else np.nan
        stats[name] = (int(se.size), 0.0, r, 0.6745 * r, r)
      else:
        stats[name] = estimator_stats(D, data[KEYS[name]][m], lo / 10)
    cve_rmse, crlb = stats["cve_localizations"][2], stats["crlb"][2]
    for name in ESTIMATORS:
      n, bias, rmse, med, rmse_ln = stats[name]
      cov = np.nan
      if name == "model":
        cov = float(np.mean((D >= data["lo"][m]) & (D <= data["hi"][m]))) if D.size else np.nan
      rows.append(dict(zip(COLUMNS, (a, b, name, n, bias, rmse, med, rmse_ln,
                                     rmse / cve_rmse, rmse / crlb, cov))))
  return rows


def _fmt(v, spec=".4f"):
  return "" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def _label(a, b):
  return "all" if b / a > 100 else f"{a:.3g}-{b:.3g}"


def _csv(rows, columns):
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(columns)
  for r in rows:
    w.writerow([f"{r['D_low']:.4g}", f"{r['D_high']:.4g}", r["estimator"], r["n"]]
               + [_fmt(r[c]) for c in columns[4:]])
  return buf.getvalue()


def write_outputs(rows, out_dir, title, data=None):
  """accuracy.csv (the first six COLUMNS, as before), accuracy_stats.csv (all COLUMNS),
  accuracy.md (returned) and accuracy.png; ``data`` adds the per-decade table."""
  os.makedirs(out_dir, exist_ok=True)
  cli.atomic_write_text(os.path.join(out_dir, "accuracy.csv"), _csv(rows, COLUMNS[:6]))
  cli.atomic_write_text(os.path.join(out_dir, "accuracy_stats.csv"), _csv(rows, COLUMNS))

  bins = sorted({(r["D_low"], r["D_high"]) for r in rows},
                key=lambda ab: (ab[1] / ab[0] > 100, ab[0]))
  get = lambda a, b, name: next(r for r in rows if (r["D_low"], r["D_high"], r["estimator"])
                                == (a, b, name))
  md = [f"### {title}", "",
        "Relative RMSE (relative bias) per D bin; crlb = relative standard error bound; "
        "model/CVE and model/CRLB are ratios of relative RMSE; coverage = model's 68% "
        "interval.", "",
        "| D (um^2/s) | n | " + " | ".join(ESTIMATORS) + " | model/CVE | model/CRLB | coverage |",
        "|---" * (len(ESTIMATORS) + 5) + "|"]
  for a, b in bins:
    cells = []
    for name in ESTIMATORS:
      r = get(a, b, name)
      cells.append(f"{r['relative_rmse']:.3f}" if name == "crlb" else
                   f"{r['relative_rmse']:.3f} ({r['relative_bias']:+.3f})")
    m = get(a, b, "model")
    md.append(f"| {_label(a, b)} | {m['n']} | " + " | ".join(cells)
              + f" | {m['over_cve']:.2f} | {m['over_crlb']:.2f} | {m['coverage_68']:.3f} |")
  for key, what in (("median_abs_relative_error", "Median absolute relative error"),
                    ("rmse_lnD", "RMSE of ln D (estimates <= 0 floored at D_low / 10)")):
    md += ["", f"{what} (crlb: an unbiased Gaussian estimator at the bound)", "",
           "| D (um^2/s) | " + " | ".join(ESTIMATORS) + " |",
           "|---" * (len(ESTIMATORS) + 1) + "|"]
    for a, b in bins:
      md.append(f"| {_label(a, b)} | "
                + " | ".join(f"{get(a, b, n)[key]:.3f}" for n in ESTIMATORS) + " |")
  # The issue-11 table: per decade, model vs MLE localization + CVE.
  if data is not None:
    md += ["", "Per decade (issue 11 format): model vs MLE localization + CVE", "",
           "| D (um^2/s) | model rel. RMSE | CVE rel. RMSE | model median abs rel. err "
           "| CVE median abs rel. err |", "|---|---|---|---|---|"]
  for a, b in metrics.DECADES if data is not None else ():
    m = (data["D"] >= a) & (data["D"] < b)
    if not m.any():
      continue
    sm = estimator_stats(data["D"][m], data["model"][m], a / 100)
    sc = estimator_stats(data["D"][m], data["cve"][m], a / 100)
    md.append(f"| {a:g}-{b:g} | {sm[2]:.2f} | {sc[2]:.2f} | {sm[3]:.2f} | {sc[3]:.2f} |")
  text = "\n".join(md) + "\n"
  cli.atomic_write_text(os.path.join(out_dir, "accuracy.md"), text)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  per_bin = [r for r in rows if r["D_high"] / r["D_low"] < 100]
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for name, style in zip(ESTIMATORS, ("o-", "s-", "^-", "v--", "k-")):
    xs = [math.sqrt(r["D_low"] * r["D_high"]) for r in per_bin if r["estimator"] == name]
    ys = [r["relative_rmse"] for r in per_bin if r["estimator"] == name]
    ax.plot(xs, ys, style, label="CRLB (relative SE)" if name == "crlb" else name,
            lw=2.5 if name == "crlb" else 1.2)
  ax.set(xscale="log", yscale="log", xlabel="true D (um$^2$/s)", ylabel="relative RMSE",
         title=title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "accuracy.png"), dpi=120)
  plt.close(fig)
  return text


def result_line(rows) -> str:
  total = {r["estimator"]: r for r in rows if r["D_high"] / r["D_low"] > 100}
  per_bin = [r for r in rows if r["estimator"] == "model" and r["D_high"] / r["D_low"] < 100]
  worst = max(r["over_cve"] for r in per_bin)
  return (f"RESULT model_relative_rmse={total['model']['relative_rmse']:.4f} "
          f"cve_relative_rmse={total['cve_localizations']['relative_rmse']:.4f} "
          f"crlb_relative_se={total['crlb']['relative_rmse']:.4f} "
          f"worst_bin_model_over_cve={worst:.4f} "
          f"model_coverage_68={total['model']['coverage_68']:.4f}")


def _define_flags():
  """Flags exist only when run as a command (importing this module defines none)."""
  flags.DEFINE_string("workdir", "runs/default", "Trained run folder.")
  flags.DEFINE_integer("num_movies", 2048, "Test movies.")
  flags.DEFINE_integer("seed", 2024, "Test-set seed.")
  flags.DEFINE_integer("bins", 6, "Log-spaced D bins over the prior range.")
  flags.DEFINE_integer("chunk", 128, "Movies per device call.")
  flags.DEFINE_enum("simulator", "project", SIMULATORS,
                    "Test movies from the run's simulator or an independent numpy one.")


def main(argv):
  del argv
  cli.quiet_logs()
  f = flags.FLAGS
  if not os.path.isdir(os.path.join(f.workdir, "checkpoints")):
    cli.fail(f"--workdir={f.workdir}: no trained run there; train one first")
  if f.num_movies < 2 * f.bins:
    cli.fail("--num_movies must be at least twice --bins")
  t0 = time.time()
  rows, data, config = run_study(f.workdir, f.num_movies, f.seed, f.bins, f.chunk,
                                 f.simulator)
  out_dir = os.path.join(f.workdir, "accuracy" if f.simulator == "project"
                         else f"accuracy_{f.simulator}")
  text = write_outputs(rows, out_dir, f"{config.model.name}, {f.num_movies} test "
                       f"movies ({f.simulator} simulator, seed {f.seed})", data)
  np.savez_compressed(os.path.join(out_dir, "accuracy_data.npz"), **data)
  print(text)
  print(f"wrote {out_dir}/accuracy.csv, accuracy.md, accuracy.png in {time.time() - t0:.0f} s")
  print(result_line(rows))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
