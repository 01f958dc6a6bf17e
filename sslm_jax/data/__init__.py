"""Input pipeline: document sources, the token-row cache, masking and batches.

`sslm_jax.data.pipeline` (prepare, build, Data) imports TensorFlow; importing this package
does not, so `sslm_jax.data.masking` stays usable where TensorFlow is not installed.
"""
