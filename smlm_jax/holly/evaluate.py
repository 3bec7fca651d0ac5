"""Scores a learned point cloud against a reference shape, with pictures.

  python -m smlm_jax.holly.evaluate --workdir=runs/bunny \
      --reference=../shared/real-data/holly/objs/bunny_large.obj \
      [--num_images=256] [--seed=777] [--starts=48] [--output=runs/bunny/eval]
  python -m smlm_jax.holly.evaluate --learned=cloud.ply --reference=FILE.obj
  python -m smlm_jax.holly.evaluate --workdir=runs/cep152      # no reference: pictures

The learned cloud (the latest checkpoint of --workdir, or a .ply/.obj given with
--learned) is aligned to the reference by a similarity transform including reflection
(ICP from 2 handednesses x (--starts initial rotations + the 16 best of 2048 random
ones screened by Chamfer), :mod:`smlm_jax.holly.align`), and
the symmetric Chamfer distance is reported in units of the reference's bounding-box
diagonal. For a run trained on images simulated from a shape (config.data.obj), the
pose CNN is also scored on --num_images fresh simulated images at the final sigma:
the angular error (degrees) of its best hypothesis after alignment, and (when the
run's config has eval_refined_poses) that of the poses training uses (pose search +
Gauss-Newton refinement against the learned cloud).

Writes to --output (default DIR/eval, or next to --learned):
  metrics.json   chamfer (relative and in reference units), alignment (scale,
                 handedness), pose errors, train seconds, step
  aligned.ply    the learned cloud in the reference's coordinates
  views.png      renders of the aligned learned cloud (top row) and of the reference
                 (bottom row) seen along z, y and x (+y up)
  rotation.gif   both rotating about the vertical axis (--gif_frames, default 36)
  poses.csv      runs on folder images only: each image's refined pose against the
                 learned cloud (file, sigma_px, quaternion qw..qz of R (object ->
                 image frame), viewing direction view_x..z = R^T e_z in the cloud's
                 frame, in-plane shift in px, residual), for picking particles by view
                 or by how well the cloud explains them
Last line printed: ``RESULT chamfer=<float> seconds=<train seconds>`` (nan when there
is no reference / no recorded training time).
"""
from __future__ import annotations

import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

import json
import math
import os

from absl import app, flags
import numpy as np

from smlm_jax.core import cli
from smlm_jax.holly import align as align_lib
from smlm_jax.holly import shapes
from smlm_jax.holly import symmetry as symmetry_lib


def train_seconds(workdir: str, step: int) -> float:
  """Training wall time recorded at checkpoint ``step`` (nan if unknown)."""
  path = os.path.join(workdir, "train_seconds.json")
  try:
    log = {int(k): float(v) for k, v in json.load(open(path)).items()}
  except (OSError, ValueError, AttributeError):
    return float("nan")
  if step in log:
    return log[step]
  return log[max(log)] if log else float("nan")


def pose_errors(task, state, num_images: int, seed: int, starts: int = 48):
  """Angular errors (deg) on fresh simulated images at the final sigma, after aligning
  the learned cloud to the (normalized) truth, modulo the truth's symmetry
  (task.symmetry()): ({"cnn": [B]} (the CNN's best hypothesis by render loss),
  "cnn_raw": [B] (not modulo the symmetry) and, when the run's config has
  ``eval_refined_poses``, "refined": [B] (the poses training uses: search +
  Gauss-Newton), the images)."""
  import jax
  from smlm_jax.core import trainer
  mesh = trainer.make_mesh()
  sigma = task.sigma(int(task.config.num_train_steps))
  batch = task.eval_batch(sigma, num_images, seed)
  fn = task.best_poses_fn()
  params = jax.device_get(state["params"])
  bs = int(task.config.eval_batch_size)
  images = {"image": batch["image"], "sigma": batch["sigma"]}
  R, loss, _ = trainer.batched(lambda c: fn(params, c), images, bs, mesh)
  al = align_lib.align(np.asarray(params["points"]), task.sites, num_starts=starts)
  sym = task.symmetry()
  out = {"cnn": symmetry_lib.pose_errors_deg(R, batch["R"], al, sym),
         "cnn_raw": align_lib.pose_errors_deg(R, batch["R"], al)}
  if bool(task.config.get("eval_refined_poses", False)):
    refined = task.refined_poses_fn()
    R_ref = trainer.batched(lambda c: refined(params, c, seed), images, bs, mesh)
    out["refined"] = symmetry_lib.pose_errors_deg(R_ref, batch["R"], al, sym)
  return out, batch


