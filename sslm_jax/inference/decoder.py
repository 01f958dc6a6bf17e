"""The forward pass of generation: a model's weights in decoding layout, run over the KV cache.

Training keeps each layer's weights as the model's modules hold them ([in, out] kernels, q, k and
v apart, stacked over layers). One decode step reads every weight once for very little arithmetic,
so its speed is the speed of reading weights. `to_decode_layout` therefore copies them once into
the layout the step reads fastest (a DecodeModel): every kernel [out, in] (a row per output, read
contiguously), q, k and v fused into one [K * C * H, D] kernel (inference/kv_cache.split_qkv),
and, unless the model scans its layers, one array per layer instead of slices of the stack taken
at every call. With the cache layout of kv_cache.KVCache, this took a GPT-2-small decode step on
a 2-core CPU from ~20 to ~16.5 ms at batch 1 and from ~39 to ~34 ms at batch 8
(bench --mode=generate).

This module holds GPT-2's layout and block (pre-LN, learned positions, tied output embedding) and
the entry points every family shares (to_decode_layout, init_cache, extend, logits);
inference/llama_decoder.py holds Llama's. Einsum letters as in inference/kv_cache.py; E is a
merged output axis (see LayerWeights). tests/test_decode.py and tests/test_decode_families.py
check each family against its full forward pass.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sslm_jax.inference import kv_cache, llama_decoder
from sslm_jax.inference.kv_cache import KVCache
from sslm_jax.models.config import ModelConfig
from sslm_jax.models.layers import constrain, gelu
from sslm_jax.models.transformer import GPT, Llama, mask_padding_ids


class LayerWeights(NamedTuple):
  """One GPT-2 block's weights, kernels [out, in]; each leaf has a leading [L] axis when stacked."""

  attention_norm: tuple[jax.Array, jax.Array]  # (scale_D, bias_D)
  qkv_ED: jax.Array  # E = N * 3 * H: each head's q, k and v rows together (K = N, C = 3)
  qkv_bias_E: jax.Array
  out_DE: jax.Array  # E = N * H
  out_bias_D: jax.Array
  mlp_norm: tuple[jax.Array, jax.Array]
  fc_FD: jax.Array
  fc_bias_F: jax.Array
  proj_DF: jax.Array
  proj_bias_D: jax.Array


# Logical names of LayerWeights' leaves, in field order (norms as (scale, bias)).
_LAYER_NAMES = LayerWeights(
  (("embed",), ("embed",)),
  ("heads", "embed"),
  ("heads",),
  ("embed", "heads"),
  ("embed",),
  (("embed",), ("embed",)),
  ("mlp", "embed"),
  ("mlp",),
  ("embed", "mlp"),
  ("embed",),
)


class Weights(NamedTuple):
  """A GPT's weights for decoding. `layers` is a LayerWeights of stacked [L, ...] leaves when
  cfg.scan_layers, else a tuple of L LayerWeights."""

  token_VD: jax.Array
  position_PD: jax.Array
  final_norm: tuple[jax.Array, jax.Array]
  layers: LayerWeights | tuple[LayerWeights, ...]


class DecodeModel(NamedTuple):
  """A causal model ready to generate: its static config and its weights in decoding layout
  (Weights for GPT-2, llama_decoder.LlamaWeights for Llama)."""

  cfg: ModelConfig
  weights: Weights | llama_decoder.LlamaWeights


def to_decode_layout(model: GPT | Llama) -> DecodeModel:
  """Copy a GPT's or a Llama's weights into decoding layout (one pass over them; keeps their
  sharding under an active `sharding.activate` context). Hold on to the result to generate many
  times."""
  cfg = model.cfg
  if not cfg.causal:
    raise ValueError(
      f"generation needs a causal_lm model (gpt2 or llama), not a {cfg.family} (masked_lm) one."
    )
  graphdef, params = nnx.split(model, nnx.Param)
  layout = llama_decoder.decode_layout if cfg.family == "llama" else _decode_layout
  return DecodeModel(cfg, layout(graphdef, params))


