"""GPT-2 and BERT Transformers in Flax NNX, sharing one block, and the Llama and ModernBERT
families built on them from the rotary blocks of models/modern.py.

The block's self-attention is in models/attention.py, generation's forward pass and KV cache in
inference/decoder.py; the sharding constraint,
dropout, GELU and the parameterised layers both modules build on are in models/layers.py.

Einsum letters: B batch, T query positions, S key positions, D model width,
N heads, H head dim, F MLP hidden, V vocab, P gathered (masked) positions,
L layers.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`,
`mlp`, `layers`, `position`, `token_type`); activations are constrained with
`act_*` names. Mapping names to mesh axes is the job of `training/sharding.py`; this
module never sees a mesh axis name.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from sslm_jax.models import layers, modern
from sslm_jax.models.attention import Attention, attention_segments
from sslm_jax.models.config import ModelConfig
from sslm_jax.models.layers import PADDING_LOGIT, constrain, dense, dropout, embed, gelu, layer_norm


class Mlp(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f = cfg.emb_dim, cfg.mlp_dim
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.causal else cfg.init_std
    self.fc = dense(
      cfg, "BTD,DF->BTF", (d, f), (f,), ("embed", "mlp"), ("mlp",), std=cfg.init_std, rngs=rngs
    )
    self.proj = dense(
      cfg, "BTF,FD->BTD", (f, d), (d,), ("mlp", "embed"), ("embed",), std=out_std, rngs=rngs
    )

  def __call__(self, x_BTD):
    h_BTF = constrain(gelu(self.fc(x_BTD), self.cfg.gelu), ("act_batch", "act_len", "act_mlp"))
    return self.proj(h_BTF)


class Block(nnx.Module):
  """One Transformer layer: pre-LayerNorm (GPT-2) when causal, post-LayerNorm (BERT) otherwise."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attention_norm = layer_norm(cfg, rngs=rngs)
    self.attention = Attention(cfg, rngs=rngs)
    self.mlp_norm = layer_norm(cfg, rngs=rngs)
    self.mlp = Mlp(cfg, rngs=rngs)

  def __call__(self, x_BTD, segments, dropout_key=None, layer_index=None, rotations=None):
    del layer_index, rotations  # the same in every GPT-2 and BERT layer; no rotary positions
    rate, dt = self.cfg.dropout_rate, x_BTD.dtype
    # A 3-way split keeps the first two keys of a 2-way one: residual dropout bits are unchanged.
    keys = (None,) * 3 if dropout_key is None else jax.random.split(dropout_key, 3)
    k_attn, k_mlp, k_probs = keys
    if self.cfg.causal:
      h = self.attention(self.attention_norm(x_BTD).astype(dt), segments, k_probs)
      x_BTD = x_BTD + dropout(h, rate, k_attn)
      h = self.mlp(self.mlp_norm(x_BTD).astype(dt))
      x_BTD = x_BTD + dropout(h, rate, k_mlp)
    else:
      h = self.attention(x_BTD, segments, k_probs)
      x_BTD = self.attention_norm(x_BTD + dropout(h, rate, k_attn)).astype(dt)
      h = self.mlp(x_BTD)
      x_BTD = self.mlp_norm(x_BTD + dropout(h, rate, k_mlp)).astype(dt)
    return constrain(x_BTD, ("act_batch", "act_len", "act_embed"))


_REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Stack(nnx.Module):
  """`num_layers` blocks (of class `block`) stored with a leading `layers` axis and run with
  nnx.scan; each block is also given its layer index and the rotary angles (if any).

  One parameter layout whatever the execution: `scan_layers=False` fully unrolls
  the scan (faster steps on some backends, compile time grows with depth).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, block=None):
    self.cfg = cfg
    block = block or Block

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)

  def __call__(self, x_BTD, segments, dropout_key=None, rotations=None):
    cfg = self.cfg
    keys_L = None if dropout_key is None else jax.random.split(dropout_key, cfg.num_layers)

    def layer(block, x_BTD, key, index):
      return block(x_BTD, segments, key, index, rotations)

    if cfg.remat_policy != "none":
      layer = nnx.remat(layer, policy=_REMAT_POLICIES[cfg.remat_policy])

    @nnx.scan(
      in_axes=(0, nnx.Carry, 0 if keys_L is not None else None, 0),
      out_axes=nnx.Carry,
      unroll=1 if cfg.scan_layers else cfg.num_layers,
      transform_metadata={nnx.PARTITION_NAME: "layers"},
    )
    def run(block, x_BTD, key, index):
      return layer(block, x_BTD, key, index)

    return run(self.blocks, x_BTD, keys_L, jnp.arange(cfg.num_layers))


class HeadInputs(NamedTuple):
  """The output projection's inputs: logits = x_BxD @ embedding_VD.T (+ bias_V), padding ids
  masked. training/vocab_loss.py takes them so that the [tokens, V] logits never exist whole."""

  x_BxD: jax.Array  # final hidden states, in the compute dtype
  embedding_VD: jax.Array  # the tied input embedding, in the param dtype
  bias_V: jax.Array | None  # BERT's decoder bias; None for GPT


def _tied_logits(x_BxD, embedding_VD, dtype):
  """Output projection onto the input embedding, in float32 for the softmax."""
  return jnp.einsum(
    "...D,VD->...V",
    x_BxD.astype(dtype),
    embedding_VD.astype(dtype),
    preferred_element_type=jnp.float32,
  )


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
    self.token_embed = embed(cfg, cfg.vocab_size, ("vocab", "embed"), cfg.init_std, rngs=rngs)
    self.position_embed = embed(cfg, cfg.max_len, ("position", "embed"), 0.01, rngs=rngs)
    self.stack = Stack(cfg, rngs=rngs)
    self.final_norm = layer_norm(cfg, rngs=rngs)

  def hidden(self, inputs_BT, positions_BT, segment_ids_BT, dropout_key=None):
    cfg = self.cfg
    k_embed, k_stack = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    x_BTD = self.token_embed(inputs_BT) + self.position_embed(positions_BT)
    x_BTD = dropout(x_BTD.astype(cfg.dtype), cfg.dropout_rate, k_embed)
    x_BTD = constrain(x_BTD, ("act_batch", "act_len", "act_embed"))
    x_BTD = self.stack(x_BTD, attention_segments(cfg, segment_ids_BT), k_stack)
    return self.final_norm(x_BTD)

  def head_inputs(self, inputs_BT, positions_BT, segment_ids_BT, dropout_key=None):
    """What the output projection takes (see HeadInputs); GPT's has no bias."""
    x_BTD = self.hidden(inputs_BT, positions_BT, segment_ids_BT, dropout_key)
    return HeadInputs(x_BTD.astype(self.cfg.dtype), self.token_embed.embedding[...], None)

  def __call__(self, inputs_BT, positions_BT, segment_ids_BT, dropout_key=None):
    """Next-token logits [B, T, V] in float32."""
    x_BTD, embedding_VD, _ = self.head_inputs(inputs_BT, positions_BT, segment_ids_BT, dropout_key)
    logits_BTV = _tied_logits(x_BTD, embedding_VD, self.cfg.dtype)
    logits_BTV = mask_padding_ids(logits_BTV, self.cfg)
    return constrain(logits_BTV, ("act_batch", "act_len", "act_vocab"))


class MlmHead(nnx.Module):
  """BERT's prediction head: dense + GELU + LayerNorm, then the tied decoder plus a bias."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.emb_dim
    bias = None if cfg.rotary else (d,)  # ModernBERT's head has no bias but the decoder's
    self.transform = dense(
      cfg, "BPD,DE->BPE", (d, d), bias, ("embed", "mlp"), ("mlp",), std=cfg.init_std, rngs=rngs
    )
    self.norm = layer_norm(cfg, rngs=rngs, use_bias=not cfg.rotary)
    self.decoder_bias = nnx.Param(
      jnp.zeros((cfg.vocab_size,), cfg.param_dtype), out_sharding=("vocab",)
    )

  def hidden(self, x_BPD):
    """The transform before the tied decoder: dense + GELU + LayerNorm (float32)."""
    return self.norm(gelu(self.transform(x_BPD), self.cfg.gelu))

  def logits(self, h_BPD, embedding_VD, dtype):
    """The tied decoder plus bias on the transformed states: [B, P, V] in float32."""
    logits_BPV = _tied_logits(h_BPD, embedding_VD, dtype) + self.decoder_bias[...].astype(
      jnp.float32
    )
    return mask_padding_ids(logits_BPV, self.cfg)


class BERT(nnx.Module):
  """BERT: token + position + token-type embeddings, post-LN blocks, MLM head on masked slots."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    std = cfg.init_std
    self.token_embed = embed(cfg, cfg.vocab_size, ("vocab", "embed"), std, rngs=rngs)
    self.position_embed = embed(cfg, cfg.max_len, ("position", "embed"), std, rngs=rngs)
    self.token_type_embed = embed(cfg, cfg.num_token_types, ("token_type", "embed"), std, rngs=rngs)
    self.embed_norm = layer_norm(cfg, rngs=rngs)
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
    h_BPD, embedding_VD, _ = self.head_inputs(
      inputs_BT, positions_BT, segment_ids_BT, masked_positions_BP, dropout_key, token_types_BT
    )
    return self.mlm_head.logits(h_BPD, embedding_VD, self.cfg.dtype)

  def head_inputs(
    self,
    inputs_BT,
    positions_BT,
    segment_ids_BT,
    masked_positions_BP,
    dropout_key=None,
    token_types_BT=None,
  ):
    """What the tied decoder takes at the P masked positions (see HeadInputs): the MLM head's
    transformed states, the embedding and the decoder bias."""
    x_BTD = self.hidden(inputs_BT, positions_BT, segment_ids_BT, dropout_key, token_types_BT)
    x_BPD = jnp.take_along_axis(x_BTD, masked_positions_BP[..., None], axis=1)
    h_BPD = self.mlm_head.hidden(x_BPD).astype(self.cfg.dtype)
    return HeadInputs(h_BPD, self.token_embed.embedding[...], self.mlm_head.decoder_bias[...])


