"""events on real data: the structure check, hard negatives, the calibration.

The structure check flags a pure-noise crop and passes a crop with tubules (synthetic,
and the shared iSIM crops when ../shared is there), through ``db add`` too; hard
negatives never come near an annotated site of any frame; the calibration recovers
known simulator parameters from simulated crops (the column stripes too); the
stripes are a fixed per-column gain, off (bit for bit) at the default.
"""
import os

import numpy as np
import pytest

from smlm_jax.events import crops, data, db as db_lib, quality

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("EVENTS_ISIM_DIR",     # default: the shared iSIM crops
                        os.path.join(ROOT, "..", "shared", "real-data", "events_isim"))
NOISE_CROP = "643a9c8cc961ee3e0ca48b33"


def _tubule_crop(rng, t=5, size=96, photons=60.0, background=5.0):
  """[t, size, size] ADU: two bright Gaussian lines (5 px sigma) on a background,
  Poisson noise, gain 2.5, offset 100; and the same without the lines."""
  y, x = np.mgrid[:size, :size].astype(np.float64)
  lines = np.exp(-0.5 * ((y - 0.5 * x - 20) / 5) ** 2) + np.exp(-0.5 * ((x - 70) / 4) ** 2)
  def adu(lam):
    return (100 + 2.5 * rng.poisson(np.broadcast_to(lam, (t, size, size)))).astype(np.float32)
  return adu(background + photons * lines), adu(np.full((size, size), background))


def _write(folder, images, rng):
  gt = np.zeros(images.shape, np.float32)
  gt[:, 40:43, 40:43] = 1.0
  crops.write_crop(folder, images, gt, {"_id": os.path.basename(folder), "type": "event",
                                        "microscope": ["isim"]})


def test_structure_check_flags_noise_and_passes_tubules(tmp_path, capsys):
  rng = np.random.default_rng(0)
  tubes, noise = _tubule_crop(rng)
  assert quality.structure_snr(tubes) > 2 * quality.MIN_STRUCTURE_SNR
  assert quality.structure_snr(noise) < quality.MIN_STRUCTURE_SNR
  for lam in (0.3, 3.0, 100.0):                   # camera noise at any level
    assert not quality.usable(quality.structure_snr(rng.poisson(lam, (3, 64, 64))))
  _write(str(tmp_path / "crops" / "tubes"), tubes, rng)
  _write(str(tmp_path / "crops" / "noise"), noise, rng)
  path = str(tmp_path / "events.db")
  with db_lib.EventDB(path) as database:
    assert db_lib.cmd_add(database, [str(tmp_path / "crops")]) == 0
    assert [r["event_id"] for r in database.query(usable_only=True)] == ["tubes"]
    assert [r["event_id"] for r in database.query(["usable=0"])] == ["noise"]
  err = capsys.readouterr().err
  assert "note: noise" in err and "no structure" in err and "note: tubes" not in err
  # Training leaves the flagged crop out unless asked.
  from configs import events
  d = events.get_config("tiny").data
  d.update(db=path, val_fraction=0.0)
  assert [r["event_id"] for r in data.split_records(d)[0]] == ["tubes"]
  d.include_unusable = True
  assert sorted(r["event_id"] for r in data.split_records(d)[0]) == ["noise", "tubes"]
  if os.path.isdir(SHARED):                       # the shared iSIM crops
    records = [db_lib.read_folder(f) for f in db_lib.find_folders([SHARED])[0]]
    flagged = {r["event_id"] for r in records if not r["usable"]}
    assert flagged == {NOISE_CROP} and len(records) == 6


def test_version_1_database_gets_the_new_columns(tmp_path):
  import sqlite3
  path = str(tmp_path / "old.db")
  c = sqlite3.connect(path)
  schema = db_lib._SCHEMA.replace("  structure_snr REAL,\n  usable INTEGER NOT NULL "
                                  "DEFAULT 1,\n", "")
  assert "usable" not in schema
  c.executescript(schema + "; INSERT INTO info VALUES ('schema_version', '1');")
  c.close()
  with db_lib.EventDB(path) as database:
    assert database.query(usable_only=True) == []
    version = database.conn.execute("SELECT value FROM info").fetchone()[0]
  assert version == db_lib.SCHEMA_VERSION