@functools.partial(jax.jit, static_argnums=0)
def _decode_layout(graphdef, params) -> Weights:
  model = nnx.merge(graphdef, params)
  cfg, dt = model.cfg, jnp.dtype(model.cfg.dtype)
  blocks = model.stack.blocks
  attention, mlp = blocks.attention, blocks.mlp

  def kernel(k, perm):  # stacked [L, in..., out...] -> [L, out, in] in the compute dtype
    k = k[...].astype(dt).transpose(perm)
    return k.reshape(*k.shape[:2], -1)

  def norm(module):
    return (module.scale[...], module.bias[...])

  qkv = [attention.query, attention.key, attention.value]
  qkv_LNKHD = jnp.stack([m.kernel[...].astype(dt).transpose(0, 2, 3, 1) for m in qkv], axis=2)
  qkv_bias_LNKH = jnp.stack([m.bias[...].astype(dt) for m in qkv], axis=2)
  stacked = LayerWeights(
    attention_norm=norm(blocks.attention_norm),
    qkv_ED=qkv_LNKHD.reshape(cfg.num_layers, -1, cfg.emb_dim),
    qkv_bias_E=qkv_bias_LNKH.reshape(cfg.num_layers, -1),
    out_DE=kernel(attention.out.kernel, (0, 3, 1, 2)),
    out_bias_D=attention.out.bias[...].astype(dt),
    mlp_norm=norm(blocks.mlp_norm),
    fc_FD=kernel(mlp.fc.kernel, (0, 2, 1)),
    fc_bias_F=mlp.fc.bias[...].astype(dt),
    proj_DF=kernel(mlp.proj.kernel, (0, 2, 1)),
    proj_bias_D=mlp.proj.bias[...].astype(dt),
  )
  return Weights(
    token_VD=model.token_embed.embedding[...],
    position_PD=model.position_embed.embedding[...],
    final_norm=norm(model.final_norm),
    layers=kv_cache.per_layer(cfg, stacked, _LAYER_NAMES),
  )


def init_cache(decoding: DecodeModel, batch: int, cache_len: int, start_B) -> KVCache:
  """An empty cache of `cache_len` slots for `batch` rows whose real tokens start at `start_B`
  (kv_cache.init_cache: the model's key/value heads only)."""
  return kv_cache.init_cache(decoding.cfg, batch, cache_len, start_B)


def extend(decoding: DecodeModel, inputs_BT, positions_BT, cache: KVCache, index):
  """(final hidden states [B, T, D], cache) for T tokens written at slots index..index+T-1, at
  token positions `positions_BT`.

  Prefill is one call over the left-padded prompts at index 0; each decode step is one more with
  T = 1. Each token attends to its row's real slots up to its own.
  """
  cfg, w = decoding
  mask_BTS = kv_cache.slot_mask(cache, inputs_BT.shape[1], index)
  if cfg.family == "llama":
    return llama_decoder.extend(cfg, w, inputs_BT, positions_BT, cache, index, mask_BTS)
  x_BTD = (w.token_VD[inputs_BT] + w.position_PD[positions_BT]).astype(cfg.dtype)
  x_BTD = constrain(x_BTD, ("act_batch", "act_len", "act_embed"))
  block = functools.partial(_block, cfg, index=index, mask_BTS=mask_BTS)
  x_BTD, cache = kv_cache.run_layers(cfg, block, w.layers, x_BTD, cache)
  return kv_cache.layer_norm(cfg, x_BTD, *w.final_norm), cache


def logits(decoding: DecodeModel, x_BxD):
  """Next-token logits in float32 from final hidden states, padding ids masked."""
  cfg, w = decoding
  output_VD = llama_decoder.output_embedding(w) if cfg.family == "llama" else w.token_VD
  return mask_padding_ids(kv_cache.output_logits(cfg, x_BxD, output_VD), cfg)


def _block(cfg: ModelConfig, w: LayerWeights, x_BTD, key, value, *, index, mask_BTS):
  """One pre-LN block over the new tokens, reading and extending its layer of the cache."""
  h_BTD = kv_cache.layer_norm(cfg, x_BTD, *w.attention_norm)
  qkv_BTE = jnp.einsum("BTD,ED->BTE", h_BTD, w.qkv_ED) + w.qkv_bias_E
  out_BTE, key, value = kv_cache.attend(*kv_cache.split_qkv(cfg, qkv_BTE), key, value, index,
                                        mask_BTS)  # fmt: skip
  x_BTD = x_BTD + (jnp.einsum("BTE,DE->BTD", out_BTE, w.out_DE) + w.out_bias_D)
  h_BTD = kv_cache.layer_norm(cfg, x_BTD, *w.mlp_norm)
  h_BTF = gelu(jnp.einsum("BTD,FD->BTF", h_BTD, w.fc_FD) + w.fc_bias_F, cfg.gelu)
  h_BTF = constrain(h_BTF, ("act_batch", "act_len", "act_mlp"))
  x_BTD = x_BTD + jnp.einsum("BTF,DF->BTD", h_BTF, w.proj_DF) + w.proj_bias_D
  return constrain(x_BTD, ("act_batch", "act_len", "act_embed")), key, value