POSES_HEADER = ("file,sigma_px,qw,qx,qy,qz,view_x,view_y,view_z,shift_x_px,shift_y_px,"
                "residual")


def write_poses(task, params, path: str, seed: int = 0) -> np.ndarray:
  """For a run on folder images: every image's refined pose against the learned cloud
  (pose search + Gauss-Newton, as training uses) as CSV rows of POSES_HEADER: the
  rotation R (object -> image frame) as a unit quaternion (w >= 0), the viewing
  direction in the cloud's frame (R^T e_z: the cloud direction the image looks along),
  the in-plane shift in px of the training images and the residual |render - image|^2 /
  |image|^2 (0: explained exactly, 1: no better than nothing; the convergence report's
  per-image number). Returns the residuals."""
  import jax
  from smlm_jax.holly import diagnose, render, rotations
  imgs, sig = task.folder_images()
  names = [os.path.basename(str(p)) for group in task.image_set.paths for p in group]
  R, t, _, _, res = diagnose.refined_fit(task, jax.device_get(params), imgs, sig, seed)
  q = np.asarray(rotations.quaternion_from_matrix(R))
  view = R[:, 2, :]
  px = render.pixels_per_unit(task.size, task.fov)
  shift = t * px
  lines = [f"# refined poses of the {len(names)} images against the learned cloud; shifts "
           f"in px of the {task.size}x{task.size} training images (x: columns, y: rows; "
           f"1 cloud unit = {px:.4g} px)", POSES_HEADER]
  for i, name in enumerate(names):
    lines.append(",".join([name.replace(",", "_"), f"{sig[i]:g}"]
                          + [f"{v:.6f}" for v in (*q[i], *view[i], *shift[i])]
                          + [f"{res[i]:.5f}"]))
  cli.atomic_write_text(path, "\n".join(lines) + "\n")
  return res


def splat_views(points, size: int = 128, sigma_px: float = 1.5, angles=None):
  """Renders of a normalized cloud [N, 3] seen along z, y, x (or about y at angles)."""
  import jax.numpy as jnp
  from smlm_jax.holly import render, rotations
  pts = jnp.asarray(points, jnp.float32)
  if angles is None:
    Rs = [np.eye(3), np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]]),
          np.array([[0, 0, -1], [0, 1, 0], [1, 0, 0]])]
  else:
    Rs = [np.asarray(rotations.matrix_from_axis_angle(jnp.array([0.0, 1.0, 0.0]), a))
          for a in angles]
  R = jnp.asarray(np.stack(Rs), jnp.float32)
  t = jnp.zeros((len(Rs), 2), jnp.float32)
  return np.asarray(render.render_batch(pts, R, t, sigma_px, size, 1.1))


def write_pictures(learned_aligned, reference, out_dir: str, title: str,
                   gif_frames: int = 36):
  """views.png and rotation.gif of the aligned learned cloud next to the reference."""
  from smlm_jax.core import plotting
  plt = plotting.pyplot()
  if reference is not None:
    ref_n, centre, scale = shapes.normalize(reference)
    learn_n = (np.asarray(learned_aligned) - centre) / scale
    clouds, names = [learn_n, ref_n], ["learned (aligned)", "reference"]
  else:
    learn_n = shapes.normalize(learned_aligned)[0]
    clouds, names = [learn_n], ["learned"]
  # rows flipped so that +y points up in the pictures (image rows grow downwards)
  views = [splat_views(c)[:, ::-1] for c in clouds]
  fig = plotting.image_grid([v for vs in views for v in vs],
                            titles=[f"{n}: along {a}" for n in names for a in "zyx"],
                            ncols=3, cmap="magma", suptitle=title)
  plotting.save(fig, os.path.join(out_dir, "views.png"))

  from matplotlib import animation
  angles = np.linspace(0, 2 * math.pi, max(1, gif_frames), endpoint=False)
  frames = [splat_views(c, size=96, angles=angles)[:, ::-1] for c in clouds]
  fig, axes = plt.subplots(1, len(clouds), figsize=(3 * len(clouds), 3.2), squeeze=False)
  ims = []
  for ax, f, n in zip(axes[0], frames, names):
    ax.axis("off")
    ax.set_title(n, fontsize=9)
    ims.append(ax.imshow(f[0], cmap="magma", vmin=0, vmax=float(np.percentile(f, 99.9))))

  def update(i):
    for im, f in zip(ims, frames):
      im.set_data(f[i])
    return ims
  anim = animation.FuncAnimation(fig, update, frames=len(angles), blit=False)
  try:
    with cli.atomic_path(os.path.join(out_dir, "rotation.gif")) as tmp:
      anim.save(tmp, writer=animation.PillowWriter(fps=12))
  finally:
    plt.close(fig)


