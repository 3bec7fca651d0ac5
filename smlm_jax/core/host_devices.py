"""Use every CPU core as a data-parallel device when running on CPU.

XLA's CPU client exposes one device by default, which leaves cores idle in the
data-parallel train/predict steps. Command-line entry points import this module
*before* jax: unless the user already set ``--xla_force_host_platform_device_count``
in XLA_FLAGS, it asks for one host device per core (at most 8). This only affects the
CPU platform; on GPU/TPU the accelerator devices are used as usual.
"""
import os

_FLAG = "--xla_force_host_platform_device_count"

if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  _n = max(1, min(8, os.cpu_count() or 1))
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}={_n}".strip()
