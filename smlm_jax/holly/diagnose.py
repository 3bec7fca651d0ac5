"""Did the poses converge? A report from the images and the learned cloud alone (no
ground truth), written at the end of training (DIR/convergence.json, and a loud line
in the log when not).

A cloud that is a blur of several views still renders into smooth blobs that match
blurred images, but not the final, sharp ones; and a pose map that is not consistent
leaves the pose CNN and the pose search (+ Gauss-Newton refinement) disagreeing. On a
set of images at the final sigma:
  residual        per image, |render(cloud at the refined pose) - image|^2 / |image|^2
                  (0: explained exactly; 1: no better than an empty render); median
  agreement       fraction of images whose CNN pose (best hypothesis by render loss)
                  is within ``agree_deg`` of the refined pose, modulo the learned
                  cloud's own symmetry (symmetry.detect)
  hypothesis_spread_deg  median over images of the largest angle between two CNN
                  hypotheses (informational: hypotheses may legitimately cover
                  ambiguous views)
  view_eig_max    the largest eigenvalue of E[v v^T] over the refined poses' viewing
                  directions v = R^T e_z (object frame): 1/3 when the views spread
                  over the sphere (under 0.47 for 64 uniform views in 99% of draws),
                  1 when every image is explained from one direction. A cloud that is
                  a flattened average of the structure (the hollow shell learned as a
                  disc, the rod with a knob seen from one side) sends every image to
                  the view it fits best: those failed runs had 0.85-0.90, the seven
                  learned panel runs 0.38-0.44 (128 images each).
Verdict: converged when residual <= ``max_residual``, agreement >= ``min_agreement``
and, with at least ``view_min_images`` images per sigma (few real particles need not
cover the sphere) and a cloud that is not axially symmetric (whose roll is free),
view_eig_max <= ``max_view_eig`` (config.convergence; calibrated on runs whose truth
we know: see README). A sample with preferred orientations fails the last test
although its cloud may be right: set max_view_eig=1 for one. Above ``ONE_VIEW`` the
message says, whatever the verdict, that the images do not determine the cloud's depth
(the ten CEP152 renders are in-plane turns of one view: their 2D covariances are equal
and an in-plane turn maps one onto another; both runs there had 1.00).

Axial clouds: when the learned cloud is (at the symmetry detector's tolerance) invariant
under rotations of order >= ``AXIAL_ORDER`` about one axis, the agreement above only
tests the direction of that axis (poses are compared modulo the cloud's symmetry), and a
rotation about the axis is not determined by the cloud. The report says so
(``axial_order``); a true rod or ring is fine, but a rod whose off-axis detail was
averaged away by undetermined rolls leaves a high residual (the elongated panel shape:
0.142, against <= 0.065 for every run that learned its shape).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from smlm_jax.core import cli
from smlm_jax.holly import render
from smlm_jax.holly import rotations
from smlm_jax.holly import symmetry as sym_lib


def thresholds(config) -> dict:
  c = config.get("convergence", None)
  get = lambda k, d: float(c.get(k, d)) if c is not None else d
  return {"max_residual": get("max_residual", 0.1), "min_agreement": get("min_agreement", 0.3),
          "agree_deg": get("agree_deg", 10.0), "max_view_eig": get("max_view_eig", 0.6),
          "view_min_images": get("view_min_images", 32)}


AXIAL_ORDER = 5
ONE_VIEW = 0.95     # view_eig_max above this: (nearly) every image seen along one axis


def one_view_axis(rep: dict):
  """The object-frame viewing axis [3] (unit) of a report whose images were all
  explained from one viewing direction (``view_eig_max`` > ONE_VIEW): the images do
  not determine the cloud's depth along it. None otherwise."""
  if rep.get("view_eig_max", 0.0) > ONE_VIEW and "view_axis" in rep:
    a = np.asarray(rep["view_axis"], np.float64)
    return a / np.linalg.norm(a)
  return None


