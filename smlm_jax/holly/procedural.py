"""Procedural test structures and surface sampling of meshes (point sets of sites).

Every generator is a pure function of (num, seed) returning sites [num, 3] (float64,
arbitrary units; training normalizes them, :mod:`smlm_jax.holly.shapes`). They are the
kinds of structure the HOLLy defaults were not tuned on (experiments/holly_panel.py):

  asymmetric      three overlapping ellipsoid surfaces of different sizes and tilts
  elongated       a rod (ellipsoid 1 : 0.22 : 0.16) with a knob near one end
  tube            a thin tube (radius 0.05) bent into a hook (half circle + straight)
  shell           a hollow ellipsoidal shell (1 : 0.85 : 0.7) cut open by a tilted
                  plane (a cup), no interior sites
  helix           a chiral thin helix (2.5 turns, radius 0.45, tube radius 0.05)
  near_symmetric  a bilaterally symmetric body (ellipsoid + two fins + tail) with one
                  small asymmetric bump (3% of the sites)
  npc             a nuclear-pore-like particle: two 8-fold rings of clustered sites
                  (D8h; added 2026-12-08 as a held-out panel shape)

``sample_surface`` draws points uniformly by area on a triangle mesh (public meshes,
experiments/data/holly_shapes/README.md).
"""
from __future__ import annotations

import numpy as np

from smlm_jax.holly import align


