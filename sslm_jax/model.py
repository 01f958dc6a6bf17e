"""GPT-2 and BERT Transformers in Flax NNX, sharing one block.

Einsum letters: B batch, T query positions, S key positions, D model width,
N heads, H head dim, F MLP hidden, V vocab, P gathered (masked) positions,
L layers.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`,
`mlp`, `layers`, `position`, `token_type`); activations are constrained with
`act_*` names. Mapping names to mesh axes is the job of `sharding.py`; this
module never sees a mesh axis name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd

Objective = Literal["causal_lm", "masked_lm"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static model hyperparameters; hashable so it can be closed over by jit."""

  objective: Objective
  vocab_size: int  # embedding rows, padded to model.vocab_multiple (see config.py)
  max_len: int
  num_layers: int
  num_heads: int
  emb_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  layer_norm_epsilon: float = 1e-5
  num_token_types: int = 2
  init_std: float = 0.02
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"  # 'xla' | 'cudnn' (config.attention_impl resolves 'auto')
  # cuDNN's packed layout holds this many documents per row (config.py measures it on the data).
  max_segments: int = 1
  real_vocab_size: int = 0  # the tokenizer's ids; rows past it are padding, masked in logits
  gelu: str = "erf"  # 'erf' (BERT) | 'tanh' (GPT-2's approximation, Hugging Face's gelu_new)

  @property
  def num_ids(self) -> int:
    """Ids the model may predict: the tokenizer's, never the padding rows."""
    return self.real_vocab_size or self.vocab_size

  @property
  def causal(self) -> bool:
    return self.objective == "causal_lm"

  @property
  def head_dim(self) -> int:
    return self.emb_dim // self.num_heads


def constrain(x, logical_names: tuple[str | None, ...]):
  """Sharding constraint by logical names; a no-op outside a rules context."""
  rules = flax_spmd.get_logical_axis_rules()
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return x
  spec = jax.sharding.PartitionSpec(*flax_spmd.from_sharding_rules(logical_names, rules))
  return jax.lax.with_sharding_constraint(x, spec)


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


def _dense(cfg, spec, kernel_shape, bias_shape, names, bias_names, *, std, rngs):
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


def _layer_norm(cfg, *, rngs):
  return nnx.LayerNorm(
    cfg.emb_dim,
    epsilon=cfg.layer_norm_epsilon,
    dtype=jnp.float32,
    param_dtype=cfg.param_dtype,
    scale_metadata={"out_sharding": ("embed",)},
    bias_metadata={"out_sharding": ("embed",)},
    rngs=rngs,
  )


