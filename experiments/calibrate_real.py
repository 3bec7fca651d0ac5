"""Calibrates the simulator on the real blocks and on simulated sets with known cameras.

  python experiments/calibrate_real.py [--sets=real,emccd,scmos,emccd_high] \
      [--camera_model=auto] [--output_dir=runs/calibration] [--train_workdir=runs/cal]

Data sets (all 16 frames of 64x64 px, the default config's geometry and priors unless
stated; simulated ones have 200 movies and a known truth):
  real        ../shared/real-data/blocks_64x64x16_104_01 (249 blocks, EMCCD-like,
              background ~1100 ADU; camera unknown)
  emccd       EMCCD: offset 300 ADU, EM gain 100 x 0.2 ADU/e- = 20 ADU per
              photo-electron, 20 e- read noise after the EM register
  scmos       sCMOS: offset 100 ADU, 2 ADU/e-, 1.6 e- read noise
  emccd_high  EMCCD at ~4,500 ADU of background like the issue's data: offset 270 ADU,
              23.6 ADU per photo-electron, 150-250 background photons, 2000-10000
              photons per frame (the sCMOS model puts its offset near -1,800 ADU)

1. ``smlm_jax.diffusion.calibrate.calibrate`` with the camera model chosen
   automatically (both fitted; see that module) on every set. Prints one table: the
   model chosen and why, offset, gain, read noise, FWHM, photons and background with
   bootstrap standard errors, the distance before/after, the other model's camera and
   why it was rejected, and the truth for simulated sets. Writes each set's JSON and
   plot into --output_dir.
2. With --train_workdir: trains the default model on the simulator calibrated to the
   real blocks (``--config.sim.calibration``), predicts D on them with the calibrated
   camera, and reports the D distribution and its Spearman correlation with the
   per-window (Y) and per-track (X) values in the file names.

Last line: RESULT real_model=<m> real_offset_adu=<f> real_offset_se=<f>
  real_gain_adu_per_e=<f> real_gain_se=<f> real_fwhm_nm=<f> real_fwhm_se=<f>
  distance_before=<f> distance_after=<f> sims_model_correct=<k>/<n>
  sims_within_2se=<k>/<n> seconds=<f>
(sims_within_2se counts offset, gain and FWHM of the simulated sets within 2 standard
errors of the truth; the FWHM truth is the mean over the set's movies, whose FWHM is
drawn from 200-250 nm, while the fit has one FWHM for all.)
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import subprocess  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import numpy as np  # noqa: E402

from configs import diffusion  # noqa: E402
from smlm_jax.diffusion import calibrate, metrics  # noqa: E402
from smlm_jax.core import cli  # noqa: E402

_INPUT = flags.DEFINE_string(
    "input", os.path.join(ROOT, "..", "shared", "real-data", "blocks_64x64x16_104_01"),
    "Folder of real movies.")
_SETS = flags.DEFINE_list("sets", ["real", "emccd", "scmos", "emccd_high"],
                          "Data sets to calibrate (see the docstring).")
_MODEL = flags.DEFINE_enum("camera_model", "auto", ["auto", "emccd", "scmos"],
                           "Camera model: auto (fit both, choose) or forced.")
_OUTPUT = flags.DEFINE_string("output_dir", "runs/calibration", "JSON and plots go here.")
_STEPS = flags.DEFINE_integer("steps", 120, "optax steps.")
_NUM_SIM = flags.DEFINE_integer("num_movies", 200, "Movies per simulated set.")
_FIT_D = flags.DEFINE_bool("fit_D", True, "Also fit the range of D.")
_TRAIN = flags.DEFINE_string("train_workdir", "", "If set: train there with the calibration.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 1000, "Training steps for step 2.")

SIMULATED = {
    "emccd": {"camera": dict(model="emccd", em_gain=100.0, gain_adu_per_e=0.2,
                             offset_adu=300.0, read_noise_e=20.0)},
    "scmos": {"camera": dict(model="scmos", gain_adu_per_e=2.0, offset_adu=100.0,
                             read_noise_e=1.6)},
    "emccd_high": {"camera": dict(model="emccd", em_gain=100.0, gain_adu_per_e=0.236,
                                  offset_adu=270.0, read_noise_e=20.0),
                   "background_photons": (150.0, 250.0), "photons": (2000.0, 10000.0)},
}


def simulated_set(name, num_movies, seed=5):
  """(frames [N, 16, 64, 64] ADU, truth dict) of one simulated set."""
  import jax
  from smlm_jax.diffusion import simulator as sim_lib
  cfg = diffusion.get_config()
  spec = SIMULATED[name]
  cfg.sim.camera.update(spec["camera"])
  for key in ("background_photons", "photons"):
    if key in spec:
      cfg.sim[key] = spec[key]
  sim = sim_lib.simulator_from_config(cfg.sim)
  fn = jax.jit(lambda k: sim.batch(k, num_movies))
  frames, truth = fn(jax.random.key(seed))
  cam = spec["camera"]
  em = cam.get("em_gain", 1.0) if cam["model"] == "emccd" else 1.0
  lo, hi = cfg.sim.photons
  return np.asarray(frames), {
      "model": cam["model"], "offset": cam["offset_adu"],
      "gain": cam["gain_adu_per_e"] * em, "read_in_e": cam["read_noise_e"] / em,
      "fwhm": float(np.mean(np.asarray(truth["psf_fwhm_nm"]))),
      "photons": calibrate.log_uniform_moments((lo, hi))["mean"],
      "background": float(np.mean(np.asarray(truth["background_photons"])))}


def _pm(v, se, spec=".4g"):
  if se is None or not np.isfinite(se):
    return format(v, spec)
  return f"{format(v, spec)} ± {format(se, '.2g')}"


def main(argv):
  del argv
  cli.quiet_logs()
  os.makedirs(_OUTPUT.value, exist_ok=True)
  results, truths = {}, {}
  t_all = time.perf_counter()
  for name in _SETS.value:
    cfg = diffusion.get_config()
    if name == "real":
      if not os.path.isdir(_INPUT.value):
        print(f"skipping real: --input={_INPUT.value} not found", file=sys.stderr)
        continue
      frames, _ = calibrate.load_movies([_INPUT.value], cfg.sim, log=lambda *a, **k: None)
      truth = None
    elif name in SIMULATED:
      frames, truth = simulated_set(name, _NUM_SIM.value)
    else:
      cli.fail(f"unknown set {name!r}; use real, {', '.join(SIMULATED)}")
    t0 = time.perf_counter()
    try:
      r = calibrate.calibrate(frames, cfg.sim, fit_D=_FIT_D.value, steps=_STEPS.value,
                              camera_model=_MODEL.value)
    except calibrate.CalibrationFailed as e:
      print(f"{name}: calibration refused: {e}")
      continue
    r["seconds"] = time.perf_counter() - t0
    results[name], truths[name] = r, truth
    path = os.path.join(_OUTPUT.value, f"{name}.json")
    cli.atomic_write_text(path, calibrate.json_text(r))
    calibrate.plot_calibration(r, os.path.splitext(path)[0] + ".png")
    print(f"\n== {name}: {frames.shape[0]} movies ==\n{calibrate.summary_table(r)}",
          flush=True)

  print("\n| data | model chosen (why) | offset ADU | gain ADU/e- | read e- (input) | "
        "FWHM nm | photons/frame | background ph/px | distance before -> after | "
        "other model's camera | s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  correct = within = checked = 0
  for name, r in results.items():
    sel = r["camera_model_selection"]
    other = [m for m in calibrate.CAMERA_MODELS if m != r["camera_model"]][0]
    of = sel["fits"][other]
    other_text = (f"{calibrate.MODEL_LABELS[other]}: offset "
                  f"{_pm(of['camera_offset_adu'], of['camera_offset_adu_se'])}, gain "
                  f"{_pm(of['camera_gain_adu_per_e'], of['camera_gain_adu_per_e_se'])}"
                  + (f"; rejected: {of['implausible'][0].split(' (')[0]}"
                     if of["implausible"] else "; plausible"))
    first = sel["reason"].split(";")[0]
    why = (f"{calibrate.MODEL_LABELS[other]} implausible" if first.startswith("the ")
           else first)
    print(f"| {name} | {calibrate.MODEL_LABELS[r['camera_model']]} ({why}; k3/(slope k2) = "
          f"{sel['excess_noise_ratio']:.2f}) | "
          f"{_pm(r['camera_offset_adu'], r['camera_offset_adu_se'])} | "
          f"{_pm(r['camera_gain_adu_per_e'], r['camera_gain_adu_per_e_se'])} | "
          f"{_pm(r['read_noise_input_e'], r['read_noise_input_e_se'], '.2f')} | "
          f"{_pm(r['psf_fwhm_nm'], r['psf_fwhm_nm_se'], '.0f')} | "
          f"{_pm(r['photons']['mean'], r['photons_mean_se'], '.0f')} | "
          f"{_pm(r['background_photons']['mean'], r['background_photons_mean_se'], '.3g')} | "
          f"{r['distance_before']:.3g} -> {r['distance_after']:.3g} | {other_text} | "
          f"{r['seconds']:.0f} |")
    t = truths[name]
    if t is not None:
      print(f"| {name} truth | {calibrate.MODEL_LABELS[t['model']]} | {t['offset']:g} | "
            f"{t['gain']:g} | {t['read_in_e']:.2f} | {t['fwhm']:.0f} (movies' mean) | "
            f"{t['photons']:.0f} (prior mean) | {t['background']:.3g} | | | |")
      correct += r["camera_model"] == t["model"]
      for key, se_key, truth_v in (("camera_offset_adu", "camera_offset_adu_se", t["offset"]),
                                   ("camera_gain_adu_per_e", "camera_gain_adu_per_e_se",
                                    t["gain"]),
                                   ("psf_fwhm_nm", "psf_fwhm_nm_se", t["fwhm"])):
        checked += 1
        within += abs(r[key] - truth_v) <= 2 * r[se_key]
  n_sims = sum(t is not None for t in truths.values())

  real = results.get("real")
  if _TRAIN.value and real is not None:
    cal_path = os.path.join(_OUTPUT.value, "real.json")
    py = sys.executable
    subprocess.run([py, "-m", "smlm_jax.train", "--config=configs/diffusion.py",
                    f"--workdir={_TRAIN.value}", f"--config.sim.calibration={cal_path}",
                    f"--config.num_train_steps={_TRAIN_STEPS.value}"], cwd=ROOT, check=True)
    out_csv = os.path.join(_TRAIN.value, "real_blocks.csv")
    subprocess.run([py, "-m", "smlm_jax.diffusion.predict", f"--workdir={_TRAIN.value}",
                    f"--input={_INPUT.value}", f"--output={out_csv}",
                    f"--calibration={cal_path}",
                    f"--plot={os.path.join(_TRAIN.value, 'real_blocks.png')}"], cwd=ROOT)
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    from bench_predict import name_values, read_rows
    rows = [r for r in read_rows(out_csv) if not r["flag"].startswith("error")]
    D = np.array([float(r["D_um2_per_s"]) for r in rows])
    X, Y = name_values(rows)
    q = np.quantile(D, [0.1, 0.25, 0.5, 0.75, 0.9])
    print("\n| calibrated model on the real blocks | value |\n|---|---|")
    print(f"| D quantiles 10/25/50/75/90% (um^2/s) | {' / '.join(f'{v:.3g}' for v in q)} |")
    print(f"| Spearman(D, per-window Y) | {metrics.spearman(D, Y):.3f} |")
    print(f"| Spearman(D, per-track X) | {metrics.spearman(D, X):.3f} |")
    print(f"| rows flagged | {sum(r['flag'] != 'ok' for r in rows)} of {len(rows)} |")

  nan = float("nan")
  g = (lambda k: real[k] if real is not None else nan)
  print(f"RESULT real_model={real['camera_model'] if real else 'none'} "
        f"real_offset_adu={g('camera_offset_adu'):.4g} "
        f"real_offset_se={g('camera_offset_adu_se'):.3g} "
        f"real_gain_adu_per_e={g('camera_gain_adu_per_e'):.4g} "
        f"real_gain_se={g('camera_gain_adu_per_e_se'):.3g} "
        f"real_fwhm_nm={g('psf_fwhm_nm'):.4g} real_fwhm_se={g('psf_fwhm_nm_se'):.3g} "
        f"distance_before={g('distance_before'):.4g} "
        f"distance_after={g('distance_after'):.4g} "
        f"sims_model_correct={correct}/{n_sims} sims_within_2se={within}/{checked} "
        f"seconds={time.perf_counter() - t_all:.1f}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
