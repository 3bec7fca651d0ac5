"""Ca2+ release events: simulator physics and labels, losses with ignore, exact chunked
inference, event extraction and IoMin matching, training and the command-line tools."""
import csv
import dataclasses
import io
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from configs import sparks as sparks_config
from smlm_jax.core import tiff_io, trainer
from smlm_jax.sparks import events as ev_lib
from smlm_jax.sparks import inference, model as model_lib
from smlm_jax.sparks import simulator as sim
from smlm_jax.sparks import task as task_lib

GEOM = sim.Geometry(num_frames=40, height_px=32, width_px=48)
SPEC = sim.LabelSpec(event_fraction=0.3, ring_fraction=0.1, ignore_frames=3)


def scene(events, **kw):
  """A uniform cell filling the field (no striation, tilt or bleaching) with events."""
  n = len(events)
  cols = {k: jnp.asarray([e.get(k, 0.0) for e in events], jnp.float32)
          for k in ("t0_ms", "y_px", "x_px", "fwhm_um", "rise_ms", "plateau_ms", "tau_ms",
                    "speed_um_per_s", "amplitude")}
  evs = sim.Events(kind=jnp.asarray([e["kind"] for e in events], jnp.int32),
                   active=jnp.asarray([e.get("active", True) for e in events]), **cols)
  base = dict(f0_photons=20.0, background_photons=1.0, top_px=-100.0, bottom_px=100.0,
              top_slope=0.0, bottom_slope=0.0, striation_spacing_um=1.9,
              striation_depth=0.0, striation_angle_rad=0.0, striation_phase=0.0,
              tilt_y=0.0, tilt_x=0.0, bleach_rate_per_s=0.0)
  base.update(kw)
  return sim.Scene(events=evs, **{k: jnp.float32(v) for k, v in base.items()})


_render = jax.jit(sim.render, static_argnums=(1, 2))


def render(s, geom=GEOM, spec=SPEC):
  return jax.tree.map(np.asarray, _render(s, geom, spec))


# ----------------------------------------------------------------------------- physics
def test_spark_amplitude_fwhm_and_decay_match_drawn_parameters():
  dt = GEOM.frame_interval_ms
  amp, fwhm_um, rise, tau = 0.8, 2.2, 9.0, 30.0
  k_peak = 10
  spark = dict(kind=sim.SPARK, t0_ms=k_peak * dt - rise, y_px=16.0, x_px=20.0,
               fwhm_um=fwhm_um, rise_ms=rise, tau_ms=tau, amplitude=amp)
  out = render(scene([spark], striation_depth=0.2, bleach_rate_per_s=0.5))
  # dF/F0 recovered from the expected photons (background and bleached F0 removed).
  t_s = np.arange(GEOM.num_frames) * dt / 1000
  f0 = out["f0"][None] * np.exp(-0.5 * t_s)[:, None, None]
  dff = (out["expected_photons"] - 1.0) / f0 - 1.0
  np.testing.assert_allclose(dff, out["dff"], atol=1e-4)
  trace = dff[:, 16, 20]
  assert int(np.argmax(trace)) == k_peak
  assert trace[k_peak] == pytest.approx(amp, rel=1e-4)
  # FWHM: half-maximum crossings along x through the centre, linearly interpolated.
  row = dff[k_peak, 16]
  above = np.nonzero(row >= amp / 2)[0]
  lo, hi = above[0], above[-1]
  left = lo - 1 + (amp / 2 - row[lo - 1]) / (row[lo] - row[lo - 1])
  right = hi + (row[hi] - amp / 2) / (row[hi] - row[hi + 1])
  assert (right - left) * GEOM.pixel_size_um == pytest.approx(fwhm_um, rel=0.03)
  # Decay: log-linear fit after the peak.
  k = np.arange(k_peak + 1, k_peak + 12)
  slope = np.polyfit(k * dt, np.log(trace[k]), 1)[0]
  assert -1.0 / slope == pytest.approx(tau, rel=1e-3)
  # Rise: linear over the drawn time to peak (the frame before the peak).
  assert trace[k_peak - 1] == pytest.approx(amp * (rise - dt) / rise, rel=1e-3)


def test_wave_travels_at_the_drawn_speed():
  dt = GEOM.frame_interval_ms
  v = 90.0    # um/s
  wave = dict(kind=sim.WAVE, t0_ms=20.0, x_px=-5.0, rise_ms=15.0, tau_ms=120.0,
              speed_um_per_s=v, amplitude=1.0)
  out = render(scene([wave]))
  dff = out["dff"][:, 10]                    # [T, W] at one row
  t = np.arange(GEOM.num_frames) * dt
  # Half-maximum arrival time at each column (interpolated on the rising edge).
  arrivals, cols = [], []
  for x in range(0, GEOM.width_px, 4):
    tr = dff[:, x]
    k = int(np.argmax(tr >= 0.5))
    if k == 0 or tr[k] < 0.5:
      continue
    arrivals.append(t[k - 1] + (0.5 - tr[k - 1]) / (tr[k] - tr[k - 1]) * dt)
    cols.append(x)
  assert len(cols) >= 5
  slope_ms_per_px = np.polyfit(cols, arrivals, 1)[0]
  speed = GEOM.pixel_size_um / slope_ms_per_px * 1000.0
  assert speed == pytest.approx(v, rel=0.02)
  # The band covers every row of the cell at once.
  assert np.allclose(out["dff"][:, 0], out["dff"][:, -1])
  assert (out["labels"][5:-5] == sim.WAVE).any()


def test_labels_cover_events_and_the_spark_ignore_ring():
  dt = GEOM.frame_interval_ms
  spark = dict(kind=sim.SPARK, t0_ms=10 * dt, y_px=16.0, x_px=12.0, fwhm_um=2.0,
               rise_ms=10.0, tau_ms=25.0, amplitude=0.5)
  puff = dict(kind=sim.PUFF, t0_ms=5 * dt, y_px=16.0, x_px=38.0, fwhm_um=2.0,
              rise_ms=15.0, plateau_ms=100.0, tau_ms=30.0, amplitude=0.3)
  off = dict(kind=sim.SPARK, active=False, t0_ms=10 * dt, y_px=5.0, x_px=40.0,
             fwhm_um=2.0, rise_ms=10.0, tau_ms=25.0, amplitude=1.0)
  s = scene([spark, puff, off])
  out = render(s)
  rel = np.asarray(jax.jit(sim.event_rel, static_argnums=1)(s.events, GEOM))
  lab, inst = out["labels"], out["instances"]
  inner = np.zeros(lab.shape, bool)
  inner[SPEC.ignore_frames:-SPEC.ignore_frames] = True
  core = (rel[0] >= 0.3) & inner
  ring = (rel[0] >= 0.1) & (rel[0] < 0.3) & inner & (rel[1] < 0.3)
  assert core.sum() > 100 and ring.sum() > 100
  assert np.all(lab[core] == sim.SPARK) and np.all(inst[core] == 1)
  assert np.all(lab[ring] == sim.IGNORE) and np.all(inst[ring] == 0)
  puff_core = (rel[1] >= 0.3) & inner
  assert np.all(lab[puff_core] == sim.PUFF) and np.all(inst[puff_core] == 2)
  # The inactive slot leaves no trace; far voxels are background.
  assert not np.any(inst == 3)
  assert np.all(lab[inner & (rel[0] < 0.1) & (rel[1] < 0.3)] == sim.BACKGROUND)
  # First/last frames are ignore with no instance.
  for k in (0, SPEC.ignore_frames - 1, -1):
    assert np.all(lab[k] == sim.IGNORE) and np.all(inst[k] == 0)
  # Events exist only inside the cell: a cell ending at row 12 clips the spark.
  out2 = render(scene([spark], bottom_px=12.0))
  assert not np.any(out2["labels"][:, 14:] == sim.SPARK)
  assert np.abs(out2["dff"][:, 20:] * out2["f0"][None, 20:]).max() < 1e-3 * 20