def evaluate(workdir: str | None, reference_path: str | None, learned_path: str | None = None,
             output: str | None = None, num_images: int = 256, seed: int = 777,
             starts: int = 48, gif_frames: int = 36, pictures: bool = True) -> dict:
  """Scores and pictures (see the module doc); returns the metrics dict."""
  reference = None
  if reference_path:
    reference = shapes.read_shape(reference_path).vertices
  metrics = {"reference": reference_path}
  errors = None
  if learned_path:
    points = shapes.read_shape(learned_path).vertices
    out = output or os.path.join(os.path.dirname(os.path.abspath(learned_path)), "eval")
    metrics.update(learned=learned_path, step=None, train_seconds=float("nan"))
  else:
    from smlm_jax.core import trainer
    config, task, state = trainer.load_run(workdir)
    import jax
    points = np.asarray(jax.device_get(state["params"]["points"]), np.float64)
    step = int(state["step"])
    out = output or os.path.join(workdir, "eval")
    metrics.update(workdir=workdir, step=step, train_seconds=train_seconds(workdir, step),
                   num_points=len(points))
    from smlm_jax.holly import diagnose
    if task.sites is not None and num_images > 0:
      errors, batch = pose_errors(task, state, num_images, seed, starts)
      metrics["symmetry"] = task.symmetry().describe()
      diag_images, diag_sigma = batch["image"], batch["sigma"]
      particles = None
    elif task.image_set is not None:
      particles = task.image_set.particles
      diag_images, diag_sigma = task.folder_images()
      poses_path = os.path.join(out, "poses.csv")
      os.makedirs(out, exist_ok=True)
      res = write_poses(task, state["params"], poses_path, seed)
      metrics["poses"] = {"file": poses_path, "num_images": int(len(res)),
                          "residual_median": float(np.median(res))}
    else:
      diag_images = None
    done = os.path.join(workdir, "convergence.json")
    try:                       # the report training wrote at this step, if any
      earlier = json.load(open(done))
      if earlier.get("step") != step:
        earlier = None
    except (OSError, ValueError):
      earlier = None
    if earlier is not None:
      metrics["convergence"] = {k: v for k, v in earlier.items() if k != "step"}
    elif diag_images is not None:
      metrics["convergence"] = diagnose.report(task, jax.device_get(state["params"]),
                                               diag_images, diag_sigma, seed,
                                               particles=particles)
      diagnose.write(workdir, metrics["convergence"], step)
    if errors is not None:
      for kind, e in errors.items():
        metrics["pose_error_deg" if kind == "cnn" else f"{kind}_pose_error_deg"] = {
            "median": float(np.median(e)), "mean": float(np.mean(e)),
            "p90": float(np.percentile(e, 90)), "frac_below_10": float(np.mean(e < 10)),
            "num_images": num_images, "seed": seed}
  os.makedirs(out, exist_ok=True)
  if reference is not None:
    al = align_lib.align(points, reference, num_starts=starts)
    aligned = al.apply(points)
    metrics.update(chamfer=al.chamfer_rel, chamfer_reference_units=al.chamfer,
                   reference_diagonal=shapes.bbox_diagonal(reference),
                   alignment={"scale": al.scale, "handedness": al.handedness,
                              "Q": al.Q.tolist(), "t": al.t.tolist()})
    shapes.write_ply(os.path.join(out, "aligned.ply"), aligned,
                     comment=f"learned cloud aligned to {os.path.basename(reference_path)} "
                             "(reference units)")
    title = f"Chamfer {al.chamfer_rel:.4f} of the bounding-box diagonal"
  else:
    aligned = points
    metrics["chamfer"] = float("nan")
    title = "learned cloud (no reference)"
  if pictures:
    write_pictures(aligned, reference, out, title, gif_frames)
  cli.atomic_write_text(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1))
  print(f"learned cloud: {len(points)} points" + (f", step {metrics['step']}"
                                                  if metrics.get("step") is not None else ""))
  if reference is not None:
    print(f"reference:     {reference_path} ({len(reference)} vertices, bounding-box "
          f"diagonal {metrics['reference_diagonal']:.4g})")
    print(f"alignment:     scale {al.scale:.4g}, "
          f"{'mirrored' if al.handedness < 0 else 'proper'} rotation")
    print(f"chamfer:       {al.chamfer_rel:.5f} of the diagonal ({al.chamfer:.5g} units)")
  if "poses" in metrics:
    print(f"poses:         {metrics['poses']['file']} ({metrics['poses']['num_images']} "
          f"images, median residual {metrics['poses']['residual_median']:.3f})")
  if errors is not None:
    print(f"symmetry:      {metrics['symmetry']} (pose errors modulo it; 'CNN raw' is not)")
    for key, label in (("pose_error_deg", "pose error (CNN):    "),
                       ("cnn_raw_pose_error_deg", "pose error (CNN raw):"),
                       ("refined_pose_error_deg", "pose error (refined):")):
      if key in metrics:
        pe = metrics[key]
        print(f"{label} median {pe['median']:.2f} deg, mean {pe['mean']:.2f} deg, "
              f"90th percentile {pe['p90']:.2f} deg, {100 * pe['frac_below_10']:.1f}% < 10 "
              f"deg ({num_images} simulated images)")
  if "convergence" in metrics:
    from smlm_jax.holly import diagnose
    print(diagnose.message(metrics["convergence"]))
  print(f"wrote {out}/metrics.json" + (", views.png, rotation.gif" if pictures else "")
        + (", aligned.ply" if reference is not None else ""))
  print(f"RESULT chamfer={metrics['chamfer']:.6f} seconds={metrics['train_seconds']:.1f}")
  return metrics


