"""smlm_jax: deep learning on fluorescence-microscopy movies with JAX."""
