"""Ring analysis of a learned cloud (centrioles, CEP152): axis, diameter, rotational
symmetry order, and the agreement of two runs.

  python -m smlm_jax.holly.ring --workdir=runs/cep152 [--other=runs/cep152_seed1] \
      [--nm_per_px=NM] [--image_px=128] [--max_order=16] [--output=DIR/ring]

Method (a cloud [N, 3] in the renderer's normalized units):
  axis      the principal axis of least variance of the centred cloud (a ring or a
            short cylinder spreads in its plane); the centre is the centroid
  radius    of each point, in the plane normal to the axis; diameter = 2 x median
  spectrum  the angular power spectrum about the axis, of the points' azimuths theta:
              P(n) = |sum_j exp(i n theta_j)|^2 / N,   n = 1..max_order,
            whose expectation is 1 for azimuths spread uniformly at random (a
            featureless ring) and grows ~N for points clustered at n equal spacings;
            the order is the n >= 2 of the largest P(n) (n = 1 is an off-centre ring;
            a harmonic k n of an n-fold ring is weaker than n for blurred clusters).
            ``p_value`` = exp(-P) under that null (exponential), times the number of
            orders tried (Bonferroni).
  agreement Chamfer distance between two runs' clouds after similarity alignment
            (with reflection, align.py), as a fraction of the first cloud's
            bounding-box diagonal (target: two seeds within 0.02). When both runs'
            convergence reports say every image was explained from one viewing
            direction (``view_eig_max`` > diagnose.ONE_VIEW, ``view_axis``), the
            images do not determine the clouds' depth along it, and
            ``seed_chamfer_projected`` compares what they do determine: each cloud
            projected along its own viewing axis (2D, same alignment and units).
Lengths: normalized units; in pixels of the training images' field of view via
--image_px (the folder's native size: 128 for the CEP152 renders) and in nm with
--nm_per_px. Writes OUTPUT/ring.json and ring.png (the cloud seen along the axis and
the spectrum); last line ``RESULT diameter_units=... diameter_px=... order=...
power=... seed_chamfer=...``.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from smlm_jax.core import cli


def ring_frame(points):
  """(centre [3], axis [3] unit, in-plane basis [2, 3]) of a cloud [N, 3]."""
  x = np.asarray(points, np.float64)
  centre = x.mean(0)
  _, vecs = np.linalg.eigh(np.cov((x - centre).T))
  axis = vecs[:, 0]
  return centre, axis, vecs[:, 1:].T


def analyse(points, max_order: int = 16) -> dict:
  """Axis, radius, diameter and angular power spectrum (see the module doc)."""
  x = np.asarray(points, np.float64)
  centre, axis, basis = ring_frame(x)
  d = x - centre
  uv = d @ basis.T
  r = np.linalg.norm(uv, axis=1)
  theta = np.arctan2(uv[:, 1], uv[:, 0])
  n = np.arange(1, max_order + 1)
  power = np.abs(np.exp(1j * n[:, None] * theta[None]).sum(1)) ** 2 / len(x)
  k = int(np.argmax(power[1:])) + 1            # n >= 2
  order = int(n[k])
  return {"centre": centre.tolist(), "axis": axis.tolist(),
          "radius_median": float(np.median(r)), "diameter": float(2 * np.median(r)),
          "radius_iqr": float(np.subtract(*np.percentile(r, [75, 25]))),
          "height_std": float(np.std(d @ axis)), "orders": n.tolist(),
          "power": power.tolist(), "order": order, "order_power": float(power[k]),
          "p_value": float(min(1.0, math.exp(-power[k]) * (max_order - 1))),
          "num_points": int(len(x))}


def seed_chamfer(a, b, starts: int = 48) -> float:
  """Chamfer of cloud b aligned onto cloud a, fraction of a's bounding-box diagonal."""
  from smlm_jax.holly import align
  return float(align.align(b, a, num_starts=starts).chamfer_rel)


def project_along(points, axis):
  """[N, 3] -> [N, 3]: the points' coordinates in the plane normal to ``axis`` (third
  coordinate 0)."""
  a = np.asarray(axis, np.float64)
  a = a / np.linalg.norm(a)
  u = np.cross(a, [1.0, 0, 0] if abs(a[0]) < 0.9 else [0, 1.0, 0])
  u /= np.linalg.norm(u)
  w = np.cross(a, u)
  x = np.asarray(points, np.float64)
  return np.stack([x @ u, x @ w, np.zeros(len(x))], 1)


def one_view_axis(workdir: str):
  """The viewing axis of a run whose images were all explained from one direction
  (its convergence.json), else None."""
  from smlm_jax.holly import diagnose
  try:
    rep = json.load(open(os.path.join(workdir, "convergence.json")))
  except (OSError, ValueError):
    return None
  return diagnose.one_view_axis(rep)


