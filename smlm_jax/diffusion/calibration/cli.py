"""Command line: ``python -m smlm_jax.diffusion.calibrate`` (this module's ``main``).

  python -m smlm_jax.diffusion.calibrate --input=PATH [--input=PATH ...] \
      --config=configs/diffusion.py --output=calibration.json [--plot=calibration.png] \
      [--camera_model=auto|scmos|emccd] [--camera_offset_adu=A] [--camera_gain_adu_per_e=G] \
      [--allow_implausible] [--fit_D] [--steps=120] [--num_sim=128] [--bootstrap=200]

Exit status: 0 written; 2 a usage error or unusable data (one ``error:`` line);
3 the fit is physically implausible under every camera model tried (one ``error:`` line
naming the value, its allowed range and what to try; nothing is written unless
``--allow_implausible``, which writes the fit with the failed checks in ``"implausible"``).

Reads the inputs as windows of the config's shape (``load_movies``: unusable inputs
are skipped with one line each), runs ``pipeline.calibrate``, writes the JSON
(``json_text``: NaN/inf as null, no plot arrays), prints ``summary_table`` and
optionally writes the plot. Train with the JSON via ``--config.sim.calibration=FILE``
and predict with ``--calibration=FILE``.
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

import json
import sys

from absl import flags
import numpy as np

from smlm_jax.core import cli
from smlm_jax.core import tiff_io
from smlm_jax.diffusion.calibration.camera import (CAMERA_MODELS, MODEL_LABELS,
                                                   CalibrationFailed,
                                                   ImplausibleCalibration)
from smlm_jax.diffusion.calibration.pipeline import calibrate
from smlm_jax.diffusion.calibration.plots import plot_calibration


def load_movies(paths, sim_cfg, log=print, channel=None):
  """[M, T, H, W] ADU windows of the config's shape (of ``channel`` of multi-channel
  movies), and a list of skipped inputs."""
  skipped, windows = [], []
  t, h, w = int(sim_cfg.num_frames), int(sim_cfg.height_px), int(sim_cfg.width_px)
  skip_log = lambda msg, **kw: log(msg.replace("error: ", "skipped: ", 1), **kw)  # noqa: E731
  for path, movie, starts, error in tiff_io.scan_inputs(paths, t, h, w, None, "reading",
                                                       skip_log, channel=channel):
    if error:
      skipped.append((path, error[0]))
      continue
    windows += [movie.frames[s:s + t] for s in starts]
  if not windows:
    return np.zeros((0, t, h, w), np.float32), skipped
  return np.stack(windows), skipped


def _finite(x):
  """JSON-safe: NaN/inf -> None, recursively."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x) if np.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x


def json_text(result: dict) -> str:
  return json.dumps(_finite({k: v for k, v in result.items() if not k.startswith("_")}),
                    indent=1)


def _pm(value, se, spec, fixed=False):
  text = format(value, spec)
  if fixed:
    return f"{text} (fixed)"
  if se is None or not np.isfinite(se):
    return text
  return f"{text} ± {format(se, spec)}"


