"""HOLLy: renderer physics, rotations, shapes I/O, alignment, a known-pose fit, training
through the shared trainer, the evaluate command and its one-line errors."""
import json
import math
import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smlm_jax.core import tiff_io
from configs import holly as holly_config
from smlm_jax.holly import align as align_lib
from smlm_jax.holly import images as images_lib
from smlm_jax.holly import render
from smlm_jax.holly import rotations
from smlm_jax.holly import shapes
from smlm_jax.holly import task as task_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "real-data", "holly")
PY = sys.executable


def _moments(img):
  img = np.asarray(img, np.float64)
  n = img.shape[0]
  c = np.arange(n) + 0.5                       # pixel centres in pixel coordinates
  m = img.sum()
  cy = (img.sum(1) * c).sum() / m
  cx = (img.sum(0) * c).sum() / m
  vy = (img.sum(1) * (c - cy) ** 2).sum() / m
  vx = (img.sum(0) * (c - cx) ** 2).sum() / m
  return m, cx, cy, vx, vy


# ------------------------------------------------------------------------- renderer
@pytest.mark.parametrize("sigma", [0.7, 2.0, 5.0])
def test_single_point_renders_gaussian_of_right_mass_centre_width(sigma):
  size, fov = 64, 1.1
  p = jnp.array([[0.21, -0.33, 0.5]])
  img = render.render(p, jnp.eye(3), jnp.zeros(2), sigma, size, fov)
  m, cx, cy, vx, vy = _moments(img)
  u = (np.array([0.21, -0.33]) + fov) * size / (2 * fov)
  assert m == pytest.approx(1.0, abs=1e-4)
  assert cx == pytest.approx(u[0], abs=2e-3) and cy == pytest.approx(u[1], abs=2e-3)
  # pixel-integrated: variance sigma^2 + 1/12 (the pixel box)
  assert vx == pytest.approx(sigma ** 2 + 1 / 12, rel=3e-3)
  assert vy == pytest.approx(sigma ** 2 + 1 / 12, rel=3e-3)
  # peak at the expected pixel (row = y, column = x)
  assert np.unravel_index(np.argmax(img), img.shape) == (int(u[1]), int(u[0]))


def test_rotation_matches_hand_computed_projection():
  size, fov = 64, 1.0
  # 90 degrees about z: (0.5, 0, 0.3) -> (0, 0.5, 0.3); about y: (0.5, 0, 0.3) -> (0.3, 0, -0.5)
  p = jnp.array([[0.5, 0.0, 0.3]])
  Rz = rotations.matrix_from_axis_angle(jnp.array([0.0, 0.0, 1.0]), math.pi / 2)
  Ry = rotations.matrix_from_axis_angle(jnp.array([0.0, 1.0, 0.0]), math.pi / 2)
  for R, (x, y) in ((Rz, (0.0, 0.5)), (Ry, (0.3, 0.0))):
    img = render.render(p, R, jnp.array([0.1, -0.2]), 1.0, size, fov)
    _, cx, cy, _, _ = _moments(img)
    assert cx == pytest.approx((x + 0.1 + fov) * size / (2 * fov), abs=1e-2)
    assert cy == pytest.approx((y - 0.2 + fov) * size / (2 * fov), abs=1e-2)
  # a general pose equals rendering the pre-rotated cloud at the identity
  cloud = jax.random.uniform(jax.random.key(0), (20, 3), minval=-0.7, maxval=0.7)
  R = rotations.random_rotation(jax.random.key(1))
  a = render.render(cloud, R, jnp.zeros(2), 1.5, size, fov)
  b = render.render(cloud @ np.asarray(R).T, jnp.eye(3), jnp.zeros(2), 1.5, size, fov)
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_gradients_finite_in_points_pose_sigma():
  size = 32
  cloud = jax.random.uniform(jax.random.key(0), (10, 3), minval=-0.8, maxval=0.8)
  target = render.render(cloud * 0.9, jnp.eye(3), jnp.zeros(2), 2.0, size, 1.1)

  def loss(pts, r6, t, sigma):
    img = render.render(pts, rotations.matrix_from_6d(r6), t, sigma, size, 1.1)
    return task_lib.image_loss(img, target, sigma, "multiscale")

  r6 = rotations.sixd_from_matrix(rotations.random_rotation(jax.random.key(2)))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(cloud, r6, jnp.array([0.01, 0.0]), 2.0)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)


def test_smlm_images_unit_mass_on_average_and_seeded():
  sites = jnp.asarray(np.random.default_rng(0).uniform(-0.45, 0.45, (50, 3)), jnp.float32)
  p = render.SimParams(size=48, dropout=0.2, fluorophores=2, fluorophore_spread=0.02,
                       wobble=0.01, localizations=500, precision=0.02, photons=2000.0,
                       background_photons=5.0)
  keys = jax.random.split(jax.random.key(3), 65)
  sim = jax.jit(render.simulate_batch, static_argnums=3)
  imgs, R, t = sim(keys, sites, 1.5, p)
  sums = np.asarray(imgs).sum(axis=(1, 2))
  # shot + read noise on 2000 photons and 48^2 x 5 background photons: sd ~ 0.06
  assert abs(sums.mean() - 1.0) < 0.03 and 0.02 < sums.std() < 0.15
  np.testing.assert_allclose(np.asarray(R[0] @ R[0].T), np.eye(3), atol=1e-5)
  assert np.all(np.abs(np.asarray(t)) <= p.max_shift)
  # localizations scatter around the sites: the mean image is smoother than one image
  assert np.asarray(imgs).mean(0).max() < 0.5 * np.asarray(imgs).max(axis=(1, 2)).mean()