def picture(points, result: dict, path: str, title: str = ""):
  from smlm_jax.core import plotting
  plt = plotting.pyplot()
  x = np.asarray(points, np.float64)
  c = np.asarray(result["centre"])
  axis = np.asarray(result["axis"])
  _, _, basis = ring_frame(x)
  uv = (x - c) @ basis.T
  fig, ax = plt.subplots(1, 2, figsize=(8, 3.8))
  ax[0].scatter(uv[:, 0], uv[:, 1], s=6, c=(x - c) @ axis, cmap="viridis")
  t = np.linspace(0, 2 * np.pi, 200)
  rm = result["radius_median"]
  ax[0].plot(rm * np.cos(t), rm * np.sin(t), "r--", lw=0.8)
  ax[0].set_aspect("equal")
  ax[0].set_title(f"along the ring axis: diameter {result['diameter']:.3f} units", fontsize=9)
  ax[1].bar(result["orders"], result["power"], color="0.5")
  ax[1].bar([result["order"]], [result["order_power"]], color="C3")
  ax[1].axhline(1.0, color="k", lw=0.6, ls=":")
  ax[1].set_xlabel("rotational order n")
  ax[1].set_ylabel("angular power P(n) (1 = uniform)")
  ax[1].set_title(f"order {result['order']} (p = {result['p_value']:.2g})", fontsize=9)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  plotting.save(fig, path)


def run(workdir_or_cloud: str, other: str | None = None, nm_per_px: float = 0.0,
        image_px: int = 128, max_order: int = 16, output: str | None = None) -> dict:
  from smlm_jax.holly import render, shapes
  load = lambda p: shapes.read_shape(p if p.endswith((".ply", ".obj"))
                                     else os.path.join(p, "shape.ply")).vertices
  pts = load(workdir_or_cloud)
  res = analyse(pts, max_order)
  px_per_unit = render.pixels_per_unit(image_px, 1.1)
  res["diameter_px"] = res["diameter"] * px_per_unit
  res["image_px"] = image_px
  if nm_per_px > 0:
    res["diameter_nm"] = res["diameter_px"] * nm_per_px
  res["seed_chamfer"] = float("nan")
  res["seed_chamfer_projected"] = float("nan")
  if other:
    o = load(other)
    res["seed_chamfer"] = seed_chamfer(pts, o)
    res["other"] = analyse(o, max_order)
    axes = [one_view_axis(p) if os.path.isdir(p) else None for p in (workdir_or_cloud, other)]
    if all(a is not None for a in axes):
      res["seed_chamfer_projected"] = seed_chamfer(project_along(pts, axes[0]),
                                                   project_along(o, axes[1]))
  out = output or os.path.join(workdir_or_cloud if os.path.isdir(workdir_or_cloud)
                               else os.path.dirname(os.path.abspath(workdir_or_cloud)), "ring")
  os.makedirs(out, exist_ok=True)
  cli.atomic_write_text(os.path.join(out, "ring.json"), json.dumps(res, indent=1))
  picture(pts, res, os.path.join(out, "ring.png"), os.path.basename(
      os.path.abspath(workdir_or_cloud)))
  return res


def main(argv):
  from absl import flags
  f = flags.FLAGS
  cli.quiet_logs()
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("workdir", "other"):
    p = getattr(f, name)
    if p and not os.path.exists(p if p.endswith((".ply", ".obj"))
                                else os.path.join(p, "shape.ply")):
      cli.fail(f"--{name}={p}: no shape.ply there (train first) and not a .ply/.obj")
  if not f.workdir:
    cli.fail("give --workdir=DIR (a training run) or a cloud .ply/.obj")
  if f.max_order < 2 or f.image_px < 1:
    cli.fail("--max_order must be >= 2 and --image_px >= 1")
  res = run(f.workdir, f.other, f.nm_per_px, f.image_px, f.max_order, f.output)
  print(f"ring axis {np.round(res['axis'], 3).tolist()}, diameter {res['diameter']:.4f} "
        f"units = {res['diameter_px']:.1f} px of the {res['image_px']} px images"
        + (f" = {res['diameter_nm']:.0f} nm" if "diameter_nm" in res else ""))
  print("angular power P(n): " + " ".join(f"{n}:{p:.1f}" for n, p in
                                           zip(res["orders"], res["power"])))
  print(f"rotational order {res['order']} (P = {res['order_power']:.1f}, p = "
        f"{res['p_value']:.2g}); two runs' Chamfer {res['seed_chamfer']:.4f}")
  if np.isfinite(res["seed_chamfer_projected"]):
    print("both runs explained every image from one viewing direction: their depth is not "
          "determined by the images; Chamfer of the clouds projected along it "
          f"{res['seed_chamfer_projected']:.4f}")
  print(f"RESULT diameter_units={res['diameter']:.5f} diameter_px={res['diameter_px']:.2f} "
        f"order={res['order']} power={res['order_power']:.2f} "
        f"seed_chamfer={res['seed_chamfer']:.5f} "
        f"seed_chamfer_projected={res['seed_chamfer_projected']:.5f}")


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("workdir", None, "Training run folder (its shape.ply) or a cloud file.")
  flags.DEFINE_string("other", None, "A second run (another seed) to compare with.")
  flags.DEFINE_float("nm_per_px", 0.0, "Pixel size of the images in nm (0: not known).")
  flags.DEFINE_integer("image_px", 128, "Native size of the training images (px).")
  flags.DEFINE_integer("max_order", 16, "Largest rotational order of the spectrum.")
  flags.DEFINE_string("output", None, "Output folder (default DIR/ring).")
  app.run(main, flags_parser=cli.parse_flags)
