"""One training run per workdir: an advisory lock on ``DIR/.lock``.

Contract:
  * :func:`hold` takes an exclusive ``fcntl.flock`` on ``DIR/.lock`` (created if absent,
    never truncated before the lock is ours) and writes ``pid PID on host HOST`` into it.
    It is held until the block ends; it is re-entrant within one process (the CLI takes
    it before importing JAX, the trainer takes it again).
  * A second run on the same workdir gets :class:`WorkdirBusy` at once, whose message is
    one line naming the holder's PID and host. Nothing else in the workdir is touched.
  * The kernel drops a flock when its holder dies (kill -9 included), so a stale
    ``.lock`` file left by a killed run never blocks the next one.
  * Only one process of a multi-process run locks (process 0: the trainer decides).
  * Where ``fcntl`` is missing (Windows) nothing is locked. On network file systems
    flock is as reliable as the file system's locking (Linux NFS maps it to POSIX locks).
Imports no JAX, so the CLI can refuse a busy workdir within a second.
"""
from __future__ import annotations

import contextlib
import os
import socket

LOCK_NAME = ".lock"

_held: dict[str, list] = {}      # realpath of the workdir -> [fd, depth]


class WorkdirBusy(RuntimeError):
  """Another run holds the workdir's lock; the message names it."""


def holder(workdir: str) -> str:
  """What the lock file says about its holder ('pid N on host H'), or 'unknown'."""
  try:
    with open(os.path.join(workdir, LOCK_NAME)) as f:
      return f.read(200).strip() or "unknown"
  except OSError:
    return "unknown"


@contextlib.contextmanager
def hold(workdir: str):
  """Holds the workdir's lock for the block; raises :class:`WorkdirBusy` if taken."""
  try:
    import fcntl
  except ImportError:                       # no POSIX locks: run unlocked
    yield
    return
  key = os.path.realpath(workdir)
  if key in _held:
    _held[key][1] += 1
    try:
      yield
    finally:
      _held[key][1] -= 1
    return
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(os.path.join(workdir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    os.close(fd)
    raise WorkdirBusy(
        f"workdir {workdir} is in use by another training run ({holder(workdir)}, lock "
        f"{os.path.join(workdir, LOCK_NAME)}); wait for it to end or choose another "
        "--workdir") from None
  try:
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
    _held[key] = [fd, 1]
    yield
  finally:
    _held.pop(key, None)
    try:
      os.ftruncate(fd, 0)                   # before unlocking: never wipe a new holder
    except OSError:
      pass
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
