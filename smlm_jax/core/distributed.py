"""Several processes (hosts) in one training run, through ``jax.distributed``.

JAX's multi-controller model: every process runs the same program on its own devices;
``jax.devices()`` lists the devices of all processes, and a jitted step whose batch is
sharded over them computes, in each process, only that process's slice (so each
process simulates its own part of the global batch). Cross-process collectives use
NCCL on GPU, ICI/DCN on TPU and Gloo over TCP on CPU (JAX's default there).

Contract:
  initialize(...)   ``jax.distributed.initialize`` (explicit coordinator address,
                    process count and id, or auto-detection on SLURM, Open MPI, Cloud
                    TPU, ...) and, with more than one process, a :class:`Watchdog`.
  Watchdog          every process bumps a counter in the coordinator's key-value
                    store each second and watches the others': a peer whose counter
                    stands still for ``peer_timeout_s`` (killed, crashed, frozen), a
                    peer that reported a failure, or a lost coordinator makes this
                    process print ONE line (``error: ...``) and exit with code 3
                    instead of waiting forever inside a collective. JAX's own
                    heartbeat (``peer_timeout_s + 30`` s) is the backstop; it aborts
                    with a C++ log.
  barrier(name)     every process waits for the others (no device collective).
  report_failure    tells the peers why this process stops (they exit with the reason).
  finish            stops the watchdog (this process is done) before JAX's shutdown
                    barrier, so peers that finish later do not report it as dead.
  to_host(tree)     numpy values of (possibly multi-process) global arrays.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import jax
import numpy as np

EXIT_PEER_LOST = 3
_PREFIX = "smlm_jax/watchdog"
_watchdog = None
_barriers = 0


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids=None,
               peer_timeout_s: float = 60.0, initialization_timeout_s: int = 300):
  """Joins (or, as process 0, hosts) the run; None arguments are auto-detected."""
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id, local_device_ids=local_device_ids,
      initialization_timeout=int(initialization_timeout_s),
      heartbeat_timeout_seconds=int(peer_timeout_s) + 30)
  if jax.process_count() > 1:
    global _watchdog
    _watchdog = Watchdog(peer_timeout_s)
    _watchdog.start()


def _client():
  from jax._src import distributed as jax_distributed   # the runtime's key-value store
  return jax_distributed.global_state.client


class Watchdog(threading.Thread):
  """Exits this process with one clear line when a peer is gone (see module doc)."""

  def __init__(self, timeout_s: float, period_s: float = 1.0):
    super().__init__(name="smlm_jax-peer-watchdog", daemon=True)
    self.timeout_s, self.period_s = float(timeout_s), float(period_s)
    self.me, self.n = jax.process_index(), jax.process_count()
    self.client = _client()
    self.stopped = threading.Event()

  def _set(self, value: str):
    self.client.key_value_set(f"{_PREFIX}/{self.me}", value, allow_overwrite=True)

  def run(self):
    seen = {p: (None, time.monotonic()) for p in range(self.n) if p != self.me}
    beat = 0
    while not self.stopped.is_set():
      beat += 1
      try:
        self._set(str(beat))
        values = {p: self._try_get(p) for p in list(seen)}
      except Exception as e:  # noqa: BLE001  (any RPC failure: the coordinator is gone)
        if self.stopped.is_set():
          return
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        self._exit(f"lost the coordinator (process 0 of {self.n}): {first[:200]}")
      now = time.monotonic()
      for p, value in values.items():
        if value == "done":
          seen.pop(p)
        elif value is not None and value.startswith("failed:"):
          self._exit(f"process {p} of {self.n} stopped: {value[7:]}")
        elif value != seen[p][0]:
          seen[p] = (value, now)
        elif now - seen[p][1] > self.timeout_s:
          self._exit(f"process {p} of {self.n} stopped responding "
                     f"({now - seen[p][1]:.0f} s without a heartbeat; it died or "
                     "hangs); stopping this process too")
      self.stopped.wait(self.period_s)

  def _try_get(self, p):
    try:
      return self.client.key_value_try_get(f"{_PREFIX}/{p}")
    except Exception as e:  # noqa: BLE001
      if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
        return None                         # that process has not beaten yet
      raise

  def _exit(self, message):
    if self.stopped.is_set():
      return
    print(f"error: process {self.me}: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_LOST)                # the main thread may sit in a collective

  def stop(self, final: str = "done"):
    self.stopped.set()
    try:
      self._set(final)
    except Exception:  # noqa: BLE001  (the coordinator may already be gone)
      pass


def report_failure(message: str, grace_s: float = 2.0):
  """Tells the peers that this process stops and why, then gives them time to read it
  (before this process's exit takes the coordinator down, if it is process 0)."""
  if _watchdog is not None and not _watchdog.stopped.is_set():
    _watchdog.stop("failed:" + message.replace("\n", " ")[:300])
    time.sleep(grace_s)


def finish():
  """This process is done: its peers stop watching it."""
  global _watchdog
  if _watchdog is not None:
    _watchdog.stop("done")
    _watchdog = None


def barrier(name: str, timeout_s: float = 600.0):
  """Waits until every process got here (the coordination service's barrier, which
  needs no device collective); no-op in a single process."""
  global _barriers
  if jax.process_count() > 1:
    _barriers += 1                        # ids are single-use: number them
    _client().wait_at_barrier(f"smlm_jax/{name}/{_barriers}", int(timeout_s * 1000))


def to_host(tree):
  """numpy values of a pytree of arrays; arrays sharded over several processes are
  gathered (every process must call this together)."""
  def get(a):
    if (isinstance(a, jax.Array) and not a.is_fully_addressable
        and not a.is_fully_replicated):
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(jax.device_get(a))
  return jax.tree.map(get, tree)
