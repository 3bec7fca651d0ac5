"""Which domain-randomization factor hurts? Scores trained sparks runs on validation
movies drawn from the default priors with ONE factor group of
``configs/sparks.randomize_sim`` switched on at a time (issue 23).

  flock /tmp/smlm_cpu.lock python experiments/sparks_factors.py \
      --workdirs=runs/sparks,runs/sparks_photons [--groups=none,photons,noise,...] \
      [--num_movies=32 --seed=4243] [--out=factors.json] [--absorb_into_waves=run,on]

For every run and every group ('none': the default priors; 'all': every group) it
simulates ``--num_movies`` movies of ``--seed`` (a validation seed; the test seed 777 is
refused, and no independent-simulator data are read), segments them with the run's
network and confidence filter, and prints per-class F1, the false sparks and the
bright false sparks (estimated peak dF/F0 >= 0.6). Runs differ only in their network;
the movies are the same for every run. ``--absorb_into_waves`` scores each run's
predictions once per setting of the extraction's step 1b (``run``: the run's config,
``on`` / ``off``), named ``<run>+absorb_on`` etc. Last line: RESULT with one
``f1_sparks_<run>_<group>`` per pair plus ``fp_bright_<run>_<group>``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import json  # noqa: E402

from absl import app, flags  # noqa: E402

from configs import sparks as sparks_config  # noqa: E402
from smlm_jax.core import cli, trainer  # noqa: E402
from smlm_jax.sparks import evaluate as evaluate_lib  # noqa: E402
from smlm_jax.sparks import events as events_lib  # noqa: E402
from smlm_jax.sparks.task import SparksTask  # noqa: E402

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Trained run folders.")
_GROUPS = flags.DEFINE_list("groups", ["none"] + list(sparks_config.RANDOMIZATION_GROUPS),
                            "Factor groups ('none', 'all' or RANDOMIZATION_GROUPS names).")
_NUM = flags.DEFINE_integer("num_movies", 32, "Validation movies per group.")
_SEED = flags.DEFINE_integer("seed", 4243, "Validation seed (not the test seed).")
_OUT = flags.DEFINE_string("out", None, "Write the metrics as JSON here.")
_ABSORB = flags.DEFINE_list("absorb_into_waves", ["run"],
                            "Extraction step 1b per scoring: run (the run's config), on, off.")
_SELECT = flags.DEFINE_string("select", None, "Write the chosen run's folder here: the one "
                              "with the highest mean over groups of (spark F1 + puff F1) / 2.")

BRIGHT_DFF = 0.6


def group_config(group: str):
  """The default config with one factor group (or none / all) randomized."""
  config = sparks_config.get_config()
  if group == "all":
    sparks_config.randomize_sim(config.sim)
  elif group != "none":
    sparks_config.randomize_sim(config.sim, (group,))
  return config


def false_sparks(metrics: dict, bright: float = BRIGHT_DFF) -> tuple:
  """(false sparks, false sparks with estimated peak dF/F0 >= ``bright``)."""
  rows = metrics["f1_vs_amplitude"].get("spark", [])
  return (int(metrics["spark"]["fp"]), int(sum(r["fp"] for r in rows if r["lo"] >= bright)))


def main(argv):
  del argv
  cli.quiet_logs()
  if not _WORKDIRS.value:
    cli.fail("--workdirs is required")
  if _SEED.value == evaluate_lib.TEST_SEED:
    cli.fail(f"--seed={_SEED.value} is the test seed; use a validation seed")
  groups = list(_GROUPS.value)
  for g in groups:
    if g not in ("none", "all") + sparks_config.RANDOMIZATION_GROUPS:
      cli.fail(f"unknown group {g!r}")
  for w in _WORKDIRS.value:
    if not os.path.isdir(w):
      cli.fail(f"no run folder {w}")
  for a in _ABSORB.value:
    if a not in ("run", "on", "off"):
      cli.fail(f"--absorb_into_waves: {a!r} is not run, on or off")
  mesh = trainer.make_mesh()
  sets = {}
  for g in groups:
    config = group_config(g)
    config.eval_batch_size = 4
    sets[g] = SparksTask(config).simulate_set(_NUM.value, _SEED.value, mesh)
  results, keys, names = {}, [], []
  print(f"{'run':<22} {'group':<11} {'spark F1':>8} {'wave F1':>7} {'puff F1':>7} "
        f"{'FP spark':>8} {'bright':>6} {'FN spark':>8}")
  for w in _WORKDIRS.value:
    config, task, state = trainer.load_run(w, mesh)
    events_lib.use_run_filter(task.config, w)
    base = os.path.basename(os.path.normpath(w))
    run_absorb = bool(task.config.events.get("absorb_into_waves", False))
    for g in groups:
      probs = task.predict(state, sets[g]["x"], mesh)
      for a in _ABSORB.value:
        name = base if a == "run" else f"{base}+absorb_{a}"
        task.config.events.absorb_into_waves = run_absorb if a == "run" else a == "on"
        if g == groups[0]:
          names.append((w, name))
        m = task.score_set(probs, sets[g])
        fp, fp_bright = false_sparks(m)
        results[f"{name}/{g}"] = {k: m[k] for k in ("spark", "wave", "puff",
                                                    "f1_vs_amplitude", "confusion")}
        print(f"{name:<22} {g:<11} {m['spark']['f1']:>8.3f} {m['wave']['f1']:>7.3f} "
              f"{m['puff']['f1']:>7.3f} {fp:>8d} {fp_bright:>6d} {m['spark']['fn']:>8d}",
              flush=True)
        keys += [f"f1_sparks_{name}_{g}={m['spark']['f1']:.3f}",
                 f"f1_puffs_{name}_{g}={m['puff']['f1']:.3f}",
                 f"fp_bright_{name}_{g}={fp_bright}"]
  if _SELECT.value:
    score = {}
    for w, name in names:
      v = [(results[f"{name}/{g}"]["spark"]["f1"] + results[f"{name}/{g}"]["puff"]["f1"]) / 2
           for g in groups]
      score[(w, name)] = sum(v) / len(v)
      print(f"selection score {name}: {score[(w, name)]:.3f}")
    chosen_w, chosen_name = max(score, key=score.get)
    chosen = f"{chosen_w} {chosen_name}"
    print(f"chosen on validation: {chosen}")
    with open(_SELECT.value, "w") as f:
      f.write(chosen + "\n")
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)
  print("RESULT " + " ".join(keys))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
