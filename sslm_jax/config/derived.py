"""Values derived from a validated config: the model description, vocabulary padding, and the
'auto' dtype, attention kernel and GELU form resolved for a platform."""

from __future__ import annotations

import math

import jax
import ml_collections

from sslm_jax.models.config import ModelConfig

# Splash attention's blocks are multiples of the TPU's 128 lanes (models/splash.py).
SPLASH_LANES = 128


def padded_vocab_size(c: ml_collections.ConfigDict) -> int:
  multiple = max(1, c.model.vocab_multiple)
  return int(math.ceil(c.data.vocab_size / multiple) * multiple)


def positions(c: ml_collections.ConfigDict) -> int:
  """Rows of the position table: model.max_positions, or data.seq_len when that is 0."""
  return c.model.max_positions or c.data.seq_len


FAMILIES = ("gpt2", "bert", "llama", "modernbert")
CAUSAL_FAMILIES = ("gpt2", "llama")


def family(c: ml_collections.ConfigDict) -> str:
  """model.family with 'auto' resolved: gpt2 for causal_lm, bert for masked_lm."""
  if c.model.family != "auto":
    return c.model.family
  return "gpt2" if c.objective == "causal_lm" else "bert"


def norm_epsilon(c: ml_collections.ConfigDict) -> float:
  """model.norm_epsilon, or the family's: BERT's 1e-12, 1e-5 for the others."""
  if c.model.norm_epsilon:
    return float(c.model.norm_epsilon)
  return 1e-12 if family(c) == "bert" else 1e-5


def model_config(c: ml_collections.ConfigDict, platform: str | None = None) -> ModelConfig:
  """The frozen model description the model code takes (never the ConfigDict), with 'auto'
  fields resolved for `platform` ('cpu', 'gpu', 'tpu'; default: JAX's backend here)."""
  return ModelConfig(
    objective=c.objective,
    vocab_size=padded_vocab_size(c),
    max_len=positions(c),
    num_layers=c.model.num_layers,
    num_heads=c.model.num_heads,
    emb_dim=c.model.emb_dim,
    mlp_dim=c.model.mlp_dim,
    dropout_rate=float(c.model.dropout_rate),
    attention_dropout=float(c.model.attention_dropout),
    dtype=compute_dtype(c, platform),
    param_dtype=c.model.param_dtype,
    layer_norm_epsilon=norm_epsilon(c),
    scan_layers=bool(c.model.scan_layers),
    remat_policy=c.model.remat_policy,
    attention_impl=attention_impl(c, platform),
    attention_block_q=c.model.attention_block_q,
    attention_block_kv=c.model.attention_block_kv,
    loss_chunk_len=c.model.loss_chunk_len,
    max_segments=max(1, c.model.max_segments_per_row),
    real_vocab_size=c.data.vocab_size,
    gelu=gelu_form(c),
    family=family(c),
    num_kv_heads=c.model.num_kv_heads,
    rope_base=float(c.model.rope_base),
    rope_local_base=float(c.model.rope_local_base),
    qk_norm=bool(c.model.qk_norm),
    tie_embeddings=bool(c.model.tie_embeddings),
    sliding_window=c.model.sliding_window,
    global_every=c.model.global_every,
  )


def gelu_form(c: ml_collections.ConfigDict) -> str:
  """'auto' resolved: GPT-2's tanh approximation for causal_lm, BERT's erf for masked_lm."""
  if c.model.gelu != "auto":
    return c.model.gelu
  return "tanh" if c.objective == "causal_lm" else "erf"


def compute_dtype(c: ml_collections.ConfigDict, platform: str | None = None) -> str:
  """model.dtype with 'auto' resolved: bfloat16 on TPU and GPU, float32 on CPU."""
  if c.model.dtype != "auto":
    return c.model.dtype
  return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"


def windowed(c: ml_collections.ConfigDict) -> bool:
  """Some layers attend within model.sliding_window only (ModelConfig.windowed)."""
  return c.model.sliding_window > 0 and c.model.global_every != 1


def attention_impl(c: ml_collections.ConfigDict, platform: str | None = None) -> str:
  """'auto' resolved for `platform` (default: JAX's backend here): splash on TPU, cuDNN flash
  attention on GPUs where it applies, else XLA's (always XLA's with model.attention_dropout;
  on GPU also with a sliding window, which cuDNN takes only causal, to the left)."""
  if c.model.attention_impl != "auto":
    return c.model.attention_impl
  if c.model.attention_dropout:  # neither fused kernel can drop attention probabilities
    return "xla"
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "splash" if c.data.seq_len % SPLASH_LANES == 0 else "xla"
  head_dim = c.model.emb_dim // c.model.num_heads
  cudnn_ok = (
    platform == "gpu"
    and not windowed(c)
    and gpu_capability() >= (9, 0)
    and compute_dtype(c, platform) in ("bfloat16", "float16")
    and head_dim <= 128
    and head_dim % 8 == 0
  )
  return "cudnn" if cudnn_ok else "xla"


def resolved(c: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
  """A copy of `c` whose 'auto' dtype and attention are spelt out for `platform`: what a run
  there would use (the plan compiles for a TPU from a CPU process)."""
  out = c.copy_and_resolve_references()
  out.model.dtype = compute_dtype(c, platform)
  out.model.attention_impl = attention_impl(c, platform)
  return out


def gpu_capability() -> tuple[int, ...]:
  """The first local GPU's compute capability, (0,) without one or on ROCm."""
  if jax.default_backend() != "gpu":
    return (0,)
  capability = getattr(jax.local_devices()[0], "compute_capability", None)
  return tuple(int(x) for x in capability.split(".")) if capability else (0,)


def num_predictions(c: ml_collections.ConfigDict) -> int:
  """Masked positions gathered per sequence for the MLM head (BERT's max_predictions_per_seq)."""
  return max(1, int(math.ceil(c.data.seq_len * c.data.mlm_probability)))
