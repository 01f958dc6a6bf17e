"""The GPT forward pass of generation: weights in decoding layout and the KV cache.

Training keeps each layer's weights as the model's modules hold them ([in, out] kernels, q, k and
v apart, stacked over layers). One decode step reads every weight once for very little arithmetic,
so its speed is the speed of reading weights. `to_decode_layout` therefore copies them once into
the layout the step reads fastest (a DecodeModel): every kernel [out, in] (a row per output, read
contiguously), q, k and v fused into one [N * 3 * H, D] kernel, and, unless the model scans its
layers, one array per layer instead of slices of the stack taken at every call. With the cache
layout of KVCache, this took a GPT-2-small decode step on a 2-core CPU from ~20 to ~16.5 ms at
batch 1 and from ~39 to ~34 ms at batch 8 (bench --mode=generate).

Einsum letters as in models/transformer.py; E is a merged output axis (see LayerWeights), K the 3 of
q, k and v. The math is model.GPT's (pre-LN blocks, tied output embedding); tests/test_decode.py
checks it against the full forward pass.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sslm_jax.models.config import ModelConfig
from sslm_jax.models.layers import PADDING_LOGIT, constrain, gelu
from sslm_jax.models.transformer import GPT, mask_padding_ids


class LayerWeights(NamedTuple):
  """One block's weights, kernels [out, in]; each leaf has a leading [L] axis when stacked."""

  attention_norm: tuple[jax.Array, jax.Array]  # (scale_D, bias_D)
  qkv_ED: jax.Array  # E = N * 3 * H: each head's q, k and v rows together
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
  """A GPT ready to generate: its static config and its weights in decoding layout."""

  cfg: ModelConfig
  weights: Weights


def to_decode_layout(model: GPT) -> DecodeModel:
  """Copy a GPT's weights into decoding layout (one pass over them; keeps their sharding under
  an active `sharding.activate` context). Hold on to the result to generate many times."""
  if not model.cfg.causal:
    raise ValueError("generation needs a causal_lm (GPT) model.")
  graphdef, params = nnx.split(model, nnx.Param)
  return DecodeModel(model.cfg, _decode_layout(graphdef, params))


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
  is_names = lambda x: isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)
  if cfg.scan_layers:
    layers = jax.tree.map(
      lambda a, names: constrain(a, ("layers", *names)), stacked, _LAYER_NAMES, is_leaf=is_names
    )  # fmt: skip
  else:
    layers = tuple(
      jax.tree.map(
        lambda a, names, i=i: constrain(a[i], names), stacked, _LAYER_NAMES, is_leaf=is_names
      )  # fmt: skip
      for i in range(cfg.num_layers)
    )
  return Weights(
    token_VD=model.token_embed.embedding[...],
    position_PD=model.position_embed.embedding[...],
    final_norm=norm(model.final_norm),
    layers=layers,
  )


class KVCache(NamedTuple):
  """Keys and values of every layer, in `cache_len` static slots per row.

  Keys are [B, N, H, S] and values [B, N, S, H], the layouts the two attention products read
  without transposing the cache; a single row drops its B axis (with it, XLA:CPU copied the whole
  cache at every step). Stacked [L, ...] when the layers are scanned, else tuples of L arrays.
  Prompts are left-padded to end at the same slot: row b holds real tokens from slot
  `start_B[b]` up to the last slot written; the slots before it are never attended to.
  """

  keys: jax.Array | tuple[jax.Array, ...]
  values: jax.Array | tuple[jax.Array, ...]
  start_B: jax.Array  # int32


def init_cache(decoding: DecodeModel, batch: int, cache_len: int, start_B) -> KVCache:
  """An empty cache of `cache_len` slots for `batch` rows whose real tokens start at `start_B`."""
  cfg = decoding.cfg
  rows, row_names = ((batch,), ("act_batch",)) if batch > 1 else ((), ())
  key_names = (*row_names, "act_heads", None, "act_len")
  value_names = (*row_names, "act_heads", "act_len", None)
  key = constrain(jnp.zeros((*rows, cfg.num_heads, cfg.head_dim, cache_len), cfg.dtype), key_names)
  value = constrain(
    jnp.zeros((*rows, cfg.num_heads, cache_len, cfg.head_dim), cfg.dtype), value_names
  )
  if cfg.scan_layers:
    stacked = lambda x, names: constrain(jnp.stack([x] * cfg.num_layers), ("layers", *names))
    keys, values = stacked(key, key_names), stacked(value, value_names)
  else:
    keys, values = (key,) * cfg.num_layers, (value,) * cfg.num_layers
  return KVCache(keys, values, jnp.asarray(start_B, jnp.int32))


