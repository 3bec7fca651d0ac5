"""HOLLy in JAX: 3D structure as a point cloud learned from 2D (SMLM) projections.

Modules: ``shapes`` (.obj/.ply/.stl/.off in, .obj/.ply out, normalized units), ``rotations`` (uniform
SO(3) sampling, quaternions, the 6D representation), ``render`` (differentiable
Gaussian-splat renderer and the image simulators), ``models`` (the pose CNN),
``images`` (FITS/TIFF folders), ``align`` (similarity alignment incl. reflection,
Chamfer distance), ``task`` (the trainer task ``HollyTask``), ``evaluate`` (the CLI).
"""
