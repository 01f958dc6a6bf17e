"""The pieces models/attention.py and models/transformer.py are built from: the sharding constraint
on activations, dropout, GELU, layers whose weights carry logical axis names, and the logit of an
excluded id.

Einsum letters and logical axis names are those of models/transformer.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd

# Far below any real logit, yet finite: exp() of it is exactly 0 and p * log p stays 0, not NaN.
PADDING_LOGIT = -1e9


def logical_spec(logical_names: tuple[str | None, ...]) -> jax.sharding.PartitionSpec | None:
  """The PartitionSpec the rules in scope give these logical names; None outside a mesh and
  rules context (a single device, or code run without sharding)."""
  rules = flax_spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return None
  return jax.sharding.PartitionSpec(*flax_spmd.from_sharding_rules(logical_names, rules))


def constrain(x, logical_names: tuple[str | None, ...]):
  """Sharding constraint by logical names; a no-op outside a rules context."""
  spec = logical_spec(logical_names)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def dropout(x, rate: float, key):
  """Inverted dropout; identity when `key` is None (evaluation)."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def gelu(x, form: str = "erf"):
  if form == "tanh":
    return jax.nn.gelu(x, approximate=True)
  # The erf form; jax.nn.gelu(approximate=False) lowers to many more ops on CPU.
  return 0.5 * x * (1.0 + jax.lax.erf(x / math.sqrt(2.0)).astype(x.dtype))


def _normal(std):
  return nnx.initializers.normal(stddev=std)


def dense(cfg, spec, kernel_shape, bias_shape, names, bias_names, *, std, rngs):
  """An einsum layer; bias_shape None: no bias."""
  return nnx.Einsum(
    spec,
    kernel_shape,
    bias_shape,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    kernel_init=_normal(std),
    kernel_metadata={"out_sharding": names},
    bias_metadata={"out_sharding": bias_names},
    rngs=rngs,
  )


def layer_norm(cfg, *, rngs, use_bias: bool = True):
  return nnx.LayerNorm(
    cfg.emb_dim,
    epsilon=cfg.layer_norm_epsilon,
    dtype=jnp.float32,
    param_dtype=cfg.param_dtype,
    use_bias=use_bias,
    scale_metadata={"out_sharding": ("embed",)},
    bias_metadata={"out_sharding": ("embed",)},
    rngs=rngs,
  )


def rms_norm(cfg, size: int, names: tuple[str, ...], *, rngs):
  """RMSNorm in float32 (Llama's; Hugging Face's LlamaRMSNorm computes the same in float32)."""
  return nnx.RMSNorm(
    size,
    epsilon=cfg.layer_norm_epsilon,
    dtype=jnp.float32,
    param_dtype=cfg.param_dtype,
    scale_metadata={"out_sharding": names},
    rngs=rngs,
  )


def model_norm(cfg, *, rngs):
  """The family's norm over the model width: RMSNorm (llama), LayerNorm without bias
  (modernbert), LayerNorm (gpt2, bert)."""
  if cfg.family == "llama":
    return rms_norm(cfg, cfg.emb_dim, ("embed",), rngs=rngs)
  return layer_norm(cfg, rngs=rngs, use_bias=not cfg.rotary)


def embed(cfg, num, names, std, *, rngs):
  return nnx.Embed(
    num,
    cfg.emb_dim,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    embedding_init=_normal(std),
    embedding_metadata={"out_sharding": names},
    rngs=rngs,
  )