def test_gaussian_blur_adds_variance():
  img = render.render(jnp.zeros((1, 3)), jnp.eye(3), jnp.zeros(2), 1.0, 64, 1.1)
  blurred = render.gaussian_blur(img, 3.0, 64)
  m, _, _, vx, vy = _moments(blurred)
  assert m == pytest.approx(1.0, abs=1e-3)
  assert vx == pytest.approx(1.0 + 9.0 + 2 / 12, rel=0.02)


# ------------------------------------------------------------------------ rotations
def test_pose_representations_round_trip_and_uniform():
  @jax.jit
  def compute(key):
    R = rotations.random_rotation(key, (4000,))
    raw = jax.random.normal(jax.random.fold_in(key, 1), (100, 6))
    Rz = rotations.matrix_from_axis_angle(jnp.array([0.0, 0.0, 1.0]), 0.3)
    return (R, rotations.matrix_from_6d(rotations.sixd_from_matrix(R)),
            rotations.matrix_from_quaternion(rotations.quaternion_from_matrix(R)),
            rotations.matrix_from_6d(raw), rotations.geodesic_angle(R[:10], R[:10] @ Rz))
  R, R6, Rq, M, ang = (np.asarray(a, np.float64) for a in compute(jax.random.key(0)))
  np.testing.assert_allclose(R @ np.swapaxes(R, 1, 2), np.broadcast_to(np.eye(3), R.shape),
                             atol=2e-5)
  np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=2e-5)
  np.testing.assert_allclose(R6, R, atol=2e-5)          # 6D round trip
  np.testing.assert_allclose(Rq, R, atol=2e-5)          # quaternion round trip
  # Haar measure: E[R] = 0 and E[trace R] = 0 (angle density (1 - cos a) / pi)
  assert np.abs(R.mean(0)).max() < 0.05
  assert abs(np.trace(R, axis1=1, axis2=2).mean()) < 0.06
  # 6D -> rotation is defined for any 6 numbers (not only unit columns)
  np.testing.assert_allclose(np.linalg.det(M), 1.0, atol=1e-4)
  np.testing.assert_allclose(ang, 0.3, atol=2e-3)


def test_sigma_schedule_wide_to_narrow():
  # HOLLy's bunny schedule at 128 px (gpu variant), the same field of view at 64 px
  # (CPU default: every sigma in px halves)
  gpu, cpu = holly_config.get_config("gpu"), holly_config.get_config()
  assert gpu.data.size == 128 and cpu.data.size == 64
  np.testing.assert_allclose(cpu.sigma.stages, np.asarray(gpu.sigma.stages) / 2, atol=1e-3)
  c = gpu
  c.num_train_steps = 1000
  s = task_lib.sigma_schedule(c)
  vals = [s(i) for i in range(0, 1001, 50)]
  assert vals[0] == pytest.approx(10.0) and vals[-1] == pytest.approx(1.41)
  assert all(a >= b for a, b in zip(vals, vals[1:]))
  # about x0.9 per stage, reached at evenly spaced steps over the first 80%
  assert s(0.8 * 1000 / 19) == pytest.approx(9.0, rel=1e-4)
  assert s(800) == pytest.approx(1.41) and s(1000) == pytest.approx(1.41)
  assert float(s(jnp.asarray(400))) == pytest.approx(s(400), rel=1e-5)


