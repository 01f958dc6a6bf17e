"""The model's static hyperparameters (ModelConfig), which every module of models/ builds from.

config.model_config fills one from a run's config; it is hashable, so jit can close over it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ObjectiveName = Literal["causal_lm", "masked_lm"]
# gpt2 and bert: learned positions, LayerNorm, GELU MLP, biases. llama (causal_lm) and modernbert
# (masked_lm): rotary positions, gated MLPs, no biases; see models/modern.py.
FamilyName = Literal["gpt2", "bert", "llama", "modernbert"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static model hyperparameters; hashable so it can be closed over by jit."""

  objective: ObjectiveName
  vocab_size: int  # embedding rows, padded to model.vocab_multiple (see sslm_jax.config)
  max_len: int
  num_layers: int
  num_heads: int
  emb_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout: float = 0.0  # on attention probabilities; XLA attention only (sslm_jax.config)
  dtype: str = "float32"
  param_dtype: str = "float32"
  layer_norm_epsilon: float = 1e-5
  num_token_types: int = 2
  init_std: float = 0.02
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"  # 'xla' | 'cudnn' | 'splash' (config.attention_impl resolves 'auto')
  attention_block_q: int = 512  # splash attention's largest blocks (splash.fit_block)
  attention_block_kv: int = 512
  loss_chunk_len: int = 0  # positions per chunk of the output projection + loss; 0: one chunk
  # cuDNN's packed layout holds this many documents per row (sslm_jax.config measures it).
  max_segments: int = 1
  real_vocab_size: int = 0  # the tokenizer's ids; rows past it are padding, masked in logits
  gelu: str = "erf"  # 'erf' (BERT) | 'tanh' (GPT-2's approximation, Hugging Face's gelu_new)
  family: FamilyName | str = ""  # '' (the objective's own): gpt2 for causal_lm, bert for masked_lm
  num_kv_heads: int = 0  # llama's grouped-query attention: heads of keys and values; 0: num_heads
  rope_base: float = 10000.0  # rotary positions' base (theta); modernbert's global layers
  rope_local_base: float = 10000.0  # modernbert's sliding-window layers
  qk_norm: bool = False  # llama: RMSNorm on each head's queries and keys before the rotation
  tie_embeddings: bool = True  # the output projection is the input embedding (else its own)
  # modernbert: layer i attends globally when i % global_every == 0, else to keys at most
  # sliding_window // 2 positions away (Hugging Face's local_attention); 0: every layer global.
  sliding_window: int = 0
  global_every: int = 1

  def __post_init__(self):
    if not self.family:
      object.__setattr__(self, "family", "gpt2" if self.objective == "causal_lm" else "bert")

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

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def rotary(self) -> bool:
    """Rotary positions, no position table, no biases: the llama and modernbert families."""
    return self.family in ("llama", "modernbert")

  @property
  def windowed(self) -> bool:
    """Some layers attend within a sliding window only."""
    return self.sliding_window > 0 and self.global_every != 1