def test_wave_tail_fraction_relabels_only_background_behind_the_wave():
  dt = GEOM.frame_interval_ms
  wave = dict(kind=sim.WAVE, t0_ms=5 * dt, x_px=-5.0, rise_ms=10.0, tau_ms=60.0,
              speed_um_per_s=300.0, amplitude=2.0)
  spark = dict(kind=sim.SPARK, t0_ms=22 * dt, y_px=16.0, x_px=12.0, fwhm_um=2.0,
               rise_ms=10.0, tau_ms=25.0, amplitude=0.5)
  s = scene([wave, spark])
  base = render(s)
  tail_spec = dataclasses.replace(SPEC, wave_fraction=0.1)
  out = render(s, spec=tail_spec)
  rel = np.asarray(jax.jit(sim.event_rel, static_argnums=1)(s.events, GEOM))
  changed = out["labels"] != base["labels"]
  # Only background voxels change, all into the wave (instance 1), where the wave's rel is
  # in [0.1, 0.3): its slow tail (after the peak) and the foot of its rise.
  assert changed.sum() > 200
  assert np.all(base["labels"][changed] == sim.BACKGROUND)
  assert np.all(out["labels"][changed] == sim.WAVE) and np.all(out["instances"][changed] == 1)
  assert np.all((rel[0][changed] >= 0.1) & (rel[0][changed] < 0.3))
  # The spark on the tail, its ignore ring and the edge frames keep their labels.
  for k in (sim.SPARK, sim.IGNORE):
    assert np.array_equal(out["labels"] == k, base["labels"] == k)
  assert (base["labels"] == sim.SPARK).sum() > 50
  # A tail voxel later than the wave's 0.3 crossing at one column is wave now, not before.
  col = out["labels"][:, 5, 40]
  assert (col == sim.WAVE).sum() > (base["labels"][:, 5, 40] == sim.WAVE).sum()
  # wave_fraction = event_fraction (the config default) is the old rule bit for bit.
  same = render(s, spec=dataclasses.replace(SPEC, wave_fraction=0.3))
  assert np.array_equal(same["labels"], base["labels"])
  assert np.array_equal(same["instances"], base["instances"])
  # A fraction above event_fraction (which would not narrow the waves) is refused.
  cfg = sparks_config.get_config("tiny").sim
  cfg.labels.wave_fraction = 0.5
  with pytest.raises(ValueError, match="wave_fraction"):
    sim.simulator_from_config(cfg)


def test_priors_and_activity_masks():
  cfg = sparks_config.get_config()
  simulator = sim.simulator_from_config(cfg.sim)
  scenes = jax.jit(jax.vmap(lambda k: sim.draw_scene(k, simulator.priors,
                                                     simulator.geometry)))(
      jax.random.split(jax.random.key(1), 400))
  e = jax.tree.map(np.asarray, scenes.events)
  kinds = e.kind[0]
  p = simulator.priors
  assert list(kinds) == list(p.slot_classes())
  sp = kinds == sim.SPARK
  assert e.active[:, sp].mean() == pytest.approx(p.spark_probability, abs=0.04)
  assert e.active[:, kinds == sim.WAVE].mean() == pytest.approx(p.wave_probability, abs=0.07)
  assert p.spark_amplitude[0] <= e.amplitude[:, sp].min()
  assert e.amplitude[:, sp].max() <= p.spark_amplitude[1]
  assert p.spark_fwhm_um[0] <= e.fwhm_um[:, sp].min() <= e.fwhm_um[:, sp].max() <= p.spark_fwhm_um[1]
  pf = kinds == sim.PUFF
  assert p.puff_duration_ms[0] <= e.plateau_ms[:, pf].min()
  assert e.plateau_ms[:, pf].max() <= p.puff_duration_ms[1]
  # Centres lie inside the field.
  assert e.y_px[:, sp].min() >= 0 and e.y_px[:, sp].max() <= simulator.geometry.height_px - 1


# ----------------------------------------------------------------------------- losses
def test_task_loss_hand_values_and_ignore():
  cfg = sparks_config.get_config("tiny").loss
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 5, (2, 6, 5, 4)))
  zeros = jnp.zeros(labels.shape + (4,))
  for name, want in (("ce", math.log(4.0)), ("focal", 0.75 ** 2 * math.log(4.0)),
                     ("lovasz", 0.75)):
    c = cfg.copy_and_resolve_references()
    c.name = name
    c.lovasz_voxels = 0
    loss = jax.jit(lambda lg: task_lib.segmentation_loss(lg, labels, c)[0])(zeros)
    assert float(loss) == pytest.approx(want, rel=1e-5), name
  # Ignored voxels: their logits change neither the loss nor the gradient elsewhere.
  c = cfg.copy_and_resolve_references()
  c.name, c.focal_weight, c.lovasz_voxels = "sum", 0.3, 0
  logits = jax.random.normal(jax.random.key(2), labels.shape + (4,))
  noise = jax.random.normal(jax.random.key(3), logits.shape) * 5.0
  ignored = (labels == sim.IGNORE)[..., None]
  moved = jnp.where(ignored, logits + noise, logits)
  f = jax.jit(lambda lg: task_lib.segmentation_loss(lg, labels, c)[0])
  assert float(f(logits)) == pytest.approx(float(f(moved)), rel=1e-6)
  grad = jax.jit(jax.grad(f))
  g1, g2 = grad(logits), grad(moved)
  np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-7)
  assert float(jnp.abs(jnp.where(ignored, g1, 0.0)).max()) == 0.0
  # The sum is the weighted sum of its terms.
  terms = jax.jit(lambda lg: task_lib.segmentation_loss(lg, labels, c)[1])(logits)
  want = c.ce_weight * terms["ce"] + c.focal_weight * terms["focal"] + c.lovasz_weight * terms["lovasz"]
  assert float(f(logits)) == pytest.approx(float(want), rel=1e-6)


# ----------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def tiny_model():
  """(config, jitted softmax(model) on [B, T, 16, 24, 1], halo, alignment) of a
  randomly initialized tiny network."""
  cfg = sparks_config.get_config("tiny")
  model = model_lib.build_model(cfg.model)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 16, 24, 1)))
  f = jax.jit(lambda x: jax.nn.softmax(model.apply(params, x), -1))
  return (cfg, lambda x: np.asarray(f(x)), model_lib.temporal_halo(cfg.model),
          model_lib.time_alignment(cfg.model))


