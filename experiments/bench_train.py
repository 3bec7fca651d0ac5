"""Training-step throughput per model, and the share of the step spent simulating.

  python experiments/bench_train.py [--config=configs/diffusion.py] [--models=...]

For each registered model at the config's batch size: steps/s and examples/s of the
full jitted train step (simulate + normalize + forward/backward + AdamW), and separately
timed sim-only and model-only jitted functions; sim_fraction = sim-only time / full
step time. Uses one host device per CPU core on CPU. Last line:
RESULT sim_fraction=<default model> examples_per_s=<default model> backend=<...>
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import smlm_jax.core.host_devices  # noqa: F401,E402  (before jax)

import time  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from configs import diffusion  # noqa: E402
from smlm_jax.core import cli, task as task_lib, trainer  # noqa: E402
from smlm_jax.diffusion import models  # noqa: E402

with cli.config_override_errors():
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/diffusion.py", "Config.")
_MODELS = flags.DEFINE_list("models", sorted(models.MODELS), "Models to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per function.")


def _time(fn, *args):
  out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(_REPEATS.value):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / _REPEATS.value


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = trainer.make_mesh()
  config.batch_size = trainer.divisible_batch(config.batch_size, mesh)
  rep = NamedSharding(mesh, P())
  default_model = diffusion.get_config().model.name
  print(f"backend={jax.default_backend()} devices={len(jax.devices())} "
        f"batch={config.batch_size} movie={config.sim.num_frames}x{config.sim.height_px}x{config.sim.width_px}")
  print(f"{'model':<12} {'params':>8} {'step ms':>8} {'steps/s':>8} {'examples/s':>11} "
        f"{'sim ms':>7} {'model ms':>9} {'sim share':>10}")
  result = {}
  for name in _MODELS.value:
    config.model = diffusion.get_model_config(name)
    task = task_lib.build_task(config)
    tx, sched = task.make_optimizer()
    state = trainer.fresh_state(task, tx, config.seed, rep)
    n_params = sum(p.size for p in jax.tree.leaves(state["params"]))

    sim_only = jax.jit(trainer.make_batch_fn(task, mesh, config.seed))
    model_only = jax.jit(trainer.make_update_fn(task, tx, sched))
    batch = sim_only(0)
    key = trainer.step_key(config.seed, 0)

    full = trainer.make_train_step(task, tx, sched, mesh, config.seed)
    t_sim = _time(sim_only, 0)
    t_model = _time(model_only, state, batch, key)
    # The full step donates its input state: time it on its own output.
    s = full(state, None)[0]
    jax.block_until_ready(s)
    t0 = time.perf_counter()
    for _ in range(_REPEATS.value):
      s, m = full(s, None)
    jax.block_until_ready(m)
    t_full = (time.perf_counter() - t0) / _REPEATS.value
    share = t_sim / t_full
    eps = config.batch_size / t_full
    result[name] = (share, eps)
    print(f"{name:<12} {n_params:>8d} {t_full * 1e3:>8.1f} {1 / t_full:>8.2f} {eps:>11.1f} "
          f"{t_sim * 1e3:>7.1f} {t_model * 1e3:>9.1f} {share:>10.2f}")
  share, eps = result.get(default_model, next(iter(result.values())))
  print(f"RESULT sim_fraction={share:.3f} examples_per_s={eps:.1f} "
        f"backend={jax.default_backend()}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
