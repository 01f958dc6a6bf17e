"""The KV cache of generation and what every family's decoder does with it: the attention of new
tokens onto their row's cached slots, the loop over the layers, the norms of decoding.

The families' decoders (inference/decoder.py: GPT-2; inference/llama_decoder.py: Llama) hold
their weights in decoding layout and their blocks; both fuse the attention's input projection into
one [E, D] kernel in the layout `split_qkv` reads, and keep the cache of KVCache.

Einsum letters as in models/transformer.py, plus K key/value heads and G = N / K query heads per
key/value head (grouped-query attention: query head n reads key/value head n // G, as
models/attention.repeat_kv repeats them; GPT-2 has K = N, G = 1), C = G + 2, a group's query
heads, its key and its value in the fused projection, and M = G * T, a group's queries. The cache
holds K heads, never N: grouped queries read their group's head in place, without repeated copies
of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sslm_jax.models.config import ModelConfig
from sslm_jax.models.layers import PADDING_LOGIT, constrain


class KVCache(NamedTuple):
  """Keys and values of every layer, in `cache_len` static slots per row.

  Keys are [B, K, H, S] and values [B, K, S, H], the layouts the two attention products read
  without transposing the cache; a single row drops its B axis (with it, XLA:CPU copied the whole
  cache at every step). Stacked [L, ...] when the layers are scanned, else tuples of L arrays.
  Prompts are left-padded to end at the same slot: row b holds real tokens from slot
  `start_B[b]` up to the last slot written; the slots before it are never attended to.
  """

  keys: jax.Array | tuple[jax.Array, ...]
  values: jax.Array | tuple[jax.Array, ...]
  start_B: jax.Array  # int32


def init_cache(cfg: ModelConfig, batch: int, cache_len: int, start_B) -> KVCache:
  """An empty cache of `cache_len` slots for `batch` rows whose real tokens start at `start_B`:
  cfg.kv_heads heads of keys and values per layer."""
  rows, row_names = ((batch,), ("act_batch",)) if batch > 1 else ((), ())
  key_names = (*row_names, "act_heads", None, "act_len")
  value_names = (*row_names, "act_heads", "act_len", None)
  k, h = cfg.kv_heads, cfg.head_dim
  key = constrain(jnp.zeros((*rows, k, h, cache_len), cfg.dtype), key_names)
  value = constrain(jnp.zeros((*rows, k, cache_len, h), cfg.dtype), value_names)
  if cfg.scan_layers:
    stacked = lambda x, names: constrain(jnp.stack([x] * cfg.num_layers), ("layers", *names))
    keys, values = stacked(key, key_names), stacked(value, value_names)
  else:
    keys, values = (key,) * cfg.num_layers, (value,) * cfg.num_layers
  return KVCache(keys, values, jnp.asarray(start_B, jnp.int32))


def slot_mask(cache: KVCache, num_new: int, index):
  """[B, T, S]: the slots each of `num_new` tokens written from slot `index` attends to, its
  row's real slots up to its own."""
  s = jax.tree.leaves(cache.values)[0].shape[-2]
  query_slot_T1 = index + jnp.arange(num_new)[:, None]
  key_slot_S = jnp.arange(s)
  return (key_slot_S <= query_slot_T1) & (key_slot_S >= cache.start_B[:, None, None])


def split_qkv(cfg: ModelConfig, qkv_BTE):
  """(q [B, T, K, G, H], k [B, T, K, H], v [B, T, K, H]) of the fused projection, whose output
  axis E = K * C * H holds per key/value head its G query heads, its key and its value."""
  b, t, _ = qkv_BTE.shape
  k, h = cfg.kv_heads, cfg.head_dim
  g = cfg.num_heads // k
  qkv_BTKCH = constrain(qkv_BTE.reshape(b, t, k, g + 2, h),
                        ("act_batch", "act_len", "act_heads", None, None))  # fmt: skip
  return qkv_BTKCH[:, :, :, :g], qkv_BTKCH[:, :, :, g], qkv_BTKCH[:, :, :, g + 1]


