"""How far are simulated event crops from real ones? A number, statistics, a picture.

  python experiments/events_domain_gap.py [--calibration=events_calibration.json] \
      [--workdir=runs/events_gap] [--num_sim=1024] [--classifier=both|logreg|cnn]

Real: the usable iSIM crops of ``../shared/real-data/events_isim`` (``--real``; crops
without structure are left out, :mod:`smlm_jax.events.quality`), cut into
``crop_px`` tiles of ``data.num_frames``-frame windows (the model's input).
Simulated: ``--num_sim`` windows of the default simulator, or of the calibrated one
(``--calibration``, from ``python -m smlm_jax.events.calibrate``).

Classifiers told to separate real from simulated windows, scored on held-out data
split by REAL CROP (leave one crop out; the simulated windows in as many disjoint
folds), so a classifier cannot recognise a crop it has seen: balanced accuracy (mean
of the real and simulated recalls; 0.5 = indistinguishable):
  logreg  logistic regression (L2, standardized) on the 19 window statistics of
          :mod:`smlm_jax.events.statistics` (normalized intensity quantiles, radial
          power spectrum, noise, autocorrelation = tubule width, frame change,
          column stripes)
  cnn     a small CNN (3 conv layers, 8-16-32 channels, global mean) on the
          normalized windows themselves (the model's view), 300 Adam steps
``real_vs_sim_accuracy`` is the larger of the two (the gap the stronger one sees).

Also printed: per statistic the 10/50/90% quantiles, real vs simulated; written:
WORKDIR/gap_statistics.png (quantile curves), WORKDIR/gap_patches.png (real and
simulated windows side by side), WORKDIR/gap.json.
Last line: RESULT real_vs_sim_accuracy=... logreg_accuracy=... cnn_accuracy=...
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from configs import events  # noqa: E402
from smlm_jax.core import cli  # noqa: E402
from smlm_jax.events import statistics as stats_lib  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "real-data", "events_isim")


def real_windows(folder, n, size):
  """(windows [N, n, s, s], crop index per window, crop ids) of the usable crops."""
  from smlm_jax.events import annotate, quality
  from smlm_jax.events import db as db_lib
  wins, groups, ids = [], [], []
  for f in db_lib.find_folders([folder])[0]:
    frames, _ = annotate.read_frames(os.path.join(f, "images.tif"))
    if not quality.usable(quality.structure_snr(frames)):
      print(f"left out (no structure): {os.path.basename(f)}")
      continue
    w = stats_lib.tiles(frames, n, size)
    wins.append(w)
    groups += [len(ids)] * len(w)
    ids.append(os.path.basename(f))
  return np.concatenate(wins), np.asarray(groups), ids


def sim_windows(config, num, seed, calibration=None):
  import jax
  from smlm_jax.events import calibrate, simulate as sim_lib
  sim = calibrate.apply(config.sim, calibration) if calibration else config.sim.to_dict()
  p = sim_lib.SimParams.from_config({**sim, "size_px": int(config.crop_px)})
  make = jax.jit(lambda k: sim_lib.batch(k, p, int(config.data.num_frames))[0])
  keys = jax.random.split(jax.random.key(seed), num)
  return np.concatenate([np.asarray(make(keys[i:i + 128])) for i in range(0, num, 128)])


def balanced_accuracy(pred, y):
  return 0.5 * (np.mean(pred[y == 1] == 1) + np.mean(pred[y == 0] == 0))


def logreg_fold(xtr, ytr, xte, l2=1.0):
  from scipy.optimize import minimize
  mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
  a, b = (xtr - mu) / sd, (xte - mu) / sd
  w_pos = 0.5 / max(ytr.mean(), 1e-6)
  weights = np.where(ytr == 1, w_pos, 0.5 / max(1 - ytr.mean(), 1e-6))

  def f(wb):
    z = a @ wb[:-1] + wb[-1]
    loss = np.sum(weights * (np.logaddexp(0, z) - ytr * z)) / len(ytr)
    p = 1 / (1 + np.exp(-z))
    g = a.T @ (weights * (p - ytr)) / len(ytr)
    return (loss + 0.5 * l2 * np.sum(wb[:-1] ** 2) / len(ytr),
            np.append(g + l2 * wb[:-1] / len(ytr), np.sum(weights * (p - ytr)) / len(ytr)))

  wb = minimize(f, np.zeros(a.shape[1] + 1), jac=True, method="L-BFGS-B").x
  return (b @ wb[:-1] + wb[-1] > 0).astype(int)


def cnn_fold(xtr, ytr, xte, steps=300, seed=0):
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  import optax
  from smlm_jax.events import data as data_lib

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      for c in (8, 16, 32):
        x = nn.relu(nn.Conv(c, (3, 3), strides=2)(x))
      return nn.Dense(1)(jnp.mean(x, axis=(1, 2)))[:, 0]

  prep = jax.jit(lambda w: jnp.moveaxis(data_lib.normalize(w), 1, -1))
  xtr, xte = np.asarray(prep(xtr)), np.asarray(prep(xte))
  net = Net()
  params = net.init(jax.random.key(seed), xtr[:2])
  opt = optax.adam(2e-3)
  state = opt.init(params)
  w1 = 0.5 / ytr.mean()
  w0 = 0.5 / (1 - ytr.mean())

  @jax.jit
  def step(params, state, x, y):
    def loss(p):
      z = net.apply(p, x)
      wt = jnp.where(y == 1, w1, w0)
      return jnp.mean(wt * optax.sigmoid_binary_cross_entropy(z, y))
    g = jax.grad(loss)(params)
    upd, state = opt.update(g, state)
    return optax.apply_updates(params, upd), state

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(len(xtr), size=64)
    params, state = step(params, state, xtr[idx], ytr[idx].astype(np.float32))
  apply = jax.jit(net.apply)
  z = np.concatenate([np.asarray(apply(params, xte[i:i + 256]))
                      for i in range(0, len(xte), 256)])
  return (z > 0).astype(int)


def cross_validate(classify, features_real, features_sim, groups, num_folds):
  """Balanced accuracy per fold: fold k holds out real crop k and sim fold k."""
  sim_fold = np.arange(len(features_sim)) % num_folds
  accs = []
  for k in range(num_folds):
    tr_r, te_r = features_real[groups != k], features_real[groups == k]
    tr_s, te_s = features_sim[sim_fold != k], features_sim[sim_fold == k]
    xtr = np.concatenate([tr_r, tr_s])
    ytr = np.concatenate([np.ones(len(tr_r), int), np.zeros(len(tr_s), int)])
    xte = np.concatenate([te_r, te_s])
    yte = np.concatenate([np.ones(len(te_r), int), np.zeros(len(te_s), int)])
    accs.append(balanced_accuracy(classify(xtr, ytr, xte), yte))
  return accs


def run(real_dir, workdir, calibration, num_sim, classifier, seed, log=print):
  import jax
  from smlm_jax.events import plots
  config = events.get_config()
  n, size = int(config.data.num_frames), int(config.crop_px)
  real, groups, ids = real_windows(real_dir, n, size)
  sim = sim_windows(config, num_sim, seed, calibration)
  stat = jax.jit(stats_lib.window_statistics)
  fr = np.concatenate([np.asarray(stat(real[i:i + 256])) for i in range(0, len(real), 256)])
  fs = np.concatenate([np.asarray(stat(sim[i:i + 256])) for i in range(0, len(sim), 256)])
  label = "calibrated" if calibration else "default"
  log(f"real: {len(real)} windows of {len(ids)} usable crops; simulated ({label}): "
      f"{len(sim)} windows; {n} frames of {size} px")
  log(f"{'statistic':<10}{'real q10 / q50 / q90':>26}{'simulated q10 / q50 / q90':>30}")
  for i, name in enumerate(stats_lib.NAMES):
    r, s = np.quantile(fr[:, i], [0.1, 0.5, 0.9]), np.quantile(fs[:, i], [0.1, 0.5, 0.9])
    log(f"{name:<10}{r[0]:>10.3f}{r[1]:>8.3f}{r[2]:>8.3f}{s[0]:>14.3f}{s[1]:>8.3f}{s[2]:>8.3f}")
  results = {}
  if classifier in ("both", "logreg"):
    results["logreg"] = cross_validate(logreg_fold, fr, fs, groups, len(ids))
  if classifier in ("both", "cnn"):
    results["cnn"] = cross_validate(lambda a, b, c: cnn_fold(a, b, c, seed=seed),
                                    real, sim, groups, len(ids))
  for name, accs in results.items():
    log(f"{name}: held-out balanced accuracy {np.mean(accs):.3f} (per held-out crop "
        + " ".join(f"{a:.2f}" for a in accs) + ")")
  q = lambda a: np.quantile(a, stats_lib.QUANTILES, axis=0).T
  plots.plot_statistics({name: {"real": a, "simulated": b} for name, a, b in
                         zip(stats_lib.NAMES, q(fr), q(fs))},
                        os.path.join(workdir, "gap_statistics.png"),
                        f"real (black) vs {label} simulation (red): quantiles 0.1-0.9")
  rng = np.random.default_rng(seed)
  plots.plot_patches({"real": real[rng.choice(len(real), 8, replace=False)],
                      f"sim ({label})": sim[:8]},
                     os.path.join(workdir, "gap_patches.png"))
  out = {"simulation": label, "calibration": calibration, "num_real": int(len(real)),
         "num_sim": int(len(sim)), "crops": ids,
         "accuracy": {k: float(np.mean(v)) for k, v in results.items()},
         "per_fold": results}
  cli.atomic_write_text(os.path.join(workdir, "gap.json"),
                        json.dumps(out, indent=1, default=float))
  return out


def main(argv):
  del argv
  f = flags.FLAGS
  cli.quiet_logs()
  if not os.path.isdir(f.real):
    cli.fail(f"{f.real} not found (the real iSIM crops)")
  if f.classifier not in ("both", "logreg", "cnn"):
    cli.fail("--classifier: both, logreg or cnn")
  if f.calibration and not os.path.isfile(f.calibration):
    cli.fail(f"--calibration={f.calibration}: no such file")
  os.makedirs(f.workdir, exist_ok=True)
  t0 = time.time()
  out = run(f.real, f.workdir, f.calibration, f.num_sim, f.classifier, f.seed)
  acc = out["accuracy"]
  print(f"({time.time() - t0:.0f} s)")
  print(f"RESULT real_vs_sim_accuracy={max(acc.values()):.3f} "
        + " ".join(f"{k}_accuracy={v:.3f}" for k, v in acc.items())
        + f" simulation={out['simulation']}")


if __name__ == "__main__":
  flags.DEFINE_string("real", SHARED, "Folder of real crop folders.")
  flags.DEFINE_string("workdir", "runs/events_gap", "Output folder.")
  flags.DEFINE_string("calibration", None, "Calibration JSON (default: uncalibrated).")
  flags.DEFINE_integer("num_sim", 1024, "Simulated windows.")
  flags.DEFINE_string("classifier", "both", "both | logreg | cnn")
  flags.DEFINE_integer("seed", 0, "Seed of the simulated windows and the CNN.")
  app.run(main, flags_parser=cli.parse_flags)