# ---------------------------------------------------------------------------- shapes
def test_obj_ply_round_trip_and_binary_ply(tmp_path):
  rng = np.random.default_rng(0)
  v = rng.normal(size=(17, 3))
  f = rng.integers(0, 17, size=(9, 3))
  for writer, ext in ((shapes.write_ply, "ply"), (shapes.write_obj, "obj")):
    path = str(tmp_path / f"s.{ext}")
    writer(path, v, f)
    s = shapes.read_shape(path)
    np.testing.assert_allclose(s.vertices, v, atol=1e-6)
    np.testing.assert_array_equal(s.faces, f)
  # binary little-endian PLY with extra properties and a face list
  rec = np.zeros(5, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1")])
  rec["x"], rec["y"], rec["z"] = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [1, 1, 1, 1, 1]
  header = ("ply\nformat binary_little_endian 1.0\nelement vertex 5\nproperty float x\n"
            "property float y\nproperty float z\nproperty uchar red\nelement face 1\n"
            "property list uchar int vertex_indices\nend_header\n").encode()
  face = np.array([3], "u1").tobytes() + np.array([0, 2, 4], "<i4").tobytes()
  path = tmp_path / "b.ply"
  path.write_bytes(header + rec.tobytes() + face)
  s = shapes.read_shape(str(path))
  np.testing.assert_allclose(s.vertices[:, 1], [5, 6, 7, 8, 9])
  np.testing.assert_array_equal(s.faces, [[0, 2, 4]])
  n, centre, scale = shapes.normalize(s.vertices)
  assert np.max(np.linalg.norm(n, axis=1)) == pytest.approx(1.0)


def test_stl_binary_and_ascii_and_off_read_as_the_same_mesh(tmp_path):
  import struct
  # a unit cube: 8 corners, 12 triangles
  v = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 2.5)], np.float64)
  quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
  tris = np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])
  binary = tmp_path / "cube.stl"
  with open(binary, "wb") as f:
    f.write(b"binary header".ljust(80, b" ") + struct.pack("<I", len(tris)))
    for t in tris:
      f.write(struct.pack("<3f", 0, 0, 0) + v[t].astype("<f4").tobytes() + b"\0\0")
  ascii_ = tmp_path / "cube_ascii.stl"
  ascii_.write_text("solid cube\n" + "".join(
      "facet normal 0 0 0\n outer loop\n"
      + "".join(f"  vertex {x:g} {y:g} {z:g}\n" for x, y, z in v[t])
      + " endloop\nendfacet\n" for t in tris) + "endsolid cube\n")
  off = tmp_path / "cube.off"
  off.write_text("OFF\n# a comment\n8 6 0\n" + "".join(f"{x:g} {y:g} {z:g}\n" for x, y, z in v)
                 + "".join(f"4 {a} {b} {c} {d}\n" for a, b, c, d in quads))
  for path in (binary, ascii_, off):
    sh = shapes.read_shape(str(path))
    assert sh.vertices.shape == (8, 3), path
    assert {tuple(r) for r in sh.vertices} == {tuple(r) for r in v}
    # every face's corners are the cube's: 12 triangles (OFF's quads fan-split: 6 x 4)
    corners = {frozenset(map(tuple, v[t])) for t in tris}
    got = {frozenset(map(tuple, sh.vertices[f])) for f in sh.faces}
    assert got == corners if sh.faces.shape[1] == 3 else len(sh.faces) == 6
  assert len(shapes.load_normalized(str(binary))) == 8
  # truncated / foreign files: one-line errors
  (tmp_path / "short.stl").write_bytes(binary.read_bytes()[:-7])
  (tmp_path / "short.off").write_text("OFF\n8 6 0\n0 0 0\n")
  (tmp_path / "color.off").write_text("COFF\n1 0 0\n0 0 0 1 1 1 1\n")
  for name, words in (("short.stl", "not an STL"), ("short.off", "corrupt"),
                      ("color.off", "COFF")):
    with pytest.raises(shapes.ShapeError, match=words) as e:
      shapes.read_shape(str(tmp_path / name))
    assert "\n" not in str(e.value)


def test_real_shapes_vertex_counts():
  if not os.path.isdir(SHARED):
    pytest.skip("../shared/real-data not found")
  for name, count in (("teapot_large.obj", 235), ("bunny_large.obj", 354),
                      ("bunny_detailed.ply", 690)):
    s = shapes.read_shape(os.path.join(SHARED, "objs", name))
    assert s.vertices.shape == (count, 3) and s.faces is not None


def test_bad_shapes_one_line_errors(tmp_path):
  bad = tmp_path / "bad.obj"
  bad.write_text("v 1 2\nv a b c\n")
  empty = tmp_path / "empty.obj"
  empty.write_text("# nothing\n")
  ply = tmp_path / "bad.ply"
  ply.write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\n"
                 "property float y\nproperty float z\nend_header\n1 2 3\n4 5\n")
  for path, words in ((tmp_path / "missing.obj", "no such file"), (bad, "vertex"),
                      (empty, "no vertices"), (ply, "corrupt"), (tmp_path, "folder")):
    with pytest.raises(shapes.ShapeError) as e:
      shapes.read_shape(str(path))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_dense_mesh_simulates_from_a_fixed_subset_of_max_sites(tmp_path, capsys):
  rng = np.random.default_rng(0)
  v = rng.normal(size=(5000, 3)) * (3.0, 1.0, 0.5) + 7.0
  path = str(tmp_path / "dense.ply")
  shapes.write_ply(path, v)
  full = shapes.load_normalized(path)
  sub = shapes.load_normalized(path, max_sites=4096)
  assert full.shape == (5000, 3) and sub.shape == (4096, 3)
  # a subset of the vertices in the file's units (normalized on all of them), seeded
  rows = {tuple(r) for r in np.round(full, 5)}
  assert all(tuple(r) in rows for r in np.round(sub, 5))
  np.testing.assert_array_equal(sub, shapes.load_normalized(path, max_sites=4096))
  assert len(np.unique(np.round(sub, 5), axis=0)) == 4096
  np.testing.assert_array_equal(shapes.load_normalized(path, max_sites=6000), full)
  cfg = _tiny(tmp_path)
  cfg.data.obj = path
  cfg.data.max_sites = 1000
  assert task_lib.HollyTask(cfg).sites.shape == (1000, 3)
  assert "5000 vertices" in capsys.readouterr().out
  assert int(holly_config.get_config().data.max_sites) >= 400   # every panel shape whole


# ------------------------------------------------------------------------- alignment
def test_alignment_recovers_similarity_with_reflection():
  rng = np.random.default_rng(1)
  ref = rng.normal(size=(80, 3)) * [1.0, 0.6, 0.3]
  Q = np.asarray(rotations.random_rotation(jax.random.key(5)), np.float64) @ align_lib.MIRROR
  learned = 0.37 * ref @ Q.T + [0.2, -0.1, 0.4]
  al = align_lib.align(learned, ref, num_starts=24)
  assert al.handedness == -1
  assert al.chamfer_rel < 1e-4
  np.testing.assert_allclose(al.apply(learned), ref, atol=1e-4)
  assert align_lib.align(rng.uniform(-1, 1, (80, 3)), ref).chamfer_rel > 0.03
  # pose errors: poses of the learned cloud that reproduce the reference's images
  R_true = np.asarray(rotations.random_rotation(jax.random.key(6), (5,)), np.float64)
  # X_r = s Q X_l + t  =>  P R X_r = P (R Q) X_l s + ... ; mirrored: use M R Q
  R_pred = align_lib.MIRROR @ R_true @ al.Q
  assert np.all(align_lib.pose_errors_deg(R_pred, R_true, al) < 0.1)


