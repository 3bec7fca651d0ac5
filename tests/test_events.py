"""events: annotations -> ground truth -> crops -> database -> training -> predict.

Ground truth at the annotated place and width; crops and their metadata; database add /
query / split without leaks, idempotent re-add, transactions that survive exceptions
and a killed process; focal loss vs. hand values; augmentations keep image and label
aligned; simulated events constrict where the label is; metrics on a hand case; two
training steps through the shared trainer (simulated, then real + simulated crops
starting from the first run) and the predict CLI on a shared crop with bad inputs.
"""
import csv
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from smlm_jax.core import tiff_io
from smlm_jax.core.tiff_io import MovieError
from smlm_jax.events import annotate, crops, db as db_lib, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "real-data", "events_isim")
SHARED_CSV = os.path.join(SHARED, "annotations", "labels_1_f.csv")


def _need_shared():
  if not os.path.isdir(SHARED):
    pytest.skip("../shared/real-data not found (events_isim crops)")


def _cli(module, *args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600)


def _synthetic_movie(folder):
  """A [12, 2, 96, 120] uint16 OME movie (56 nm, 5 s), a 5-column napari CSV with two
  events (frames 3-6 drifting; frames 8 and 10, a one-frame gap) and a db.yaml."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  movie = (rng.poisson(20, (12, 2, 96, 120)) + 100).astype(np.uint16)
  path = os.path.join(folder, "movie.ome.tif")
  tiff_io.write_image(path, movie, "TCYX", pixel_size_nm=56.0, frame_interval_s=5.0, ome=True)
  rows = [(t, 0, 40.3 + 0.2 * t, 30.7) for t in range(3, 7)] + [(8, 1, 70.0, 90.2),
                                                                  (10, 1, 70.4, 90.0)]
  with open(os.path.join(folder, "labels.csv"), "w") as f:
    f.write("index,axis-0,axis-1,axis-2,axis-3\n")
    f.writelines(f"{i},{t},{c},{y},{x}\n" for i, (t, c, y, x) in enumerate(rows))
  with open(os.path.join(folder, "db.yaml"), "w") as f:
    f.write("cell_line: [cos7]\nmicroscope: [isim]\nstain: [mtStayGold]\n"
            "event_content: division\nmy_key: 42\n")
  return path


@pytest.fixture(scope="module")
def crop_dir(tmp_path_factory):
  """Crops of the synthetic movie, made in-process (2 events, 2 negatives)."""
  base = str(tmp_path_factory.mktemp("movie"))
  movie = _synthetic_movie(base)
  points = annotate.read_points(os.path.join(base, "labels.csv"))
  gt = np.stack(list(annotate.ground_truth_frames(points, (12, 96, 120))))
  user = crops.read_user_metadata(os.path.join(base, "db.yaml"))
  out = os.path.join(base, "crops")
  crops.make_crops(movie, gt, out, crop_px=64, user=user)
  return out


# ------------------------------------------------------------------ ground truth
def test_real_csv_to_gaussian_ground_truth_place_and_sigma():
  _need_shared()
  points = annotate.read_points(SHARED_CSV)
  assert len(points) == 96 and points.channel is None
  info = annotate.MovieInfo("labels_1_f", 100, 2048, 2048)
  annotate.check_points(points, info)                      # all inside 100 x 2048 x 2048
  i = 0                                                    # row 0: frame 30, (868.36, 1282.01)
  frame, y, x = points.frame[i], points.y[i], points.x[i]
  assert frame == 30 and abs(y - 868.3639) < 1e-3 and abs(x - 1282.0058) < 1e-3
  sel = points.frame == frame
  gt = annotate.gaussian_spots(points.y[sel], points.x[sel], (2048, 2048), sigma_px=2.0)
  assert np.unravel_index(np.argmax(gt[860:880, 1270:1295]), (20, 25)) == (8, 12)
  win = gt[int(y) - 8:int(y) + 9, int(x) - 8:int(x) + 9].astype(np.float64)
  (py, px), = crops.find_peaks(win)
  assert abs(py + int(y) - 8 - y) < 0.05 and abs(px + int(x) - 8 - x) < 0.05
  # Width: the second moment of a 2D Gaussian cut at 0.1 of its peak is
  # 2 sigma^2 (1 - 0.1 (1 + ln 10)) / 0.9.
  yy, xx = np.mgrid[:17, :17]
  r2 = (yy + int(y) - 8 - y) ** 2 + (xx + int(x) - 8 - x) ** 2
  sigma = math.sqrt((win * r2).sum() / win.sum() / (2 * (1 - 0.1 * (1 + math.log(10))) / 0.9))
  assert abs(sigma - 2.0) < 0.1, sigma
  radius = annotate.spot_radius_px(2.0)
  assert np.all(win[r2 < (0.9 * radius) ** 2] >= 0.1) and np.all(win[r2 > (1.1 * radius) ** 2] == 0)
  # The same file on a smaller movie, and a CSV with other columns: one clear line.
  with pytest.raises(MovieError, match="29 of 96 annotation.*outside the movie"):
    annotate.check_points(points, annotate.MovieInfo("m", 100, 1000, 2048))
  r = _cli("smlm_jax.events.annotate", f"--csv={SHARED_CSV}", "--shape=50,2048,2048",
           "--output=/tmp/unused_gt.tif")
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "outside the movie" in r.stderr


def test_bad_csvs(tmp_path):
  bad = tmp_path / "bad.csv"
  bad.write_text("id,t,y,x\n0,1,2,3\n")
  with pytest.raises(MovieError, match="not a napari points export"):
    annotate.read_points(str(bad))
  bad.write_text("index,axis-0,axis-1,axis-2\n0,1.5,2,3\n")
  with pytest.raises(MovieError, match="non-integer frame"):
    annotate.read_points(str(bad))
  bad.write_text("index,axis-0,axis-1,axis-2\n0,1,abc,3\n")
  with pytest.raises(MovieError, match="non-numeric"):
    annotate.read_points(str(bad))


def test_yaml_records_fail_in_one_line(tmp_path):
  path = tmp_path / "event_db.yaml"
  for text, message, code in (("a: [1, 2\n", "not valid YAML", "bad_metadata"),
                              ("- 1\n- 2\n", "expected a YAML mapping", "bad_metadata")):
    path.write_text(text)
    for read in (crops.read_user_metadata, db_lib.read_yaml_mapping):
      with pytest.raises(MovieError, match=message) as e:
        read(str(path))
      assert e.value.code == code and "\n" not in str(e.value)
  path.write_text("")
  assert crops.read_user_metadata(str(path)) == {}          # an empty record is empty
  with pytest.raises(MovieError, match="expected a YAML mapping"):
    db_lib.read_folder(str(tmp_path))                       # ... but not a crop's record
  with pytest.raises(MovieError, match="cannot read") as e:
    crops.read_user_metadata(str(tmp_path / "missing.yaml"))
  assert e.value.code == "not_found"
  path.write_text("type: event\n")
  with pytest.raises(MovieError, match="images.tif is missing"):
    db_lib.read_folder(str(tmp_path))


def test_annotate_and_crops_cli(tmp_path):
  movie = _synthetic_movie(str(tmp_path))
  r = _cli("smlm_jax.events.annotate", f"--csv={tmp_path}/labels.csv", f"--movie={movie}")
  assert r.returncode == 0, r.stderr
  gt_path = tmp_path / "ground_truth.tif"
  gt_image = tiff_io.read_image(str(gt_path))
  assert gt_image.data.shape == (12, 96, 120) and gt_image.data.dtype == np.uint8
  assert abs(gt_image.pixel_size_nm - 56.0) < 1e-3 and gt_image.frame_interval_s == 5.0
  gt = annotate.from_stored(gt_image.data)
  assert gt[5].max() > 0.9 and gt[7].max() == 0 and gt[8].max() > 0.9
  out = tmp_path / "crops"
  r = _cli("smlm_jax.events.crops", f"--movie={movie}", f"--ground_truth={gt_path}",
           f"--output_dir={out}", "--crop_px=64", "--channel=1")
  assert r.returncode == 0, r.stderr
  recs = [db_lib.read_folder(f) for f in db_lib.find_folders([str(out)])[0]]
  events = sorted((r["metadata"] for r in recs if r["kind"] == "event"),
                  key=lambda m: m["source_frames"])
  assert len(events) == 2 and sum(r["kind"] == "negative" for r in recs) == 2
  a, b = events
  assert a["source_frames"] == [2, 7] and a["event_frames"] == [1, 2, 3, 4]  # 1 frame before
  assert b["source_frames"] == [7, 11] and b["event_frames"] == [1, 3]        # gap of 1 linked
  assert a["pixel_size_nm"] == 56.0 and a["frame_interval_s"] == 5.0 and a["channel"] == 1
  assert a["microscope"] == ["isim"] and a["my_key"] == 42 and a["event_content"] == "division"
  x0, y0, x1, y1 = a["crop_box"]
  assert (x1 - x0, y1 - y0) == (64, 64) and x0 == 0           # shifted inside at the edge
  assert abs(a["site_yx_px"][0] + y0 - 41.2) < 0.05 and abs(a["site_yx_px"][1] + x0 - 30.7) < 0.05
  folder = [r["folder"] for r in recs if r["event_id"] == a["_id"]][0]
  crop_gt = annotate.read_ground_truth(os.path.join(folder, "ground_truth.tif"))
  crop_im = tifffile.imread(os.path.join(folder, "images.tif"))
  full = tiff_io.read_image(movie).data
  np.testing.assert_array_equal(crop_im, full[2:7, 1, y0:y1, x0:x1])      # channel 1
  np.testing.assert_allclose(crop_gt, gt[2:7, y0:y1, x0:x1], atol=1 / 254)
  for r in recs:
    if r["kind"] == "negative":
      (nx0, ny0, nx1, ny1), (t0, t1) = r["metadata"]["crop_box"], r["metadata"]["source_frames"]
      assert gt[t0:t1, ny0:ny1, nx0:nx1].max() == 0
  # Same inputs, same ids: a re-run overwrites the same folders.
  r = _cli("smlm_jax.events.crops", f"--movie={movie}", f"--ground_truth={gt_path}",
           f"--output_dir={out}", "--crop_px=64", "--channel=1")
  assert r.returncode == 0 and len(db_lib.find_folders([str(out)])[0]) == 4
  assert os.path.getsize(out / "crops_overview.png") > 1000


# ------------------------------------------------------------------------ database
def test_database_add_query_split_idempotent(tmp_path, crop_dir):
  path = str(tmp_path / "events.db")
  folders, _ = db_lib.find_folders([crop_dir])
  records = [db_lib.read_folder(f) for f in folders]
  with db_lib.EventDB(path) as database:
    assert database.add(records) == {"added": 4, "updated": 0, "unchanged": 0}
    assert database.add(records) == {"added": 0, "updated": 0, "unchanged": 4}
    moved = str(tmp_path / "moved")
    shutil.copytree(folders[0], moved)
    assert database.add([db_lib.read_folder(moved)])["updated"] == 1
    assert database.count() == 4
    q = lambda *c: sorted(r["event_id"] for r in database.query(c))
    assert len(q("microscope=isim")) == 4 and len(q("cell_line=COS7")) == 4
    assert len(q("kind=negative")) == 2 and len(q("type=event", "frames>=5")) == 1
    assert len(q("frames>=4", "frames<5")) == 1 and q("stain~staygold") == q()
    assert q("my_key=42") == q() and q("my_key>41.5") == q() and q("my_key!=42") == []
    assert q("folder~moved") == [records[0]["event_id"]]
    with pytest.raises(db_lib.DatabaseError, match="needs a number"):
      database.query(["frames>=many"])
  if os.path.isdir(SHARED):
    r = _cli("smlm_jax.events.db", "add", SHARED, f"--db={path}")
    assert r.returncode == 0 and "6 added" in r.stderr, r.stderr
    r = _cli("smlm_jax.events.db", "add", SHARED, str(tmp_path / "nothing"), f"--db={path}")
    assert r.returncode == 1 and "0 added" in r.stderr and "6 unchanged" in r.stderr
    r = _cli("smlm_jax.events.db", "query", "microscope=isim", "frames>=7", "yaml.frames>30",
             f"--db={path}", f"--output={tmp_path}/q.csv")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "q.csv") as f:
      ids = {row["event_id"] for row in csv.DictReader(f)}
    # 7 or more frames, and a source frame > 30 (deep-events' frames: [first, last])
    assert ids == {"643a9c8cc961ee3e0ca48b33", "643a9c8d4feb4bc13e2d368d"}
  # Split by event: disjoint, complete, deterministic, stable when the set grows, and
  # with group_by every group on one side.
  with db_lib.EventDB(path) as database:
    everything = database.query()
  ids = lambda rs: {r["event_id"] for r in rs}
  for group_by in (None, "source_file"):
    train, val = db_lib.split_events(everything, 0.5, seed=3, group_by=group_by)
    assert ids(train) | ids(val) == ids(everything) and not ids(train) & ids(val)
    assert (ids(train), ids(val)) == tuple(map(ids, db_lib.split_events(
        everything, 0.5, seed=3, group_by=group_by)))
    sub_train, sub_val = db_lib.split_events(everything[::2], 0.5, seed=3, group_by=group_by)
    assert ids(sub_train) <= ids(train) and ids(sub_val) <= ids(val)
    groups = {}
    for r in everything:
      groups.setdefault(r["source_file"], set()).add(r["event_id"] in ids(val))
    if group_by:
      assert all(len(sides) == 1 for sides in groups.values())
  fractions = [db_lib.split_fraction(f"e{i}", 0) for i in range(2000)]
  assert abs(np.mean(np.array(fractions) < 0.2) - 0.2) < 0.03


def test_database_transactions_leave_the_file_unchanged(tmp_path, crop_dir, monkeypatch):
  path = str(tmp_path / "events.db")
  records = [db_lib.read_folder(f) for f in db_lib.find_folders([crop_dir])[0]]
  with db_lib.EventDB(path) as database:
    database.add(records[:2])

  def snapshot():
    c = sqlite3.connect(path)
    try:
      assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
      return (c.execute("SELECT event_id, folder FROM events ORDER BY pk").fetchall(),
              c.execute("SELECT * FROM meta ORDER BY pk, key, text").fetchall())
    finally:
      c.close()

  before = snapshot()
  calls = []

  def failing(self, c, pk, rows):
    calls.append(pk)
    if len(calls) == 2:
      raise RuntimeError("disk full (simulated)")
    return original(self, c, pk, rows)

  original = db_lib.EventDB._insert_meta
  monkeypatch.setattr(db_lib.EventDB, "_insert_meta", failing)
  with db_lib.EventDB(path) as database, pytest.raises(RuntimeError, match="disk full"):
    database.add(records[2:])                # the first of two was written, then failure
  monkeypatch.undo()
  assert snapshot() == before and len(calls) == 2
  # A process killed (SIGKILL) inside an add transaction: the journal is rolled back.
  code = (f"import os, signal, sys; sys.path.insert(0, {ROOT!r})\n"
          "from smlm_jax.events import db\n"
          f"d = db.EventDB({path!r})\n"
          f"recs = [db.read_folder(f) for f in db.find_folders([{crop_dir!r}])[0]]\n"
          "orig = db.EventDB._insert_meta\n"
          "def kill(self, c, pk, rows):\n"
          "  orig(self, c, pk, rows)\n"
          "  os.kill(os.getpid(), signal.SIGKILL)\n"
          "db.EventDB._insert_meta = kill\n"
          "d.add(recs[2:])\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert r.returncode == -9, r.stderr
  assert snapshot() == before
  with db_lib.EventDB(path) as database:
    assert database.add(records)["added"] == 2 and database.count() == 4
    assert database.delete(conditions=["kind=negative"]) == 2 and database.count() == 2


# ------------------------------------------------------------------- model pieces
def test_losses_against_hand_values():
  import ml_collections
  from smlm_jax.events import task
  logits = np.array([0.0, 2.0, -1.0], np.float32)
  target = np.array([1.0, 0.0, 0.5], np.float32)
  sig = lambda v: 1 / (1 + math.exp(-v))
  hand = []
  for x, t in zip(logits.tolist(), target.tolist()):
    p = sig(x)
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    pt = t * p + (1 - t) * (1 - p)
    hand.append((t * 0.25 + (1 - t) * 0.75) * (1 - pt) ** 2 * ce)
  assert abs(hand[0] - 0.25 * 0.25 * math.log(2)) < 1e-12          # p = 0.5, t = 1
  cfg = ml_collections.ConfigDict({"name": "focal", "alpha": 0.25, "gamma": 2.0})
  assert abs(float(task.pixel_loss(logits, target, cfg)) - np.mean(hand)) < 1e-6
  cfg.name = "bce"
  bce = np.mean([-(t * math.log(sig(x)) + (1 - t) * math.log(1 - sig(x)))
                 for x, t in zip(logits.tolist(), target.tolist())])
  assert abs(float(task.pixel_loss(logits, target, cfg)) - bce) < 1e-6
  cfg.name, cfg.dice_weight = "dice", 1.0
  p = np.array([sig(v) for v in logits.tolist()])
  dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
  assert abs(float(task.pixel_loss(logits[None], target[None], cfg)) - dice) < 1e-6


def test_augmentations_keep_image_and_label_aligned():
  import jax
  from smlm_jax.events import augment, simulate
  yy, xx = np.mgrid[:64, :64]
  site = (17.0, 41.0)
  spot = np.exp(-((yy - site[0]) ** 2 + (xx - site[1]) ** 2) / (2 * 1.5 ** 2))
  frames = np.stack([100 + 500 * spot + 3 * (yy / 64.0)] * 3).astype(np.float32)
  label = np.asarray(simulate.gaussian_map(site, (64, 64), 2.0))
  seen = set()
  for elastic_px in (0.0, 2.0):
    p = augment.AugmentParams(crop_px=48, elastic_px=elastic_px)
    fn = jax.jit(jax.vmap(lambda k: augment.geometry(k, frames, label, p)))
    out_f, out_l = fn(jax.random.split(jax.random.key(7), 24))
    for f, l in zip(np.asarray(out_f), np.asarray(out_l)):
      assert f.shape == (3, 48, 48) and l.shape == (48, 48)
      if l.max() < 0.5:
        assert f[-1].max() - np.median(f[-1]) < 100        # cropped out of both
        continue
      pf = np.unravel_index(np.argmax(f[-1]), f[-1].shape)
      pl = np.unravel_index(np.argmax(l), l.shape)
      assert np.hypot(pf[0] - pl[0], pf[1] - pl[1]) <= (0 if elastic_px == 0 else 1.5)
      seen.add(pl)
      if elastic_px == 0 and 5 <= min(pl) and max(pl) < 43:   # whole spot inside the crop:
        assert np.isclose(l.max(), label.max()) and np.isclose(l.sum(), label.sum(), rtol=1e-5)
  assert len(seen) > 10                                    # crops and symmetries vary
  # Intensity (frames only): re-sampled shot noise at 10 photons per unit of the
  # window's (q99.5 - median) is much noisier than the nearly noise-free input, and the
  # full augmentation returns the label it was given, transformed like the frames.
  p = augment.AugmentParams(crop_px=48, elastic_px=0.0, gamma=(1.0, 1.0), flicker=0.0,
                            poisson_prob=1.0, photons=(10.0, 10.0), gauss_prob=0.0)
  f, l = jax.jit(lambda k: augment.augment(k, frames, label, p))(jax.random.key(1))
  background = np.asarray(f)[:, np.asarray(l) == 0]
  assert 0.05 < np.std(background) < 1.0 and np.asarray(l).shape == (48, 48)


def test_simulated_divisions_constrict_at_the_label():
  import jax
  from smlm_jax.events import simulate
  p = simulate.SimParams(size_px=48, num_tubules=(1, 2), points_per_tubule=48,
                         photons=(150.0, 150.0), background_photons=(5.0, 5.0))
  frames, truth = jax.jit(lambda k: simulate.batch(k, p, 3))(
      jax.random.split(jax.random.key(0), 96))
  frames, label = np.asarray(frames), np.asarray(truth["label"])
  has, sites = np.asarray(truth["has_event"]), np.asarray(truth["site_yx"])
  assert 30 < has.sum() < 66                               # event_fraction 0.5 of 96
  assert np.all(label[~has] == 0) and np.all(label[has].max(axis=(1, 2)) > 0.939)  # site off-grid by <= 0.5 px
  peaks = [np.unravel_index(np.argmax(l), l.shape) for l in label[has]]
  assert all(np.hypot(py - sy, px - sx) <= 0.75 for (py, px), (sy, sx) in zip(peaks, sites[has]))
  # Intensity at the site (3x3 mean minus background) falls from the first to the
  # current frame: the neck narrows or the tubule is cut.
  bg = np.median(frames, axis=(1, 2, 3))
  def at_site(t):
    return np.array([frames[i, t, int(round(sy)) - 1:int(round(sy)) + 2,
                            int(round(sx)) - 1:int(round(sx)) + 2].mean() - bg[i]
                     for i, (sy, sx) in zip(np.flatnonzero(has), sites[has])])
  ratio = np.median(at_site(2) / np.maximum(at_site(0), 1.0))
  assert ratio < 0.75, ratio
  # Camera: ADU = 2.5 (Poisson(0.8 photons) + 1.5 N(0, 1)) + 100, so the residual of
  # the expected ADU, divided by its standard deviation, has mean 0 and variance 1.
  lam = 0.8 * np.asarray(truth["expected_photons"], np.float64)
  z = (frames - (100.0 + 2.5 * lam)) / (2.5 * np.sqrt(lam + 1.5 ** 2))
  assert abs(z.mean()) < 0.01 and abs(z.var() - 1.0) < 0.02, (z.mean(), z.var())


def test_event_metrics_on_a_hand_case():
  prob = np.zeros((40, 40))
  prob[10, 10], prob[10, 12], prob[30, 30] = 0.9, 0.85, 0.6   # event + spurious blob
  negative = np.full((40, 40), 0.3)
  summaries = [metrics.crop_summary(prob, [(10.0, 11.0)], 5.0),
               metrics.crop_summary(negative, [], 5.0)]
  sweep = metrics.event_sweep(summaries, beta=0.1, thresholds=[0.2, 0.5, 0.7, 0.95])
  np.testing.assert_array_equal(sweep["tp"], [1, 1, 1, 0])
  np.testing.assert_array_equal(sweep["fp"], [2, 1, 0, 0])
  np.testing.assert_array_equal(sweep["fn"], [0, 0, 0, 1])
  np.testing.assert_allclose(sweep["precision"], [1 / 3, 0.5, 1.0, 1.0])
  f = lambda p, r, b: (1 + b * b) * p * r / (b * b * p + r)
  np.testing.assert_allclose(sweep["fbeta"], [f(1 / 3, 1, 0.1), f(0.5, 1, 0.1), 1.0, 0.0])
  assert metrics.summarize(sweep)["threshold"] == 0.7
  # Non-maximum suppression: maxima 2 px apart, and a plateau of two equal pixels, are
  # one detection each.
  prob[20, 5] = prob[20, 6] = 0.7
  found = metrics.detect(prob, 0.5, 5.0)
  assert [(y, x) for y, x, _ in found] == [(10, 10), (20, 5), (30, 30)]
  np.testing.assert_allclose([s for _, _, s in found], [0.9, 0.7, 0.6], rtol=1e-6)
  prob[20, 5] = prob[20, 6] = 0.0
  assert metrics.localization_error(prob, [(10.0, 11.0)]) == 1.0
  pixels = metrics.PixelCounter()
  pixels.add(prob, np.where(prob >= 0.85, 1.0, 0.0))
  s = metrics.summarize(pixels.sweep(thresholds=[0.5, 0.8]), threshold=0.8)
  assert (s["tp"], s["fp"], s["fn"]) == (2, 0, 0)


def test_host_windows_hold_the_site_half_of_the_time():
  _need_shared()
  from smlm_jax.events import data
  records = [db_lib.read_folder(f) for f in db_lib.find_folders([SHARED])[0]]
  sampler = data.HostSampler([data.load_crop(r) for r in records], 3, 64, seed=0,
                             positive_fraction=0.5)
  batch = sampler(0, 200)
  assert batch["frames"].shape == (200, 3, 96, 96) and batch["label"].shape == (200, 96, 96)
  np.testing.assert_array_equal(sampler(0, 200)["label"], batch["label"])   # reproducible
  peaks = [np.unravel_index(np.argmax(l), l.shape) for l in batch["label"] if l.max() >= 0.5]
  central = np.mean([32 <= y < 64 and 32 <= x < 64 for y, x in peaks])
  # 35 of 40 frames are annotated: ~44% placed around the site, plus chance windows.
  assert 0.4 < len(peaks) / 200 < 0.85 and central > 0.6


def test_mirror_pad_reflects_the_border_and_unpad_inverts_it():
  from smlm_jax.events import data
  w = np.random.default_rng(0).normal(size=(2, 3, 9, 12)).astype(np.float32)
  padded, p = data.mirror_pad(w, 4)
  assert p == 4 and padded.shape == (2, 3, 17, 20)
  np.testing.assert_array_equal(padded[..., 4:-4, 4:-4], w)
  np.testing.assert_array_equal(padded[..., 4 - 1, 4:-4], w[..., 1, :])    # row -1 = row 1
  np.testing.assert_array_equal(padded[..., 4:-4, -1], w[..., :, -5])      # col W+3 = W-5
  np.testing.assert_array_equal(data.unpad(padded, p), w)
  assert data.mirror_pad(w, 32)[1] == 8                   # capped at min(H, W) - 1
  assert data.mirror_pad(w, 0)[0] is w


# ----------------------------------------------------------------- end to end
def test_train_two_steps_then_predict_cli(tmp_path):
  """Two steps on real crops from the database (host batches, on-device augmentation,
  evaluation on the validation crops), the batches of the 'sim' and 'mixed' sources
  traced, a run that starts from the first (init_from), and predict on a shared crop
  with bad inputs."""
  _need_shared()
  import jax
  from configs import events
  from smlm_jax.core import trainer
  from smlm_jax.events import task as task_lib
  path = str(tmp_path / "events.db")
  with db_lib.EventDB(path) as database:
    database.add([db_lib.read_folder(f) for f in db_lib.find_folders([SHARED])[0]])
  cfg = events.get_config("tiny")
  cfg.data.update(source="db", db=path, query="microscope=isim", val_fraction=0.5,
                  split_seed=1)
  cfg.eval.num_sim = 0                  # the simulated evaluation set: see the study
  run = str(tmp_path / "run")
  final = trainer.train_and_evaluate(cfg, run)
  assert set(final) == {"real", "threshold", "selected_on"} and 0 < final["threshold"] < 1
  assert set(final["real"]["event"]) >= {"precision", "recall", "f1", "fbeta", "threshold"}
  with open(os.path.join(run, "threshold.json")) as f:
    chosen = json.load(f)
  assert chosen["selected_on"] == "real" and chosen["threshold"] == final["threshold"]
  for name in ("pr_curve.png", "examples.png"):
    assert os.path.getsize(os.path.join(run, name)) > 1000
  rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  # Every source makes model inputs [B, c, c, n] and event maps [B, c, c] (traced only).
  for source in ("sim", "mixed", "db"):
    cfg.data.source = source
    task = task_lib.EventsTask(cfg)
    host = task.host_batch(0)
    batch = jax.eval_shape(lambda k, h: task.make_batch(k, h, lambda t: t),
                           jax.random.key(0), host)
    assert batch["x"].shape == (4, 32, 32, 3) and batch["y"].shape == (4, 32, 32)
    assert (host is None) == (source == "sim")
  # A run starting from this one gets exactly its parameters; a different model fails.
  _, params, _ = trainer.load_variables(run)
  cfg2 = events.get_config("tiny")
  cfg2.init_from = run
  start = task_lib.EventsTask(cfg2).init_variables(jax.random.key(5))["params"]
  jax.tree.map(np.testing.assert_array_equal, start, params)
  cfg2.model.base_width = 8
  with pytest.raises(ValueError, match="its model differs"):
    task_lib.EventsTask(cfg2).init_variables(jax.random.key(5))
  # predict (threshold from threshold.json): one shared crop, one unreadable file, one
  # missing path.
  crop = os.path.join(SHARED, "event_643a9c8bc21ad87106587c80", "images.tif")
  bad = tmp_path / "bad.tif"
  bad.write_text("not a tiff")
  out = tmp_path / "pred" / "det.csv"
  r = _cli("smlm_jax.events.predict", f"--workdir={run}", f"--input={crop}",
           f"--input={bad}", f"--input={tmp_path}/missing.tif", f"--output={out}")
  assert r.returncode == 1, r.stderr
  assert sum(l.startswith("error:") for l in r.stderr.splitlines()) == 2
  with open(out) as f:
    header = [l for l in f if l.startswith("#")]
  with open(out) as f:
    table = list(csv.DictReader(l for l in f if not l.startswith("#")))
  assert list(table[0]) == ["file", "frame", "y_px", "x_px", "score", "flag"]
  assert f"threshold {chosen['threshold']:.2f} from threshold.json" in "".join(header)
  assert sorted(row["flag"] for row in table if row["flag"] != "ok") == [
      "error:not_found", "error:unreadable"]
  prob = tiff_io.read_image(str(tmp_path / "pred" / "images_prob.tif")).data
  assert prob.shape == (7, 256, 256) and prob.dtype == np.float32
  assert 0.0 <= prob.min() and prob.max() <= 1.0
  # The rows are exactly the local maxima >= threshold of the written maps, with NMS.
  ok = [(int(r["frame"]), int(r["y_px"]), int(r["x_px"])) for r in table if r["flag"] == "ok"]
  expect = [(t, y, x) for t in range(7)
            for y, x, _ in metrics.detect(prob[t], chosen["threshold"], 8.0)]
  assert ok == expect and len(ok) > 0
