"""HOLLy study: Chamfer distance of point clouds learned from images only.

  flock /tmp/smlm_cpu.lock python experiments/holly_study.py --out=runs/holly_study \
      [--runs=teapot,bunny,points,smlm,holly,cep152] [--steps=N] [--side_steps=N]

Each run trains ``configs/holly.py`` (the CPU default unless stated) with
``python -m smlm_jax.train`` and scores it with ``python -m smlm_jax.holly.evaluate``:
  teapot / bunny   default config, images simulated from teapot_large.obj /
                   bunny_large.obj; Chamfer vs. training time from the in-training
                   evaluations (every eval_every_steps) and the final evaluation
  points           bunny with num_points in --points (Chamfer vs. number of points)
  smlm             bunny with the SMLM-faithful simulator (dropout, 2 fluorophores per
                   site, wobble, 2000 localizations of 1.5% precision, camera noise)
  holly            bunny without the pose search (HOLLy's pure render-loss training)
  cep152           the ten real CEP152 FITS renders (sigma 2 px); pictures only (no
                   ground truth)
--steps overrides num_train_steps of every run, --side_steps only that of the
secondary runs (smlm, points, holly, cep152: those questions at a lower cost than the
headline teapot/bunny runs). A run whose workdir already holds its final checkpoint
is not retrained (the trainer resumes at the end), so the study can be run in pieces;
results accumulate in OUT/study.json.
Prints one table per question and ends with
``RESULT chamfer_teapot=... chamfer_bunny=... chamfer_smlm=... seconds_teapot=...
seconds_bunny=...`` (nan for runs not made). Times are wall-clock on this machine
(2-core CPU in our setting; run under the lock so they mean something).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "real-data", "holly")
OBJS = {"teapot": os.path.join(SHARED, "objs", "teapot_large.obj"),
        "bunny": os.path.join(SHARED, "objs", "bunny_large.obj")}
SMLM = ["--config.data.dropout=0.1", "--config.data.fluorophores=2",
        "--config.data.fluorophore_spread=0.01", "--config.data.wobble=0.005",
        "--config.data.localizations=2000", "--config.data.precision=0.015",
        "--config.data.photons=3000", "--config.data.background_photons=1"]


def run(cmd, log_path):
  t0 = time.time()
  with open(log_path, "w") as log:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
  if proc.returncode != 0:
    print(f"  FAILED ({proc.returncode}): see {log_path}", flush=True)
  return proc.returncode, time.time() - t0


def train_and_score(name, out, overrides, reference, steps=None):
  """Trains (or resumes a finished run) and evaluates; returns a result dict."""
  workdir = os.path.join(out, name)
  os.makedirs(workdir, exist_ok=True)
  cmd = [sys.executable, "-m", "smlm_jax.train", "--config=configs/holly.py",
         f"--workdir={workdir}"] + list(overrides)
  if steps:
    cmd.append(f"--config.num_train_steps={steps}")
  print(f"[{name}] training: {' '.join(cmd[2:])}", flush=True)
  rc, wall = run(cmd, os.path.join(workdir, "train.log"))
  res = {"name": name, "wall_s": wall, "chamfer": float("nan"), "seconds": float("nan"),
         "steps": steps}
  if rc != 0:
    return res
  cmd = [sys.executable, "-m", "smlm_jax.holly.evaluate", f"--workdir={workdir}"]
  if reference:
    cmd.append(f"--reference={reference}")
  rc, _ = run(cmd, os.path.join(workdir, "evaluate.log"))
  if rc == 0:
    read_evaluation(res, workdir)
  res["curve"] = curve(workdir, reference)
  print(f"[{name}] chamfer {res['chamfer']:.4f}, train {res['seconds']:.0f} s", flush=True)
  return res


def read_evaluation(res, workdir):
  """Adds the evaluate command's numbers (workdir/eval/metrics.json) to ``res``."""
  m = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  nan = float("nan")
  res.update(chamfer=m.get("chamfer", nan), seconds=m.get("train_seconds"),
             pose=m.get("pose_error_deg", {}).get("median", nan),
             pose_refined=m.get("refined_pose_error_deg", {}).get("median", nan),
             points=m.get("num_points"))


