"""Llama's forward pass of generation: its weights in decoding layout and its block over the cache.

The layout follows inference/decoder.py's GPT-2 one (kernels [out, in], one array per layer
unless the layers are scanned) with Llama's differences: no position table and no biases, RMSNorm
(float32), grouped-query attention whose fused projection holds per key/value head its G query
heads, its key and its value (inference/kv_cache.split_qkv; the cache keeps the K key/value heads
only), optional RMSNorm on each head's queries and keys, rotary positions (models/rotary.py) on
both after it, SwiGLU with its gate and up kernels fused row by row into one [F * 2, D] kernel,
and the untied output embedding when the model has one. The math is models.transformer.Llama's;
tests/test_decode_families.py checks it against the full forward pass.

Einsum letters as in inference/kv_cache.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sslm_jax.inference import kv_cache
from sslm_jax.models import rotary
from sslm_jax.models.config import ModelConfig
from sslm_jax.models.layers import constrain


class LlamaLayerWeights(NamedTuple):
  """One Llama block's weights, kernels [out, in]; each leaf has a leading [L] axis when
  stacked. The qk-norm scales are None without model.qk_norm."""

  attention_norm_D: jax.Array
  qkv_ED: jax.Array  # E = K * (G + 2) * H: per key/value head, its query heads, key and value
  query_norm_H: jax.Array | None
  key_norm_H: jax.Array | None
  out_DE: jax.Array  # E = N * H
  mlp_norm_D: jax.Array
  gate_up_ED: jax.Array  # E = F * 2: row 2f is gate unit f, row 2f + 1 up unit f
  down_DF: jax.Array


_LAYER_NAMES = LlamaLayerWeights(
  ("embed",),
  ("heads", "embed"),
  ("kv",),
  ("kv",),
  ("embed", "heads"),
  ("embed",),
  ("mlp", "embed"),
  ("embed", "mlp"),
)


class LlamaWeights(NamedTuple):
  """A Llama's weights for decoding; `layers` as decoder.Weights' (stacked or a tuple)."""

  token_VD: jax.Array
  final_norm_D: jax.Array
  output_VD: jax.Array | None  # the untied output embedding; None when tied to token_VD
  layers: LlamaLayerWeights | tuple[LlamaLayerWeights, ...]


@functools.partial(jax.jit, static_argnums=0)
def decode_layout(graphdef, params) -> LlamaWeights:
  """A Llama's weights (nnx.split(model, nnx.Param)) in decoding layout."""
  model = nnx.merge(graphdef, params)
  cfg, dt = model.cfg, jnp.dtype(model.cfg.dtype)
  layers, d, h, k = cfg.num_layers, cfg.emb_dim, cfg.head_dim, cfg.kv_heads
  blocks = model.stack.blocks
  attention, mlp = blocks.attention, blocks.mlp

  def rows(kernel, perm):  # stacked [L, in..., out...] -> [L, out..., in] in the compute dtype
    return kernel[...].astype(dt).transpose(perm)

  q_LKGHD = rows(attention.query.kernel, (0, 2, 3, 1)).reshape(layers, k, -1, h, d)
  k_LK1HD = rows(attention.key.kernel, (0, 2, 3, 1))[:, :, None]
  v_LK1HD = rows(attention.value.kernel, (0, 2, 3, 1))[:, :, None]
  qkv_LKCHD = jnp.concatenate([q_LKGHD, k_LK1HD, v_LK1HD], axis=2)
  gate_up_LF2D = jnp.stack([rows(mlp.gate.kernel, (0, 2, 1)), rows(mlp.up.kernel, (0, 2, 1))], 2)
  qk_norm = (attention.query_norm.scale[...], attention.key_norm.scale[...]) if cfg.qk_norm else (
    None, None)  # fmt: skip
  stacked = LlamaLayerWeights(
    attention_norm_D=blocks.attention_norm.scale[...],
    qkv_ED=qkv_LKCHD.reshape(layers, -1, d),
    query_norm_H=qk_norm[0],
    key_norm_H=qk_norm[1],
    out_DE=rows(attention.out.kernel, (0, 3, 1, 2)).reshape(layers, d, -1),
    mlp_norm_D=blocks.mlp_norm.scale[...],
    gate_up_ED=gate_up_LF2D.reshape(layers, -1, d),
    down_DF=rows(mlp.down.kernel, (0, 2, 1)),
  )
  return LlamaWeights(
    token_VD=model.token_embed.embedding[...],
    final_norm_D=model.final_norm.scale[...],
    output_VD=None if cfg.tie_embeddings else model.lm_head.embedding[...],
    layers=kv_cache.per_layer(cfg, stacked, _LAYER_NAMES),
  )


