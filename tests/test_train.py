"""Training: end to end with resume, device-count invariance, config flags, models."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import diffusion
from smlm_jax import models, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(model="blurformer"):
  cfg = diffusion.get_config("tiny")
  cfg.model = diffusion.get_model_config(model)
  return cfg


def test_train_two_steps_then_resume(tmp_path):
  cfg = _tiny()
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(cfg, workdir)
  assert np.isfinite(final["relative_rmse"])
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == [1, 2] and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "2"
  # Resume: a longer schedule continues from step 2, not from scratch.
  cfg.num_train_steps = 4
  train.train_and_evaluate(cfg, workdir)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == [1, 2, 3, 4]
  _, _, state, _ = train.load_run(workdir)
  assert int(state["step"]) == 4
  from smlm_jax import evaluate
  metrics = evaluate.evaluate_run(workdir, num_movies=16, seed=1)
  saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  for key in ("relative_rmse", "median_relative_error", "rmse_log10_D", "coverage_68"):
    assert np.isfinite(saved[key]) and saved[key] == metrics[key]
  assert saved["step"] == 4 and saved["n"] == 16
  for png in ("pred_vs_true.png", "relative_error.png"):
    assert os.path.getsize(os.path.join(workdir, "eval", png)) > 1000


@pytest.mark.parametrize("model", ["blurformer", "park_cnn"])
def test_one_step_same_on_1_and_4_devices(model):
  cfg = _tiny(model)
  sim, mdl, tx, sched = train.build(cfg)
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    mesh = train.make_mesh(devices)
    state = jax.device_put(train.init_state(mdl, tx, sim.geometry, 0),
                           NamedSharding(mesh, P()))
    step = train.make_train_step(cfg, sim, mdl, tx, sched, mesh)
    new_state, meas = step(state)
    results.append((float(meas["loss"]), jax.device_get(new_state["params"])))
  assert len(jax.devices()) >= 4
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_config_overrides_reach_config():
  r = subprocess.run([sys.executable, "-m", "smlm_jax.train", "--config=configs/diffusion.py:tiny",
                      "--config.model.name=cnn3d", "--config.batch_size=12",
                      "--config.sim.camera.offset_adu=400", "--print_config"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  import yaml
  cfg = yaml.full_load(r.stdout)
  assert cfg["model"]["name"] == "cnn3d"
  assert cfg["batch_size"] == 12
  assert cfg["sim"]["camera"]["offset_adu"] == 400
  assert cfg["sim"]["num_frames"] == 8  # the tiny variant


def test_unknown_config_field_fails_clearly(tmp_path):
  r = subprocess.run([sys.executable, "-m", "smlm_jax.train", "--config=configs/diffusion.py",
                      f"--workdir={tmp_path}", "--config.no_such_field=3"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  assert "no_such_field" in r.stderr
  r = subprocess.run([sys.executable, "-m", "smlm_jax.train",
                      "--config=configs/diffusion.py", f"--workdir={tmp_path}",
                      "--config.model.name=nope"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "unknown model.name 'nope'" in r.stderr
  assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_forward_finite(name):
  model = models.build_model(diffusion.get_model_config(name))
  x = jax.random.normal(jax.random.key(0), (3, 16, 64, 64))
  variables = model.init(jax.random.key(1), x, train=False)
  mean, log_var = model.apply(variables, x, train=False)
  assert mean.shape == (3,) and log_var.shape == (3,)
  assert np.all(np.isfinite(np.asarray(mean))) and np.all(np.isfinite(np.asarray(log_var)))


def test_overfits_a_fixed_batch():
  """On one fixed batch the squared log-D error drops by >= 50% within 50 steps."""
  cfg = _tiny()
  cfg.learning_rate = 3e-3
  cfg.warmup_steps = 5
  cfg.num_train_steps = 50
  sim, mdl, tx, sched = train.build(cfg)
  frames, truth = sim.batch(jax.random.key(0), 16)
  x, _, _ = train.normalize.model_input(frames, sim.camera)
  target = jnp.log(truth["D_um2_per_s"])
  state = train.init_state(mdl, tx, sim.geometry, 0)

  @jax.jit
  def step(state):
    def loss_fn(params):
      mean, log_var, _ = train.apply_model(mdl, {**state, "params": params}, x, True)
      return jnp.mean((mean - target) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {**state, "params": train.optax.apply_updates(state["params"], updates),
            "opt": opt}, loss

  losses = []
  for _ in range(50):
    state, loss = step(state)
    losses.append(float(loss))
  assert losses[-1] <= 0.5 * losses[0], losses[::10]


def test_nan_loss_stops_with_message(tmp_path):
  cfg = _tiny()
  cfg.learning_rate = 1e30
  cfg.grad_clip_norm = 1e30
  cfg.num_train_steps = 6
  cfg.log_every_steps = 1
  with pytest.raises(train.TrainingError, match="loss became"):
    train.train_and_evaluate(cfg, str(tmp_path / "nan"))
