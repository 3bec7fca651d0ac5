"""Calibrate the event simulator to real movies (no labels needed), by gradient descent.

  python -m smlm_jax.events.calibrate --input=CROPS_OR_MOVIES [--input=...] \
      --output=events_calibration.json [--plot=calibration.png] [--steps=150] \
      [--num_tubules="1,4;2,6"] [--config=configs/events.py] [--channel=0]
  python -m smlm_jax.train --config=configs/events.py \
      --config.data.calibration=events_calibration.json ...

Inputs: TIFF movies [T, H, W] (or [T, C, H, W]: --channel, default 0, as events
predict), crop folders (their images.tif), or folders holding
either (ground_truth.tif and *_prob.tif are skipped). An input without structure
(:mod:`.quality`) is left out with a ``note:``. Each input is cut into ``crop_px``
tiles of ``data.num_frames``-frame windows (the model's input); their
:func:`.statistics.window_statistics` (normalized intensity quantiles, radial power
spectrum, pixel noise, autocorrelation = tubule width, frame-to-frame change) are
the target.

Fit (as ``smlm_jax.diffusion.calibrate`` does for blur): a set of ``num_sim``
simulated windows whose random numbers are drawn once (fixed keys; the camera noise
reparameterized as Gaussian with the shot + read variance, fixed normals), so the
simulated statistics are a smooth function of the continuous simulator parameters
(:func:`.simulate.scene`); Adam on the distance between the quantiles of the real and
simulated statistics (:func:`.statistics.quantile_distance`), keeping the best step.
Fitted: PSF sigma, tubule diameter / length / peak photons / background ranges
(each a centre and a log half-width), labelling modulation, drift between frames
(motion), per-frame flicker and the column stripes (``column_gain_rel_std``, seen by
the ``stripes`` statistic; it starts from 0.03 when the config has 0, so
``loss_initial`` is that of the default simulator with 3% stripes). Network density (``num_tubules``, a static shape) is
chosen on a grid, the lowest loss winning. Not fitted: pixel size (from the
metadata), the camera (gain, offset and read noise stay those of the config: after
the model's normalization only the signal-to-noise ratio matters, which the photon
ranges carry), the event's own shape and timing (neck width, rate: the unannotated
frames hold too few divisions to measure them; they keep the config's priors), and
photobleaching (a global per-window factor, removed by the normalization).

Output JSON: ``sim`` (config.sim fields to override), ``fit`` (losses, steps, grid),
``statistics`` (per statistic the quantiles of real / initial / calibrated windows),
``inputs`` and ``skipped``. ``config.data.calibration=FILE`` applies ``sim``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import numpy as np

from smlm_jax.core import cli
from smlm_jax.events import quality
from smlm_jax.events import statistics as stats_lib

RANGES = ("diameter_nm", "length_um", "photons", "background_photons")
SCALARS = ("psf_sigma_nm", "drift_px", "flicker", "column_gain_rel_std")
# Log-parameterized scalars start at least here (a default of 0 = "off" has no log).
STARTS = {"column_gain_rel_std": 0.03}
# Plausible limits of the fitted values (clipped): iSIM PSF sigma 40-200 nm; tubules
# 100 nm - 2 um wide, 0.2-20 um long; 1-5000 photons peak, 0.05-100 background.
LIMITS = {"psf_sigma_nm": (40.0, 200.0), "diameter_nm": (100.0, 2000.0),
          "length_um": (0.2, 20.0), "photons": (1.0, 5000.0),
          "background_photons": (0.05, 100.0), "drift_px": (0.01, 5.0),
          "flicker": (0.001, 0.5), "column_gain_rel_std": (0.001, 0.5)}


def theta_from_params(p) -> dict:
  """Unconstrained parameters of SimParams p: log scalars, ranges as (log centre, log
  log half-width), modulation as a logit."""
  theta = {k: math.log(max(getattr(p, k), STARTS.get(k, 0.0))) for k in SCALARS}
  for k in RANGES:
    lo, hi = getattr(p, k)
    theta[k] = [0.5 * (math.log(lo) + math.log(hi)),
                math.log(max(0.5 * (math.log(hi) - math.log(lo)), 1e-3))]
  m = min(max(p.modulation, 1e-3), 1 - 1e-3)
  theta["modulation"] = math.log(m / (1 - m))
  return theta


def values_from_theta(theta) -> dict:
  """{field: value} (jnp or float) of unconstrained theta, clipped to LIMITS."""
  import jax
  import jax.numpy as jnp
  out = {k: jnp.clip(jnp.exp(theta[k]), *LIMITS[k]) for k in SCALARS}
  for k in RANGES:
    c, h = theta[k][0], jnp.exp(theta[k][1])
    out[k] = (jnp.clip(jnp.exp(c - h), *LIMITS[k]), jnp.clip(jnp.exp(c + h), *LIMITS[k]))
  out["modulation"] = jax.nn.sigmoid(theta["modulation"])
  return out


def make_sim_statistics(base, num_frames: int, num_sim: int, seed: int):
  """(theta -> [num_sim, K] statistics) with every random number fixed here."""
  import jax
  import jax.numpy as jnp
  from smlm_jax.events import simulate as sim_lib
  keys = jax.random.split(jax.random.key(seed), num_sim)
  z = jax.random.normal(jax.random.key(seed + 1),
                        (num_sim, num_frames, base.size_px, base.size_px))
  qe, read = base.qe, base.read_noise_e

  @jax.jit
  def stats(theta):
    p = dataclasses.replace(base, **values_from_theta(theta))
    photons = jax.vmap(lambda k: sim_lib.scene(k, p, num_frames)[0])(keys)
    electrons = qe * photons
    frames = electrons + jnp.sqrt(electrons + read ** 2) * z
    return stats_lib.window_statistics(frames)

  return stats


def fit(real_stats: np.ndarray, base, num_frames: int, steps: int = 150,
        num_sim: int = 96, learning_rate: float = 0.05, seed: int = 0, log=None) -> dict:
  """Adam from ``base``'s values; {'theta', 'values', 'loss_initial', 'loss', 'step',
  'initial_stats', 'stats'} of the best step."""
  import jax
  import jax.numpy as jnp
  import optax
  scale = jnp.asarray(stats_lib.robust_scale(real_stats))
  real = jnp.asarray(real_stats)
  sim_stats = make_sim_statistics(base, num_frames, num_sim, seed)
  def loss_fn(th, r, sc):
    simulated = sim_stats(th)
    return stats_lib.quantile_distance(r, simulated, sc), simulated

  # The real statistics are arguments, not constants (XLA would fold them slowly).
  vg = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  value_and_grad = lambda th: vg(th, real, scale)
  theta = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), theta_from_params(base))
  opt = optax.adam(learning_rate)
  state = opt.init(theta)
  best = (math.inf, theta, 0, None)
  initial = None
  for step in range(steps + 1):
    (loss, simulated), grad = value_and_grad(theta)
    loss = float(loss)
    initial = (loss, simulated) if initial is None else initial
    if math.isfinite(loss) and loss < best[0]:
      best = (loss, theta, step, simulated)
    if log and (step % 25 == 0 or step == steps):
      log(f"  step {step:4d}  loss {loss:.4f}")
    if step == steps:
      break
    grad = jax.tree.map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), grad)
    updates, state = opt.update(grad, state)
    theta = optax.apply_updates(theta, updates)
  loss, theta, step, simulated = best
  values = jax.tree.map(float, values_from_theta(theta))
  return {"theta": theta, "values": values, "loss_initial": initial[0], "loss": loss,
          "step": step, "initial_stats": np.asarray(initial[1]),
          "stats": np.asarray(simulated)}


def sim_overrides(values: dict, num_tubules) -> dict:
  """config.sim fields of fitted values (ranges as [lo, hi] lists)."""
  out = {k: ([round(float(v[0]), 4), round(float(v[1]), 4)] if isinstance(v, (tuple, list))
             else round(float(v), 4)) for k, v in values.items()}
  out["num_tubules"] = [int(num_tubules[0]), int(num_tubules[1])]
  return out


def calibrate(windows: np.ndarray, sim_config, crop_px: int, num_frames: int,
              num_tubules_grid=None, steps: int = 150, num_sim: int = 96,
              learning_rate: float = 0.05, seed: int = 0, log=print) -> dict:
  """The calibration record (see the module docstring) of real windows [N, n, c, c]."""
  from smlm_jax.events import simulate as sim_lib
  import jax
  real_stats = np.asarray(jax.jit(stats_lib.window_statistics)(windows))
  grid = num_tubules_grid or [tuple(sim_config.num_tubules)]
  results = []
  for nt in grid:
    base = sim_lib.SimParams.from_config({**sim_config.to_dict(), "size_px": crop_px,
                                          "num_tubules": tuple(nt)})
    log(f"num_tubules {tuple(nt)}: fitting {len(theta_from_params(base))} parameter "
        f"groups to {len(windows)} real windows with {num_sim} simulated ones")
    results.append((nt, fit(real_stats, base, num_frames, steps, num_sim, learning_rate,
                            seed, log)))
  nt, best = min(results, key=lambda r: r[1]["loss"])
  q = lambda a: np.quantile(a, stats_lib.QUANTILES, axis=0).T.round(4).tolist()
  return {"sim": sim_overrides(best["values"], nt),
          "fit": {"loss_initial": best["loss_initial"], "loss": best["loss"],
                  "best_step": best["step"], "steps": steps, "num_sim": num_sim,
                  "num_windows": int(len(windows)), "crop_px": crop_px,
                  "num_frames": num_frames, "quantiles": list(stats_lib.QUANTILES),
                  "grid": {str(tuple(n)): r["loss"] for n, r in results}},
          "statistics": {name: {"real": a, "initial": b, "calibrated": c}
                         for name, a, b, c in zip(stats_lib.NAMES, q(real_stats),
                                                  q(best["initial_stats"]),
                                                  q(best["stats"]))}}


def load(path: str) -> dict:
  """A calibration file's config.sim overrides; ValueError (one line) if unusable."""
  try:
    with open(path) as f:
      record = json.load(f)
  except OSError as e:
    raise ValueError(f"calibration {path}: cannot read ({e.strerror})") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"calibration {path}: not JSON ({e})") from None
  if not isinstance(record, dict) or not isinstance(record.get("sim"), dict):
    raise ValueError(f"calibration {path}: no 'sim' mapping (write it with python -m "
                     "smlm_jax.events.calibrate)")
  return record["sim"]