def output_embedding(w: LlamaWeights):
  """The [V, D] output projection: lm_head when untied, else the input embedding."""
  return w.token_VD if w.output_VD is None else w.output_VD


def extend(cfg: ModelConfig, w: LlamaWeights, inputs_BT, positions_BT, cache, index, mask_BTS):
  """decoder.extend for a Llama: (final hidden states [B, T, D], cache)."""
  x_BTD = constrain(w.token_VD[inputs_BT].astype(cfg.dtype), ("act_batch", "act_len", "act_embed"))
  rot = rotary.rotation(positions_BT, cfg.head_dim, cfg.rope_base)  # once for every layer
  block = functools.partial(_block, cfg, rot=rot, index=index, mask_BTS=mask_BTS)
  x_BTD, cache = kv_cache.run_layers(cfg, block, w.layers, x_BTD, cache)
  return kv_cache.rms_norm(cfg, x_BTD, w.final_norm_D), cache


def _block(cfg: ModelConfig, w: LlamaLayerWeights, x_BTD, key, value, *, rot, index, mask_BTS):
  """One pre-RMSNorm block over the new tokens, reading and extending its layer of the cache."""
  (b, t, _), n, h = x_BTD.shape, cfg.num_heads, cfg.head_dim
  h_BTD = kv_cache.rms_norm(cfg, x_BTD, w.attention_norm_D)
  qkv_BTE = jnp.einsum("BTD,ED->BTE", h_BTD, w.qkv_ED)
  q_BTKGH, k_BTKH, v_BTKH = kv_cache.split_qkv(cfg, qkv_BTE)
  if cfg.qk_norm:
    q_BTKGH = kv_cache.rms_norm(cfg, q_BTKGH, w.query_norm_H)
    k_BTKH = kv_cache.rms_norm(cfg, k_BTKH, w.key_norm_H)
  # Head n = k * G + g, as models/attention.repeat_kv pairs query heads with key/value heads.
  q_BTKGH = rotary.rotate(q_BTKGH.reshape(b, t, n, h), rot).reshape(q_BTKGH.shape)
  k_BTKH = rotary.rotate(k_BTKH, rot)
  out_BTE, key, value = kv_cache.attend(q_BTKGH, k_BTKH, v_BTKH, key, value, index, mask_BTS)
  x_BTD = x_BTD + jnp.einsum("BTE,DE->BTD", out_BTE, w.out_DE)
  h_BTD = kv_cache.rms_norm(cfg, x_BTD, w.mlp_norm_D)
  gate_up_BTF2 = jnp.einsum("BTD,ED->BTE", h_BTD, w.gate_up_ED).reshape(b, t, -1, 2)
  h_BTF = jax.nn.silu(gate_up_BTF2[..., 0]) * gate_up_BTF2[..., 1]
  h_BTF = constrain(h_BTF, ("act_batch", "act_len", "act_mlp"))
  x_BTD = x_BTD + jnp.einsum("BTF,DF->BTD", h_BTF, w.down_DF)
  return constrain(x_BTD, ("act_batch", "act_len", "act_embed")), key, value