def test_alignment_on_a_dense_reference_searches_a_subset_scores_every_point():
  from smlm_jax.holly import procedural
  rng = np.random.default_rng(2)
  ref = procedural.asymmetric(3000, 0)
  Q = np.asarray(rotations.random_rotation(jax.random.key(7)), np.float64)
  idx = rng.choice(3000, 300, replace=False)
  learned = 0.5 * ref[idx] @ Q.T + [0.3, 0.0, -0.2]
  fast = align_lib.align(learned, ref, num_starts=8, screen=256, max_reference=400)
  slow = align_lib.align(learned, ref, num_starts=8, screen=256, max_reference=0)
  # the known similarity is found (to the sampling of a 300-point cloud), and the
  # Chamfer is that of the whole reference, as the full search's
  assert align_lib.angle_deg(fast.Q[None], Q.T[None])[0] < 2.0
  assert fast.handedness == 1 and fast.scale == pytest.approx(2.0, rel=0.02)
  assert np.abs(fast.apply(learned) - ref[idx]).max() < 0.05
  assert fast.chamfer == pytest.approx(align_lib.chamfer(fast.apply(learned), ref), rel=1e-9)
  assert fast.chamfer == pytest.approx(slow.chamfer, rel=0.01)


def test_alignment_screen_finds_the_narrow_basin_of_a_helix():
  # a helix's screw-shifted copies attract ICP from most starts: from the 24 octahedral
  # rotations alone the jittered subset of its own sites stays misaligned; the Chamfer
  # screen of random rotations puts a start in the right basin
  from scipy.spatial.transform import Rotation
  from smlm_jax.holly import procedural
  ref = procedural.helix(400, 0)
  rng = np.random.default_rng(1)
  sub = ref[rng.permutation(400)[:300]] + rng.normal(0, 0.01, (300, 3))
  R = Rotation.random(random_state=100).as_matrix()
  learned = 0.7 * sub @ R.T + 0.3
  assert align_lib.align(learned, ref, num_starts=24, screen=0).chamfer_rel > 0.015
  al = align_lib.align(learned, ref, num_starts=24)
  assert al.chamfer_rel < 0.01 and al.handedness == 1
  assert align_lib.angle_deg(al.Q @ R, np.eye(3)) < 2.0


def test_gauss_newton_refines_a_pose_some_degrees_off():
  from smlm_jax.holly import pose_search
  size, fov = 32, 1.1
  cloud = jnp.asarray(np.random.default_rng(6).uniform(-0.7, 0.7, (40, 3)), jnp.float32)
  R_true = rotations.random_rotation(jax.random.key(8))
  t_true = jnp.array([0.03, -0.02])
  image = render.render(cloud, R_true, t_true, 1.0, size, fov)
  R0 = rotations.matrix_from_axis_angle(jnp.array([1.0, 2.0, 0.5]), math.radians(8)) @ R_true

  @jax.jit
  def run(image, R0):
    t0 = pose_search.centroid_translation(cloud, R0, image[None], size, fov)[0]
    return pose_search.refine(cloud, image, R0, t0, 1.0, size, fov, (2.0, 1.0, 0.5, 0.0))
  R, t = run(image, R0)
  err = math.degrees(float(rotations.geodesic_angle(R, R_true)))
  assert err < 1.0 and np.abs(np.asarray(t - t_true)).max() < 0.01, (err, t)


# ------------------------------------------------------------------- known-pose fit
def test_known_pose_fit_converges():
  """Points fitted by gradient descent to images at known poses: Chamfer falls 10x."""
  import optax
  size, fov, n_img = 32, 1.1, 24
  truth = jnp.asarray(np.random.default_rng(2).uniform(-0.6, 0.6, (12, 3)), jnp.float32)
  R = rotations.random_rotation(jax.random.key(7), (n_img,))
  t = jnp.zeros((n_img, 2))
  sched = lambda i: 3.0 * (0.8 / 3.0) ** (i / 250.0)

  def loss(pts, sigma):
    pred = render.render_batch(pts, R, t, sigma, size, fov)
    target = render.render_batch(truth, R, t, sigma, size, fov)
    return jnp.mean(task_lib.image_loss(pred, target, sigma, "multiscale"))

  pts = jnp.asarray(np.random.default_rng(3).uniform(-0.5, 0.5, (12, 3)), jnp.float32)
  tx = optax.adam(optax.cosine_decay_schedule(0.03, 300, 0.03))
  opt = tx.init(pts)

  @jax.jit
  def step(pts, opt, sigma):
    g = jax.grad(loss)(pts, sigma)
    u, opt = tx.update(g, opt)
    return optax.apply_updates(pts, u), opt

  before = align_lib.chamfer(np.asarray(pts), np.asarray(truth))
  for i in range(300):
    pts, opt = step(pts, opt, sched(min(i, 250)))
  after = align_lib.chamfer(np.asarray(pts), np.asarray(truth))
  assert after < before / 10, (before, after)


