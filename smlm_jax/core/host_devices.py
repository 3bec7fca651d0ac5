"""Use every CPU core as a data-parallel device when running on CPU.

XLA's CPU client exposes one device by default, which leaves cores idle in the
data-parallel train/predict steps. Command-line entry points import this module
*before* jax: unless the user already set ``--xla_force_host_platform_device_count``
in XLA_FLAGS, it asks for one host device per core (at most 8). This only affects the
CPU platform; on GPU/TPU the accelerator devices are used as usual.

The CPU devices share the machine's cores, and XLA:CPU aborts the whole process when one
device waits more than 40 s for the others at a collective (all-reduce). Seen on 2 busy
cores; at least one such wait was a deadlock (0% CPU; the trainer now finishes each
step before other work on CPU, ``trainer.cpu_step_sync``), so the limit is raised to
5 minutes only (a step of our CPU configs takes well under a second; a hang should
fail, not wait 20 minutes). A user's own setting is left alone.
"""
import os

_FLAG = "--xla_force_host_platform_device_count"

if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  _n = max(1, min(8, os.cpu_count() or 1))
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}={_n}".strip()

_TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds"
if _TIMEOUT not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {_TIMEOUT}=300".strip()