def test_hard_negatives_never_contain_an_annotated_site():
  rng = np.random.default_rng(1)
  t, h, w = 6, 160, 200
  yy, xx = np.mgrid[:h, :w]
  frames = np.broadcast_to((yy * 1000 + xx).astype(np.float32), (t, h, w)).copy()
  truth = np.zeros((t, h, w), np.float32)
  sites = [(1, 40, 50), (3, 100, 150), (4, 120, 30)]   # different frames, all count
  for f, y, x in sites:
    truth[f] = np.maximum(truth[f], np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 8.0) *
                          (((yy - y) ** 2 + (xx - x) ** 2) < 25))
  crop = data.Crop(frames, truth, {"event_id": "x"})
  sampler = data.HostSampler([crop], 3, 32, seed=0, positive_fraction=0.0,
                             negative_fraction=1.0)
  batch = sampler(0, 300)
  assert batch["frames"].shape == (300, 3, 48, 48) and not batch["label"].any()
  y0 = (batch["frames"][:, 0, 0, 0] // 1000).astype(int)
  x0 = (batch["frames"][:, 0, 0, 0] % 1000).astype(int)
  for a, b in zip(y0, x0):                       # the window and 8 px around it
    for _, y, x in sites:
      assert not (a - 8 <= y < a + 48 + 8 and b - 8 <= x < b + 48 + 8), (a, b, y, x)
  assert len(set(zip(y0, x0))) > 100             # spread, not one safe corner
  # Mixed fractions: positives still placed around the site, negatives label 0.
  mixed = data.HostSampler([crop], 3, 32, seed=0, positive_fraction=0.5,
                           negative_fraction=0.5)(1, 200)
  has = mixed["label"].max(axis=(1, 2)) > 0.5
  assert 0.05 < has.mean() < 0.6


def test_calibration_recovers_known_parameters():
  import jax
  from configs import events
  from smlm_jax.events import calibrate, simulate as sim_lib
  cfg = events.get_config("tiny")
  truth = {"photons": (60.0, 150.0), "diameter_nm": (500.0, 700.0), "drift_px": 1.5,
           "column_gain_rel_std": 0.15}
  p = sim_lib.SimParams.from_config({**cfg.sim.to_dict(), **truth, "size_px": 32})
  frames, _ = jax.jit(sim_lib.batch, static_argnums=(1, 2))(
      jax.random.split(jax.random.key(100), 64), p, 3)
  rec = calibrate.calibrate(np.asarray(frames), cfg.sim, 32, 3, steps=40, num_sim=32,
                            learning_rate=0.08, log=lambda *a: None)
  fit = rec["sim"]
  assert rec["fit"]["loss"] < 0.5 * rec["fit"]["loss_initial"]
  # Each recovered within 25%, and closer to the truth than the start.
  for key in ("drift_px", "diameter_nm", "column_gain_rel_std"):
    for got, want, start in zip(np.ravel(fit[key]), np.ravel(truth[key]),
                                np.ravel(calibrate.STARTS.get(key, cfg.sim[key]))):
      assert abs(got - want) < 0.25 * want and abs(got - want) < abs(start - want), key
  centre = lambda r: np.sqrt(r[0] * r[1])
  assert abs(centre(fit["photons"]) / centre(truth["photons"]) - 1) < 0.3
  # The file is what training reads.
  path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cal_{os.getpid()}.json")
  import json
  with open(path, "w") as f:
    json.dump(rec, f)
  try:
    merged = calibrate.apply(cfg.sim, path)
    assert merged["drift_px"] == fit["drift_px"] and merged["qe"] == cfg.sim.qe
    from smlm_jax.events import task as task_lib
    cfg.data.calibration = path                   # training's simulator
    sim = task_lib.EventsTask(cfg).sim
    assert sim.drift_px == fit["drift_px"] and sim.photons == tuple(fit["photons"])
    assert sim.size_px == cfg.crop_px
  finally:
    os.unlink(path)
  with pytest.raises(ValueError, match="no 'sim'"):
    bad = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bad_{os.getpid()}.json")
    with open(bad, "w") as f:
      f.write("{}")
    try:
      calibrate.load(bad)
    finally:
      os.unlink(bad)


def test_calibration_reads_the_chosen_channel_of_a_two_channel_movie(tmp_path):
  import tifffile
  from smlm_jax.events import calibrate
  rng = np.random.default_rng(1)
  tubes, noise = _tubule_crop(rng, t=5, size=64)
  two = str(tmp_path / "two.tif")                 # [T, C, H, W]: noise, then tubules
  tifffile.imwrite(two, np.stack([noise, tubes], 1), imagej=True,
                   metadata={"axes": "TCYX"})
  one = str(tmp_path / "one.tif")
  tifffile.imwrite(one, tubes, imagej=True, metadata={"axes": "TYX"})
  got, used, skipped = calibrate.load_windows([two], 3, 32, log=lambda *a: None, channel=1)
  want, _, _ = calibrate.load_windows([one], 3, 32, log=lambda *a: None)
  np.testing.assert_array_equal(got, want)
  assert used == [two] and not skipped
  # Channel 0 holds camera noise only: left out as unusable, so nothing is left.
  with pytest.raises(ValueError, match="no usable input"):
    calibrate.load_windows([two], 3, 32, log=lambda *a: None, channel=0)
  # A channel the file lacks: skipped with the reason (a note), nothing silently read.
  notes = []
  with pytest.raises(ValueError, match="no usable input"):
    calibrate.load_windows([two], 3, 32, log=notes.append, channel=2)
  assert len(notes) == 1 and two in notes[0] and "channel" in notes[0]


def test_column_stripes_are_a_fixed_column_gain():
  import jax
  import jax.numpy as jnp
  from configs import events
  from smlm_jax.events import simulate as sim_lib
  cfg = events.get_config("tiny").sim.to_dict()
  off = sim_lib.SimParams.from_config({**cfg, "size_px": 32})
  on = sim_lib.SimParams.from_config({**cfg, "size_px": 32, "column_gain_rel_std": 0.2})
  key = jax.random.key(3)
  from smlm_jax.core import noise

  @jax.jit
  def run(key):
    base, _, noise_key = sim_lib.scene(key, off, 3)
    ref = noise.apply_camera(noise_key, base, off.camera)
    return base, sim_lib.scene(key, on, 3)[0], sim_lib.simulate(key, off, 3)[0], ref
  base, striped, frames, ref = run(key)
  gain = np.asarray(striped / base)               # the same gain in every row and frame
  np.testing.assert_allclose(gain, np.broadcast_to(gain[0, 0], gain.shape), rtol=1e-5)
  assert 0.1 < gain[0, 0].std() < 0.3
  np.testing.assert_allclose(gain[0, 0], sim_lib.column_gain(key, on), rtol=1e-5)
  # Default: bit for bit the simulation without the stripes code (0.0 is skipped).
  assert bool(jnp.all(frames == ref))


def _study():
  """experiments/events_study.py as a module (it is a script, not a package)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "events_study", os.path.join(ROOT, "experiments", "events_study.py"))
  study = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(study)
  return study


def test_study_frame_max_rule_counts_one_candidate_per_frame():
  study = _study()
  rng = np.random.default_rng(0)
  def frame(peaks):
    p = rng.uniform(0, 0.05, (64, 64)).astype(np.float32)
    for (y, x), v in peaks:
      p[y, x] = v
    return p
  # At the site (0.3) but a weaker second peak far away (0.2): one TP, no false
  # detection under frame_max; the 'threshold' rule at 0.1 also counts the far peak.
  probs = [frame([((20, 21), 0.3), ((50, 50), 0.2)]), frame([((10, 10), 0.6)]),
           frame([((40, 40), 0.15)])]
  sites = [[(20, 20)], [(30, 30)], []]             # frame 2: no annotated site
  row = study.score_crop(probs, sites, 0.1, 8, "frame_max")
  assert (row["tp"], row["fp"], row["fn"], row["false_detections"]) == (1, 2, 1, 2)
  row = study.score_crop(probs, sites, 0.1, 8, "threshold")
  assert (row["tp"], row["fp"], row["false_detections"]) == (1, 3, 3)
  # The floor: max F0.1 on validation frames; with no site ever on top, the lowest.
  assert 0.15 <= study.best_threshold([probs[:1] + probs[2:]], [sites[:1] + sites[2:]], 8,
                                      0.1, "frame_max") <= 0.3
  assert study.best_threshold([probs[1:2]], [sites[1:2]], 8, 0.1, "frame_max") == 0.01
  # A validation crop whose site is never on top says nothing (F-beta 0): inner_crop
  # keeps the lowest floor, inner_or_train takes the training crops' row instead.
  views = {"raw": {"a": probs[:1], "b": probs[1:2]}}
  site_of = {"a": sites[:1], "b": sites[1:2]}
  silent = study.choose_and_score(views, site_of, "a", ["b"], 8, 0.1, "frame_max")
  informed = study.choose_and_score(views, site_of, "b", ["a"], 8, 0.1, "frame_max")
  assert silent["validation_fbeta"] == 0 and silent["threshold"] == 0.01
  assert informed["validation_fbeta"] > 0 and informed["threshold"] >= 0.15
  assert study.inner_or_train(silent, informed) is informed
  assert study.inner_or_train(informed, silent) is informed


def test_predict_max_per_frame_keeps_the_most_probable(tmp_path, monkeypatch):
  import csv
  import types
  from configs import events
  from smlm_jax.core import tiff_io
  from smlm_jax.events import predict
  cfg = events.get_config("tiny")

  def probabilities(frames):                       # two peaks per frame, 40 px apart
    for f in frames:
      p = np.zeros(f.shape, np.float32)
      p[5, 5], p[45, 45] = 0.6, 0.9
      yield p
  monkeypatch.setattr(predict, "Predictor", lambda *a: types.SimpleNamespace(
      config=cfg, n=int(cfg.data.num_frames), probabilities=probabilities))
  movie = str(tmp_path / "m.tif")
  rng = np.random.default_rng(0)
  tiff_io.write_image(movie, (100 + rng.poisson(5, (4, 64, 64))).astype(np.uint16), "TYX")
  for k, per_frame in ((0, 2), (1, 1)):
    out = str(tmp_path / f"d{k}.csv")
    assert predict.run(str(tmp_path), [movie], out, threshold=0.5,
                       probability_tiffs=False, max_per_frame=k, edge_px=0) == 0
    with open(out) as f:
      rows = list(csv.DictReader(l for l in f if not l.startswith("#")))
    assert len(rows) == 4 * per_frame
    assert all(int(r["y_px"]) == 45 for r in rows) == (per_frame == 1)
  # --edge_px: the peak 5 px from the border is not detected at 6 px (nor at the
  # run's sim.margin_px, 6), but is at 5 px (pixel centres at integers)
  for edge, per_frame in ((6.0, 1), (-1.0, 1), (5.0, 2)):
    out = str(tmp_path / "e.csv")
    assert predict.run(str(tmp_path), [movie], out, threshold=0.5,
                       probability_tiffs=False, edge_px=edge) == 0
    with open(out) as f:
      rows = list(csv.DictReader(l for l in f if not l.startswith("#")))
    assert len(rows) == 4 * per_frame, (edge, rows)
  from smlm_jax.events import metrics
  band = metrics.clear_edge(np.ones((20, 30)), 2.5) == 0
  assert band[:3].all() and band[-3:].all() and band[:, :3].all() and band[:, -3:].all()
  assert not band[3:-3, 3:-3].any()


def test_temporal_mean_puts_a_persistent_site_above_a_one_frame_blip(tmp_path, monkeypatch):
  """metrics.temporal_mean (the study's '_t1' views, predict --temporal): a site at 0.5
  in every frame beats a 0.9 blip that jumps to another place each frame, which wins
  every frame's raw maximum; streamed (generator in, generator out) it equals the
  windowed mean, with fewer frames at the ends."""
  import csv
  import types
  from configs import events
  from smlm_jax.core import tiff_io
  from smlm_jax.events import metrics
  from smlm_jax.events import predict
  blips = [(5, 5), (5, 50), (50, 5), (50, 50), (30, 5)]

  def maps(n):
    for t in range(n):
      p = np.zeros((64, 64), np.float32)
      p[30, 30] = 0.5
      p[blips[t]] = 0.9
      yield p
  raw = list(maps(5))
  assert all(np.unravel_index(np.argmax(p), p.shape) != (30, 30) for p in raw)
  avg = list(metrics.temporal_mean(maps(5), 1))
  assert len(avg) == 5
  assert all(np.unravel_index(np.argmax(p), p.shape) == (30, 30) for p in avg)
  np.testing.assert_allclose(avg[0], (raw[0] + raw[1]) / 2)
  np.testing.assert_allclose(avg[2], (raw[1] + raw[2] + raw[3]) / 3)
  np.testing.assert_allclose(avg[4], (raw[3] + raw[4]) / 2)
  assert [np.array_equal(a, b) for a, b in zip(metrics.temporal_mean(raw, 0), raw)] == [True] * 5
  with pytest.raises(ValueError):
    list(metrics.temporal_mean(raw, -1))
  # predict --temporal=1 --max_per_frame=1: every frame's one detection at the site.
  cfg = events.get_config("tiny")
  monkeypatch.setattr(predict, "Predictor", lambda *a: types.SimpleNamespace(
      config=cfg, n=int(cfg.data.num_frames), probabilities=lambda frames: maps(len(frames))))
  movie = str(tmp_path / "m.tif")
  tiff_io.write_image(movie, (100 + np.random.default_rng(0).poisson(5, (5, 64, 64))).astype(
      np.uint16), "TYX")
  for temporal, at_site in ((0, 0), (1, 5)):
    out = str(tmp_path / f"d{temporal}.csv")
    assert predict.run(str(tmp_path), [movie], out, threshold=0.2, probability_tiffs=False,
                       max_per_frame=1, temporal=temporal, edge_px=0) == 0
    with open(out) as f:
      rows = list(csv.DictReader(l for l in f if not l.startswith("#")))
    assert sum((int(r["y_px"]), int(r["x_px"])) == (30, 30) for r in rows) == at_site


def _same_truth_other_picture(field):
  """In the simulator, ``field`` at 1 (against 0) keeps the truth (the division site)
  and changes the picture."""
  import jax
  from configs import events
  from smlm_jax.events import simulate as sim_lib
  cfg = {**events.get_config("tiny").sim.to_dict(), "size_px": 32, "num_tubules": (3, 3)}
  key = jax.random.key(4)
  a, ta, _ = sim_lib.scene(key, sim_lib.SimParams.from_config(cfg), 2)
  b, tb, _ = sim_lib.scene(key, sim_lib.SimParams.from_config({**cfg, field: 1.0}), 2)
  np.testing.assert_array_equal(np.asarray(ta["label"]), np.asarray(tb["label"]))
  assert float(np.abs(np.asarray(a) - np.asarray(b)).max()) > 1.0


def test_branches_start_on_the_previous_tubule():
  import jax
  from smlm_jax.events import simulate as sim_lib
  curve = jax.random.uniform(jax.random.key(0), (4, 20, 2), maxval=60.0)
  out = np.asarray(sim_lib._attach_branches(jax.random.key(1), curve, 1.0))
  np.testing.assert_array_equal(out[0], np.asarray(curve[0]))     # tubule 0 never moves
  for i in range(1, 4):
    d = np.linalg.norm(out[i - 1] - out[i, 0], axis=-1)
    assert d.min() < 1e-4 and 2 <= int(np.argmin(d)) < 18          # on the previous one
    shift = out[i] - np.asarray(curve[i])                          # moved rigidly
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-4)
  same = np.asarray(sim_lib._attach_branches(jax.random.key(1), curve, 0.0))
  np.testing.assert_array_equal(same, np.asarray(curve))
  _same_truth_other_picture("branch_prob")


def test_rings_are_arcs_of_their_own_length_and_leave_tubule_0():
  import jax
  from smlm_jax.events import simulate as sim_lib
  k = 64
  curve = jax.random.uniform(jax.random.key(0), (3, k, 2), maxval=60.0)
  length = np.array([30.0, 25.0, 40.0], np.float32)
  out = np.asarray(sim_lib._ring_curves(jax.random.key(1), length, k, 1.0, curve))
  np.testing.assert_array_equal(out[0], np.asarray(curve[0]))     # tubule 0 never changes
  for i in (1, 2):
    r = np.linalg.norm(out[i], axis=-1)                           # about the origin
    np.testing.assert_allclose(r, r[0], rtol=1e-4)
    arc_len = np.linalg.norm(np.diff(out[i], axis=0), axis=-1).sum()
    assert arc_len == pytest.approx(length[i], rel=1e-3)
    assert 1.2 * np.pi * r[0] <= arc_len <= 2.0 * np.pi * r[0] + 1e-3
  same = np.asarray(sim_lib._ring_curves(jax.random.key(1), length, k, 0.0, curve))
  np.testing.assert_array_equal(same, np.asarray(curve))
  _same_truth_other_picture("ring_prob")


def test_tips_cut_only_the_ends_and_move_between_frames():
  import jax
  from smlm_jax.events import simulate as sim_lib
  arc = np.tile(np.linspace(0.0, 40.0, 81, dtype=np.float32), (5, 1))     # [m, K] px
  w = np.asarray(sim_lib._tip_windows(jax.random.key(2), arc, 3, 3.0))   # [n, m, K]
  assert w.shape == (3, 5, 81) and w.min() >= 0.0 and w.max() <= 1.0
  middle = (arc[0] > 10.0) & (arc[0] < 30.0)                            # beyond 1/4 of it
  np.testing.assert_array_equal(w[..., middle], 1.0)                    # never cut there
  kept = w.sum(-1) * 0.5                                                 # px of arc kept
  assert (kept[-1] >= 40.0 - 4 * 3.0 - 2.0).all()                        # now: <= 2 tip_px a side
  assert np.abs(np.diff(kept, axis=0)).max() > 1.0                       # ends move in time
  _same_truth_other_picture("tip_px")


def test_blobs_are_round_fragments_of_the_set_peak_and_only_add_light():
  import jax
  from configs import events
  from smlm_jax.events import simulate as sim_lib
  cfg = {**events.get_config("tiny").sim.to_dict(), "size_px": 48, "num_blobs": 3,
         "blob_prob": 1.0, "blob_elongation": (0.0, 0.0), "blob_brightness": (1.0, 1.0)}
  p = sim_lib.SimParams.from_config(cfg)
  yx, sigma, mass, drift = sim_lib._blobs(jax.random.key(5), p, 1.25, 50.0)
  assert yx.shape == (3 * sim_lib.BLOB_POINTS, 2) and drift.shape == (3, 2)
  one = slice(0, sim_lib.BLOB_POINTS)
  np.testing.assert_allclose(np.asarray(yx[one]), np.asarray(yx[one][:1]).repeat(
      sim_lib.BLOB_POINTS, 0), atol=1e-5)                        # round: one centre
  img = np.asarray(sim_lib._render(yx[one] * 0 + 24.0, sigma[one], mass[one], 48))
  assert 40.0 < img.max() <= 50.0 + 1e-3                          # peak = brightness x peak
  # in a scene: the truth is the same, the picture only gains light where blobs are
  key = jax.random.key(6)
  base = {**cfg, "num_blobs": 0, "num_tubules": (2, 2)}
  a, ta, _ = sim_lib.scene(key, sim_lib.SimParams.from_config(base), 2)
  b, tb, _ = sim_lib.scene(key, sim_lib.SimParams.from_config({**base, "num_blobs": 3}), 2)
  np.testing.assert_array_equal(np.asarray(ta["label"]), np.asarray(tb["label"]))
  diff = np.asarray(b) - np.asarray(a)
  assert diff.min() > -1e-3 and diff.max() > 1.0
  none = {**base, "num_blobs": 3, "blob_prob": 0.0}                  # empty slots: nothing
  c, _, _ = sim_lib.scene(key, sim_lib.SimParams.from_config(none), 2)
  np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-4)


def test_dihedral_tta_map_turns_with_the_movie():
  """make_predict_fn(tta=True) averages the 8 rotations / reflections: turning or
  mirroring the frames turns the map with them, which one pass of an untrained network
  does not."""
  import jax
  from configs import events
  from smlm_jax.core import trainer
  from smlm_jax.events import task as task_lib
  cfg = events.get_config("tiny")
  n = int(cfg.data.num_frames)
  model = task_lib.build_model(cfg.model)
  mesh = trainer.make_mesh()
  frames = np.random.default_rng(1).uniform(100, 200, (4, n, 16, 16)).astype(np.float32)
  v = model.init(jax.random.key(3), np.moveaxis(frames, 1, -1), train=False)
  params, stats = v["params"], v.get("batch_stats", {})
  raw = task_lib.make_predict_fn(model, mesh)
  tta = task_lib.make_predict_fn(model, mesh, tta=True)
  p = np.asarray(tta(params, stats, frames))
  turned = np.ascontiguousarray(np.rot90(frames, 1, axes=(2, 3)))
  np.testing.assert_allclose(np.asarray(tta(params, stats, turned)),
                             np.rot90(p, 1, axes=(1, 2)), atol=1e-5)
  mirrored = np.ascontiguousarray(frames[..., ::-1])
  np.testing.assert_allclose(np.asarray(tta(params, stats, mirrored)), p[..., ::-1], atol=1e-5)
  r = np.asarray(raw(params, stats, frames))
  assert np.abs(np.asarray(raw(params, stats, turned)) - np.rot90(r, 1, axes=(1, 2))).max() > 1e-3


def test_study_chooses_the_view_on_validation_crops_only():
  study = _study()
  rng = np.random.default_rng(0)
  def frames(site, far, k=3):
    out = []
    for _ in range(k):
      p = rng.uniform(0, 0.05, (32, 32)).astype(np.float32)
      p[10, 10], p[25, 25] = site, far
      out.append(p)
    return out
  sites = {"a": [[(10, 10)]] * 3, "b": [[(10, 10)]] * 3}
  # Validation crop b: the site tops the frame only in the averaged maps -> 'tta'.
  raw = {"a": frames(0.9, 0.1), "b": frames(0.3, 0.6)}
  tta = {"a": frames(0.2, 0.8), "b": frames(0.7, 0.2)}
  row = study.choose_and_score({"raw": raw, "tta": tta}, sites, "a", ["b"], 8, 0.1,
                               "frame_max")
  assert row["view"] == "tta" and (row["tp"], row["fp"]) == (0, 3)   # a's own maps unseen
  # Equal on validation: raw is kept.
  row = study.choose_and_score({"raw": raw, "tta": dict(tta, b=raw["b"])}, sites, "a", ["b"],
                               8, 0.1, "frame_max")
  assert row["view"] == "raw"