# ---------------------------------------------------------------- training, evaluate
def _tiny(tmp_path, **data):
  c = holly_config.get_config("tiny")
  c.data.obj = os.path.join(str(tmp_path), "truth.obj")
  rng = np.random.default_rng(4)
  shapes.write_obj(c.data.obj, rng.uniform(-1, 1, (20, 3)) * [1.0, 0.5, 0.3])
  for k, v in data.items():
    c.data[k] = v
  return c


def test_initial_cloud_ball_or_sphere(tmp_path):
  cfg = _tiny(tmp_path)
  radii = {}
  for how in ("ball", "sphere"):
    cfg.init_shape = how
    p = np.asarray(task_lib.HollyTask(cfg).init_variables(jax.random.key(0))["params"]["points"])
    radii[how] = np.linalg.norm(p, axis=1)
  r0 = float(cfg.init_radius)
  assert radii["ball"].max() <= r0 + 1e-6 and radii["ball"].min() < 0.9 * r0
  np.testing.assert_allclose(radii["sphere"], r0, rtol=1e-5)
  cfg.init_shape = "cube"
  with pytest.raises(ValueError, match="init_shape"):
    task_lib.HollyTask(cfg).init_variables(jax.random.key(0))


def test_one_view_runs_write_the_cloud_flat_along_the_viewing_axis(tmp_path):
  """A converged final report with every image seen along one axis: shape.ply is the
  cloud squeezed onto its plane normal to that axis (in-plane coordinates kept), the
  cloud as trained is shape_with_depth.ply; spread views, "keep" or a run that did not
  converge write the cloud as is."""
  cfg = _tiny(tmp_path)
  rng = np.random.default_rng(3)
  pts = rng.normal(size=(50, 3)).astype(np.float32)
  axis = np.array([0.0, 0.6, 0.8])
  state = {"params": {"points": pts}, "step": 7}

  def export(view_eig, how="flatten", converged=True):
    cfg.convergence.one_view_depth = how
    task = task_lib.HollyTask(cfg)
    rep = {"view_eig_max": view_eig, "view_axis": axis.tolist(), "converged": converged,
           "residual": 0.01, "agreement": 1.0, "hypothesis_spread_deg": 0.0,
           "thresholds": {"max_residual": 0.1, "min_agreement": 0.3, "agree_deg": 10.0,
                          "max_view_eig": 0.6}}
    task._convergence = (7, rep)
    work = tmp_path / f"{how}_{view_eig}_{converged}"
    work.mkdir()
    task.export(state, str(work), 7)
    return (shapes.read_shape(str(work / "shape.ply")).vertices,
            (work / "shape_with_depth.ply"))

  flat, raw_path = export(0.99)
  depth = pts @ axis
  np.testing.assert_allclose(flat @ axis, depth.mean(), atol=1e-5)
  u = np.array([1.0, 0.0, 0.0])                 # a direction in the plane
  np.testing.assert_allclose(flat @ u, pts @ u, atol=1e-5)
  np.testing.assert_allclose(shapes.read_shape(str(raw_path)).vertices, pts, atol=1e-5)
  for view_eig, how, converged in ((0.5, "flatten", True), (0.99, "keep", True),
                                   (0.99, "flatten", False)):
    kept, raw_path = export(view_eig, how, converged)
    np.testing.assert_allclose(kept, pts, atol=1e-5)
    assert not raw_path.exists()
  cfg.convergence.one_view_depth = "squash"
  with pytest.raises(ValueError, match="one_view_depth"):
    task_lib.HollyTask(cfg)


def test_cnn_margin_keeps_the_cnn_pose_unless_the_search_is_clearly_better(tmp_path):
  cfg = _tiny(tmp_path)
  k = int(cfg.model.hypotheses)
  wins = {}
  for margin in (0.0, 1e6):
    cfg.search.cnn_margin = margin
    task = task_lib.HollyTask(cfg)
    params = task.init_variables(jax.random.key(0))["params"]
    batch = task.eval_batch(2.0, 8, 3)
    _, _, i, _, _ = task.refined_poses(params, {"image": jnp.asarray(batch["image"]),
                                                "sigma": jnp.asarray(batch["sigma"])},
                                       jax.random.key(1))
    wins[margin] = int(np.sum(np.asarray(i) == k))      # the search's pose chosen
  assert wins[0.0] >= 4 and wins[1e6] == 0, wins       # an untrained CNN loses unless