class Attention(nnx.Module):
  """Multi-head self-attention within packed segments (see `attention_segments`); causal for GPT."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, n, h = cfg.emb_dim, cfg.num_heads, cfg.head_dim
    qkv = dict(names=("embed", "heads", "kv"), bias_names=("heads", "kv"), std=cfg.init_std)
    self.query = _dense(cfg, "BTD,DNH->BTNH", (d, n, h), (n, h), **qkv, rngs=rngs)
    self.key = _dense(cfg, "BTD,DNH->BTNH", (d, n, h), (n, h), **qkv, rngs=rngs)
    self.value = _dense(cfg, "BTD,DNH->BTNH", (d, n, h), (n, h), **qkv, rngs=rngs)
    # GPT-2 scales residual projections by 1/sqrt(2L) at init.
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.causal else cfg.init_std
    self.out = _dense(
      cfg, "BTNH,NHD->BTD", (n, h, d), (d,), ("heads", "kv", "embed"), ("embed",),
      std=out_std, rngs=rngs,
    )  # fmt: skip

  def __call__(self, x_BTD, segments):
    names = ("act_batch", "act_len", "act_heads", None)
    q_BTNH = constrain(self.query(x_BTD), names)
    k_BSNH = constrain(self.key(x_BTD), names)
    v_BSNH = constrain(self.value(x_BTD), names)
    if isinstance(segments, Packing):
      out_BTNH = fused_packed_attention(q_BTNH, k_BSNH, v_BSNH, segments, causal=self.cfg.causal)
    else:
      out_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BSNH, v_BSNH, mask=segments, is_causal=self.cfg.causal, implementation="xla"
      )
    return self.out(out_BTNH)

  def cached(self, x_BTD, key_BNHS, value_BNSH, index, mask_B1TS):
    """Attention of T new tokens written at cache slot `index` onto every valid slot.

    Plain einsums whatever `attention_impl`: T is 1 per decode step, and the mask is a slot
    mask. Keys are kept [B, N, H, S] and values [B, N, S, H], the layouts the two products
    read without transposing the cache every step.
    """
    names = ("act_batch", "act_len", "act_heads", None)
    q_BTNH = constrain(self.query(x_BTD), names)
    k_BNHT = self.key(x_BTD).astype(key_BNHS.dtype).transpose(0, 2, 3, 1)
    v_BNTH = self.value(x_BTD).astype(value_BNSH.dtype).transpose(0, 2, 1, 3)
    key_BNHS = jax.lax.dynamic_update_slice(key_BNHS, k_BNHT, (0, 0, 0, index))
    value_BNSH = jax.lax.dynamic_update_slice(value_BNSH, v_BNTH, (0, 0, index, 0))
    scale = 1.0 / math.sqrt(q_BTNH.shape[-1])
    scores_BNTS = jnp.einsum(
      "BTNH,BNHS->BNTS", q_BTNH, key_BNHS, preferred_element_type=jnp.float32
    )
    scores_BNTS = jnp.where(mask_B1TS, scores_BNTS * scale, PADDING_LOGIT)
    probs_BNTS = jax.nn.softmax(scores_BNTS, axis=-1).astype(value_BNSH.dtype)
    out_BNTH = jnp.einsum("BNTS,BNSH->BNTH", probs_BNTS, value_BNSH)
    out_BTD = jnp.einsum("BNTH,NHD->BTD", out_BNTH, self.out.kernel[...].astype(out_BNTH.dtype))
    return out_BTD + self.out.bias[...].astype(out_BTD.dtype), key_BNHS, value_BNSH


class Mlp(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f = cfg.emb_dim, cfg.mlp_dim
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.causal else cfg.init_std
    self.fc = _dense(
      cfg, "BTD,DF->BTF", (d, f), (f,), ("embed", "mlp"), ("mlp",), std=cfg.init_std, rngs=rngs
    )
    self.proj = _dense(
      cfg, "BTF,FD->BTD", (f, d), (d,), ("mlp", "embed"), ("embed",), std=out_std, rngs=rngs
    )

  def __call__(self, x_BTD):
    h_BTF = constrain(gelu(self.fc(x_BTD), self.cfg.gelu), ("act_batch", "act_len", "act_mlp"))
    return self.proj(h_BTF)


class Block(nnx.Module):
  """One Transformer layer: pre-LayerNorm (GPT-2) when causal, post-LayerNorm (BERT) otherwise."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attention_norm = _layer_norm(cfg, rngs=rngs)
    self.attention = Attention(cfg, rngs=rngs)
    self.mlp_norm = _layer_norm(cfg, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_BTD, segments, dropout_key=None):
    rate, dt = self.cfg.dropout_rate, x_BTD.dtype
    k_attn, k_mlp = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    if self.cfg.causal:
      h = self.attention(self.attention_norm(x_BTD).astype(dt), segments)
      x_BTD = x_BTD + dropout(h, rate, k_attn)
      h = self.mlp(self.mlp_norm(x_BTD).astype(dt))
      x_BTD = x_BTD + dropout(h, rate, k_mlp)
    else:
      h = self.attention(x_BTD, segments)
      x_BTD = self.attention_norm(x_BTD + dropout(h, rate, k_attn)).astype(dt)
      h = self.mlp(x_BTD)
      x_BTD = self.mlp_norm(x_BTD + dropout(h, rate, k_mlp)).astype(dt)
    return constrain(x_BTD, ("act_batch", "act_len", "act_embed"))

  def cached(self, x_BTD, key_BNHS, value_BNSH, index, mask_B1TS):
    """The causal (pre-LN) block over new tokens, reading and extending one layer's cache."""
    dt = x_BTD.dtype
    h, key_BNHS, value_BNSH = self.attention.cached(
      self.attention_norm(x_BTD).astype(dt), key_BNHS, value_BNSH, index, mask_B1TS
    )
    x_BTD = x_BTD + h
    x_BTD = x_BTD + self.mlp(self.mlp_norm(x_BTD).astype(dt))
    return constrain(x_BTD, ("act_batch", "act_len", "act_embed")), key_BNHS, value_BNSH


_REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Stack(nnx.Module):
  """`num_layers` blocks stored with a leading `layers` axis and run with nnx.scan.

  One parameter layout whatever the execution: `scan_layers=False` fully unrolls
  the scan (faster steps on some backends, compile time grows with depth).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)

  def __call__(self, x_BTD, segments, dropout_key=None):
    cfg = self.cfg
    keys_L = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)

    def layer(block, x_BTD, key):
      return block(x_BTD, segments, key)

    if cfg.remat_policy != "none":
      layer = nnx.remat(layer, policy=_REMAT_POLICIES[cfg.remat_policy])

    @nnx.scan(
      in_axes=(0, nnx.Carry, 0 if keys_L is not None else None),
      out_axes=nnx.Carry,
      unroll=1 if cfg.scan_layers else cfg.num_layers,
      transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    def run(block, x_BTD, key):
      return layer(block, x_BTD, key)

    return run(self.blocks, x_BTD, keys_L)

  def unstacked(self) -> Layers:
    """The blocks as separate modules. A decode loop slices the stacked weights once, before
    it starts, instead of copying every layer's weights out of the stack at every step."""
    graphdef, state = nnx.split(self.blocks)
    return Layers([
      nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
      for i in range(self.cfg.num_layers)
    ])  # fmt: skip

  def cached(self, x_BTD, cache: KVCache, index, mask_B1TS, layers: Layers | None = None):
    """The blocks over new tokens with their layer of the cache: scanned over the stacked
    blocks and cache, or, given `layers` and a cache of per-layer tuples, one after another."""
    if layers is not None:
      keys, values = [], []
      for block, key_BNHS, value_BNSH in zip(layers.blocks, cache.keys, cache.values, strict=True):
        x_BTD, key_BNHS, value_BNSH = block.cached(x_BTD, key_BNHS, value_BNSH, index, mask_B1TS)
        keys.append(key_BNHS)
        values.append(value_BNSH)
      return x_BTD, cache._replace(keys=tuple(keys), values=tuple(values))

    @nnx.scan(
      in_axes=(0, nnx.Carry, 0, 0),
      out_axes=(nnx.Carry, 0, 0),
      unroll=1 if self.cfg.scan_layers else self.cfg.num_layers,
      transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    def run(block, x_BTD, key_BNHS, value_BNSH):
      return block.cached(x_BTD, key_BNHS, value_BNSH, index, mask_B1TS)

    x_BTD, keys, values = run(self.blocks, x_BTD, cache.keys, cache.values)
    return x_BTD, cache._replace(keys=keys, values=values)


class Layers(nnx.Module):
  """A Stack's blocks as L separate modules (see Stack.unstacked)."""

  def __init__(self, blocks: list[Block]):
    self.blocks = nnx.List(blocks)


class KVCache(NamedTuple):
  """Keys and values of every layer for generation, in `cache_len` static slots per row.

  Keys are [L, B, N, H, S] and values [L, B, N, S, H], or tuples of L such [B, ...] arrays
  for the unstacked layers. Prompts are left-padded so that they end at the same slot: row b
  holds real tokens from slot `start_B[b]` up to the last slot written; slots before it are
  padding and never attended to.
  """

  keys: jax.Array | tuple[jax.Array, ...]
  values: jax.Array | tuple[jax.Array, ...]
  start_B: jax.Array  # int32


KEY_CACHE_NAMES = ("act_batch", "act_heads", None, "act_len")
VALUE_CACHE_NAMES = ("act_batch", "act_heads", "act_len", None)


def segment_mask(segment_ids_BT):
  """[B, 1, T, S]: same packed segment and not padding (id 0). Causality is the attention's."""
  same_B1TS = segment_ids_BT[:, None, :, None] == segment_ids_BT[:, None, None, :]
  return same_B1TS & (segment_ids_BT[:, None, None, :] > 0)


class Packing(NamedTuple):
  """Packed documents as cuDNN's flash attention takes them: per row, the length and the start
  of each segment, -1 past the row's last one. The kernel never sees a [T, S] mask."""

  lengths_BM: jax.Array
  offsets_BM1: jax.Array  # M + 1 columns, as the kernel's API asks; the last is always -1


def packing(segment_ids_BT, max_segments: int) -> Packing:
  """Lengths and starts of the runs of equal nonzero ids in each row (id 0 is padding).

  Runs past the first `max_segments` of a row are dropped (their tokens attend to nothing):
  the caller sizes `max_segments` from the data (config.max_segments_per_row).
  """
  b, t = segment_ids_BT.shape
  m = max_segments
  prev_BT = jnp.pad(segment_ids_BT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  real_BT = segment_ids_BT > 0
  starts_BT = real_BT & (segment_ids_BT != prev_BT)
  slot_BT = jnp.where(real_BT, jnp.cumsum(starts_BT, axis=1) - 1, m)  # m: dropped
  rows_B1 = jnp.arange(b)[:, None]
  lengths_BM = jnp.zeros((b, m), jnp.int32).at[rows_B1, slot_BT].add(1, mode="drop")
  t_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  offsets_BM = jnp.full((b, m), t, jnp.int32).at[rows_B1, slot_BT].min(t_BT, mode="drop")
  used_BM = lengths_BM > 0
  lengths_BM = jnp.where(used_BM, lengths_BM, -1)
  offsets_BM = jnp.where(used_BM, offsets_BM, -1)
  return Packing(lengths_BM, jnp.pad(offsets_BM, ((0, 0), (0, 1)), constant_values=-1))


def attention_segments(cfg: ModelConfig, segment_ids_BT):
  """What each attention layer takes: a dense [B, 1, T, S] mask for XLA, a Packing for cuDNN."""
  if cfg.attention_impl == "cudnn":
    return packing(segment_ids_BT, max(2, cfg.max_segments))
  return segment_mask(segment_ids_BT)


def fused_packed_attention(q_BTNH, k_BSNH, v_BSNH, segments: Packing, *, causal: bool):
  """cuDNN flash attention over packed documents, given their lengths and offsets.

  jax.nn.dot_product_attention takes only one length per row, so packing goes through the
  kernel's own entry point, which JAX exposes under jax._src (checked against JAX 0.10).
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn

  mask_type = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
  return cudnn.dot_product_attention(
    q_BTNH,
    k_BSNH,
    v_BSNH,
    q_seqlen=segments.lengths_BM,
    kv_seqlen=segments.lengths_BM,
    q_offsets=segments.offsets_BM1,
    kv_offsets=segments.offsets_BM1,
    scale=1.0 / math.sqrt(q_BTNH.shape[-1]),
    mask_type=mask_type,
    qkv_layout="BTNH",
  )


def _embed(cfg, num, names, std, *, rngs):
  return nnx.Embed(
    num,
    cfg.emb_dim,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    embedding_init=_normal(std),
    embedding_metadata={"out_sharding": names},
    rngs=rngs,
  )


def _tied_logits(x_BxD, embedding_VD, dtype):
  """Output projection onto the input embedding, in float32 for the softmax."""
  return jnp.einsum(
    "...D,VD->...V",
    x_BxD.astype(dtype),
    embedding_VD.astype(dtype),
    preferred_element_type=jnp.float32,
  )


# Far below any real logit, yet finite: exp() of it is exactly 0 and p * log p stays 0, not NaN.
PADDING_LOGIT = -1e9


def mask_padding_ids(logits_BxV, cfg: ModelConfig):
  """Padding rows of the embedding (ids >= the tokenizer's) get PADDING_LOGIT: they take no
  part in the softmax of the loss, eval, sampling or mask filling."""
  if cfg.num_ids >= logits_BxV.shape[-1]:
    return logits_BxV
  return jnp.where(jnp.arange(logits_BxV.shape[-1]) < cfg.num_ids, logits_BxV, PADDING_LOGIT)


class GPT(nnx.Module):
  """GPT-2: learned absolute positions, pre-LN blocks, final LN, tied output embedding."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.token_embed = _embed(cfg, cfg.vocab_size, ("vocab", "embed"), cfg.init_std, rngs=rngs)
    self.position_embed = _embed(cfg, cfg.max_len, ("position", "embed"), 0.01, rngs=rngs)
    self.stack = Stack(cfg, rngs=rngs)
    self.final_norm = _layer_norm(cfg, rngs=rngs)

  def hidden(self, inputs_BT, positions_BT, segment_ids_BT, dropout_key=None):
    cfg = self.cfg
    k_embed, k_stack = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    x_BTD = self.token_embed(inputs_BT) + self.position_embed(positions_BT)
    x_BTD = dropout(x_BTD.astype(cfg.dtype), cfg.dropout_rate, k_embed)
    x_BTD = constrain(x_BTD, ("act_batch", "act_len", "act_embed"))
    x_BTD = self.stack(x_BTD, attention_segments(cfg, segment_ids_BT), k_stack)
    return self.final_norm(x_BTD)

  def __call__(self, inputs_BT, positions_BT, segment_ids_BT, dropout_key=None):
    """Next-token logits [B, T, V] in float32."""
    x_BTD = self.hidden(inputs_BT, positions_BT, segment_ids_BT, dropout_key)
    logits_BTV = _tied_logits(x_BTD, self.token_embed.embedding[...], self.cfg.dtype)
    logits_BTV = mask_padding_ids(logits_BTV, self.cfg)
    return constrain(logits_BTV, ("act_batch", "act_len", "act_vocab"))

  def init_cache(self, batch: int, cache_len: int, start_B, per_layer: bool = False) -> KVCache:
    """An empty cache of `cache_len` slots for `batch` rows whose real tokens start at `start_B`:
    stacked over layers, or tuples of per-layer arrays for `extend(..., layers=...)`."""
    cfg = self.cfg
    n, h, s = cfg.num_heads, cfg.head_dim, cache_len
    key, value = jnp.zeros((batch, n, h, s), cfg.dtype), jnp.zeros((batch, n, s, h), cfg.dtype)
    if per_layer:
      keys = tuple(constrain(key, KEY_CACHE_NAMES) for _ in range(cfg.num_layers))
      values = tuple(constrain(value, VALUE_CACHE_NAMES) for _ in range(cfg.num_layers))
    else:
      stacked = lambda x, names: constrain(jnp.stack([x] * cfg.num_layers), ("layers", *names))
      keys, values = stacked(key, KEY_CACHE_NAMES), stacked(value, VALUE_CACHE_NAMES)
    return KVCache(keys, values, jnp.asarray(start_B, jnp.int32))

  def extend(self, inputs_BT, positions_BT, cache: KVCache, index, layers: Layers | None = None):
    """(final hidden states [B, T, D], cache) for T tokens written at slots index..index+T-1.

    Prefill is one call over the left-padded prompts at index 0; each decode step is one more
    with T = 1. Each token attends to its row's real slots up to its own. With `layers` (from
    `self.stack.unstacked()`) the cache holds per-layer tuples (see init_cache).
    """
    cfg = self.cfg
    x_BTD = self.token_embed(inputs_BT) + self.position_embed(positions_BT)
    x_BTD = constrain(x_BTD.astype(cfg.dtype), ("act_batch", "act_len", "act_embed"))
    t, s = inputs_BT.shape[1], jax.tree.leaves(cache.values)[0].shape[-2]
    query_slot_T1 = index + jnp.arange(t)[:, None]
    key_slot_S = jnp.arange(s)
    mask_BTS = (key_slot_S <= query_slot_T1) & (key_slot_S >= cache.start_B[:, None, None])
    x_BTD, cache = self.stack.cached(x_BTD, cache, index, mask_BTS[:, None], layers)
    return self.final_norm(x_BTD), cache

  def logits(self, x_BxD):
    """Next-token logits in float32 from final hidden states, padding ids masked."""
    logits_BxV = _tied_logits(x_BxD, self.token_embed.embedding[...], self.cfg.dtype)
    return mask_padding_ids(logits_BxV, self.cfg)


class MlmHead(nnx.Module):
  """BERT's prediction head: dense + GELU + LayerNorm, then the tied decoder plus a bias."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.emb_dim
    self.transform = _dense(
      cfg, "BPD,DE->BPE", (d, d), (d,), ("embed", "mlp"), ("mlp",), std=cfg.init_std, rngs=rngs
    )
    self.norm = _layer_norm(cfg, rngs=rngs)
    self.decoder_bias = nnx.Param(
      jnp.zeros((cfg.vocab_size,), cfg.param_dtype), out_sharding=("vocab",)
    )

  def __call__(self, x_BPD, embedding_VD, dtype):
    h_BPD = self.norm(gelu(self.transform(x_BPD), self.cfg.gelu))
    logits_BPV = _tied_logits(h_BPD, embedding_VD, dtype) + self.decoder_bias[...].astype(
      jnp.float32
    )
    return mask_padding_ids(logits_BPV, self.cfg)


class BERT(nnx.Module):
  """BERT: token + position + token-type embeddings, post-LN blocks, MLM head on masked slots."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    std = cfg.init_std
    self.token_embed = _embed(cfg, cfg.vocab_size, ("vocab", "embed"), std, rngs=rngs)
    self.position_embed = _embed(cfg, cfg.max_len, ("position", "embed"), std, rngs=rngs)
    self.token_type_embed = _embed(
      cfg, cfg.num_token_types, ("token_type", "embed"), std, rngs=rngs
    )
    self.embed_norm = _layer_norm(cfg, rngs=rngs)
    self.stack = Stack(cfg, rngs=rngs)
    self.mlm_head = MlmHead(cfg, rngs=rngs)

  def hidden(self, inputs_BT, positions_BT, segment_ids_BT, dropout_key=None, token_types_BT=None):
    """Contextual hidden states [B, T, D] (bidirectional within each packed segment)."""
    cfg = self.cfg
    k_embed, k_stack = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    if token_types_BT is None:
      token_types_BT = jnp.zeros_like(inputs_BT)
    x_BTD = (
      self.token_embed(inputs_BT)
      + self.position_embed(positions_BT)
      + self.token_type_embed(token_types_BT)
    )
    x_BTD = dropout(self.embed_norm(x_BTD).astype(cfg.dtype), cfg.dropout_rate, k_embed)
    x_BTD = constrain(x_BTD, ("act_batch", "act_len", "act_embed"))
    return self.stack(x_BTD, attention_segments(cfg, segment_ids_BT), k_stack)

  def __call__(
    self,
    inputs_BT,
    positions_BT,
    segment_ids_BT,
    masked_positions_BP,
    dropout_key=None,
    token_types_BT=None,
  ):
    """Logits [B, P, V] in float32 at the P gathered (masked) positions only.

    `token_types_BT` tells the sentences of a pair apart (0 first, 1 second); zeros if None.
    """
    x_BTD = self.hidden(inputs_BT, positions_BT, segment_ids_BT, dropout_key, token_types_BT)
    x_BPD = jnp.take_along_axis(x_BTD, masked_positions_BP[..., None], axis=1)
    return self.mlm_head(x_BPD, self.token_embed.embedding[...], self.cfg.dtype)


def build(cfg: ModelConfig, seed: int) -> GPT | BERT:
  """A fresh model. Shardings are applied by the caller (see train_state.py)."""
  cls = GPT if cfg.causal else BERT
  with nnx.use_eager_sharding(False):
    return cls(cfg, rngs=nnx.Rngs(params=seed))


def count_params(state) -> int:
  return sum(x.size for x in jax.tree.leaves(state))
