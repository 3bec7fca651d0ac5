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
Verdict: converged when residual <= ``max_residual`` and agreement >=
``min_agreement`` (config.convergence; calibrated on runs whose truth we know: see
README).

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
          "agree_deg": get("agree_deg", 10.0)}


AXIAL_ORDER = 5


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
  """Converged: median residual and CNN/search agreement within the thresholds."""
  return bool(rep["residual"] <= th["max_residual"]
              and rep["agreement"] >= th["min_agreement"])


def report(task, params, images, sigma, seed: int = 0, batch_size: int = 64) -> dict:
  """The convergence report (see the module doc) on unit-mass images [B, N, N] at
  widths sigma [B]."""
  th = thresholds(task.config)
  k = int(task.config.model.hypotheses)
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
    return R_ref, best, R_cnn, res

  outs = []
  for i in range(0, len(images), batch_size):
    outs.append(jax.device_get(one(params, jnp.asarray(images[i:i + batch_size]),
                                   jnp.asarray(sigma[i:i + batch_size]),
                                   jax.random.key(seed + i))))
  R_ref, best, R_cnn, res = (np.concatenate(a) for a in zip(*outs))
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
  out["converged"] = verdict(out, th)
  return out


def message(rep: dict) -> str:
  th = rep["thresholds"]
  body = (f"image residual {rep['residual']:.3f} (max {th['max_residual']:g}), CNN/search "
          f"agreement {100 * rep['agreement']:.0f}% within {th['agree_deg']:g} deg (min "
          f"{100 * th['min_agreement']:.0f}%), hypothesis spread "
          f"{rep['hypothesis_spread_deg']:.0f} deg")
  axial = ""
  if rep.get("axial_order", 1) >= AXIAL_ORDER:
    axial = ("; the learned cloud is nearly axially symmetric (C%d or more about one axis): "
             "rotations about that axis are not determined, and the agreement only "
             "tests the axis" % rep["axial_order"])
  if rep["converged"]:
    return f"holly: poses converged: {body}{axial}"
  return (f"WARNING holly: poses did NOT converge: {body}{axial}; the cloud is likely a "
          "blur of several views or misses detail the images show. Train longer, with "
          "another --config.seed, or more --config.search.num_rotations")


def write(workdir: str, rep: dict, step: int):
  cli.atomic_write_text(os.path.join(workdir, "convergence.json"),
                        json.dumps({"step": int(step), **rep}, indent=1))