def test_restarts_continue_the_lowest_residual_start_with_its_own_fields(tmp_path):
  """Two starts that differ in seed, init_shape and search blur (one run: the three
  restart tests of before shared nothing but ~130 s of compilation each)."""
  from smlm_jax.core import trainer
  cfg = _tiny(tmp_path)
  cfg.num_train_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps = 4, 1, 2
  cfg.restarts.num, cfg.restarts.fraction = 2, 0.5
  cfg.restarts.vary = "init_shape, search.sigma_coarse_px"
  cfg.restarts.values = ("ball,2.5", "sphere, 0.5")
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(cfg, workdir)
  rec = json.load(open(os.path.join(workdir, trainer.RESTARTS_FILE)))
  scores = {r["seed"]: r["score"] for r in rec["starts"]}
  assert sorted(scores) == [0, 1] and rec["steps"] == 2
  for r, shape, sigma in zip(rec["starts"], ("ball", "sphere"), (2.5, 0.5)):
    sub = json.load(open(os.path.join(r["folder"], "config.json")))   # its own fields
    assert (sub["init_shape"], sub["search"]["sigma_coarse_px"]) == (shape, sigma)
    assert sub["seed"] == r["seed"]

  def eval_steps(folder):
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    return [r["step"] for r in rows if any(k.startswith("eval/") for k in r)]
  # a start is evaluated at its last step only; the continuation every eval_every_steps
  assert all(eval_steps(r["folder"]) == [2] for r in rec["starts"])
  assert eval_steps(workdir) == [3, 4]
  assert scores[0] != scores[1] and all(0 < v < 2 for v in scores.values())
  assert rec["chosen_seed"] == min(scores, key=scores.get)
  chosen = min(rec["starts"], key=lambda r: r["score"])
  assert rec["vary"] == cfg.restarts.vary and rec["chosen_value"] == chosen["value"]
  want = {"ball,2.5": ("ball", 2.5), "sphere, 0.5": ("sphere", 0.5)}[chosen["value"]]
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert (saved["init_shape"], saved["search"]["sigma_coarse_px"]) == want
  assert saved["seed"] == chosen["seed"]
  # the run continued from the chosen start's step-2 checkpoint, with its seed
  _, _, state = trainer.load_run(workdir, step=2)
  for seed in (0, 1):
    _, _, sub = trainer.load_run(os.path.join(workdir, "restarts", f"seed_{seed}"))
    same = np.array_equal(np.asarray(sub["params"]["points"]),
                          np.asarray(state["params"]["points"]))
    assert same == (seed == rec["chosen_seed"]), seed
  config, _, final = trainer.load_run(workdir)
  assert int(final["step"]) == 4 and int(config.seed) == rec["chosen_seed"]
  # the clock includes both starts; a rerun resumes (no new starts) with both values
  secs = json.load(open(os.path.join(workdir, "train_seconds.json")))
  assert secs["4"] > rec["seconds"] > 0
  trainer.train_and_evaluate(cfg, workdir)
  assert json.load(open(os.path.join(workdir, trainer.RESTARTS_FILE))) == rec
  saved = json.load(open(os.path.join(workdir, "config.json")))
  assert (saved["init_shape"], saved["search"]["sigma_coarse_px"]) == want


def test_restarts_vary_one_field_or_say_why_not(tmp_path, capsys):
  from smlm_jax.core import trainer
  cfg = _tiny(tmp_path)
  # one field: each value is cast to the field's type (text too)
  assert trainer._varied_items(cfg, "search.sigma_coarse_px", "0.75") == [
      ("search.sigma_coarse_px", 0.75)]
  probe = holly_config.get_config("tiny")
  trainer._set_varied(probe, "search.sigma_coarse_px", 3)
  assert probe.search.sigma_coarse_px == 3.0 and isinstance(probe.search.sigma_coarse_px,
                                                            float)
  cfg.num_train_steps, cfg.eval_every_steps, cfg.checkpoint_every_steps = 4, 4, 2
  cfg.restarts.num, cfg.restarts.fraction = 2, 0.5
  cfg.restarts.vary, cfg.restarts.values = "search.sigma_coarse_px", (3.0, 0.5)
  # a field the user set that the starts vary is named, not silently replaced (said
  # before the first start trains: a stand-in for training stops the run there)
  cfg.search.sigma_coarse_px = 2.0

  class _FirstStart(Exception):
    pass

  def first_start(*args, **kwargs):
    raise _FirstStart

  capsys.readouterr()
  with mock.patch.object(trainer, "_train", first_start), pytest.raises(_FirstStart):
    trainer.train_and_evaluate(cfg, str(tmp_path / "own"))
  assert "config.search.sigma_coarse_px=2.0 is replaced per start" in capsys.readouterr().out
  for vary, values, words in (("search.sigma_coarse_px", (1.0,), "one value per start"),
                              ("search.nope", (1.0, 2.0), "no such field"),
                              ("init_shape,search.sigma_coarse_px", ("ball,1", "ball"),
                               "needs 2 values"),
                              ("init_shape,search.sigma_coarse_px", ("ball,1", "ball,x"),
                               "sigma_coarse_px expected a number")):
    cfg.restarts.vary, cfg.restarts.values = vary, values
    with pytest.raises(ValueError, match=words):
      trainer.train_and_evaluate(cfg, str(tmp_path / vary))