class Llama(GPT):
  """Llama: token embedding, RMSNorm pre-norm blocks with rotary GQA attention and SwiGLU,
  final RMSNorm, tied or untied output embedding (`lm_head`, [V, D])."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.token_embed = embed(cfg, cfg.vocab_size, ("vocab", "embed"), cfg.init_std, rngs=rngs)
    self.stack = Stack(cfg, rngs=rngs, block=modern.ModernBlock)
    self.final_norm = layers.model_norm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = embed(cfg, cfg.vocab_size, ("vocab", "embed"), cfg.init_std, rngs=rngs)

  def hidden(self, inputs_BT, positions_BT, segment_ids_BT, dropout_key=None):
    cfg = self.cfg
    k_embed, k_stack = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    x_BTD = dropout(self.token_embed(inputs_BT).astype(cfg.dtype), cfg.dropout_rate, k_embed)
    x_BTD = constrain(x_BTD, ("act_batch", "act_len", "act_embed"))
    segments = attention_segments(cfg, segment_ids_BT)
    x_BTD = self.stack(x_BTD, segments, k_stack, modern.rotations(cfg, positions_BT))
    return self.final_norm(x_BTD)

  def output_embedding(self):
    """The [V, D] output projection: the input embedding when tied, else lm_head."""
    table = self.token_embed if self.cfg.tie_embeddings else self.lm_head
    return table.embedding[...]

  def head_inputs(self, inputs_BT, positions_BT, segment_ids_BT, dropout_key=None):
    x_BTD = self.hidden(inputs_BT, positions_BT, segment_ids_BT, dropout_key)
    return HeadInputs(x_BTD.astype(self.cfg.dtype), self.output_embedding(), None)


class ModernBert(BERT):
  """ModernBERT: token embedding + LayerNorm, pre-norm blocks with rotary attention (global
  every cfg.global_every layers, sliding-window between) and GeGLU, final LayerNorm, and the MLM
  head on the masked slots (tied decoder plus bias). No token types: `token_types_BT` is
  accepted and ignored."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.token_embed = embed(cfg, cfg.vocab_size, ("vocab", "embed"), cfg.init_std, rngs=rngs)
    self.embed_norm = layers.model_norm(cfg, rngs=rngs)
    self.stack = Stack(cfg, rngs=rngs, block=modern.ModernBlock)
    self.final_norm = layers.model_norm(cfg, rngs=rngs)
    self.mlm_head = MlmHead(cfg, rngs=rngs)

  def hidden(self, inputs_BT, positions_BT, segment_ids_BT, dropout_key=None, token_types_BT=None):
    """Contextual hidden states [B, T, D] (bidirectional within each packed segment)."""
    del token_types_BT
    cfg = self.cfg
    k_embed, k_stack = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    x_BTD = self.embed_norm(self.token_embed(inputs_BT)).astype(cfg.dtype)
    x_BTD = constrain(
      dropout(x_BTD, cfg.dropout_rate, k_embed), ("act_batch", "act_len", "act_embed")
    )
    segments = attention_segments(cfg, segment_ids_BT)
    x_BTD = self.stack(x_BTD, segments, k_stack, modern.rotations(cfg, positions_BT))
    return self.final_norm(x_BTD).astype(cfg.dtype)


def build(cfg: ModelConfig, seed: int) -> GPT | BERT | Llama | ModernBert:
  """A fresh model of cfg.family. Shardings are applied by the caller (see training/state.py)."""
  cls = {"gpt2": GPT, "bert": BERT, "llama": Llama, "modernbert": ModernBert}[cfg.family]
  with nnx.use_eager_sharding(False):
    return cls(cfg, rngs=nnx.Rngs(params=seed))


def count_params(state) -> int:
  return sum(x.size for x in jax.tree.leaves(state))


def fit_positions(table_LD, rows: int, where: str):
  """A starting position table (NumPy, [L, D]) sized to `rows` for a run with another table.

  A longer table keeps its first `rows` rows. A shorter one is extended, with a warning: row p
  starts as a copy of row p mod L (the pretrained rows repeated, so nothing starts at random),
  to be learnt by training on sequences longer than L.
  """
  length = table_LD.shape[0]
  if length >= rows:
    return table_LD[:rows]
  logging.warning(
    "The position table of %s has %d rows; extending it to %d (model.max_positions or "
    "data.seq_len): rows %d-%d start as copies of rows 0-%d and are learnt by training on "
    "sequences longer than %d.",
    where, length, rows, length, rows - 1, rows - 1 - length, length,
  )  # fmt: skip
  return np.concatenate([table_LD] * math.ceil(rows / length))[:rows]
