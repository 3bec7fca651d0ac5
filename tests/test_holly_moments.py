"""HOLLy pose-free moments (moments.py): the projections' covariance statistics give
the structure's 3D covariance invariants without any pose, and they tell a hollow
shell from the flat disc its cloud once collapsed into."""
import jax
import jax.numpy as jnp
import numpy as np

from smlm_jax.holly import moments
from smlm_jax.holly import procedural
from smlm_jax.holly import render
from smlm_jax.holly import rotations


def _images(points, num, size=48, fov=1.1, sigma_px=1.0, seed=0):
  R = rotations.random_rotation(jax.random.key(seed), (num,))
  t = 0.05 * jax.random.uniform(jax.random.key(seed + 1), (num, 2), minval=-1, maxval=1)
  pts = jnp.asarray(points, jnp.float32)
  imgs = jax.vmap(lambda r, tt: render.render(pts, r, tt, sigma_px, size, fov))(R, t)
  return np.asarray(imgs), np.full(num, sigma_px)


def _normalized(points):
  p = points - points.mean(0)
  return p / np.linalg.norm(p, axis=1).max()


def test_image_moments_give_the_structure_invariants_without_poses():
  sites = _normalized(procedural.asymmetric(300, seed=2))
  imgs, sig = _images(sites, 512)
  est = moments.invariants_from_images(*moments.image_moments(imgs, sig, 48, 1.1))
  true = np.asarray(moments.cloud_invariants(jnp.asarray(sites, jnp.float32)))
  np.testing.assert_allclose(est, true, rtol=0.08)
  # the splat width is taken out: wider images give the same invariants
  imgs2, sig2 = _images(sites, 512, sigma_px=2.5)
  est2 = moments.invariants_from_images(*moments.image_moments(imgs2, sig2, 48, 1.1))
  np.testing.assert_allclose(est2, est, rtol=0.05)


def test_moment_loss_tells_a_shell_from_a_flat_disc():
  shell = _normalized(procedural.shell(400, seed=0))
  target = moments.cloud_invariants(jnp.asarray(shell, jnp.float32))
  # the shell's projection onto its two largest axes: a flat disc with the same outline
  c = shell - shell.mean(0)
  _, vecs = np.linalg.eigh(c.T @ c)
  disc = c @ vecs[:, 1:] @ vecs[:, 1:].T
  raw = procedural.shell(400, seed=0)
  scale = np.linalg.norm(raw - raw.mean(0), axis=1).max()
  other = procedural.shell(400, seed=1) / scale   # another sample, same size
  assert float(moments.moment_loss(jnp.asarray(other, jnp.float32), target)) < 0.02
  assert float(moments.moment_loss(jnp.asarray(disc, jnp.float32), target)) > 0.5
  g = jax.grad(moments.moment_loss)(jnp.asarray(disc, jnp.float32), target)
  assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0
