"""The end-of-training convergence verdict (holly/diagnose.py) on numbers of known runs,
and the axial-cloud note."""
import numpy as np

from configs import holly as holly_config
from smlm_jax.holly import diagnose, symmetry


def _rep(residual, agreement, axial=1):
  return {"residual": residual, "agreement": agreement, "hypothesis_spread_deg": 100.0,
          "axial_order": axial}


def test_verdict_catches_a_rod_whose_roll_was_averaged_away():
  th = diagnose.thresholds(holly_config.get_config())
  # measured at 3000 steps: bunny learned (0.0055, 78%), teapot learned (0.065, 70%),
  # elongated failed with poses ~50 deg off (0.142, 69%), shell failed (0.43, 69%)
  assert diagnose.verdict(_rep(0.0055, 0.78), th)
  assert diagnose.verdict(_rep(0.065, 0.70), th)
  assert not diagnose.verdict(_rep(0.142, 0.69), th)
  assert not diagnose.verdict(_rep(0.43, 0.69), th)
  assert not diagnose.verdict(_rep(0.01, 0.2), th)      # CNN and search disagree
  rep = dict(_rep(0.142, 0.69, axial=8), converged=False, thresholds=th)
  msg = diagnose.message(rep)
  assert msg.startswith("WARNING") and "axially symmetric" in msg
  assert "axially" not in diagnose.message(dict(_rep(0.0055, 0.78), converged=True,
                                                thresholds=th))


def test_view_spread_flags_images_explained_from_one_direction():
  """Uniform viewing directions pass, views bunched on one axis fail the verdict, and
  the check is skipped for few particles or an axial cloud."""
  th = diagnose.thresholds(holly_config.get_config())
  rng = np.random.default_rng(1)
  q = rng.normal(size=(64, 4))
  from scipy.spatial.transform import Rotation
  uniform = Rotation.from_quat(q / np.linalg.norm(q, axis=1, keepdims=True)).as_matrix()
  assert diagnose.view_eig_max(uniform) < 0.5
  # every image seen within ~15 deg of the object's z axis (random in-plane turns)
  tilt = Rotation.from_rotvec(np.concatenate([0.25 * rng.normal(size=(64, 2)),
                                              np.zeros((64, 1))], 1))
  spin = Rotation.from_rotvec(np.outer(rng.uniform(0, 2 * np.pi, 64), [0, 0, 1.0]))
  bunched = (spin * tilt).as_matrix()
  assert diagnose.view_eig_max(bunched) > 0.85
  good = dict(_rep(0.01, 0.8), view_eig_max=diagnose.view_eig_max(uniform),
              views_checked=True)
  bad = dict(good, view_eig_max=diagnose.view_eig_max(bunched))
  assert diagnose.verdict(good, th) and not diagnose.verdict(bad, th)
  msg = diagnose.message(dict(bad, converged=False, thresholds=th))
  assert "one viewing direction" in msg and "max_view_eig=1" in msg
  assert diagnose.verdict(dict(bad, views_checked=False), th)
  # a few particles, all one view: converged, but the depth is flagged as undetermined
  one = dict(good, view_eig_max=0.999, views_checked=False, converged=True, thresholds=th)
  assert "depth" in diagnose.message(one) and "depth" not in diagnose.message(
      dict(good, converged=True, thresholds=th))


def test_axial_order_of_a_rod_and_of_an_asymmetric_cloud():
  rng = np.random.default_rng(0)
  n = 240
  phi = rng.uniform(0, 2 * np.pi, n)
  rod = np.stack([rng.uniform(-1, 1, n), 0.15 * np.cos(phi), 0.15 * np.sin(phi)], 1)
  assert diagnose.axial_order(symmetry.detect(rod)) >= diagnose.AXIAL_ORDER
  centres = np.array([[0.6, 0.1, -0.2], [-0.3, 0.5, 0.1], [0.0, -0.4, 0.45],
                      [-0.5, -0.2, -0.4]])
  blob = (centres[rng.integers(0, 4, n)] * np.array([1.0, 0.8, 0.6])
          + 0.05 * rng.normal(size=(n, 3)))
  assert diagnose.axial_order(symmetry.detect(blob)) < diagnose.AXIAL_ORDER