def _movie(halo, align):
  """A random normalized movie long enough for 4 exact chunks, and the chunking."""
  chunk, stride = 2 * halo + 2 * align + 6, 2 * align
  chunk += (-chunk) % align
  T = chunk + 3 * stride
  return np.asarray(jax.random.normal(jax.random.key(4), (T, 16, 24, 1))), chunk, stride


def test_temporal_halo_bounds_the_receptive_field(tiny_model):
  cfg, f, halo, align = tiny_model
  x, _, _ = _movie(halo, align)
  t0 = x.shape[0] // 2
  y0 = f(x[None])
  x1 = x.copy()
  x1[t0] += 3.0
  y1 = f(x1[None])
  changed = np.nonzero(np.abs(y1 - y0).max(axis=(0, 2, 3, 4)) > 1e-6)[0]
  assert changed.min() >= t0 - halo and changed.max() <= t0 + halo
  assert changed.max() - changed.min() >= halo      # the bound is not loose by 2x


def test_chunked_inference_equals_whole_movie(tiny_model):
  cfg, predict_batch, halo, align = tiny_model
  mesh = trainer.make_mesh()
  x, chunk, stride = _movie(halo, align)
  T = x.shape[0]
  plan = inference.plan_chunks(T, chunk, stride, halo, align)
  assert plan.exact, plan.reason
  assert len(plan.starts) == 4
  whole = predict_batch(x[None])[0]
  chunked = inference.predict_chunked(predict_batch, x, plan, 2, mesh)
  np.testing.assert_allclose(chunked, whole, atol=1e-4)  # float32 rounding
  # Every frame is written exactly once and the kept ranges tile the movie.
  assert plan.keep[0][0] == 0 and plan.keep[-1][1] == T
  assert all(a[1] == b[0] for a, b in zip(plan.keep, plan.keep[1:]))
  # Too little overlap is reported; a movie of any length (padded end) still works.
  assert not inference.plan_chunks(T, chunk, chunk - 2, halo, align).exact
  odd = inference.plan_chunks(T - 5, chunk, stride, halo, align)
  out = inference.predict_chunked(predict_batch, x[:T - 5], odd, 2, mesh)
  assert out.shape == (T - 5, 16, 24, 4) and np.all(np.isfinite(out))
  np.testing.assert_allclose(out[:T - 5 - halo - align], whole[:T - 5 - halo - align],
                             atol=1e-4)


# ----------------------------------------------------------------------------- events
def test_iomin_matching_on_hand_made_instances():
  shape = (10, 10, 10)
  true = np.zeros(shape, np.int32)
  pred = np.zeros(shape, np.int32)
  ignore = np.zeros(shape, bool)
  true_cls = np.array([0, sim.SPARK, sim.WAVE, sim.PUFF, sim.SPARK])
  pred_cls = np.array([0, sim.SPARK, sim.PUFF, sim.PUFF, sim.SPARK, sim.SPARK])
  true[0, 0, :10] = 1            # spark, 10 voxels
  pred[0, 0, 4:10] = 1           # 6 of them,
  pred[0, 1, 0:2] = 1            # plus 2 outside: IoMin 6 / min(10, 8) = 0.75 -> match
  true[2, :4, :5] = 2            # wave, 20 voxels
  pred[2, :4, :5] = 2            # predicted as a puff: class mismatch
  true[4, 0, :10] = 3            # puff, 10 voxels
  pred[4, 0, :4] = 3             # 4 of them,
  pred[4, 1, :6] = 3             # plus 6 outside: IoMin 4 / 10 = 0.4 -> no match
  true[6, 0, :4] = 4             # spark only in ignored voxels: not scored
  ignore[6, 0, :4] = True
  pred[6, 0, :4] = 4             # ... nor the prediction there
  pred[8, 5, 5] = 5              # spurious spark
  pred_cls = np.append(pred_cls, [sim.SPARK, sim.SPARK])
  ignore[9, 0, :] = True         # unannotated frame:
  pred[9, 0, :6] = 6             # a spark 6/8 in it: 'ignored', not a false positive
  pred[8, 0, 6:8] = 6
  pred[9, 0, 8:10] = 7           # one 2/6 in it: a false positive
  pred[8, 0, :4] = 7
  m = ev_lib.match_events(true, true_cls, pred, pred_cls, ignore, 0.5)
  assert m["counts"][sim.SPARK] == (1, 2, 0)    # tp, fp (preds 5, 7), fn
  assert m["counts"][sim.WAVE] == (0, 0, 1)
  assert m["counts"][sim.PUFF] == (0, 2, 1)
  assert 4 not in m["true_ids"] and 4 not in m["pred_ids"] and 6 not in m["pred_ids"]
  conf = m["confusion"]
  assert conf[sim.SPARK, sim.SPARK] == 1 and conf[sim.WAVE, sim.PUFF] == 1
  assert conf[sim.PUFF, 0] == 1 and conf[0, sim.PUFF] == 1 and conf[0, sim.SPARK] == 2
  assert conf.sum() == 6
  # A prediction mostly in ignore still counts when it matches a true event.
  true3 = np.zeros(shape, np.int32)
  true3[0, 0, :3] = 1
  pred3 = np.zeros(shape, np.int32)
  pred3[0, 0, :10] = 1
  ign3 = np.zeros(shape, bool)
  ign3[0, 0, 3:] = True
  m3 = ev_lib.match_events(true3, np.array([0, 1]), pred3, np.array([0, 1]), ign3)
  assert m3["counts"][sim.SPARK] == (1, 0, 0)
  # IoMin (not IoU): a small prediction inside a big true event matches.
  true2 = np.zeros(shape, np.int32)
  true2[:, :6, :6] = 1
  pred2 = np.zeros(shape, np.int32)
  pred2[3:5, 2:4, 2:4] = 1
  m2 = ev_lib.match_events(true2, np.array([0, 2]), pred2, np.array([0, 2]),
                           np.zeros(shape, bool))
  assert m2["counts"][sim.WAVE] == (1, 0, 0)


