"""The foundation every smlm_jax system uses (imports no system; never imports jax here).

trainer      one training loop for any Task: mesh, sharded jitted step, orbax, evals, logs
task         the Task interface the trainer drives, and the registry of systems
noise        exact Poisson sampler and camera models (sCMOS, EMCCD)
tiff_io      TIFF / OME-TIFF / ImageJ reading and writing with metadata; input scanning
cli          one-line errors, atomic files, CSV, progress bars for command-line tools
plotting     matplotlib (Agg) helpers shared by the systems' plots
host_devices one CPU device per core (imported before jax by entry points)
distributed  several processes/hosts: jax.distributed set-up, peer watchdog, gathers
workdir_lock one training run per workdir (flock on DIR/.lock; imports no jax)
"""
