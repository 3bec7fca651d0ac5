"""``python -m smlm_jax.diffusion.calibrate``: the calibration command.

The code lives in the package ``smlm_jax.diffusion.calibration`` (its ``__init__``
says which module holds what; the command is ``calibration/cli.py``). This module
keeps the command's name and re-exports the package's names, so
``from smlm_jax.diffusion import calibrate; calibrate.calibrate(...)`` still works.
"""
import smlm_jax.core.host_devices  # noqa: F401  (before jax: one CPU device per core)

from smlm_jax.diffusion.calibration import *  # noqa: F401,F403  (the public names)
from smlm_jax.diffusion.calibration import cli as _cli

if __name__ == "__main__":
  from smlm_jax.core import cli
  cli.run_app(_cli.main, _cli._define_flags)