def test_extraction_splits_merged_sparks_and_drops_small_events():
  spec = ev_lib.EventSpec()
  T, H, W = 20, 24, 40
  t, y, x = np.meshgrid(np.arange(T), np.arange(H), np.arange(W), indexing="ij")
  dff = (np.exp(-((y - 12) ** 2 + (x - 12) ** 2) / 18 - (t - 8) ** 2 / 4)
         + np.exp(-((y - 12) ** 2 + (x - 22) ** 2) / 18 - (t - 9) ** 2 / 4))
  classes = np.zeros((T, H, W), np.uint8)
  classes[dff > 0.3] = sim.SPARK                   # one merged component, two peaks
  classes[15, 2, 2] = sim.SPARK                    # a 1-voxel speck: dropped
  classes[2:14, 18:22, 30:34] = sim.PUFF           # 12 frames x 16 px puff: kept
  assert ndimage.label(classes == sim.SPARK, structure=np.ones((3, 3, 3)))[1] == 2
  inst, cls_of = ev_lib.instances_from_classes(classes, spec, dff)
  events = ev_lib.describe(inst, cls_of, dff, spec)
  sparks = sorted((e for e in events if e.cls == sim.SPARK), key=lambda e: e.x_px)
  assert len(sparks) == 2 and sum(e.cls == sim.PUFF for e in events) == 1
  assert (sparks[0].y_px, sparks[0].x_px) == (12, 12)
  assert (sparks[1].y_px, sparks[1].x_px) == (12, 22)
  assert sparks[0].amplitude == pytest.approx(dff[8, 12, 12])
  puff = [e for e in events if e.cls == sim.PUFF][0]
  assert (puff.t_start, puff.t_end) == (2, 13)
  assert puff.duration_ms == pytest.approx(12 * spec.frame_interval_ms)
  assert puff.area_um2 == pytest.approx(16 * 0.04)
  # Without the peak map the merged sparks stay one event.
  inst1, cls1 = ev_lib.instances_from_classes(classes, spec, None)
  assert sum(c == sim.SPARK for c in cls1) == 1


def test_confidence_filter_drops_unsure_predictions_but_never_true_events():
  T, H, W = 20, 16, 32
  probs = np.zeros((T, H, W, 4), np.float32)
  probs[..., 0] = 1.0
  # Two puffs of 14 frames x 4 x 4 px: one the network is sure of (p = 0.9), one not
  # (p = 0.55, argmax still puff); a sure 14 x 3 x 3 px puff (126 voxels).
  for sl, p in (((slice(2, 16), slice(2, 6), slice(2, 6)), 0.9),
                ((slice(2, 16), slice(2, 6), slice(20, 24)), 0.55),
                ((slice(2, 16), slice(10, 13), slice(12, 15)), 0.9)):
    probs[sl] = (1 - p, 0.0, 0.0, p)
  classes = np.argmax(probs, -1).astype(np.uint8)
  spec = ev_lib.EventSpec()
  _, cls_all = ev_lib.instances_from_classes(classes, spec, None, probs)
  assert sum(c == sim.PUFF for c in cls_all) == 3                      # filter off
  sure = dataclasses.replace(spec, min_probability=(0.0, 0.0, 0.65))
  inst, cls_of = ev_lib.instances_from_classes(classes, sure, None, probs)
  assert sum(c == sim.PUFF for c in cls_of) == 2 and inst[5, 3, 21] == 0 and inst[5, 3, 3] > 0
  voxel = 0.2 ** 2 * 6.8                                               # um^2 ms
  big = dataclasses.replace(sure, min_volume_um2_ms=(0.0, 0.0, 150 * voxel))
  inst, cls_of = ev_lib.instances_from_classes(classes, big, None, probs)
  assert sum(c == sim.PUFF for c in cls_of) == 1 and inst[5, 3, 3] > 0
  # Scoring: the same unsure puff as the truth is still a true event (a miss), not ignored.
  labels = np.where(classes == sim.PUFF, sim.PUFF, 0)
  true_inst, true_cls = ev_lib.instances_from_labels(labels)
  scorer = ev_lib.Scorer(big)
  scorer.add(probs, np.ones((T, H, W), np.float32), labels, true_inst, true_cls)
  m = scorer.metrics()["puff"]
  assert (m["tp"], m["fp"], m["fn"]) == (1, 0, 2)


def test_filter_chosen_on_validation_maximizes_f1_and_matches_the_scorer():
  T, H, W = 20, 16, 48
  probs = np.zeros((T, H, W, 4), np.float32)
  probs[..., 0] = 1.0
  labels = np.zeros((T, H, W), np.uint8)
  # Puffs of 14 frames x 4 x 4 px: three true ones (found with p = 0.9 and 0.61, one
  # missed) and two false ones (p = 0.55, 0.57). Best filter: >= 0.58 (TP 2, FP 0, FN 1).
  for x0, p, true in ((2, 0.9, True), (10, 0.61, True), (18, 0.55, False),
                      (26, 0.57, False), (34, None, True)):
    sl = (slice(2, 16), slice(2, 6), slice(x0, x0 + 4))
    if p is not None:
      probs[sl] = (1 - p, 0.0, 0.0, p)
    if true:
      labels[sl] = sim.PUFF
  true_inst, true_cls = ev_lib.instances_from_labels(labels)
  spec = ev_lib.EventSpec()
  movie = np.ones((T, H, W), np.float32)
  scorer = ev_lib.Scorer(spec)
  scorer.add(probs, movie, labels, true_inst, true_cls)
  chosen = ev_lib.choose_filter(scorer.records)
  assert chosen["min_probability"][2] == pytest.approx(0.58)
  assert chosen["min_volume_um2_ms"][2] == 0.0
  assert (chosen["tp"]["puff"], chosen["fp"]["puff"], chosen["fn"]["puff"]) == (2, 0, 1)
  assert chosen["unfiltered_f1"]["puff"] == pytest.approx(4 / 7)
  assert chosen["f1"]["puff"] == pytest.approx(0.8)
  # The fast counts, the records scored under another filter and a fresh extraction
  # with that filter all agree.
  for mp in (0.0, 0.56, 0.58, 0.62, 0.95):
    f = {"min_probability": (0.0, 0.0, mp), "min_volume_um2_ms": (0.0, 0.0, 0.0)}
    fresh = ev_lib.Scorer(dataclasses.replace(spec, min_probability=(0.0, 0.0, mp)))
    fresh.add(probs, movie, labels, true_inst, true_cls)
    counts = ev_lib.filter_counts(scorer.records, sim.PUFF, mp, 0.0)
    for m in (fresh.metrics()["puff"], scorer.metrics(f)["puff"]):
      assert (m["tp"], m["fp"], m["fn"]) == counts
    _, inst, cls_of, _, _ = ev_lib.extract_events(probs, movie, fresh.spec)
    assert sum(c == sim.PUFF for c in cls_of) == counts[0] + counts[1]