def apply(sim_config, path: str) -> dict:
  """{**sim_config, **overrides of the calibration file} as a plain dict."""
  return {**sim_config.to_dict(), **load(path)}


# ------------------------------------------------------------------------ command
def input_files(paths) -> list[str]:
  """TIFF movies / crops' images.tif of the inputs (see the module docstring)."""
  out = []
  for p in paths:
    if os.path.isfile(p):
      out.append(p)
    elif os.path.isdir(p):
      for root, _, names in sorted(os.walk(p)):
        for name in sorted(names):
          low = name.lower()
          if (low.endswith((".tif", ".tiff")) and not low.startswith("ground_truth")
              and not low.endswith(("_prob.tif", "_prob.tiff"))):
            out.append(os.path.join(root, name))
    else:
      raise ValueError(f"--input={p}: no such file or folder")
  if not out:
    raise ValueError(f"--input: no TIFF files in {', '.join(paths)}")
  return out


def load_windows(paths, num_frames: int, crop_px: int, log=print, channel: int = 0):
  """(windows [N, n, c, c] of every usable input, used paths, skipped [(path, why)]);
  ``channel``: the channel read from multi-channel [T, C, H, W] movies (a file without
  it is skipped with the reason)."""
  from smlm_jax.core.tiff_io import MovieError
  from smlm_jax.events import annotate
  windows, used, skipped = [], [], []
  for path in input_files(paths):
    try:
      frames, _ = annotate.read_frames(path, channel)
    except MovieError as e:
      skipped.append((path, str(e)))
      continue
    frames = np.asarray(frames, np.float32)
    snr = quality.structure_snr(frames)
    if not quality.usable(snr):
      skipped.append((path, f"no structure above the camera noise (structure SNR "
                            f"{snr:.1f} < {quality.MIN_STRUCTURE_SNR:g})"))
    elif frames.shape[0] < num_frames or min(frames.shape[1:]) < crop_px:
      skipped.append((path, f"{frames.shape}: fewer than {num_frames} frames of "
                            f"{crop_px} px"))
    else:
      windows.append(stats_lib.tiles(frames, num_frames, crop_px))
      used.append(path)
  for path, why in skipped:
    log(f"note: {path} left out: {why}")
  if not windows:
    raise ValueError("no usable input (see the notes above)")
  return np.concatenate(windows), used, skipped


