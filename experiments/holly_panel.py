"""HOLLy shape panel: the default config trained on shapes of different kinds.

  flock /tmp/smlm_cpu.lock python experiments/holly_panel.py --out=runs/holly_panel \
      [--shapes=bunny,suzanne,...] [--steps=N] [--tiny] [--table_only] [--rescore]

One row per shape: images simulated from the shape (configs/holly.py, default
unless --tiny), trained with ``trainer.train_and_evaluate`` in OUT/<shape>, scored
with ``smlm_jax.holly.evaluate`` (256 fresh images at the final sigma):
  chamfer     symmetric Chamfer of the aligned cloud, fraction of the bounding-box
              diagonal
  floor       the sampling floor: the Chamfer of a perfect cloud of the same point
              count drawn from the shape's sites (mean of 3 draws; with replacement
              when the shape has fewer sites); target: chamfer - floor <= 0.015
  pose        median pose error (deg) after alignment, modulo the shape's symmetry
              (declared OBJ.symmetry.json or detected, symmetry.py), of the method's
              poses (the refined poses: the CNN's hypotheses + pose search + Gauss-Newton
              against the learned cloud, the poses training learns the cloud from and
              evaluate writes to poses.csv for a user's images) and of the pose CNN's
              best hypothesis alone (its amortized proposal), each with the fraction
              within 10 deg; target: median <= 10 deg
  raw         the CNN's median without the symmetry
  conv        the end-of-training convergence verdict (diagnose.py; no truth used)
  seconds     training wall time (train_seconds.json)
  met         whether the row meets issue 27's targets: excess <= 0.015, the method's
              (refined) pose median <= 10 deg, training <= 1200 s
  met CNN     the same judged on the pose CNN's median alone (before 2026-12-08 the
              headline; the CNN proposes, the search + Gauss-Newton against the learned
              cloud decides, so the refined poses are what the method outputs)
Shapes: tuning group (the defaults were chosen on these: bunny, teapot) and a
held-out group (procedural and public meshes, experiments/data/holly_shapes/README.md)
reported separately. A shape whose OUT/<shape>/eval/metrics.json exists is not
retrained nor rescored (--rescore rescores; training resumes from checkpoints and is
a no-op once finished), so the panel runs in pieces under the CPU lock; rows
accumulate in OUT/panel.json. --tiny: configs/holly.py:tiny, 8 images, 2 ICP starts
(the test). Last line: ``RESULT worst_chamfer=... median_chamfer=...
worst_pose_median_deg=... seconds_max=...`` over the rows present (the pose: the
method's refined poses; also worst_excess (chamfer - floor), worst_cnn_pose_median_deg,
not_converged, meeting_targets (refined poses), meeting_targets_cnn).
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

import argparse
import ast
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.path.join(ROOT, "experiments", "data", "holly_shapes")

# name -> (file (relative to --shared for the two shared shapes, else DATA), group, kind)
SHAPES = {
    "bunny": ("objs/bunny_large.obj", "tuning", "scanned mesh (shared)"),
    "teapot": ("objs/teapot_large.obj", "tuning", "mesh, near-symmetric (shared)"),
    "suzanne": ("suzanne.ply", "held-out", "public mesh, bilateral"),
    "spot": ("spot.ply", "held-out", "public mesh, near-bilateral"),
    "fandisk": ("fandisk.ply", "held-out", "public CAD part"),
    "asymmetric": ("asymmetric.ply", "held-out", "procedural, asymmetric"),
    "elongated": ("elongated.ply", "held-out", "procedural, elongated"),
    "tube": ("tube.ply", "held-out", "procedural, thin tube"),
    "shell": ("shell.ply", "held-out", "procedural, hollow shell"),
    "helix": ("helix.ply", "held-out", "procedural, chiral"),
    "near_symmetric": ("near_symmetric.ply", "held-out", "procedural, near-symmetric"),
    # added 2026-12-05 after the defaults were fixed, each trained and scored once
    "cow": ("cow.ply", "held-out", "public mesh, quadruped"),
    "homer": ("homer.ply", "held-out", "public mesh, humanoid"),
    # added 2026-12-08, trained and scored once with the default
    "npc": ("npc.ply", "held-out", "procedural, nuclear pore (D8h)"),
}


def shape_path(name: str, shared: str) -> str:
  f = SHAPES[name][0]
  return os.path.join(shared, f) if f.startswith("objs/") else os.path.join(DATA, f)


def sampling_floor(sites, num_points: int, draws: int = 3, seed: int = 0) -> float:
  """Chamfer (fraction of the diagonal) of ``num_points`` sites drawn from the shape."""
  from smlm_jax.holly import align
  sites = np.asarray(sites, np.float64)
  rng = np.random.default_rng(seed)
  diag = float(np.linalg.norm(sites.max(0) - sites.min(0)))
  vals = [align.chamfer(sites[rng.choice(len(sites), num_points,
                                         replace=len(sites) < num_points)], sites) / diag
          for _ in range(draws)]
  return float(np.mean(vals))


def finished(workdir: str, steps: int) -> bool:
  """Whether the run in ``workdir`` recorded its final step (then it is only scored:
  resuming would rewrite its config.json with today's defaults)."""
  try:
    return str(steps) in json.load(open(os.path.join(workdir, "train_seconds.json")))
  except (OSError, ValueError):
    return False


def make_config(obj: str, tiny: bool, steps: int | None, seed: int | None = None,
                overrides=()):
  """configs/holly.py (default or tiny) for ``obj``, with ``overrides``: "a.b=value"
  strings (value parsed as JSON where it can be, else kept as text; the field must
  exist)."""
  from configs import holly
  c = holly.get_config("tiny" if tiny else None)
  c.data.obj = obj
  if steps:
    c.num_train_steps = int(steps)
  if seed is not None:
    c.seed = int(seed)
  for item in overrides:
    key, sep, text = item.partition("=")
    try:                                  # JSON, else a Python literal, else the text
      value = json.loads(text)
    except ValueError:
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = text
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      node = node.get(part) if hasattr(node, "get") else None
    if not sep or node is None or leaf not in node:
      raise ValueError(f"--set {item!r}: expected an existing config field as KEY=VALUE, "
                       "e.g. --set search.top=2")
    old = node[leaf]
    if isinstance(old, (int, float)) and not isinstance(old, bool):
      if not isinstance(value, (int, float)) or isinstance(value, bool) or (
          isinstance(old, int) and float(value) != int(value)):
        raise ValueError(f"--set {item!r}: {key} takes "
                         f"{'an integer' if isinstance(old, int) else 'a number'}")
      value = type(old)(value)
    if isinstance(old, str):              # text fields take the text as written
      value = text
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except TypeError as e:                # a value of another type than the field's
      raise ValueError(f"--set {item!r}: {key} takes a {type(old).__name__} "
                       f"(e.g. {old!r}); {e}") from None
  return c


def run_shape(name: str, args) -> dict:
  from smlm_jax.core import trainer
  from smlm_jax.holly import evaluate, shapes
  obj = shape_path(name, args.shared)
  workdir = os.path.join(args.out, name)
  config = make_config(obj, args.tiny, args.steps, args.seed, args.set)
  row = {"name": name, "group": SHAPES[name][1], "kind": SHAPES[name][2], "obj": obj}
  t0 = time.time()
  if not finished(workdir, int(config.num_train_steps)):
    trainer.train_and_evaluate(config, workdir)
  row["wall_s"] = time.time() - t0
  saved = json.load(open(os.path.join(workdir, "config.json")))["search"]
  row["search"] = (f"{saved.get('grid', 'random')} {saved['num_rotations']}, top "
                   f"{saved.get('top', 1)}, levels {saved.get('levels', 0)}")
  rpath = os.path.join(workdir, trainer.RESTARTS_FILE)
  if os.path.exists(rpath):     # best of several starts: which one continued
    rec = json.load(open(rpath))
    row["search"] += (f"; start seed {rec['chosen_seed']} of "
                      f"{','.join(str(r['seed']) for r in rec['starts'])} at step {rec['steps']}"
                      + (f" ({rec['vary']}={rec['chosen_value']})" if rec.get("vary") else ""))
  tiny = args.tiny
  m = evaluate.evaluate(workdir, obj, num_images=8 if tiny else args.num_images,
                        seed=777, starts=2 if tiny else 48, gif_frames=24, pictures=not tiny)
  nan = float("nan")
  row.update(chamfer=m.get("chamfer", nan), seconds=m.get("train_seconds", nan),
             pose=m.get("pose_error_deg", {}).get("median", nan),
             pose_frac10=m.get("pose_error_deg", {}).get("frac_below_10", nan),
             pose_raw=m.get("cnn_raw_pose_error_deg", {}).get("median", nan),
             refined=m.get("refined_pose_error_deg", {}).get("median", nan),
             refined_frac10=m.get("refined_pose_error_deg", {}).get("frac_below_10", nan),
             symmetry=m.get("symmetry", ""),
             converged=m.get("convergence", {}).get("converged"),
             residual=m.get("convergence", {}).get("residual", nan),
             num_points=int(config.num_points))
  sites = shapes.read_shape(obj).vertices
  row["floor"] = sampling_floor(sites, int(config.num_points))
  return row


# issue 27's targets per shape: Chamfer - floor, pose median, training seconds
TARGET_EXCESS = 0.015
TARGET_POSE_DEG = 10.0
TARGET_SECONDS = 1200.0


def meets(r: dict, pose: str = "refined") -> bool:
  """Whether a row meets every target (NaN fails), the pose target judged on the
  method's poses, the refined ones (``pose="refined"``, the default), or on the pose
  CNN's best hypothesis alone (``pose="pose"``; row key kept for old panel.json)."""
  return bool(r["chamfer"] - r["floor"] <= TARGET_EXCESS and r[pose] <= TARGET_POSE_DEG
              and r["seconds"] <= TARGET_SECONDS)


def table(rows: dict) -> list[str]:
  head = (f"{'shape':<15}{'kind':<30}{'chamfer':>8}{'floor':>7}{'excess':>7}"
          f"{'pose':>7}{'<10':>5}{'CNN':>7}{'<10':>5}{'raw':>6}{'conv':>5}"
          f"{'train s':>8}{'met':>5}{'met CNN':>8}  symmetry")
  lines = []
  for group in ("tuning", "held-out"):
    sel = [r for r in rows.values() if r["group"] == group]
    if not sel:
      continue
    lines += [f"\n{group} group", head]
    for r in sel:
      conv = {True: "yes", False: "NO", None: "?"}[r.get("converged")]
      lines.append(
          f"{r['name']:<15}{r['kind'][:29]:<30}{r['chamfer']:>8.4f}{r['floor']:>7.4f}"
          f"{r['chamfer'] - r['floor']:>7.4f}{r['refined']:>7.2f}"
          f"{100 * r['refined_frac10']:>4.0f}%{r['pose']:>7.1f}{100 * r['pose_frac10']:>4.0f}%"
          f"{r['pose_raw']:>6.1f}{conv:>5}{r['seconds']:>8.0f}{'yes' if meets(r) else 'NO':>5}"
          f"{'yes' if meets(r, 'pose') else 'NO':>8}  "
          f"{r['symmetry'].split(':')[0]}; search "
          f"{r.get('search', '?')}")
  return lines


def result_line(rows: dict) -> str:
  vals = list(rows.values())
  get = lambda k: np.array([r[k] for r in vals], np.float64) if vals else np.array([np.nan])
  worst = lambda a: float(np.nanmax(a)) if np.any(np.isfinite(a)) else float("nan")
  excess = get("chamfer") - get("floor")
  return (f"RESULT worst_chamfer={worst(get('chamfer')):.5f} "
          f"median_chamfer={float(np.nanmedian(get('chamfer'))) if vals else float('nan'):.5f} "
          f"worst_pose_median_deg={worst(get('refined')):.2f} "
          f"seconds_max={worst(get('seconds')):.0f} worst_excess={worst(excess):.5f} "
          f"worst_cnn_pose_median_deg={worst(get('pose')):.2f} "
          f"not_converged={sum(r.get('converged') is False for r in vals)} "
          f"meeting_targets={sum(meets(r) for r in vals)} "
          f"meeting_targets_cnn={sum(meets(r, 'pose') for r in vals)} rows={len(vals)}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="runs/holly_panel")
  ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset")
  ap.add_argument("--shared", default=os.path.join(ROOT, "..", "shared", "real-data", "holly"),
                  help="folder with objs/bunny_large.obj and objs/teapot_large.obj")
  ap.add_argument("--steps", type=int, default=None, help="override num_train_steps")
  ap.add_argument("--seed", type=int, default=None,
                  help="override config.seed (the training seed; use another --out per seed)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="override a config field, e.g. --set search.top=2 "
                       "(repeatable; use another --out per setting)")
  ap.add_argument("--num_images", type=int, default=256)
  ap.add_argument("--tiny", action="store_true", help="configs/holly.py:tiny (tests)")
  ap.add_argument("--table_only", action="store_true", help="no training: print OUT/panel.json")
  ap.add_argument("--rescore", action="store_true", help="re-evaluate finished rows")
  args = ap.parse_args(argv)
  names = [s for s in args.shapes.split(",") if s]
  unknown = sorted(set(names) - set(SHAPES))
  if unknown:
    print(f"error: unknown shapes {', '.join(unknown)}; choose from {', '.join(SHAPES)}",
          file=sys.stderr)
    return 2
  missing = [n for n in names if not os.path.exists(shape_path(n, args.shared))]
  if missing and not args.table_only:
    print(f"error: shape files missing for {', '.join(missing)} (--shared={args.shared})",
          file=sys.stderr)
    return 2
  try:
    make_config("", args.tiny, args.steps, args.seed, args.set)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from smlm_jax.core import cli
  cli.quiet_logs()
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "panel.json")
  rows = {}
  if os.path.exists(path):
    try:
      rows = json.load(open(path))
    except ValueError:
      rows = {}
  if not args.table_only:
    for name in names:
      if name in rows and not args.rescore:
        print(f"[{name}] done earlier (OUT/panel.json); --rescore to redo", flush=True)
        continue
      print(f"[{name}] training {shape_path(name, args.shared)}", flush=True)
      try:
        rows[name] = run_shape(name, args)
      except Exception as e:   # one shape failing must not lose the others
        print(f"[{name}] FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              flush=True)
        continue
      cli.atomic_write_text(path, json.dumps(rows, indent=1))
  sel = {n: rows[n] for n in SHAPES if n in rows and (args.table_only or n in names)}
  print("\nChamfer: fraction of the bounding-box diagonal; floor: perfect cloud of the same "
        "point count; pose: median error (deg) after alignment modulo the shape's symmetry "
        "(raw: not modulo), '<10': fraction within 10 deg; conv: end-of-training verdict; "
        f"met: excess <= {TARGET_EXCESS}, pose (refined) <= {TARGET_POSE_DEG:.0f} deg and "
        f"training <= {TARGET_SECONDS:.0f} s; met CNN: the same with the CNN's pose")
  for line in table(sel):
    print(line)
  for group in ("tuning", "held-out"):
    g = {n: r for n, r in sel.items() if r["group"] == group}
    if g:
      print(f"{group}: {result_line(g)[len('RESULT '):]}")
  print(result_line(sel))
  return 0


if __name__ == "__main__":
  sys.exit(main())