def test_amplitude_floor_is_chosen_when_false_events_are_faint():
  """Sure but faint false puffs (dF/F0 0.05) beside bright true ones (0.5): no
  probability or volume threshold separates them, the estimated peak dF/F0 does."""
  T, H, W = 20, 16, 48
  probs = np.zeros((T, H, W, 4), np.float32)
  probs[..., 0] = 1.0
  labels = np.zeros((T, H, W), np.uint8)
  movie = np.full((T, H, W), 10.0, np.float32)
  for x0, amp, true in ((2, 0.5, True), (10, 0.05, False), (18, 0.5, True),
                        (26, 0.05, False), (34, 0.05, False)):
    sl = (slice(2, 16), slice(2, 6), slice(x0, x0 + 4))
    probs[sl] = (0.1, 0.0, 0.0, 0.9)
    movie[sl] *= 1.0 + amp
    if true:
      labels[sl] = sim.PUFF
  true_inst, true_cls = ev_lib.instances_from_labels(labels)
  spec = ev_lib.EventSpec()
  scorer = ev_lib.Scorer(spec)
  rec = scorer.add(probs, movie, labels, true_inst, true_cls)
  amps = sorted(rec.amp[1:])
  assert amps[2] < 0.05 < amps[3]                  # smoothed: faint ~0.02, bright ~0.2
  chosen = ev_lib.choose_filter(scorer.records)
  assert chosen["min_amplitude_dff"][2] == pytest.approx(0.05)
  assert chosen["min_probability"][2] == 0.0 and chosen["min_volume_um2_ms"][2] == 0.0
  assert (chosen["tp"]["puff"], chosen["fp"]["puff"], chosen["fn"]["puff"]) == (2, 0, 0)
  assert chosen["unfiltered_f1"]["puff"] == pytest.approx(4 / 7)
  # The extraction applies the floor as the scorer counts it.
  floor = dataclasses.replace(spec, min_amplitude_dff=(0.0, 0.0, 0.05))
  _, _, cls_of, events, _ = ev_lib.extract_events(probs, movie, floor)
  assert sum(c == sim.PUFF for c in cls_of) == 2
  assert all(e.amplitude > 0.05 for e in events)
  assert scorer.metrics(dict(chosen))["puff"]["fp"] == 0