def test_train_two_steps_writes_shapes_and_evaluate_scores(tmp_path):
  from smlm_jax.core import trainer
  from smlm_jax.holly import evaluate
  cfg = _tiny(tmp_path)
  workdir = str(tmp_path / "run")
  with mock.patch.object(task_lib.HollyTask, "finish_training", autospec=True,
                         side_effect=lambda self, state, mesh: state) as finish:
    final = trainer.train_and_evaluate(cfg, workdir)
  # the post-training phase (the pose-CNN polish) runs once, after the last step
  assert finish.call_count == 1 and int(finish.call_args[0][1]["step"]) == 2
  assert 0.0 < final["chamfer"] < 1.0 and np.isfinite(final["pose_error_deg"]["median"])
  for name in ("shape.ply", "shape.obj", "shapes/shape_000001.ply", "shapes/shape_000002.obj"):
    assert os.path.exists(os.path.join(workdir, name)), name
  learned = shapes.read_shape(os.path.join(workdir, "shape.ply")).vertices
  assert learned.shape == (cfg.num_points, 3)
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert json.load(open(os.path.join(workdir, "train_seconds.json")))["2"] > 0
  # the evaluate command on the run: scores, pictures, RESULT as the last line
  out = subprocess.run([PY, "-m", "smlm_jax.holly.evaluate", f"--workdir={workdir}",
                        f"--reference={cfg.data.obj}", "--num_images=8", "--starts=2",
                        "--gif_frames=3"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr
  last = out.stdout.strip().splitlines()[-1]
  assert last.startswith("RESULT chamfer=") and "seconds=" in last
  m = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
  assert 0.0 < m["chamfer"] < 1.0 and m["step"] == 2 and m["train_seconds"] > 0
  assert m["pose_error_deg"]["num_images"] == 8
  assert float(last.split()[1].split("=")[1]) == pytest.approx(m["chamfer"], rel=1e-4)
  assert float(last.split()[2].split("=")[1]) == pytest.approx(m["train_seconds"], abs=0.1)
  for name in ("views.png", "rotation.gif", "aligned.ply"):
    assert os.path.getsize(os.path.join(workdir, "eval", name)) > 0
  # a cloud file scored directly: the same Chamfer as the alignment module's
  m2 = evaluate.evaluate(None, cfg.data.obj, learned_path=os.path.join(workdir, "shape.ply"),
                         output=str(tmp_path / "ev"), starts=2, gif_frames=2)
  assert m2["chamfer"] == pytest.approx(align_lib.align(
      learned, shapes.read_shape(cfg.data.obj).vertices, 2).chamfer_rel, rel=1e-6)


def test_folder_images_with_channels_need_a_channel(tmp_path):
  import tifffile
  rng = np.random.default_rng(6)
  two = rng.random((3, 2, 32, 32)).astype(np.float32)     # [T, C, H, W]
  (tmp_path / "imgs").mkdir()
  tifffile.imwrite(tmp_path / "imgs" / "tc.tif", two, imagej=True,
                   metadata={"axes": "TCYX"})
  msgs = []
  with pytest.raises(ValueError, match="no usable"):       # no silent pick
    images_lib.load_folder(str(tmp_path / "imgs"), default_sigma=1.0,
                           log=lambda *a, **k: msgs.append(a[0]))
  assert len(msgs) == 1 and "--config.data.channel=0..1" in msgs[0]
  s = images_lib.load_folder(str(tmp_path / "imgs"), default_sigma=1.0, channel=1)
  want = two[:, 1] / two[:, 1].sum(axis=(1, 2), keepdims=True)
  assert s.count == 3
  np.testing.assert_allclose(s.images[0], want, rtol=1e-5)
  # FITS and single-channel TIFFs take only channel 0
  tifffile.imwrite(tmp_path / "one.tif", two[0, 0])
  assert images_lib.read_images(str(tmp_path / "one.tif"), 0).shape == (1, 32, 32)
  with pytest.raises(tiff_io.MovieError, match="channel 1 requested"):
    images_lib.read_images(str(tmp_path / "one.tif"), 1)


def test_folder_images_holly_layout_and_plain(tmp_path):
  from astropy.io import fits
  import tifffile
  rng = np.random.default_rng(5)
  (tmp_path / "imgs" / "2.0").mkdir(parents=True)
  (tmp_path / "imgs" / "4.0").mkdir()
  for sub in ("2.0", "4.0"):
    for i in range(3):
      fits.PrimaryHDU(rng.random((32, 32)).astype(np.float32)).writeto(
          tmp_path / "imgs" / sub / f"im{i}.fits")
  (tmp_path / "imgs" / "2.0" / "broken.fits").write_bytes(b"SIMPLE  = not fits")
  msgs = []
  s = images_lib.load_folder(str(tmp_path / "imgs"), log=lambda *a, **k: msgs.append(a[0]))
  assert list(s.sigmas) == [2.0, 4.0] and s.count == 6 and s.size == 32 and s.particles == 3
  assert len(msgs) == 1 and "broken.fits" in msgs[0] and msgs[0].startswith("error:")
  np.testing.assert_allclose(s.images[0].sum(axis=(1, 2)), 1.0, rtol=1e-5)
  assert s.group_for(3.0) == 0 and s.group_for(9.0) == 1 and s.group_for(1.0) == 0
  plain = tmp_path / "plain"
  plain.mkdir()
  tifffile.imwrite(plain / "stack.tif", rng.random((4, 32, 32)).astype(np.float32),
                   photometric="minisblack")
  with pytest.raises(ValueError, match="image_sigma"):
    images_lib.load_folder(str(plain))
  assert images_lib.load_folder(str(plain), default_sigma=1.5).count == 4
  # a stray file of another width is skipped, not the folder's majority (it sorts first)
  odd = tmp_path / "odd"
  odd.mkdir()
  tifffile.imwrite(odd / "a_big.tif", rng.random((64, 64)).astype(np.float32))
  for i in range(3):
    tifffile.imwrite(odd / f"b{i}.tif", rng.random((32, 32)).astype(np.float32))
  tifffile.imwrite(odd / "c_neg.tif", -rng.random((32, 32)).astype(np.float32))
  msgs = []
  s = images_lib.load_folder(str(odd), default_sigma=1.0,
                             log=lambda *a, **k: msgs.append(a[0]))
  assert s.size == 32 and s.count == 3 and s.paths == [["b0.tif", "b1.tif", "b2.tif"]]
  assert any("a_big.tif" in m and "most are 32 px" in m for m in msgs)
  assert any("c_neg.tif" in m and "no positive pixel" in m for m in msgs)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no usable") as e:
    images_lib.load_folder(str(tmp_path / "empty"), default_sigma=1.0, log=lambda *a, **k: 0)
  assert "\n" not in str(e.value)
  # a task on the folder: host batch from the group below the curriculum's sigma,
  # blurred up to it on device
  from smlm_jax.core import trainer
  cfg = _tiny(tmp_path, images=str(tmp_path / "imgs"))
  cfg.sigma.stages = (6.0, 3.0)
  task = task_lib.HollyTask(cfg)
  host = task.host_batch(0)
  assert host["image"].shape == (8, 32, 32) and np.all(host["native_sigma"] == 4.0)
  mesh = trainer.make_mesh()
  batch = jax.jit(lambda k, h: task.make_batch(k, h, trainer.shard_fn(mesh)))(
      jax.random.key(0), trainer.put_host_batch(host, mesh))
  assert batch["image"].shape == (8, 32, 32)
  np.testing.assert_allclose(np.asarray(batch["sigma"]), 6.0)
  assert task.host_batch(cfg.num_train_steps)["native_sigma"][0] == 2.0


def test_folder_run_writes_poses_that_reproduce_their_residuals(tmp_path):
  from astropy.io import fits
  from smlm_jax.core import trainer
  from smlm_jax.holly import evaluate
  rng = np.random.default_rng(6)
  for sub in ("2.0", "4.0"):
    (tmp_path / "imgs" / sub).mkdir(parents=True)
    for i in range(3):
      fits.PrimaryHDU(rng.random((32, 32)).astype(np.float32)).writeto(
          tmp_path / "imgs" / sub / f"im{i}.fits")
  cfg = _tiny(tmp_path, images=str(tmp_path / "imgs"))
  cfg.sigma.stages = (6.0, 3.0)
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(cfg, workdir)
  m = evaluate.evaluate(workdir, None, output=str(tmp_path / "ev"), pictures=False)
  lines = open(m["poses"]["file"]).read().splitlines()
  assert lines[0].startswith("#") and lines[1] == evaluate.POSES_HEADER
  rows = [l.split(",") for l in lines[2:]]
  assert sorted(r[0] for r in rows) == sorted(["im0.fits", "im1.fits", "im2.fits"] * 2)
  vals = np.array([[float(v) for v in r[1:]] for r in rows])
  sigma, q, view, shift, res = vals[:, 0], vals[:, 1:5], vals[:, 5:8], vals[:, 8:10], vals[:, 10]
  np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
  assert np.all(q[:, 0] >= 0) and set(sigma) == {2.0, 4.0}
  # the written pose, read back through the conventions the file states, renders the
  # image with the written residual
  config, task, state = trainer.load_run(workdir)
  pts = jnp.asarray(state["params"]["points"])
  imgs, sig = task.folder_images()
  R = np.asarray(rotations.matrix_from_quaternion(jnp.asarray(q, jnp.float32)))
  np.testing.assert_allclose(R[:, 2, :], view, atol=1e-4)
  t = shift / render.pixels_per_unit(task.size, task.fov)
  for i in range(len(rows)):
    img = np.asarray(render.render(pts, jnp.asarray(R[i], jnp.float32),
                                   jnp.asarray(t[i], jnp.float32), float(sig[i]),
                                   task.size, task.fov))
    again = np.sum((img - imgs[i]) ** 2) / np.sum(imgs[i] ** 2)
    assert again == pytest.approx(res[i], rel=2e-3, abs=1e-4)
  assert m["poses"]["residual_median"] == pytest.approx(np.median(res), abs=1e-4)


def test_command_line_errors_are_one_line(tmp_path):
  bad = tmp_path / "bad.obj"
  bad.write_text("v 1 2 x\n")
  cases = [
      (["-m", "smlm_jax.train", "--config=configs/holly.py:tiny", f"--workdir={tmp_path}/w",
        f"--config.data.obj={bad}"], "bad vertex"),
      (["-m", "smlm_jax.holly.evaluate", f"--workdir={tmp_path}/nothing"], "no such folder"),
      (["-m", "smlm_jax.holly.evaluate", f"--learned={bad}", f"--reference={bad}"],
       "bad vertex"),
  ]
  for args, words in cases:
    out = subprocess.run([PY] + args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, (args, out.stderr)
    errs = [l for l in out.stderr.strip().splitlines() if l.startswith("error:")]
    assert errs and words in errs[-1], (args, out.stderr)
    assert "Traceback" not in out.stderr
  # the same checks the train command turns into one line (ValueError), in process
  cfg = holly_config.get_config("tiny")
  for field, value, words in (("obj", str(tmp_path / "missing.obj"), "no such file"),
                              ("images", str(tmp_path / "w"), "no usable")):
    cfg.data[field] = value
    cfg.data.image_sigma = 2.0
    with pytest.raises(ValueError, match=words) as e:
      task_lib.HollyTask(cfg)
    assert "\n" not in str(e.value)
