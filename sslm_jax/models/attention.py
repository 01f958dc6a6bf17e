"""Self-attention over packed documents.

Einsum letters as in models/transformer.py; M is the most segments (documents) a row holds. Packed
rows reach the attention in the form its implementation takes, which `attention_segments` picks:
a dense [B, 1, T, S] segment mask (XLA), a `Packing` of segment lengths and offsets (cuDNN's
flash attention on GPU), or the [B, T] segment ids themselves (splash attention, the Pallas
TPU kernel in models/splash.py). Only the XLA path ever builds a [T, S] mask.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sslm_jax.models.config import ModelConfig
from sslm_jax.models.layers import PADDING_LOGIT, constrain, dense, dropout, rms_norm
from sslm_jax.models.rotary import Rotation, rotate


class Attention(nnx.Module):
  """Multi-head self-attention within packed segments (see `attention_segments`); causal for GPT."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if cfg.attention_dropout and cfg.attention_impl != "xla":  # config/checks.py says so to users
      raise ValueError(f"attention_dropout needs the XLA attention, not {cfg.attention_impl}")
    if cfg.windowed and cfg.attention_impl == "cudnn":  # likewise
      raise ValueError("a sliding window needs the XLA or splash attention, not cudnn")
    self.cfg = cfg
    d, n, h, k = cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.kv_heads
    bias = (lambda *shape: None) if cfg.rotary else (lambda *shape: shape)
    qkv = dict(names=("embed", "heads", "kv"), bias_names=("heads", "kv"), std=cfg.init_std)
    self.query = dense(cfg, "BTD,DNH->BTNH", (d, n, h), bias(n, h), **qkv, rngs=rngs)
    self.key = dense(cfg, "BTD,DNH->BTNH", (d, k, h), bias(k, h), **qkv, rngs=rngs)
    self.value = dense(cfg, "BTD,DNH->BTNH", (d, k, h), bias(k, h), **qkv, rngs=rngs)
    # GPT-2 scales residual projections by 1/sqrt(2L) at init.
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.causal else cfg.init_std
    self.out = dense(
      cfg, "BTNH,NHD->BTD", (n, h, d), bias(d), ("heads", "kv", "embed"), ("embed",),
      std=out_std, rngs=rngs,
    )  # fmt: skip
    if cfg.qk_norm:  # one RMSNorm over the head width, shared by the heads (Qwen3, OLMo-2 style)
      self.query_norm = rms_norm(cfg, h, ("kv",), rngs=rngs)
      self.key_norm = rms_norm(cfg, h, ("kv",), rngs=rngs)

  def __call__(self, x_BTD, segments, dropout_key=None, rot: Rotation | None = None, local=None):
    """`rot`: the rotary angles (rotary families); `local`: a traced bool, True in a layer that
    attends within cfg.sliding_window only."""
    names = ("act_batch", "act_len", "act_heads", None)
    cfg = self.cfg
    q_BTNH = constrain(self.query(x_BTD), names)
    k_BSKH = constrain(self.key(x_BTD), names)
    v_BSKH = constrain(self.value(x_BTD), names)
    if cfg.qk_norm:
      q_BTNH = self.query_norm(q_BTNH).astype(x_BTD.dtype)
      k_BSKH = self.key_norm(k_BSKH).astype(x_BTD.dtype)
    if rot is not None:
      q_BTNH, k_BSKH = rotate(q_BTNH, rot), rotate(k_BSKH, rot)
    if cfg.windowed and cfg.attention_impl == "xla":
      segments = window_mask(segments, cfg.sliding_window, local)
    # The kernels take the K key/value heads as they are (grouped-query attention), all but
    # the written-out dropout path.
    if cfg.attention_impl == "splash":
      # Imported here: only TPU programs (and their CPU tests) load the Pallas TPU kernels.
      from sslm_jax.models.splash import splash_attention

      out_BTNH = splash_attention(
        q_BTNH, k_BSKH, v_BSKH, segments, causal=cfg.causal,
        block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv,
        window=cfg.sliding_window, local=local,
      )  # fmt: skip
    elif isinstance(segments, Packing):
      out_BTNH = fused_packed_attention(q_BTNH, k_BSKH, v_BSKH, segments, causal=cfg.causal)
    elif dropout_key is not None and cfg.attention_dropout > 0:
      k_BSNH, v_BSNH = repeat_kv(k_BSKH, cfg), repeat_kv(v_BSKH, cfg)
      out_BTNH = dropout_attention(
        q_BTNH, k_BSNH, v_BSNH, segments, causal=cfg.causal, rate=cfg.attention_dropout,
        key=dropout_key,
      )  # fmt: skip
    else:
      out_BTNH = jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, mask=segments, is_causal=cfg.causal, implementation="xla"
      )
    return self.out(out_BTNH)


