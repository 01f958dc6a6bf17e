"""The model's static hyperparameters (ModelConfig), which every module of models/ builds from.

config.model_config fills one from a run's config; it is hashable, so jit can close over it.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ObjectiveName = Literal["causal_lm", "masked_lm"]


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