def extend(decoding: DecodeModel, inputs_BT, positions_BT, cache: KVCache, index):
  """(final hidden states [B, T, D], cache) for T tokens written at slots index..index+T-1.

  Prefill is one call over the left-padded prompts at index 0; each decode step is one more with
  T = 1. Each token attends to its row's real slots up to its own.
  """
  cfg, w = decoding
  x_BTD = (w.token_VD[inputs_BT] + w.position_PD[positions_BT]).astype(cfg.dtype)
  x_BTD = constrain(x_BTD, ("act_batch", "act_len", "act_embed"))
  t, s = inputs_BT.shape[1], jax.tree.leaves(cache.values)[0].shape[-2]
  query_slot_T1 = index + jnp.arange(t)[:, None]
  key_slot_S = jnp.arange(s)
  mask_BTS = (key_slot_S <= query_slot_T1) & (key_slot_S >= cache.start_B[:, None, None])
  block = functools.partial(_block, cfg, index=index, mask_BTS=mask_BTS)
  if cfg.scan_layers:

    def scanned(x_BTD, layer):
      x_BTD, key, value = block(layer[0], x_BTD, *layer[1:])
      return x_BTD, (key, value)

    x_BTD, (keys, values) = jax.lax.scan(scanned, x_BTD, (w.layers, cache.keys, cache.values))
  else:
    keys, values = [], []
    for layer, key, value in zip(w.layers, cache.keys, cache.values, strict=True):
      x_BTD, key, value = block(layer, x_BTD, key, value)
      keys.append(key)
      values.append(value)
    keys, values = tuple(keys), tuple(values)
  return _layer_norm(cfg, x_BTD, w.final_norm), cache._replace(keys=keys, values=values)


def logits(decoding: DecodeModel, x_BxD):
  """Next-token logits in float32 from final hidden states, padding ids masked."""
  cfg, w = decoding
  logits_BxV = jnp.einsum(
    "...D,VD->...V", x_BxD.astype(cfg.dtype), w.token_VD.astype(cfg.dtype),
    preferred_element_type=jnp.float32,
  )  # fmt: skip
  return mask_padding_ids(logits_BxV, cfg)


def _layer_norm(cfg: ModelConfig, x_BxD, scale_bias):
  """nnx.LayerNorm's computation (float32, fast variance), back in x's dtype."""
  scale_D, bias_D = scale_bias
  x32_BxD = x_BxD.astype(jnp.float32)
  mean_Bx1 = x32_BxD.mean(-1, keepdims=True)
  var_Bx1 = jnp.maximum((x32_BxD * x32_BxD).mean(-1, keepdims=True) - mean_Bx1 * mean_Bx1, 0.0)
  scale_BxD = jax.lax.rsqrt(var_Bx1 + cfg.layer_norm_epsilon) * scale_D
  return ((x32_BxD - mean_Bx1) * scale_BxD + bias_D).astype(x_BxD.dtype)


def _block(cfg: ModelConfig, w: LayerWeights, x_BTD, key, value, *, index, mask_BTS):
  """One pre-LN block over the new tokens, reading and extending its layer of the cache."""
  h_BTD, key, value = _attention(cfg, w, _layer_norm(cfg, x_BTD, w.attention_norm), key, value,
                                 index, mask_BTS)  # fmt: skip
  x_BTD = x_BTD + h_BTD
  h_BTD = _layer_norm(cfg, x_BTD, w.mlp_norm)
  h_BTF = gelu(jnp.einsum("BTD,FD->BTF", h_BTD, w.fc_FD) + w.fc_bias_F, cfg.gelu)
  h_BTF = constrain(h_BTF, ("act_batch", "act_len", "act_mlp"))
  x_BTD = x_BTD + jnp.einsum("BTF,DF->BTD", h_BTF, w.proj_DF) + w.proj_bias_D
  return constrain(x_BTD, ("act_batch", "act_len", "act_embed")), key, value


def _attention(cfg: ModelConfig, w: LayerWeights, x_BTD, key, value, index, mask_BTS):
  """Attention of T new tokens written at slot `index` onto every valid slot of the cache."""
  (b, t, _), n, h = x_BTD.shape, cfg.num_heads, cfg.head_dim
  qkv_BTE = jnp.einsum("BTD,ED->BTE", x_BTD, w.qkv_ED) + w.qkv_bias_E
  qkv_BTNKH = constrain(qkv_BTE.reshape(b, t, n, 3, h),
                        ("act_batch", "act_len", "act_heads", None, None))  # fmt: skip
  q_BTNH = qkv_BTNKH[:, :, :, 0]
  k_BNHT = qkv_BTNKH[:, :, :, 1].transpose(0, 2, 3, 1).astype(key.dtype)
  v_BNTH = qkv_BTNKH[:, :, :, 2].transpose(0, 2, 1, 3).astype(value.dtype)
  one_row = key.ndim == 3  # kept without its B axis (see KVCache)
  rows = () if one_row else (0,)
  key = jax.lax.dynamic_update_slice(key, k_BNHT[0] if one_row else k_BNHT, (*rows, 0, 0, index))
  value = jax.lax.dynamic_update_slice(
    value, v_BNTH[0] if one_row else v_BNTH, (*rows, 0, index, 0)
  )  # fmt: skip
  key_BNHS, value_BNSH = (key[None], value[None]) if one_row else (key, value)
  scores_BNTS = jnp.einsum(
    "BTNH,BNHS->BNTS", q_BTNH, key_BNHS, preferred_element_type=jnp.float32
  ) * (1.0 / math.sqrt(h))
  scores_BNTS = jnp.where(mask_BTS[:, None], scores_BNTS, PADDING_LOGIT)
  probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1).astype(value_BNSH.dtype)
  out_BTNH = jnp.einsum("BNTS,BNSH->BTNH", probs_BNTS, value_BNSH)
  out_BTE = constrain(out_BTNH, ("act_batch", "act_len", "act_heads", None)).reshape(b, t, -1)
  return jnp.einsum("BTE,DE->BTD", out_BTE, w.out_DE) + w.out_bias_D, key, value