def attend(q_BTKGH, k_BTKH, v_BTKH, key, value, index, mask_BTS):
  """(attention output [B, T, N * H] with head n = k * G + g, key, value): the T new keys and
  values written into this layer's cache at slot `index`, then each query's attention onto its
  group's slots that `mask_BTS` keeps."""
  b, t, k, g, h = q_BTKGH.shape
  k_BKHT = k_BTKH.transpose(0, 2, 3, 1).astype(key.dtype)
  v_BKTH = v_BTKH.transpose(0, 2, 1, 3).astype(value.dtype)
  one_row = key.ndim == 3  # kept without its B axis (see KVCache)
  rows = () if one_row else (0,)
  key = jax.lax.dynamic_update_slice(key, k_BKHT[0] if one_row else k_BKHT, (*rows, 0, 0, index))
  value = jax.lax.dynamic_update_slice(
    value, v_BKTH[0] if one_row else v_BKTH, (*rows, 0, index, 0)
  )  # fmt: skip
  key_BKHS, value_BKSH = (key[None], value[None]) if one_row else (key, value)
  # A group's G query heads at T positions are M = G * T rows against one cached head: the
  # products read the cache in place as GPT-2's multi-head ones do (G = 1), never a copy of it.
  q_BKMH = q_BTKGH.transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
  scores_BKMS = jnp.einsum(
    "BKMH,BKHS->BKMS", q_BKMH, key_BKHS, preferred_element_type=jnp.float32
  ) * (1.0 / math.sqrt(h))
  mask_B1MS = jnp.broadcast_to(mask_BTS[:, None, None], (b, 1, g, t, mask_BTS.shape[-1]))
  scores_BKMS = jnp.where(mask_B1MS.reshape(b, 1, g * t, -1), scores_BKMS, PADDING_LOGIT)
  probs_BKMS = jax.nn.softmax(scores_BKMS, axis=-1).astype(value_BKSH.dtype)
  out_BMKH = jnp.einsum("BKMS,BKSH->BMKH", probs_BKMS, value_BKSH)
  out_BTKGH = out_BMKH.reshape(b, g, t, k, h).transpose(0, 2, 3, 1, 4)
  out_BTKGH = constrain(out_BTKGH, ("act_batch", "act_len", "act_heads", None, None))
  return out_BTKGH.reshape(b, t, -1), key, value


# block(layer weights, x_BTD, key, value) -> (x_BTD, key, value), one layer over the new tokens.
Block = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def run_layers(cfg: ModelConfig, block: Block, layers, x_BTD, cache: KVCache):
  """(x_BTD, cache) after every layer's `block`: a scan over stacked [L, ...] weights and cache
  when cfg.scan_layers, else a loop over their tuples."""
  if cfg.scan_layers:

    def scanned(x_BTD, layer):
      x_BTD, key, value = block(layer[0], x_BTD, *layer[1:])
      return x_BTD, (key, value)

    x_BTD, (keys, values) = jax.lax.scan(scanned, x_BTD, (layers, cache.keys, cache.values))
  else:
    keys, values = [], []
    for layer, key, value in zip(layers, cache.keys, cache.values, strict=True):
      x_BTD, key, value = block(layer, x_BTD, key, value)
      keys.append(key)
      values.append(value)
    keys, values = tuple(keys), tuple(values)
  return x_BTD, cache._replace(keys=keys, values=values)


def per_layer(cfg: ModelConfig, stacked: NamedTuple, names: NamedTuple):
  """Stacked [L, ...] layer weights as the decoder keeps them, each leaf constrained by its
  logical names (`names`: the same NamedTuple with a tuple of names per leaf, or a tuple of such
  tuples for a field holding several arrays): stacked when cfg.scan_layers, else a tuple of L
  single layers. A field that is None (an absent weight) stays None."""

  def constrained(pick, prefix):
    return type(stacked)(*(
      None if a is None
      else jax.tree.map(lambda x, ns: constrain(pick(x), (*prefix, *ns)), a, n, is_leaf=_is_names)
      for a, n in zip(stacked, names, strict=True)
    ))  # fmt: skip

  if cfg.scan_layers:
    return constrained(lambda x: x, ("layers",))
  return tuple(constrained(lambda x, i=i: x[i], ()) for i in range(cfg.num_layers))


def _is_names(x) -> bool:
  return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def layer_norm(cfg: ModelConfig, x_BxD, scale_D, bias_D):
  """nnx.LayerNorm's computation (float32, fast variance), back in x's dtype."""
  x32_BxD = x_BxD.astype(jnp.float32)
  mean_Bx1 = x32_BxD.mean(-1, keepdims=True)
  var_Bx1 = jnp.maximum((x32_BxD * x32_BxD).mean(-1, keepdims=True) - mean_Bx1 * mean_Bx1, 0.0)
  scale_BxD = jax.lax.rsqrt(var_Bx1 + cfg.layer_norm_epsilon) * scale_D
  return ((x32_BxD - mean_Bx1) * scale_BxD + bias_D).astype(x_BxD.dtype)


def rms_norm(cfg: ModelConfig, x_BxD, scale_D):
  """nnx.RMSNorm's computation over the last axis (float32), back in x's dtype."""
  x32_BxD = x_BxD.astype(jnp.float32)
  mean_square_Bx1 = (x32_BxD * x32_BxD).mean(-1, keepdims=True)
  scale_BxD = jax.lax.rsqrt(mean_square_Bx1 + cfg.layer_norm_epsilon) * scale_D
  return (x32_BxD * scale_BxD).astype(x_BxD.dtype)


def output_logits(cfg: ModelConfig, x_BxD, output_VD):
  """Logits in float32 of final hidden states projected onto `output_VD`, in the compute dtype."""
  return jnp.einsum(
    "...D,VD->...V", x_BxD.astype(cfg.dtype), output_VD.astype(cfg.dtype),
    preferred_element_type=jnp.float32,
  )  # fmt: skip