def repeat_kv(x_BSKH, cfg: ModelConfig):
  """Grouped keys or values repeated to one per query head (head n reads group n // (N / K)),
  for the written-out attention with dropout."""
  if cfg.kv_heads == cfg.num_heads:
    return x_BSKH
  return jnp.repeat(x_BSKH, cfg.num_heads // cfg.kv_heads, axis=2)


def window_mask(mask_B1TS, window: int, local):
  """The dense mask of a layer that may be windowed: where `local` holds, keys more than
  window // 2 positions from the query are dropped (ModernBERT's local attention)."""
  t, s = mask_B1TS.shape[-2:]
  distance_TS = jnp.abs(jnp.arange(t)[:, None] - jnp.arange(s)[None, :])
  near_TS = distance_TS <= window // 2
  return mask_B1TS & (near_TS | jnp.logical_not(local))


def dropout_attention(q_BTNH, k_BSNH, v_BSNH, mask_B1TS, *, causal: bool, rate: float, key):
  """XLA attention with dropout on its probabilities (BERT's attention_probs_dropout_prob).

  jax.nn.dot_product_attention has no dropout: this is its XLA path written out (float32 logits
  and softmax, the same mask), with inverted dropout between the softmax and the values. The
  bits come from `key` alone (threefry is partitionable), so no mesh changes them.
  """
  t, s = q_BTNH.shape[1], k_BSNH.shape[1]
  scale = 1.0 / math.sqrt(q_BTNH.shape[-1])
  logits_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH, preferred_element_type=jnp.float32)
  keep_B1TS = mask_B1TS & jnp.tril(jnp.ones((t, s), bool)) if causal else mask_B1TS
  logits_BNTS = jnp.where(keep_B1TS, logits_BNTS * scale, PADDING_LOGIT)
  probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1)
  probs_BNTS = constrain(probs_BNTS, ("act_batch", "act_heads", None, None))
  probs_BNTS = dropout(probs_BNTS, rate, key).astype(v_BSNH.dtype)
  return jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS, v_BSNH)


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
  """What each attention layer takes: a dense [B, 1, T, S] mask for XLA, a Packing for cuDNN,
  the [B, T] segment ids for splash."""
  if cfg.attention_impl == "cudnn":
    return packing(segment_ids_BT, max(2, cfg.max_segments))
  if cfg.attention_impl == "splash":
    return segment_ids_BT
  return segment_mask(segment_ids_BT)


def fused_packed_attention(q_BTNH, k_BSKH, v_BSKH, segments: Packing, *, causal: bool):
  """cuDNN flash attention over packed documents, given their lengths and offsets.

  jax.nn.dot_product_attention takes only one length per row, so packing goes through the
  kernel's own entry point, which JAX exposes under jax._src (checked against JAX 0.10). It
  takes K key/value heads for N query heads (grouped-query attention: its key gradient has K
  heads), as jax.nn.dot_product_attention's cuDNN path passes them. Its sliding window
  (sliding_window_length) is a left window only, so ModernBERT's two-sided one is not passed:
  config/checks.py refuses cudnn for windowed models.
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn

  mask_type = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
  return cudnn.dot_product_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    q_seqlen=segments.lengths_BM,
    kv_seqlen=segments.lengths_BM,
    q_offsets=segments.offsets_BM1,
    kv_offsets=segments.offsets_BM1,
    scale=1.0 / math.sqrt(q_BTNH.shape[-1]),
    mask_type=mask_type,
    qkv_layout="BTNH",
  )