def _ellipsoid(rng, n, axes, centre=(0, 0, 0), rot=None):
  """~uniform-by-area points on an ellipsoid surface (rejection on the area element)."""
  a = np.asarray(axes, np.float64)
  out = []
  while sum(len(o) for o in out) < n:
    d = rng.normal(size=(4 * n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    # area element of the map sphere -> ellipsoid is proportional to |normal scaled|
    w = np.linalg.norm(d / a * np.prod(a), axis=1)
    keep = rng.uniform(size=len(d)) < w / w.max()
    out.append(d[keep] * a)
  p = np.concatenate(out)[:n]
  if rot is not None:
    p = p @ np.asarray(rot).T
  return p + np.asarray(centre, np.float64)


def _tube(rng, n, curve, radius, t_max=1.0):
  """Points on a tube of ``radius`` around curve(t), t in [0, t_max], uniform in arc
  length (dense resampling of the curve) and angle."""
  t = np.linspace(0, t_max, 4000)
  c = curve(t)
  seg = np.linalg.norm(np.diff(c, axis=0), axis=1)
  s = np.concatenate([[0], np.cumsum(seg)])
  u = np.sort(rng.uniform(0, s[-1], n))
  i = np.clip(np.searchsorted(s, u) - 1, 0, len(seg) - 1)
  tangent = np.diff(c, axis=0)[i] / seg[i, None]
  p = c[i] + (u - s[i])[:, None] * tangent
  ref = np.where(np.abs(tangent[:, 2:3]) < 0.9, [[0, 0, 1.0]], [[1.0, 0, 0]])
  n1 = np.cross(tangent, ref)
  n1 /= np.linalg.norm(n1, axis=1, keepdims=True)
  n2 = np.cross(tangent, n1)
  a = rng.uniform(0, 2 * np.pi, n)[:, None]
  return p + radius * (np.cos(a) * n1 + np.sin(a) * n2)


def asymmetric(num: int = 400, seed: int = 0):
  rng = np.random.default_rng(seed)
  sizes = [(0.6, 0.4, 0.3), (0.35, 0.25, 0.5), (0.25, 0.3, 0.2)]
  centres = [(0, 0, 0), (0.55, 0.3, 0.1), (-0.35, 0.45, -0.3)]
  rots = [align.axis_angle_matrix(axis, angle)
          for axis, angle in (((1, 2, 0.5), 0.4), ((0.3, -1, 2), 1.1), ((2, 1, -1), 0.7))]
  area = np.array([np.prod(s) ** (2 / 3) for s in sizes])
  counts = np.round(num * area / area.sum()).astype(int)
  counts[0] += num - counts.sum()
  return np.concatenate([_ellipsoid(rng, k, s, c, r)
                         for k, s, c, r in zip(counts, sizes, centres, rots)])


def elongated(num: int = 400, seed: int = 0):
  rng = np.random.default_rng(seed)
  k = int(0.15 * num)
  rod = _ellipsoid(rng, num - k, (1.0, 0.22, 0.16))
  knob = _ellipsoid(rng, k, (0.12, 0.12, 0.12), centre=(0.7, 0.18, 0.08))
  return np.concatenate([rod, knob])


def tube(num: int = 400, seed: int = 0):
  rng = np.random.default_rng(seed)

  def hook(t):      # t in [0, 1]: straight segment (t < 0.5) then a half circle
    x = np.where(t < 0.5, -0.9 + 2.4 * t, 0.3 + 0.45 * np.sin(2 * np.pi * (t - 0.5)))
    y = np.where(t < 0.5, 0.0, 0.45 - 0.45 * np.cos(2 * np.pi * (t - 0.5)))
    return np.stack([x, y, 0.15 * np.sin(np.pi * t)], -1)
  return _tube(rng, num, hook, 0.05)


def shell(num: int = 400, seed: int = 0):
  rng = np.random.default_rng(seed)
  p = _ellipsoid(rng, 3 * num, (1.0, 0.85, 0.7))
  normal = np.array([0.3, 0.2, 1.0]) / np.linalg.norm([0.3, 0.2, 1.0])
  p = p[p @ normal < 0.45]
  return p[:num]


def helix(num: int = 400, seed: int = 0):
  rng = np.random.default_rng(seed)
  turns = 2.5
  curve = lambda t: np.stack([0.45 * np.cos(2 * np.pi * turns * t),
                              0.45 * np.sin(2 * np.pi * turns * t), 1.6 * t - 0.8], -1)
  return _tube(rng, num, curve, 0.05)


def near_symmetric(num: int = 400, seed: int = 0):
  """Mirror-symmetric about the plane y = 0, except one small bump."""
  rng = np.random.default_rng(seed)
  k_bump = int(0.03 * num)
  k_fin = int(0.12 * num)
  k_tail = int(0.12 * num)
  half = (num - k_bump - 2 * k_fin - k_tail) // 2
  body = _ellipsoid(rng, half, (0.8, 0.35, 0.4))
  body = np.concatenate([body, body * [1, -1, 1]])          # exactly symmetric
  fin = _ellipsoid(rng, k_fin, (0.25, 0.3, 0.05), centre=(0.1, 0.45, -0.1),
                   rot=align.axis_angle_matrix((1, 0, 0), 0.5))
  fins = np.concatenate([fin, fin * [1, -1, 1]])
  tail = _ellipsoid(rng, k_tail, (0.25, 0.04, 0.3), centre=(-0.95, 0, 0.1))
  tail = np.concatenate([tail[: k_tail // 2], (tail * [1, -1, 1])[: k_tail - k_tail // 2]])
  rest = num - len(body) - len(fins) - len(tail)
  bump = _ellipsoid(rng, rest, (0.1, 0.1, 0.1), centre=(0.35, 0.3, 0.3))
  return np.concatenate([body, fins, tail, bump])


def npc(num: int = 400, seed: int = 0):
  """A nuclear-pore-like particle, the standard test structure of SMLM particle fusion
  (Heydarian et al. 2018, 2021; Nup96 labelling): two parallel rings (radius 0.55, 0.5
  apart, as ~107 nm and ~50 nm scaled to the bounding box), each of 8 corners, each
  corner a cluster of sites (rms 0.05 per axis), the corners of both rings at the same
  azimuths: D8h symmetry (32 elements) when sampled densely."""
  rng = np.random.default_rng(seed)
  corner = np.arange(num) % 16
  phi = 2 * np.pi * (corner % 8) / 8
  z = np.where(corner < 8, 0.25, -0.25)
  centre = np.stack([0.55 * np.cos(phi), 0.55 * np.sin(phi), z], -1)
  return centre + 0.05 * rng.normal(size=(num, 3))


GENERATORS = {"asymmetric": asymmetric, "elongated": elongated, "tube": tube,
              "shell": shell, "helix": helix, "near_symmetric": near_symmetric,
              "npc": npc}


def sample_surface(vertices, faces, num: int, seed: int = 0):
  """``num`` points uniform by area on a triangle mesh (vertices [V, 3], faces [F, 3+];
  polygons fan-triangulated), seeded."""
  v = np.asarray(vertices, np.float64)
  f = np.asarray(faces, np.int64)
  if f.shape[1] > 3:
    f = np.concatenate([f[:, [0, i, i + 1]] for i in range(1, f.shape[1] - 1)])
  a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
  area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
  rng = np.random.default_rng(seed)
  tri = rng.choice(len(f), size=num, p=area / area.sum())
  r1, r2 = rng.uniform(size=(2, num, 1))
  s = np.sqrt(r1)
  return (1 - s) * a[tri] + s * (1 - r2) * b[tri] + s * r2 * c[tri]