def curve(workdir, reference=None, starts=48):
  """[(step, train seconds, chamfer, median pose error)]: every exported shape
  (DIR/shapes/shape_<step>.ply, one per checkpoint) scored against the reference like
  the evaluate command does (--starts alignments per handedness; after training, so
  off the training clock), the pose error from the in-training evaluation at that step
  (nan when there was none)."""
  sys.path.insert(0, ROOT)
  from smlm_jax.holly import align, shapes
  pose, seconds = {}, {}
  try:
    for line in open(os.path.join(workdir, "metrics.jsonl")):
      r = json.loads(line)
      if "eval/pose_error_deg/median" in r:
        pose[r["step"]] = r["eval/pose_error_deg/median"]
  except (OSError, ValueError):
    pass
  try:
    seconds = {int(k): v for k, v in
               json.load(open(os.path.join(workdir, "train_seconds.json"))).items()}
  except (OSError, ValueError):
    pass
  ref = shapes.read_shape(reference).vertices if reference else None
  rows = []
  folder = os.path.join(workdir, "shapes")
  names = sorted(f for f in os.listdir(folder) if f.endswith(".ply")) if os.path.isdir(
      folder) else []
  for f in names:
    step = int(f[len("shape_"):-len(".ply")])
    cd = float("nan")
    if ref is not None:
      cd = align.align(shapes.read_shape(os.path.join(folder, f)).vertices, ref,
                       num_starts=starts).chamfer_rel
    rows.append((step, seconds.get(step, float("nan")), cd, pose.get(step, float("nan"))))
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="runs/holly_study")
  ap.add_argument("--runs", default="teapot,bunny,points,smlm,holly,cep152")
  ap.add_argument("--steps", type=int, default=None, help="override num_train_steps")
  ap.add_argument("--side_steps", type=int, default=None,
                  help="override num_train_steps of the points/smlm/holly/cep152 runs")
  ap.add_argument("--points", default="100,200,700")
  ap.add_argument("--table_only", action="store_true",
                  help="no training: rescore the curves of OUT/study.json and print")
  args = ap.parse_args()
  runs = args.runs.split(",")
  unknown = set(runs) - {"teapot", "bunny", "points", "smlm", "holly", "cep152"}
  if unknown:
    ap.error(f"unknown runs: {', '.join(sorted(unknown))}")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "study.json")
  results = {}
  if os.path.exists(path):       # earlier pieces of the study
    try:
      results = json.load(open(path))
    except ValueError:
      results = {}
  if args.table_only:
    runs = []
    for r in results.values():
      ref = OBJS.get(r["name"]) or (OBJS["bunny"] if r["name"].startswith("bunny") else None)
      r["curve"] = curve(os.path.join(args.out, r["name"]), ref)
      if os.path.exists(os.path.join(args.out, r["name"], "eval", "metrics.json")):
        read_evaluation(r, os.path.join(args.out, r["name"]))
  side = args.side_steps or args.steps
  bunny = [f"--config.data.obj={OBJS['bunny']}"]

  def do(key, name, overrides, reference, steps):
    results[key] = train_and_score(name, args.out, overrides, reference, steps)
    cli.atomic_write_text(path, json.dumps(results, indent=1))

  for shape in ("teapot", "bunny"):
    if shape in runs:
      do(shape, shape, [f"--config.data.obj={OBJS[shape]}"], OBJS[shape], args.steps)
  if "smlm" in runs:
    do("smlm", "bunny_smlm", bunny + SMLM, OBJS["bunny"], side)
  if "points" in runs:
    for m in [int(x) for x in args.points.split(",")]:
      do(f"points_{m}", f"bunny_points_{m}", bunny + [f"--config.num_points={m}"],
         OBJS["bunny"], side)
  if "holly" in runs:
    do("holly", "bunny_holly_no_search", bunny + ["--config.search.num_rotations=0"],
       OBJS["bunny"], side)
  if "cep152" in runs:
    do("cep152", "cep152", [f"--config.data.images={os.path.join(SHARED, 'fits')}"], None,
       side)

  print("\nChamfer (fraction of the bounding-box diagonal) vs. training time: the shape "
        "exported at each checkpoint, scored like the final evaluation")
  print(f"{'run':<24}{'step':>7}{'seconds':>10}{'chamfer':>10}")
  for key, r in results.items():
    for step, sec, cd, _ in r.get("curve", []):
      print(f"{r['name']:<24}{step:>7}{sec:>10.0f}{cd:>10.4f}")
  print("\nFinal evaluation (python -m smlm_jax.holly.evaluate)")
  print("(median pose errors in degrees on 256 fresh simulated images: of the CNN's best "
        "hypothesis, and of the refined poses training uses)")
  print(f"{'run':<24}{'steps':>8}{'points':>7}{'train s':>10}{'chamfer':>10}"
        f"{'pose CNN':>10}{'refined':>9}")
  for key, r in results.items():
    sec = r["seconds"] if r.get("seconds") is not None else float("nan")
    print(f"{r['name']:<24}{str(r.get('steps') or 'default'):>8}"
          f"{str(r.get('points', '')):>7}{sec:>10.0f}{r['chamfer']:>10.4f}"
          f"{r.get('pose', float('nan')):>10.1f}{r.get('pose_refined', float('nan')):>9.2f}")
  get = lambda k, f: results.get(k, {}).get(f, float("nan"))
  print(f"RESULT chamfer_teapot={get('teapot', 'chamfer'):.5f} "
        f"chamfer_bunny={get('bunny', 'chamfer'):.5f} chamfer_smlm={get('smlm', 'chamfer'):.5f} "
        f"seconds_teapot={get('teapot', 'seconds'):.0f} seconds_bunny={get('bunny', 'seconds'):.0f}")


if __name__ == "__main__":
  main()
