"""smlm_jax: deep learning on fluorescence-microscopy movies in JAX."""
from setuptools import find_packages, setup

setup(
    name="smlm_jax",
    version="0.1.0",
    description="Diffusion from motion blur and other SMLM tasks with JAX/Flax",
    packages=find_packages(include=["smlm_jax", "smlm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "ml-collections>=1.1,<2",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "tifffile>=2024.8.10",
        # tifffile's companion codec package: LZW, Zstd, PackBits, JPEG, ... compressed
        # TIFFs (without it tifffile reads only uncompressed and Deflate files).
        "imagecodecs>=2024.1.1",
        # Progress bars on long work (simulate, train, predict).
        "tqdm>=4.66,<5",
        # PNG plots of evaluation and calibration results.
        "matplotlib>=3.8,<4",
        # TensorBoard event files without a TensorFlow dependency.
        "tensorboardX>=2.6,<3",
        # scipy.ndimage: connected components / labelling of detected events (the
        # field's standard for instance extraction in sparks and events).
        "scipy>=1.11",
        # FITS images (the format of HOLLy's and many SMLM renders).
        "astropy>=6",
        # YAML metadata files next to event data (deep-events' format).
        "PyYAML>=6",
        # Linking spots into tracks with gap closing in diffusion.analyze: trackpy is the
        # field's standard Python linker (Crocker-Grier); pandas is its table format.
        "trackpy>=0.6",
        "pandas>=2",
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3"]},
)