def summary_table(result: dict) -> str:
  """Console table: values ± standard errors, the model choice, warnings."""
  sel = result.get("camera_model_selection", {})
  fixed = result.get("fixed", {})
  model = result.get("camera_model", "scmos")
  rows = [("camera model", f"{MODEL_LABELS.get(model, model)} ({sel.get('mode', '?')}: "
                           f"{sel.get('reason', '')})"),
          ("camera offset (ADU)", _pm(result["camera_offset_adu"],
                                      result.get("camera_offset_adu_se"), ".2f",
                                      "camera_offset_adu" in fixed)),
          ("camera gain (ADU/e-)", _pm(result["camera_gain_adu_per_e"],
                                       result.get("camera_gain_adu_per_e_se"), ".4g",
                                       "camera_gain_adu_per_e" in fixed)),
          ("read noise, input (e-)", _pm(result.get("read_noise_input_e", float("nan")),
                                         result.get("read_noise_input_e_se"), ".3f")),
          ("PSF FWHM (nm)", _pm(result["psf_fwhm_nm"], result.get("psf_fwhm_nm_se"), ".1f"))]
  for key, se_key in (("photons", "photons_mean_se"),
                      ("background_photons", "background_photons_mean_se"),
                      ("D_um2_per_s", "D_mean_se")):
    if key in result:
      v = result[key]
      rows.append((key, f"mean {_pm(v['mean'], result.get(se_key), '.4g')}, std "
                        f"{v['std']:.4g}, log-uniform {v['low']:.4g}-{v['high']:.4g}"))
  for m, f in sel.get("fits", {}).items():
    offset, gain = (_pm(f[k], f[f"{k}_se"], ".4g", k in fixed)
                    for k in ("camera_offset_adu", "camera_gain_adu_per_e"))
    text = f"offset {offset} ADU, gain {gain} ADU/e-, read {f['read_noise_input_e']:.3g} e-"
    if "distance_after" in f:
      text += (f", FWHM {_pm(f['psf_fwhm_nm'], f['psf_fwhm_nm_se'], '.0f')} nm, "
               f"distance {f['distance_after']:.3g}")
    text += " -> " + ("IMPLAUSIBLE: " + f["implausible"][0] if f["implausible"]
                      else "plausible")
    rows.append((f"{MODEL_LABELS.get(m, m)} fit", text))
  for w in result.get("warnings", []):
    rows.append(("WARNING", w))
  rows += [("distance before -> after",
            f"{result['distance_before']:.4g} -> {result['distance_after']:.4g}"),
           ("seconds", f"{result['seconds']:.1f}")]
  width = max(len(r[0]) for r in rows)
  return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def _define_flags():
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", cli.config_path("diffusion"),
                                  "Config whose sim section is calibrated.")
  flags.DEFINE_multi_string("input", [], "TIFF file or folder; repeat for several.")
  flags.DEFINE_string("output", None, "Calibration JSON to write.")
  flags.DEFINE_string("plot", None, "Optional PNG of real vs simulated statistics.")
  flags.DEFINE_enum("camera_model", "auto", ["auto", "scmos", "emccd"],
                    "auto: fit both and pick the one the data support; or force one "
                    "(same as giving --config.sim.camera.model on the command line).")
  flags.DEFINE_float("camera_offset_adu", None,
                     "Known camera baseline (ADU, e.g. from the spec sheet): fixed, the "
                     "rest is fitted.")
  flags.DEFINE_float("camera_gain_adu_per_e", None,
                     "Known ADU per photo-electron (EMCCD: including EM gain): fixed.")
  flags.DEFINE_bool("allow_implausible", False,
                    "Write a fit that fails the plausibility checks (listed in the JSON "
                    "under 'implausible') instead of exiting with status 3.")
  flags.DEFINE_bool("fit_D", False, "Also fit the population range of D.")
  flags.DEFINE_integer("steps", 120, "optax steps.")
  flags.DEFINE_integer("num_sim", 128, "Simulated movies per loss evaluation.")
  flags.DEFINE_float("learning_rate", 0.05, "Adam learning rate on log parameters.")
  flags.DEFINE_integer("bootstrap", 200, "Bootstrap resamples over movies for standard "
                       "errors (0: none).")
  flags.DEFINE_integer("seed", 0, "Seed of the simulated set and the bootstrap.")
  cli.define_channel_flag("movies")


def camera_model_flag(f) -> str:
  """'auto' or the forced model: --camera_model, or --config.sim.camera.model given on
  the command line (the config file's own value is a training default, not a choice)."""
  from ml_collections import config_flags
  override = config_flags.get_override_values(f["config"]).get("sim.camera.model")
  if override is not None and f.camera_model not in ("auto", override):
    cli.fail(f"--camera_model={f.camera_model} contradicts "
             f"--config.sim.camera.model={override}; give one")
  if override is not None:
    if override not in CAMERA_MODELS:
      cli.fail(f"--config.sim.camera.model must be scmos or emccd, got {override!r}")
    return override
  return f.camera_model


def main(argv):
  cli.quiet_logs()
  f = flags.FLAGS
  inputs = cli.inputs_and_output(f, argv, "a .json file")
  if f.plot:
    cli.check_writable(f.plot, "plot")
  if f.steps < 1 or f.num_sim < 8:
    cli.fail("--steps must be >= 1 and --num_sim >= 8")
  if f.bootstrap == 1 or f.bootstrap < 0:
    cli.fail("--bootstrap must be 0 (no standard errors) or >= 2")
  if f.camera_gain_adu_per_e is not None and not f.camera_gain_adu_per_e > 0:
    cli.fail("--camera_gain_adu_per_e must be > 0")
  model = camera_model_flag(f)
  sim_cfg = f.config.sim
  frames, skipped = load_movies(inputs, sim_cfg, channel=cli.channel_flag(f))
  if frames.shape[0] < 8:
    cli.fail(f"only {frames.shape[0]} usable movie window(s); calibration needs >= 8")
  print(f"calibrating on {frames.shape[0]} movie window(s) "
        f"({len(skipped)} input(s) skipped), camera model {model}", file=sys.stderr)
  try:
    result = calibrate(frames, sim_cfg, fit_D=f.fit_D, steps=f.steps, num_sim=f.num_sim,
                       learning_rate=f.learning_rate, seed=f.seed, camera_model=model,
                       offset_adu=f.camera_offset_adu,
                       gain_adu_per_e=f.camera_gain_adu_per_e,
                       allow_implausible=f.allow_implausible, num_bootstrap=f.bootstrap)
  except ImplausibleCalibration as e:
    cli.fail(str(e), code=3)
  except CalibrationFailed as e:
    cli.fail(str(e))
  cli.atomic_write_text(f.output, json_text(result))
  print(summary_table(result))
  print(f"wrote {f.output}", file=sys.stderr)
  if f.plot:
    plot_calibration(result, f.plot)
    print(f"wrote {f.plot}", file=sys.stderr)


if __name__ == "__main__":
  cli.run_app(main, _define_flags)
