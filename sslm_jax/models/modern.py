"""The blocks of the rotary families: a Llama-style decoder and a ModernBERT-style encoder.

Both drop GPT-2's and BERT's position tables and biases for rotary positions (models/rotary.py)
and gated MLPs. Llama: RMSNorm pre-norm blocks, SwiGLU, grouped-query attention
(cfg.num_kv_heads), optional QK-norm, tied or untied output embedding. ModernBERT: LayerNorm
without bias, pre-norm blocks (the first layer's attention takes its input unnormed, as Hugging
Face's does), GeGLU, global attention every cfg.global_every layers and sliding-window attention
between (rotary base cfg.rope_base globally, cfg.rope_local_base in the window), a final norm and
BERT's MLM head without its biases but the decoder's.

The models themselves (transformer.Llama and transformer.ModernBert) are in models/transformer.py
beside GPT and BERT, whose methods (hidden, head_inputs, __call__) training, the loss, sharding and
the tasks call. Einsum letters and logical axis names as in models/transformer.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sslm_jax.models import rotary
from sslm_jax.models.attention import Attention
from sslm_jax.models.config import ModelConfig
from sslm_jax.models.layers import constrain, dense, dropout, gelu, model_norm


def activation(cfg: ModelConfig, x):
  """The gated MLP's activation: SiLU (SwiGLU, llama) or GELU (GeGLU, modernbert)."""
  return jax.nn.silu(x) if cfg.family == "llama" else gelu(x, cfg.gelu)


class GatedMlp(nnx.Module):
  """down(act(gate(x)) * up(x)), without biases."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f = cfg.emb_dim, cfg.mlp_dim
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5 if cfg.causal else cfg.init_std
    up = dict(names=("embed", "mlp"), bias_names=("mlp",), std=cfg.init_std, rngs=rngs)
    self.gate = dense(cfg, "BTD,DF->BTF", (d, f), None, **up)
    self.up = dense(cfg, "BTD,DF->BTF", (d, f), None, **up)
    self.down = dense(
      cfg, "BTF,FD->BTD", (f, d), None, ("mlp", "embed"), ("embed",), std=out_std, rngs=rngs
    )

  def __call__(self, x_BTD):
    h_BTF = activation(self.cfg, self.gate(x_BTD)) * self.up(x_BTD)
    return self.down(constrain(h_BTF, ("act_batch", "act_len", "act_mlp")))


class ModernBlock(nnx.Module):
  """A pre-norm block: x + attention(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attention_norm = model_norm(cfg, rngs=rngs)
    self.attention = Attention(cfg, rngs=rngs)
    self.mlp_norm = model_norm(cfg, rngs=rngs)
    self.mlp = GatedMlp(cfg, rngs=rngs)

  def __call__(self, x_BTD, segments, dropout_key=None, layer_index=None, rotations=None):
    cfg, dt = self.cfg, x_BTD.dtype
    keys = (None,) * 3 if dropout_key is None else jax.random.split(dropout_key, 3)
    k_attn, k_mlp, k_probs = keys
    local = is_local(cfg, layer_index)
    rot = rotary.select(local, *rotations)
    h_BTD = self.attention_norm(x_BTD).astype(dt)
    if cfg.family == "modernbert":  # Hugging Face's first ModernBERT layer has no attention norm
      h_BTD = jnp.where(layer_index == 0, x_BTD, h_BTD)
    h_BTD = self.attention(h_BTD, segments, k_probs, rot, local)
    x_BTD = x_BTD + dropout(h_BTD, cfg.dropout_rate, k_attn)
    h_BTD = self.mlp(self.mlp_norm(x_BTD).astype(dt))
    x_BTD = x_BTD + dropout(h_BTD, cfg.dropout_rate, k_mlp)
    return constrain(x_BTD, ("act_batch", "act_len", "act_embed"))


def is_local(cfg: ModelConfig, layer_index):
  """Whether layer `layer_index` (traced) attends within the sliding window; None if none does."""
  if not cfg.windowed:
    return None
  return layer_index % cfg.global_every != 0


def rotations(cfg: ModelConfig, positions_BT):
  """(global, local) rotary angles of the positions; local is None without windowed layers."""
  h = cfg.head_dim
  local = rotary.rotation(positions_BT, h, cfg.rope_local_base) if cfg.windowed else None
  return rotary.rotation(positions_BT, h, cfg.rope_base), local
