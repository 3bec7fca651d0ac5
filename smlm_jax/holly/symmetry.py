"""Symmetries of a shape, and pose errors modulo them.

What a projection cannot tell apart. An image is P R X (P drops z, R the pose, X the
structure's sites). Two poses give the same images for every image when
  * X is symmetric under a proper rotation g (g X = X, as a set): R and R g, and
  * X is symmetric under an improper transform g (a mirror plane, an inversion, a
    rotoreflection; det g = -1): R and M R g, where M = diag(1, 1, -1) mirrors the
    optical axis (P M = P, so P M R g X = P R X; M R g is proper).
So for a bilaterally symmetric shape (suzanne, a cow, a fish) every image has two
correct poses, which can differ by up to 180 degrees, even though the shape has no
rotational symmetry; a ring with an n-fold axis has 2n. The pose error modulo the
symmetry is the smallest angle to any of them (:func:`pose_errors_deg`).

Detection (:func:`detect`), from the reference sites (or a learned cloud), centred on
their centroid: candidates are rotations by 2 pi k / n (n = 2..max_order) about each
principal axis and each coordinate axis (meshes are usually modelled axis-aligned),
mirror planes normal to those axes, half-turns and mirrors about the bisectors of
pairs of axes, and the inversion. A candidate g is kept when the sites and their
image g X overlap as densities: with a Gaussian kernel of width ``width`` (default
0.04) times the bounding-box diagonal,
  score(g) = 1 - K(g X, X) / K(X, X),  K(A, B) = sum over pairs a != b of
  exp(-|a - b|^2 / 2 h^2)
(coincident pairs are left out so that an exactly symmetric vertex set and a random
surface sample of a symmetric shape score alike), below ``tol`` (default 0.05). Point
sets sparser than h per site are noisy: a 400-point sample of suzanne scores 0.10 on
its mirror plane, the bunny 0.07 on its best candidate, so such shapes should have
their symmetry detected on the dense mesh (or declared: a JSON file with the 3x3
elements, :func:`save` / :func:`load`; experiments/data/holly_shapes/*.symmetry.json).
The kept elements are closed under composition, and a generator whose products fail
the test is dropped. A near-symmetric shape (one small bump) is declared symmetric at
this tolerance: its images differ between the symmetric poses by less than the
training blur, so the pose error modulo the near-symmetry is the meaningful one.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from smlm_jax.holly import align as align_lib

MIRROR = align_lib.MIRROR


@dataclasses.dataclass
class Symmetry:
  elements: np.ndarray        # [G, 3, 3] orthogonal, elements[0] = identity
  scores: np.ndarray          # [G] detection score of each element (identity: 0)
  labels: list                # [G] short names ("C4 about e3", "mirror e1", "product")

  @property
  def order(self) -> int:
    return len(self.elements)

  def describe(self) -> str:
    proper = int(np.sum(np.linalg.det(self.elements) > 0))
    return (f"{self.order} element(s): {proper} rotation(s), {self.order - proper} "
            "improper (mirror/rotoreflection)")


def candidates(axes, max_order: int = 8):
  """[(g [3, 3], label)]: the candidate symmetries about principal axes axes [3, 3]
  (columns)."""
  out = []
  for j in range(3):
    a = axes[:, j]
    for n in range(2, max_order + 1):
      for k in range(1, n):
        if np.gcd(k, n) == 1:
          out.append((align_lib.axis_angle_matrix(a, 2 * np.pi * k / n),
                      f"C{n}^{k} about e{j + 1}"))
    out.append((np.eye(3) - 2 * np.outer(a, a), f"mirror normal to e{j + 1}"))
  for i in range(3):
    for j in range(i + 1, 3):
      for s in (1, -1):
        b = axes[:, i] + s * axes[:, j]
        out.append((align_lib.axis_angle_matrix(b, np.pi),
                    f"C2 about e{i + 1}{'+' if s > 0 else '-'}e{j + 1}"))
        out.append((np.eye(3) - 2 * np.outer(b, b) / 2.0,
                    f"mirror normal to e{i + 1}{'+' if s > 0 else '-'}e{j + 1}"))
  out.append((-np.eye(3), "inversion"))
  return out


def _kernel(a, b, h):
  d2 = np.sum((a[:, None] - b[None]) ** 2, -1)
  return float(np.sum(np.where(d2 > 1e-12, np.exp(-d2 / (2 * h * h)), 0.0)))


def score(points, g, width: float = 0.04) -> float:
  """1 - K(g X, X) / K(X, X) (see the module doc): ~0 for a symmetry of X."""
  x = np.asarray(points, np.float64)
  x = x - x.mean(0)
  h = width * float(np.linalg.norm(x.max(0) - x.min(0)))
  return 1.0 - _kernel(x @ np.asarray(g).T, x, h) / max(_kernel(x, x, h), 1e-30)


def detect(points, tol: float = 0.05, width: float = 0.04, max_order: int = 8,
           max_elements: int = 48) -> "Symmetry":
  """The symmetry group of a point set [N, 3] (see the module doc)."""
  x = np.asarray(points, np.float64)
  if len(x) > 800:                           # the kernel is O(N^2): thin out
    x = x[np.random.default_rng(0).choice(len(x), 800, replace=False)]
  x = x - x.mean(0)
  h = width * float(np.linalg.norm(x.max(0) - x.min(0)))
  kxx = max(_kernel(x, x, h), 1e-30)
  sc = lambda g: 1.0 - _kernel(x @ g.T, x, h) / kxx
  _, vecs = np.linalg.eigh(x.T @ x / len(x))
  els, scores, labels = [np.eye(3)], [0.0], ["identity"]
  known = lambda g, group: any(np.abs(g - e).max() < 1e-3 for e in group)
  cand = ([(g, "principal " + lab) for g, lab in candidates(vecs, max_order)]
          + [(g, "coordinate " + lab) for g, lab in candidates(np.eye(3), max_order)])
  scored = sorted(((sc(g), i) for i, (g, _) in enumerate(cand)), key=lambda t: t[0])
  for s, i in scored:                         # best first
    g, label = cand[i]
    if s >= tol:
      break
    if known(g, els):
      continue
    # the closure of the group with g; every new element must pass the test too
    group, new = list(els) + [g], [(g, s, label)]
    ok, changed = True, True
    while ok and changed:
      changed = False
      for a in list(group):
        for b in list(group):
          ab = a @ b
          if known(ab, group):
            continue
          sab = sc(ab)
          if sab >= 2 * tol or len(group) >= max_elements:
            ok = False
            break
          group.append(ab), new.append((ab, sab, f"product ({label})"))
          changed = True
        if not ok:
          break
    if ok:
      for e, v, lab in new:
        els.append(e), scores.append(v), labels.append(lab)
  return Symmetry(np.stack(els), np.asarray(scores), labels)


def save(path: str, sym: "Symmetry", note: str = ""):
  """Declares a symmetry: JSON {"elements": [G x 3 x 3], "labels", "note"}."""
  import json
  from smlm_jax.core import cli
  cli.atomic_write_text(path, json.dumps({"elements": np.round(sym.elements, 6).tolist(),
                                          "labels": sym.labels, "note": note}, indent=1))


def load(path: str) -> "Symmetry":
  """A declared symmetry (see :func:`save`); the identity is added when missing."""
  import json
  d = json.load(open(path))
  els = np.asarray(d["elements"], np.float64).reshape(-1, 3, 3)
  labels = list(d.get("labels", ["declared"] * len(els)))
  if not any(np.abs(e - np.eye(3)).max() < 1e-6 for e in els):
    els, labels = np.concatenate([np.eye(3)[None], els]), ["identity"] + labels
  return Symmetry(els, np.zeros(len(els)), labels)


def for_shape(path: str, sites=None) -> "Symmetry":
  """The symmetry of a shape file: PATH.symmetry.json when present (declared), else
  detected on its sites (or on ``sites`` when given)."""
  import os
  declared = os.path.splitext(path)[0] + ".symmetry.json"
  if os.path.exists(declared):
    return load(declared)
  if sites is None:
    from smlm_jax.holly import shapes
    sites = shapes.read_shape(path).vertices
  return detect(sites)


def trivial() -> Symmetry:
  return Symmetry(np.eye(3)[None], np.zeros(1), ["identity"])


def equivalent_poses(R_true, symmetry: Symmetry) -> np.ndarray:
  """[B, G, 3, 3] proper poses that give the same image as R_true [B, 3, 3]: R g for
  proper g, M R g for improper g."""
  R = np.asarray(R_true, np.float64)
  out = np.einsum("bij,gjk->bgik", R, symmetry.elements)    # R g
  improper = np.linalg.det(symmetry.elements) < 0
  out[:, improper] = MIRROR @ out[:, improper]
  return out


def pose_errors_deg(R_pred, R_true, alignment, symmetry: Symmetry | None = None):
  """Angular pose errors (degrees) [B] after alignment (align_lib.pose_errors_deg),
  the smallest over the poses equivalent under the reference's symmetry."""
  if symmetry is None or symmetry.order == 1:
    return align_lib.pose_errors_deg(R_pred, R_true, alignment)
  eq = equivalent_poses(R_true, symmetry)                   # [B, G, 3, 3]
  b, g = eq.shape[:2]
  pred = np.repeat(np.asarray(R_pred, np.float64)[:, None], g, axis=1).reshape(b * g, 3, 3)
  err = align_lib.pose_errors_deg(pred, eq.reshape(b * g, 3, 3), alignment)
  return err.reshape(b, g).min(axis=1)


angle_deg = align_lib.angle_deg      # geodesic angle (deg) between rotations [..., 3, 3]


def angle_modulo_deg(R1, R2, symmetry: Symmetry | None = None) -> np.ndarray:
  """Angle (deg) between two poses of the same cloud [B, 3, 3], the smallest over the
  poses of R2 equivalent under the cloud's ``symmetry`` (no alignment involved)."""
  if symmetry is None or symmetry.order == 1:
    return angle_deg(R1, R2)
  eq = equivalent_poses(R2, symmetry)
  return angle_deg(np.asarray(R1)[:, None], eq).min(axis=1)