def test_noise_map_follows_photon_noise():
  """Poisson movie at F0 25 photons (left) and 100 (right): the noise SD of the smoothed
  dF/F0 is twice as large on the left, and an event's peak over it (SNR) says so."""
  rng = np.random.default_rng(0)
  T, H, W = 64, 32, 64
  f0 = np.where(np.arange(W) < W // 2, 25.0, 100.0)[None, None, :] * np.ones((T, H, 1))
  movie = rng.poisson(f0).astype(np.float32)
  spec = ev_lib.EventSpec()
  classes = np.zeros((T, H, W), np.uint8)
  dff = ev_lib.estimate_dff(movie, classes, spec)
  sd = ev_lib.noise_dff(dff, classes == 0)
  left, right = np.median(sd[:, 4:24]), np.median(sd[:, 40:60])
  assert left / right == pytest.approx(2.0, rel=0.15)
  # direct: the temporal SD of the smoothed dF/F0 at a pixel far from the edge
  assert right == pytest.approx(np.std(dff[:, 16, 50]), rel=0.25)
  inst = np.zeros((T, H, W), np.int32)
  inst[30:34, 14:18, 12:16] = 1
  inst[30:34, 14:18, 44:48] = 2
  dff[30:34, 14:18, 12:16] += 0.2
  dff[30:34, 14:18, 44:48] += 0.2
  snr = ev_lib.event_snr(inst, np.array([0, sim.PUFF, sim.PUFF]), dff)
  assert snr[2] > 1.6 * snr[1]


def test_dff_and_noise_ignore_bleaching_and_an_unsegmented_wave():
  """Poisson movie at 50 photons that bleaches to 80% and, for 25 of its 160 frames,
  carries +150% from a wave that no segmented event covers (its part below half its
  peak): the robust estimates keep F0 within 6% of the resting level and the noise
  within 25% of the photon noise (temporal SD of a smoothed movie without either);
  the mean / SD estimates miss both by far more (F0 +20%, noise several times)."""
  rng = np.random.default_rng(3)
  T, H, W = 160, 24, 24
  t = np.arange(T, dtype=np.float64)
  trend = 1.0 - 0.2 * t / (T - 1)                               # bleaching to 80%
  wave = np.where((t >= 100) & (t < 125), 1.5, 0.0)
  clean = rng.poisson(45.0 * np.ones((T, H, W))).astype(np.float32)   # resting level
  movie = rng.poisson(50.0 * (trend + wave)[:, None, None] * np.ones((T, H, W))
                      ).astype(np.float32)
  classes = np.zeros((T, H, W), np.uint8)
  spec = ev_lib.EventSpec()
  photon_sd = float(np.median(np.std(ev_lib.estimate_dff(clean, classes, spec), axis=0)))
  out = {}
  for est in ("robust", "mean"):
    s = dataclasses.replace(spec, dff_estimator=est)
    dff = ev_lib.estimate_dff(movie, classes, s)
    f0 = float(np.median(ev_lib.smooth(movie, s) / (dff + 1.0)))   # what it divided by
    out[est] = (f0, float(np.median(ev_lib.noise_dff(dff, classes == 0,
                                                     robust=est == "robust"))))
  rest = float(np.median(50.0 * trend))
  assert out["robust"][0] == pytest.approx(rest, rel=0.06)
  assert out["mean"][0] > 1.15 * rest
  assert out["robust"][1] == pytest.approx(photon_sd, rel=0.25)
  assert out["mean"][1] > 3 * photon_sd


def test_snr_floor_is_chosen_when_false_events_sit_in_noisy_regions():
  """Puffs of the same dF/F0 (0.15) where the dye is bright (400 photons: true) and
  where it is 16x dimmer (false: bumps of that size are noise there): no amplitude floor
  separates them, the floor in units of the noise does."""
  rng = np.random.default_rng(1)
  T, H, W = 40, 16, 96
  f0 = np.where(np.arange(W) < 48, 400.0, 25.0)[None, None, :] * np.ones((T, H, 1))
  expected = f0.copy()
  probs = np.zeros((T, H, W, 4), np.float32)
  probs[..., 0] = 1.0
  labels = np.zeros((T, H, W), np.uint8)
  for x0, true in ((6, True), (26, True), (54, False), (74, False)):
    sl = (slice(12, 28), slice(6, 10), slice(x0, x0 + 4))
    probs[sl] = (0.1, 0.0, 0.0, 0.9)
    expected[sl] *= 1.15
    if true:
      labels[sl] = sim.PUFF
  movie = rng.poisson(expected).astype(np.float32)
  true_inst, true_cls = ev_lib.instances_from_labels(labels)
  scorer = ev_lib.Scorer(ev_lib.EventSpec())
  rec = scorer.add(probs, movie, labels, true_inst, true_cls)
  assert min(rec.snr[1:3]) > 2 * max(rec.snr[3:])
  assert ev_lib.choose_filter(scorer.records)["min_snr"] == (0.0, 0.0, 0.0)   # default grid
  assert ev_lib.filter_floors(False) == ev_lib.FLOOR_GRID      # config.events.tune_snr_floor
  chosen = ev_lib.choose_filter(scorer.records, floors=ev_lib.filter_floors(True))
  assert chosen["min_snr"][2] > 0 and chosen["min_amplitude_dff"][2] == 0.0
  assert (chosen["tp"]["puff"], chosen["fp"]["puff"], chosen["fn"]["puff"]) == (2, 0, 0)
  assert chosen["unfiltered_f1"]["puff"] == pytest.approx(2 / 3)
  assert all(ev_lib.filter_counts(scorer.records, sim.PUFF, 0.0, 0.0, a) != (2, 0, 0)
             for a in ev_lib.AMPLITUDE_GRID_DFF)
  # The extraction applies the floor as the scorer counts it.
  floor = dataclasses.replace(ev_lib.EventSpec(), min_snr=(0.0, 0.0, chosen["min_snr"][2]))
  _, inst, cls_of, events, _ = ev_lib.extract_events(probs, movie, floor)
  assert sorted(e.x_px < 48 for e in events) == [True, True]
  assert scorer.metrics(dict(chosen))["puff"]["fp"] == 0
  # A fixed minimum (config.events.min_snr_fixed) holds whatever the grid prefers: so
  # high that the true puffs go too, it is kept and F1 falls to 0.
  top = float(np.nanmax(rec.snr))
  fixed = ev_lib.choose_filter(scorer.records, min_snr_fixed=(0.0, 0.0, top + 1.0))
  assert fixed["min_snr"] == (0.0, 0.0, top + 1.0) and fixed["tp"]["puff"] == 0
  assert fixed["unfiltered_f1"]["puff"] == pytest.approx(2 / 3)


def test_puff_volume_ceiling_drops_only_regions_larger_than_any_puff():
  """config.events.max_volume_um2_ms: two sure true puffs (4 x 4 px x 14 frames) and
  one sure false 'puff' 16x their volume (a region no puff makes): no probability or
  volume floor removes it, the ceiling does; the fast counts, the scorer, the filter's
  choice and a fresh extraction agree, and a ceiling of 0 is off."""
  T, H, W = 40, 16, 64
  probs = np.zeros((T, H, W, 4), np.float32)
  probs[..., 0] = 1.0
  labels = np.zeros((T, H, W), np.uint8)
  for sl, true in (((slice(2, 16), slice(2, 6), slice(2, 6)), True),
                   ((slice(2, 16), slice(2, 6), slice(10, 14)), True),
                   ((slice(4, 32), slice(2, 14), slice(24, 56)), False)):
    probs[sl] = (0.1, 0.0, 0.0, 0.9)
    if true:
      labels[sl] = sim.PUFF
  true_inst, true_cls = ev_lib.instances_from_labels(labels)
  movie = np.ones((T, H, W), np.float32)
  spec = ev_lib.EventSpec()
  voxel = spec.pixel_size_um ** 2 * spec.frame_interval_ms
  small, big = 14 * 16 * voxel, 28 * 12 * 32 * voxel
  ceiling = (0.0, 0.0, 2 * small)
  scorer = ev_lib.Scorer(spec)
  rec = scorer.add(probs, movie, labels, true_inst, true_cls)
  assert sorted(rec.volume[1:]) == pytest.approx([small, small, big])
  assert ev_lib.filter_counts(scorer.records, sim.PUFF, 0.0, 0.0) == (2, 1, 0)
  assert ev_lib.filter_counts(scorer.records, sim.PUFF, 0.0, 0.0, max_volume=2 * small) == (2, 0, 0)
  assert ev_lib.filter_counts(scorer.records, sim.PUFF, 0.0, 0.0, max_volume=small / 2) == (0, 0, 2)
  assert ev_lib.choose_filter(scorer.records)["fp"]["puff"] == 1      # no ceiling: kept
  chosen = ev_lib.choose_filter(scorer.records, max_volume_um2_ms=ceiling)
  assert (chosen["tp"]["puff"], chosen["fp"]["puff"], chosen["fn"]["puff"]) == (2, 0, 0)
  capped = dataclasses.replace(spec, max_volume_um2_ms=ceiling)
  fresh = ev_lib.Scorer(capped)
  fresh.add(probs, movie, labels, true_inst, true_cls)
  assert fresh.metrics()["puff"]["fp"] == 0 and scorer.metrics()["puff"]["fp"] == 1
  _, _, cls_of, events, _ = ev_lib.extract_events(probs, movie, capped)
  assert len(events) == 2 and all(e.x_px < 16 for e in events)
  _, _, cls_of, _, _ = ev_lib.extract_events(probs, movie, spec)
  assert sum(c == sim.PUFF for c in cls_of) == 3
  # From the config: the default caps puffs only; configs without the key are uncapped.
  config = sparks_config.get_config("tiny")
  assert ev_lib.spec_from_config(config).max_volume_um2_ms[:2] == (0.0, 0.0)
  assert ev_lib.spec_from_config(config).max_volume_um2_ms[2] > 0
  assert ev_lib.choice_options(config.events)["max_volume_um2_ms"][2] > 0
  del config.events["max_volume_um2_ms"]
  assert ev_lib.spec_from_config(config).max_volume_um2_ms == (0.0, 0.0, 0.0)
  assert ev_lib.choice_options(config.events)["max_volume_um2_ms"] == (0.0, 0.0, 0.0)


def test_spark_pieces_touching_a_wave_become_the_wave():
  """Step 1b (absorb_into_waves): a spark region touching a wave band joins it, a
  spark elsewhere stays a spark even with a stray wave voxel inside (too small to be a
  wave); off, both stay sparks."""
  T, H, W = 24, 16, 64
  classes = np.zeros((T, H, W), np.uint8)
  classes[4:20, :, 4:36] = sim.WAVE                 # 20.5 um^2: above the wave minimum
  classes[8:12, 5:11, 36:42] = sim.SPARK            # touches the wave's edge
  classes[8:12, 5:11, 52:58] = sim.SPARK            # far from it
  classes[10, 8, 56] = sim.WAVE                     # a stray wave voxel in that spark
  out = ev_lib.absorb_into_waves(classes, ev_lib.EventSpec())
  assert np.all(out[8:12, 5:11, 36:42] == sim.WAVE)
  assert np.sum(out[8:12, 5:11, 52:58] == sim.SPARK) == 4 * 36 - 1
  assert np.sum(out == sim.WAVE) == np.sum(classes == sim.WAVE) + 4 * 36
  probs = np.eye(4, dtype=np.float32)[classes]
  movie = np.ones((T, H, W), np.float32)
  movie[10, 8, 39] = movie[10, 8, 55] = 20.0        # one peak per spark
  for absorb, sparks in ((False, 2), (True, 1)):
    spec = ev_lib.EventSpec(absorb_into_waves=absorb)
    _, _, cls_of, _, _ = ev_lib.extract_events(probs, movie, spec)
    assert sum(c == sim.SPARK for c in cls_of) == sparks
    assert sum(c == sim.WAVE for c in cls_of) == 1


def test_puffs_in_a_wave_tail_are_dropped_and_others_kept():
  """Step 4b (wave_tail_fraction): a puff where the wave passed earlier is its decay and
  is dropped; a puff at the same pixels BEFORE the wave, or beside it, stays; off, all
  three stay. A wave below its minimum size does not count."""
  T, H, W = 80, 16, 64
  classes = np.zeros((T, H, W), np.uint8)
  classes[20:40, :, 4:36] = sim.WAVE                # 20.5 um^2, 136 ms: a wave
  classes[50:70, 5:11, 10:16] = sim.PUFF            # after it, where it was: a tail
  classes[2:16, 5:11, 20:26] = sim.PUFF             # before it, same pixels: kept
  classes[50:70, 5:11, 48:54] = sim.PUFF            # beside it: kept
  probs = np.eye(4, dtype=np.float32)[classes]
  movie = np.ones((T, H, W), np.float32)
  for frac, puffs in ((0.0, 3), (0.5, 2), (1.0, 2)):
    spec = ev_lib.EventSpec(wave_tail_fraction=frac)
    _, inst, cls_of, _, _ = ev_lib.extract_events(probs, movie, spec)
    assert sum(c == sim.PUFF for c in cls_of) == puffs, frac
    if frac:
      assert np.all(inst[50:70, 5:11, 10:16] == 0)
      assert np.all(inst[2:16, 5:11, 20:26] > 0) and np.all(inst[50:70, 5:11, 48:54] > 0)
  small = classes.copy()
  small[20:40, :, 10:36] = 0                        # 6 x 16 px: below the wave minimum
  _, _, cls_of, _, _ = ev_lib.extract_events(np.eye(4, dtype=np.float32)[small], movie,
                                             ev_lib.EventSpec(wave_tail_fraction=0.5))
  assert sum(c == sim.PUFF for c in cls_of) == 3


# ----------------------------------------------------------------------------- training + CLI
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  cfg = sparks_config.get_config("tiny")
  workdir = str(tmp_path_factory.mktemp("sparks") / "run")
  metrics = trainer.train_and_evaluate(cfg, workdir)
  return workdir, metrics


def test_two_training_steps_through_the_shared_trainer(tiny_run):
  workdir, metrics = tiny_run
  assert {"spark", "wave", "puff", "voxel_iou", "confusion"} <= set(metrics)
  rows = [__import__("json").loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == [1, 2] and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  assert any("eval/spark/f1" in r for r in rows)
  config, task, state = trainer.load_run(workdir)
  assert int(state["step"]) == 2 and config.task == "sparks"
  # The confidence filter chosen on the validation movies is saved and used by predict.
  chosen = ev_lib.load_filter(workdir)
  assert chosen["step"] == 2 and len(chosen["min_probability"]) == 3
  assert "chosen on 4 validation movies" in ev_lib.use_run_filter(config, workdir)
  assert tuple(config.events.min_probability) == tuple(chosen["min_probability"])


def test_init_from_starts_from_the_runs_parameters(tiny_run):
  workdir, _ = tiny_run
  _, params, _ = trainer.load_variables(workdir)
  cfg = sparks_config.get_config("tiny")
  fresh = task_lib.SparksTask(cfg).init_variables(jax.random.key(0))["params"]
  cfg.init_from = workdir
  warm = task_lib.SparksTask(cfg).init_variables(jax.random.key(0))["params"]
  for a, b, c in zip(jax.tree.leaves(warm), jax.tree.leaves(params), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(np.abs(np.asarray(b) - np.asarray(c)).max() > 0
             for b, c in zip(jax.tree.leaves(params), jax.tree.leaves(fresh)))
  cfg.model.base_width = 6                 # another model: refused with a clear message
  with pytest.raises(ValueError, match="init_from"):
    task_lib.SparksTask(cfg).init_variables(jax.random.key(0))


def test_evaluate_simulated_draws_from_other_priors(tiny_run, tmp_path):
  from smlm_jax.sparks import evaluate
  workdir, _ = tiny_run
  quiet = lambda *a, **k: None
  own = evaluate.evaluate_simulated(workdir, 4, 11, str(tmp_path / "a"), log=quiet)
  cfg = sparks_config.get_config("tiny")
  same = evaluate.evaluate_simulated(workdir, 4, 11, str(tmp_path / "b"), log=quiet,
                                     sim_config=cfg.sim)
  for c in ("spark", "wave", "puff"):               # the run's own priors: same movies
    assert [own[c][k] for k in ("tp", "fp", "fn")] == [same[c][k] for k in ("tp", "fp", "fn")]
  for g in ("sparks", "puffs", "waves"):            # priors without any event
    cfg.sim[g].probability = 0.0
  empty = evaluate.evaluate_simulated(workdir, 4, 11, str(tmp_path / "c"), log=quiet,
                                      sim_config=cfg.sim)
  assert sum(own[c]["tp"] + own[c]["fn"] for c in ("spark", "wave", "puff")) > 0
  assert all(empty[c]["tp"] + empty[c]["fn"] == 0 for c in ("spark", "wave", "puff"))


def test_mirror_tta_averages_the_four_flips(tiny_run):
  workdir, _ = tiny_run
  mesh = trainer.make_mesh()
  config, task, state = trainer.load_run(workdir, mesh)
  x = np.asarray(jax.random.normal(jax.random.key(3), (4, 16, 16, 24, 2)))
  one = task.predict_fn(mesh, tta=False)
  four = np.asarray(task.predict_fn(mesh, tta=True)(state, x))
  expected = np.mean([np.flip(np.asarray(one(state, np.flip(x, a).copy())), a)
                      for a in ((), (2,), (3,), (2, 3))], axis=0)
  np.testing.assert_allclose(four, expected, atol=1e-5)
  assert np.abs(four - np.asarray(one(state, x))).max() > 1e-4   # the flips differ
  np.testing.assert_allclose(four.sum(-1), 1.0, atol=1e-5)


def test_predict_round_trip_and_bad_input(tiny_run, tmp_path, capsys):
  from smlm_jax.sparks import predict
  workdir, _ = tiny_run
  # 40 frames (longer than the tiny run's 16-frame chunks): a cell with one spark.
  t, y, x = np.meshgrid(np.arange(40), np.arange(16), np.arange(24), indexing="ij")
  spark = 0.8 * np.exp(-((y - 8) ** 2 + (x - 12) ** 2) / 20) * np.exp(-np.abs(t - 20) / 4)
  movie = 100 + np.random.default_rng(0).poisson(20 * (1 + spark)).astype(np.float32)
  good = str(tmp_path / "cell.tif")
  tiff_io.write_image(good, movie.astype(np.float32), "TYX", pixel_size_nm=200.0,
                      frame_interval_s=0.0068)
  flat = str(tmp_path / "frame.tif")
  tiff_io.write_image(flat, movie[0], "YX")
  out = str(tmp_path / "out")
  code = predict.run(workdir, [good, flat, str(tmp_path / "missing.tif")], out,
                     plots=True)
  err = capsys.readouterr().err
  assert code == 1
  assert err.count("error:") == 2 and "single 2D frame" in err and "line-scan" in err
  classes = tiff_io.read_image(os.path.join(out, "cell_classes.tif"))
  assert classes.data.shape == movie.shape and classes.data.max() <= 3
  assert classes.pixel_size_nm == pytest.approx(200.0)
  assert classes.frame_interval_s == pytest.approx(0.0068)
  probs = tiff_io.read_image(os.path.join(out, "cell_probabilities.tif"))
  assert probs.data.shape == (movie.shape[0], 4) + movie.shape[1:]
  np.testing.assert_allclose(probs.data.sum(1), 1.0, atol=1e-4)
  k = int(sparks_config.get_config("tiny").sim.labels.ignore_frames)   # untrained: background
  np.testing.assert_array_equal(np.argmax(probs.data, 1)[k:-k], classes.data[k:-k])
  assert not classes.data[:k].any() and not classes.data[-k:].any()
  text = open(os.path.join(out, "cell_events.csv")).read()
  rows = list(csv.reader(l for l in io.StringIO(text) if not l.startswith("#")))
  assert tuple(rows[0]) == predict.EVENT_COLUMNS
  inst = tiff_io.read_image(os.path.join(out, "cell_instances.tif")).data
  assert len(rows) - 1 == len(np.unique(inst[inst > 0]))
  assert os.path.exists(os.path.join(out, "cell_events.png"))
  summary = open(os.path.join(out, "summary.csv")).read()
  assert "error:single_frame" in summary and "error:not_found" in summary
  assert summary.count(",ok") == 1


def test_puff_ceiling_of_a_trained_run_can_be_changed_at_inference(tiny_run):
  """predict / evaluate --max_puff_volume_um2_ms: the run's own ceiling by default
  (10000 since the key exists), another (0 = none) when given; only puffs change."""
  from smlm_jax.sparks import predict
  workdir, _ = tiny_run
  own = predict.Segmenter(workdir)
  assert tuple(own.task.config.events.max_volume_um2_ms) == (0.0, 0.0, 10000.0)
  assert "volume <= (inf, inf, 10000.0)" in own.filter_note
  other = predict.Segmenter(workdir, max_puff_volume_um2_ms=0.0)
  assert tuple(other.task.config.events.max_volume_um2_ms) == (0.0, 0.0, 0.0)
  assert "volume <=" not in other.filter_note
  spec = ev_lib.spec_from_config(predict.Segmenter(workdir, max_puff_volume_um2_ms=50.0).config)
  assert spec.max_volume_um2_ms == (0.0, 0.0, 50.0)
  with pytest.raises(ValueError, match=">= 0"):
    ev_lib.set_puff_ceiling(sparks_config.get_config("tiny"), -1.0)
  # The filter file keeps the ceiling it was chosen under (training: the config's);
  # evaluate --tune under another saves that one, which predict then uses unless told.
  assert tuple(ev_lib.load_filter(workdir)["max_volume_um2_ms"]) == (0.0, 0.0, 10000.0)
  from smlm_jax.sparks import evaluate
  copy = os.path.join(os.path.dirname(workdir), "ceiling_copy")
  shutil.copytree(workdir, copy)
  evaluate.tune_run(copy, 2, 5, log=lambda *a, **k: None, max_puff_volume_um2_ms=0.0)
  assert tuple(ev_lib.load_filter(copy)["max_volume_um2_ms"]) == (0.0, 0.0, 0.0)
  assert tuple(predict.Segmenter(copy).config.events.max_volume_um2_ms) == (0.0, 0.0, 0.0)
  assert predict.Segmenter(copy, max_puff_volume_um2_ms=7.0).config.events.max_volume_um2_ms[2] == 7.0


def test_evaluate_scores_an_annotated_movie(tiny_run, tmp_path):
  from smlm_jax.sparks import evaluate
  workdir, _ = tiny_run
  t, y, x = np.meshgrid(np.arange(24), np.arange(16), np.arange(24), indexing="ij")
  spark = np.exp(-((y - 8) ** 2 + (x - 12) ** 2) / 20) * np.exp(-np.abs(t - 12) / 3)
  movie = 100 + np.random.default_rng(1).poisson(20 * (1 + spark)).astype(np.float32)
  labels = np.where(spark > 0.3, sim.SPARK, sim.BACKGROUND).astype(np.uint8)
  labels[:2] = labels[-2:] = sim.IGNORE
  mpath, lpath = str(tmp_path / "m.tif"), str(tmp_path / "l.tif")
  tiff_io.write_image(mpath, movie, "TYX")
  tiff_io.write_image(lpath, labels, "TYX")
  out = str(tmp_path / "eval")
  m = evaluate.evaluate_annotated(workdir, [mpath], [lpath], output=out, log=lambda *a, **k: None)
  assert m["spark"]["tp"] + m["spark"]["fn"] == 1
  assert m["wave"]["tp"] + m["wave"]["fn"] == 0
  assert np.asarray(m["confusion"]).shape == (4, 4)
  assert os.path.exists(os.path.join(out, "metrics.json"))
  # True amplitudes (e.g. a simulator's metadata) put the true spark in its dF/F0 bin.
  assert sum(r["n_true"] for r in m["f1_vs_amplitude"].get("spark", [])) == 0
  m = evaluate.evaluate_annotated(workdir, [mpath], [lpath], output=out,
                                  log=lambda *a, **k: None, amplitudes=[{1: 1.1}])
  rows = [r for r in m["f1_vs_amplitude"]["spark"] if r["n_true"]]
  assert len(rows) == 1 and rows[0]["n_true"] == 1 and rows[0]["lo"] <= 1.1 < rows[0]["hi"]
  bad = np.zeros((3, 16, 24), np.uint8)
  tiff_io.write_image(lpath, bad, "TYX")
  with pytest.raises(tiff_io.MovieError, match="do not match"):
    evaluate.evaluate_annotated(workdir, [mpath], [lpath], output=out)


def test_predict_command_fails_in_one_line(tmp_path):
  import subprocess
  import sys
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  r = subprocess.run([sys.executable, "-m", "smlm_jax.sparks.predict",
                      f"--workdir={tmp_path / 'none'}", f"--input={tmp_path}",
                      f"--output={tmp_path / 'out'}"], capture_output=True, text=True, env=env,
                     timeout=120)
  assert r.returncode == 2
  lines = [l for l in r.stderr.splitlines() if l.strip() and "WARNING" not in l]
  assert len(lines) == 1 and lines[0].startswith("error:") and "no checkpoints" in lines[0]


def test_model_input_dff_channel_keeps_a_long_event():
  """Channel 1 is photons / F0 - 1 with F0 a low temporal quantile: an event lasting 65%
  of the movie (a median F0 would absorb it) still reads its dF/F0; channel 0 is the
  photons over the movie's mean."""
  camera = sim.simulator_from_config(sparks_config.get_config("tiny").sim).camera
  photons = np.full((20, 12, 12), 20.0, np.float32)
  photons[:13, 3:9, 3:9] *= 1.5                         # dF/F0 = 0.5 for 13 of 20 frames
  adu = photons * camera.adu_per_photon + camera.offset_adu
  x = np.asarray(task_lib.model_input(jnp.asarray(adu), camera))
  assert x.shape == (20, 12, 12, task_lib.INPUT_CHANNELS)
  np.testing.assert_allclose(x[:13, 5:7, 5:7, 1], 0.5, atol=1e-5)
  np.testing.assert_allclose(x[13:, 5:7, 5:7, 1], 0.0, atol=1e-5)
  np.testing.assert_allclose(x[:, 0, 0, 1], 0.0, atol=1e-5)
  np.testing.assert_allclose(x[..., 0].mean(), 1.0, atol=1e-5)
  assert float(np.median(photons[:, 5, 5])) == 30.0      # a median F0 would absorb it
