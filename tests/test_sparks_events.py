"""Event extraction at the movie's ends (smlm_jax/sparks/events)."""
import numpy as np

from configs import sparks as sparks_config
from smlm_jax.sparks import events as ev_lib
from smlm_jax.sparks import simulator as sim


def test_edge_frames_the_network_never_learned_are_background():
  config = sparks_config.get_config()
  spec = ev_lib.spec_from_config(config)
  assert spec.edge_frames == config.sim.labels.ignore_frames == 4
  T, H, W = 40, 16, 24
  probs = np.zeros((T, H, W, 4), np.float32)
  probs[..., sim.BACKGROUND] = 1.0
  probs[T - 2:, 2:8, 2:8] = np.eye(4)[sim.SPARK]    # a 2-frame "spark" in the last frames
  probs[0:3, 2:8, 14:20] = np.eye(4)[sim.SPARK]     # and in the first
  probs[15:20, 9:15, 8:14] = np.eye(4)[sim.SPARK]   # a real one in the middle
  t, y, x = np.meshgrid(np.arange(T), np.arange(H), np.arange(W), indexing="ij")
  movie = (1 + np.exp(-((t - 17) ** 2 + (y - 12) ** 2 + (x - 11) ** 2) / 8)
           + np.exp(-((t - T + 1) ** 2 + (y - 5) ** 2 + (x - 5) ** 2) / 8)
           + np.exp(-(t ** 2 + (y - 5) ** 2 + (x - 17) ** 2) / 8)).astype(np.float32)
  classes, _, cls_of, events, _ = ev_lib.extract_events(probs, movie, spec)
  assert [(e.cls, e.t_start, e.t_end) for e in events] == [(sim.SPARK, 15, 19)]
  assert not classes[:4].any() and not classes[T - 4:].any()
  # The same spec with edge_frames=0 (e.g. a hand-made EventSpec) keeps all three.
  import dataclasses
  spec0 = dataclasses.replace(spec, edge_frames=0)
  starts = sorted(e.t_start for e in ev_lib.extract_events(probs, movie, spec0)[3])
  assert starts == [0, 15, T - 2]