def _define_flags():
  from absl import flags
  flags.DEFINE_multi_string("input", None, "Movies, crop folders or folders of them.")
  flags.DEFINE_string("output", "events_calibration.json", "Calibration JSON to write.")
  flags.DEFINE_string("plot", None, "PNG of real / initial / calibrated statistics.")
  flags.DEFINE_string("config", "events", "Config (name in configs/ or a .py path) "
                      "whose sim.* is the start.")
  flags.DEFINE_integer("steps", 150, "Adam steps per num_tubules option.")
  flags.DEFINE_integer("num_sim", 96, "Simulated windows (random numbers fixed).")
  flags.DEFINE_float("learning_rate", 0.05, "Adam learning rate.")
  flags.DEFINE_integer("seed", 0, "Seed of the simulated set.")
  flags.DEFINE_integer("channel", 0, "Channel of multi-channel [T, C, H, W] movies "
                       "(0-based; as events predict).")
  flags.DEFINE_string("num_tubules", None, "Grid of num_tubules ranges, e.g. "
                      "'0,3;1,4;2,6' (default: the config's).")


def parse_grid(text):
  if not text:
    return None
  try:
    grid = [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part]
  except ValueError:
    grid = []
  if not grid or any(len(g) != 2 or g[0] < 0 or g[1] < max(1, g[0]) for g in grid):
    raise ValueError(f"--num_tubules={text!r}: expected 'lo,hi;lo,hi' with 0 <= lo <= "
                     "hi, hi >= 1")
  return grid