def _define_flags():
  """Flags exist only when run as a command (importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "Training run folder (its latest checkpoint).")
  flags.DEFINE_string("learned", None, "Or: a learned cloud .ply/.obj to score.")
  flags.DEFINE_string("reference", None, "Reference shape (.obj/.ply/.stl/.off).")
  flags.DEFINE_string("output", None, "Output folder (default WORKDIR/eval).")
  flags.DEFINE_integer("num_images", 256, "Simulated images for the pose error (0: skip).")
  flags.DEFINE_integer("seed", 777, "Seed of those images (differs from validation).")
  flags.DEFINE_integer("starts", 48, "Initial rotations per handedness for ICP.")
  flags.DEFINE_integer("gif_frames", 36, "Frames of the rotating GIF.")


def main(argv):
  cli.quiet_logs()
  f = flags.FLAGS
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if bool(f.workdir) == bool(f.learned):
    cli.fail("give exactly one of --workdir=DIR (a training run) or --learned=FILE")
  if f.workdir and not os.path.isdir(f.workdir):
    cli.fail(f"--workdir={f.workdir}: no such folder")
  if f.num_images < 0 or f.starts < 1:
    cli.fail("--num_images must be >= 0 and --starts >= 1")
  if f.learned and not os.path.isfile(f.learned):
    cli.fail(f"--learned={f.learned}: no such file")
  cli.check_writable(f.output or os.path.join(
      f.workdir or os.path.dirname(os.path.abspath(f.learned)), "eval"), "output",
      folder=True)
  if f.reference:
    try:
      shapes.read_shape(f.reference)
    except shapes.ShapeError as e:
      cli.fail(f"--reference: {e}")
  try:
    evaluate(f.workdir, f.reference, f.learned, f.output, f.num_images, f.seed, f.starts,
             max(1, f.gif_frames))
  except shapes.ShapeError as e:
    cli.fail(str(e))
  except (FileNotFoundError, ValueError) as e:
    cli.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
