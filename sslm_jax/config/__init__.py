"""The run config: defaults, validation and derived values. Fails before anything compiles.

  from sslm_jax import config as config_lib
  c = config_lib.defaults()       # every field, with its default (config/base.py)
  config_lib.validate(c)          # ConfigError naming the first field that cannot work
  config_lib.model_config(c)      # what the model code takes (config/derived.py)

This package re-exports the names callers use; each lives in one submodule: base.py,
checks.py, derived.py, determinism.py, and the sections finetune.py, mixture.py and
augment_spec.py. The submodules import each other, never this facade.
"""

from sslm_jax.config.base import defaults
from sslm_jax.config.checks import (
  ATTENTION_IMPLS,
  DTYPES,
  GELU_FORMS,
  OBJECTIVES,
  SOURCES,
  ConfigError,
  closest_field,
  field_names,
  validate,
)
from sslm_jax.config.derived import (
  FAMILIES,
  SPLASH_LANES,
  attention_impl,
  compute_dtype,
  family,
  gelu_form,
  gpu_capability,
  model_config,
  num_predictions,
  padded_vocab_size,
  positions,
  resolved,
)
from sslm_jax.config.determinism import DETERMINISTIC_XLA_FLAG, request_determinism

__all__ = [
  "ATTENTION_IMPLS",
  "DETERMINISTIC_XLA_FLAG",
  "DTYPES",
  "FAMILIES",
  "GELU_FORMS",
  "OBJECTIVES",
  "SOURCES",
  "SPLASH_LANES",
  "ConfigError",
  "attention_impl",
  "closest_field",
  "compute_dtype",
  "defaults",
  "family",
  "field_names",
  "gelu_form",
  "gpu_capability",
  "model_config",
  "num_predictions",
  "padded_vocab_size",
  "positions",
  "request_determinism",
  "resolved",
  "validate",
]
