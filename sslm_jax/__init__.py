"""sslm_jax: GPT and BERT pretraining in JAX/Flax NNX.

`sslm_jax.load(workdir)` returns a trained model (see sslm_jax/inference/language_model.py). It is
imported on first use, so that `python -m sslm_jax.main` and the core modules do not pay for it.
"""

__all__ = ["LanguageModel", "load"]


def __getattr__(name: str):
  if name in __all__:
    from sslm_jax.inference import language_model as api

    return getattr(api, name)
  raise AttributeError(f"module 'sslm_jax' has no attribute {name!r}")