def main(argv):
  from absl import flags
  from smlm_jax.events import plots
  cli.quiet_logs()
  f = flags.FLAGS
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; give inputs with --input")
  if not f.input:
    cli.fail("give --input=MOVIE_OR_CROPS (one or more)")
  cli.require_positive(f, ["steps", "num_sim"])
  cli.require_nonnegative(f, ("channel",))
  cli.check_writable(f.output)
  if f.plot:
    cli.check_writable(f.plot, "plot")
  try:
    grid = parse_grid(f.num_tubules)
    import importlib.util
    path = f.config if f.config.endswith(".py") else cli.config_path(f.config)
    if not os.path.isfile(path):
      raise ValueError(f"--config={f.config}: no such config file")
    spec = importlib.util.spec_from_file_location("events_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    n, c = int(config.data.num_frames), int(config.crop_px)
    windows, used, skipped = load_windows(f.input, n, c, channel=f.channel)
  except (ValueError, FileNotFoundError) as e:
    cli.fail(str(e))
  record = calibrate(windows, config.sim, c, n, grid, f.steps, f.num_sim,
                     f.learning_rate, f.seed)
  record["inputs"] = used
  record["skipped"] = [{"path": p, "why": w} for p, w in skipped]
  cli.atomic_write_text(f.output, json.dumps(record, indent=1))
  print(f"loss {record['fit']['loss_initial']:.3f} -> {record['fit']['loss']:.3f}; "
        f"calibration -> {f.output}", file=sys.stderr)
  for k, v in record["sim"].items():
    print(f"  sim.{k} = {v}")
  if f.plot:
    plots.plot_statistics(record["statistics"], f.plot)


if __name__ == "__main__":
  import smlm_jax.core.host_devices  # noqa: F401  (before jax)
  from absl import app
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