def undetermined_depth_axis(rep: dict):
  """:func:`one_view_axis` of a converged run's report, else None (a run that did not
  converge keeps its cloud as trained: its poses, not its depth, are in doubt)."""
  return one_view_axis(rep) if rep.get("converged", False) else None


def flatten_along(points, axis):
  """[N, 3] -> [N, 3]: each point's coordinate along the unit ``axis`` replaced by the
  cloud's mean one (the cloud squeezed onto its plane normal to the axis through its
  centroid; in-plane coordinates untouched)."""
  x = np.asarray(points, np.float64)
  a = np.asarray(axis, np.float64) / np.linalg.norm(axis)
  depth = x @ a
  return (x - np.outer(depth - depth.mean(), a)).astype(np.asarray(points).dtype)


def axial_order(symmetry) -> int:
  """The highest rotation order n found about one axis (C_n labels of the detector; 1
  when none): >= AXIAL_ORDER means the cloud is nearly axially symmetric."""
  best = 1
  for lab in symmetry.labels:
    if " C" in " " + lab and "about" in lab:
      head = lab.split("C", 1)[1].split("^")[0].split(" ")[0]
      if head.isdigit():
        best = max(best, int(head))
  return best


def verdict(rep: dict, th: dict) -> bool:
  """Converged: median residual, CNN/search agreement and, where it applies
  (``views_checked``), the spread of the viewing directions within the thresholds."""
  views_ok = (not rep.get("views_checked", False)
              or rep["view_eig_max"] <= th.get("max_view_eig", 1.0))
  return bool(rep["residual"] <= th["max_residual"]
              and rep["agreement"] >= th["min_agreement"] and views_ok)


def view_eig_max(R) -> float:
  """Largest eigenvalue of E[v v^T] over rotations [B, 3, 3], v = R^T e_z."""
  return view_moment(R)[0]


def view_moment(R):
  """(largest eigenvalue of E[v v^T], its eigenvector [3]) over rotations [B, 3, 3],
  v = R^T e_z (the object-frame viewing directions)."""
  v = np.asarray(R, np.float64)[:, 2, :]
  w, U = np.linalg.eigh(v.T @ v / max(len(v), 1))
  return float(w[-1]), U[:, -1]


def refined_fit(task, params, images, sigma, seed: int = 0, batch_size: int = 64):
  """Per image of unit-mass images [B, N, N] at widths sigma [B], against the cloud:
  the refined pose (search + Gauss-Newton; the CNN's first hypothesis when refinement
  is off) R [B, 3, 3] and t [B, 2] (normalized units), the CNN's best hypothesis by
  render loss [B, 3, 3], every CNN hypothesis [B, K, 3, 3] and the residual [B]
  (|render at the refined pose - image|^2 / |image|^2). Seeded (the search's grid
  turn)."""
  refine_on = len(task.config.refine.extra_sigmas_px) > 0

  @jax.jit
  def one(params, image, sigma, key):
    batch = {"image": image, "sigma": sigma}
    if refine_on:
      R_ref, t_ref, _, out, R_cnn = task.refined_poses(params, batch, key)
    else:
      out = task.predict(params["net"], image)
      R_cnn = rotations.matrix_from_6d(out["r6"])
      R_ref, t_ref = R_cnn[:, 0], out["t"]
    losses = task.render_losses(params["points"], R_cnn, out["t"], sigma, image, name="l2")
    best = jnp.take_along_axis(R_cnn, jnp.argmin(losses, 1)[:, None, None, None], 1)[:, 0]
    img = jax.vmap(lambda r, t, s: render.render(params["points"], r, t, s, task.size,
                                                 task.fov))(R_ref, t_ref, sigma)
    res = jnp.sum((img - image) ** 2, (-2, -1)) / jnp.maximum(
        jnp.sum(image ** 2, (-2, -1)), 1e-30)
    return R_ref, t_ref, best, R_cnn, res

  outs = []
  for i in range(0, len(images), batch_size):
    outs.append(jax.device_get(one(params, jnp.asarray(images[i:i + batch_size]),
                                   jnp.asarray(sigma[i:i + batch_size]),
                                   jax.random.key(seed + i))))
  return tuple(np.concatenate(a) for a in zip(*outs))


def report(task, params, images, sigma, seed: int = 0, batch_size: int = 64,
           particles: int | None = None) -> dict:
  """The convergence report (see the module doc) on unit-mass images [B, N, N] at
  widths sigma [B]; ``particles``: distinct structures among them (default: all)."""
  th = thresholds(task.config)
  k = int(task.config.model.hypotheses)
  R_ref, _, best, R_cnn, res = refined_fit(task, params, images, sigma, seed, batch_size)
  cloud_sym = sym_lib.detect(np.asarray(params["points"]))
  agree = sym_lib.angle_modulo_deg(best, R_ref, cloud_sym)
  if k > 1:
    pair = sym_lib.angle_deg(R_cnn[:, :, None], R_cnn[:, None, :])
    spread = float(np.median(pair.reshape(len(pair), -1).max(1)))
  else:
    spread = 0.0
  out = {"residual": float(np.median(res)), "residual_p90": float(np.percentile(res, 90)),
         "agreement": float(np.mean(agree < th["agree_deg"])),
         "cnn_to_refined_median_deg": float(np.median(agree)),
         "hypothesis_spread_deg": spread, "num_images": int(len(images)),
         "cloud_symmetry": cloud_sym.describe(), "axial_order": axial_order(cloud_sym),
         "thresholds": th}
  out["view_eig_max"], axis = view_moment(R_ref)
  out["view_axis"] = axis.tolist()
  n_part = len(images) if particles is None else int(particles)
  out["views_checked"] = bool(n_part >= th["view_min_images"]
                              and out["axial_order"] < AXIAL_ORDER)
  out["converged"] = verdict(out, th)
  return out


def message(rep: dict) -> str:
  th = rep["thresholds"]
  body = (f"image residual {rep['residual']:.3f} (max {th['max_residual']:g}), CNN/search "
          f"agreement {100 * rep['agreement']:.0f}% within {th['agree_deg']:g} deg (min "
          f"{100 * th['min_agreement']:.0f}%), hypothesis spread "
          f"{rep['hypothesis_spread_deg']:.0f} deg")
  if "view_eig_max" in rep:
    body += (f", viewing directions {rep['view_eig_max']:.2f} on one axis (uniform 0.33, "
             + (f"max {th['max_view_eig']:g})" if rep.get("views_checked")
                else "not checked: too few particles or an axial cloud)"))
  if rep.get("view_eig_max", 0.0) > ONE_VIEW:
    body += ("; every image is explained from one viewing direction: the images may be "
             "in-plane turns of a single view (as the ten CEP152 renders are), and then "
             "the cloud's depth along that direction is not determined by them (with "
             "config.convergence.one_view_depth='flatten', the default, a converged run's "
             "shape.ply is the cloud flattened along it; the cloud as trained is "
             "shape_with_depth.ply)")
  axial = ""
  if rep.get("axial_order", 1) >= AXIAL_ORDER:
    axial = ("; the learned cloud is nearly axially symmetric (C%d or more about one axis): "
             "rotations about that axis are not determined, and the agreement only "
             "tests the axis" % rep["axial_order"])
  if rep["converged"]:
    return f"holly: poses converged: {body}{axial}"
  views = ""
  if rep.get("views_checked") and rep["view_eig_max"] > th.get("max_view_eig", 1.0):
    views = ("; most images were explained from one viewing direction, so the cloud is "
             "likely a flattened average of the structure (unless the sample has "
             "preferred orientations: then set --config.convergence.max_view_eig=1)")
  return (f"WARNING holly: poses did NOT converge: {body}{axial}{views}; the cloud is "
          "likely a blur of several views or misses detail the images show. Train "
          "longer, with another --config.seed, or more --config.search.num_rotations")


def write(workdir: str, rep: dict, step: int):
  cli.atomic_write_text(os.path.join(workdir, "convergence.json"),
                        json.dumps({"step": int(step), **rep}, indent=1))
