"""Config validation: fails, naming the field and the fix, before anything compiles or is written.

Checks the values alone (and the JAX backend the attention kernels need); files a config names,
such as init_from_hf's directory, are read by the commands that use them.
"""

from __future__ import annotations

import difflib

import jax
import ml_collections
from absl import logging

from sslm_jax.config import augment_spec, derived
from sslm_jax.config import finetune as finetune_config
from sslm_jax.config import mixture as mixture_config
from sslm_jax.config.derived import SPLASH_LANES
from sslm_jax.errors import SslmError


class ConfigError(SslmError, ValueError):
  """A config value that cannot work; the message names the field and the fix."""


OBJECTIVES = ("causal_lm", "masked_lm")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SOURCES = ("builtin", "text", "tfds")
GELU_FORMS = ("auto", "tanh", "erf")


def closest_field(config: ml_collections.ConfigDict, dotted: str) -> str | None:
  """The valid dotted field name nearest to a misspelt one."""
  names = list(field_names(config))
  match = difflib.get_close_matches(dotted, names, n=1, cutoff=0.5)
  return match[0] if match else None


def field_names(config, prefix=""):
  """Every dotted leaf name of a config, e.g. 'data.seq_len'."""
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      yield from field_names(value, name + ".")
    else:
      yield name


def _require(ok: bool, message: str):
  if not ok:
    raise ConfigError(message)


def validate(c: ml_collections.ConfigDict) -> None:
  """Raise ConfigError naming the first field that cannot work, and how to fix it."""
  _require(
    c.objective in OBJECTIVES, f"objective={c.objective!r}: use one of {', '.join(OBJECTIVES)}."
  )
  _require(
    c.data.source in SOURCES, f"data.source={c.data.source!r}: use one of {', '.join(SOURCES)}."
  )
  # In this order, so that the first field that cannot work is the one reported.
  _validate_counts(c)
  _validate_data(c)
  _validate_model(c)
  _validate_compiler_and_init(c)
  _validate_opt(c)
  mixture_config.validate(c, _require)
  finetune_config.validate(c, _require)


def _validate_counts(c: ml_collections.ConfigDict) -> None:
  """Sizes, step counts and periods."""
  for name in ("num_train_steps", "batch_size", "data.seq_len", "eval_steps", "keep_checkpoints"):
    value = c[name] if "." not in name else c.data[name.split(".")[1]]
    _require(
      isinstance(value, int) and value > 0,
      f"{name}={value!r} must be a positive integer; set --config.{name}=N with N > 0.",
    )
  for name in ("prepare_workers", "read_threads", "read_ahead_batches"):
    _require(
      isinstance(c.data[name], int) and c.data[name] >= 1,
      f"data.{name}={c.data[name]!r} must be a positive integer; set --config.data.{name}=N.",
    )
  _require(
    isinstance(c.data.shard_rows, int) and c.data.shard_rows >= 0,
    f"data.shard_rows={c.data.shard_rows!r} must be 0 (about 64 MiB per shard) or a positive "
    "number of rows; set --config.data.shard_rows=N.",
  )
  for name in ("profile_start_step", "profile_steps"):
    _require(
      isinstance(c[name], int) and c[name] >= 0,
      f"{name}={c[name]!r} must be an integer >= 0; set --config.{name}=N.",
    )
  for name in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps"):
    _require(
      isinstance(c[name], int) and c[name] > 0,
      f"{name}={c[name]!r} must be a positive integer; set --config.{name}=N with N > 0.",
    )


def _validate_data(c: ml_collections.ConfigDict) -> None:
  _require(
    c.data.vocab_size >= 16,
    f"data.vocab_size={c.data.vocab_size} is too small; use at least 16 (special tokens take 7).",
  )
  _require(
    0.0 < c.data.mlm_probability < 1.0,
    f"data.mlm_probability={c.data.mlm_probability} must lie in (0, 1); BERT uses 0.15.",
  )
  _require(
    c.data.source != "text" or bool(c.data.text_files),
    "data.source='text' needs data.text_files; set --config.data.text_files=PATH_OR_GLOB.",
  )
  _require(
    c.data.source != "tfds" or bool(c.data.tfds_name),
    "data.source='tfds' needs a dataset; set --config.data.tfds_name=NAME (e.g. lm1b).",
  )
  if c.data.augment or c.data.augment_copies != 1:
    try:
      augment_spec.specs(c)
    except augment_spec.AugmentError as e:
      raise ConfigError(str(e)) from e


def _validate_model(c: ml_collections.ConfigDict) -> None:
  _require(
    isinstance(c.model.max_positions, int)
    and (c.model.max_positions == 0 or c.model.max_positions >= c.data.seq_len),
    f"model.max_positions={c.model.max_positions!r} is shorter than data.seq_len="
    f"{c.data.seq_len}; set --config.model.max_positions to 0 (= seq_len) or at least "
    f"{c.data.seq_len}.",
  )
  _require(
    c.model.emb_dim % c.model.num_heads == 0,
    f"model.emb_dim={c.model.emb_dim} is not divisible by model.num_heads={c.model.num_heads}.",
  )
  _require(
    0.0 <= c.model.dropout_rate < 1.0,
    f"model.dropout_rate={c.model.dropout_rate} must lie in [0, 1).",
  )
  _require(
    c.model.dtype in DTYPES,
    f"model.dtype={c.model.dtype!r}: use one of {', '.join(DTYPES)} ('auto': bfloat16 on TPU "
    "and GPU, float32 on CPU).",
  )
  _validate_attention(c)
  _validate_family(c)
  drop, impl = c.model.attention_dropout, c.model.attention_impl
  _require(0.0 <= drop < 1.0, f"model.attention_dropout={drop} must lie in [0, 1).")
  _require(
    not drop or impl not in ("splash", "cudnn"),
    f"model.attention_dropout={drop} needs the XLA attention (a fused kernel cannot drop "
    f"probabilities), not model.attention_impl={impl!r}; use 'auto' or 'xla'.",
  )
  _require(
    c.model.gelu in GELU_FORMS,
    f"model.gelu={c.model.gelu!r}: use one of {', '.join(GELU_FORMS)}.",
  )
  _require(
    c.model.max_segments_per_row >= 0,
    f"model.max_segments_per_row={c.model.max_segments_per_row}: use 0 (measure on the data) "
    "or a positive bound.",
  )


def _validate_family(c: ml_collections.ConfigDict) -> None:
  m = c.model
  _require(
    m.family == "auto" or m.family in derived.FAMILIES,
    f"model.family={m.family!r}: use one of auto, {', '.join(derived.FAMILIES)}.",
  )
  family = derived.family(c)
  causal = family in derived.CAUSAL_FAMILIES
  _require(
    causal == (c.objective == "causal_lm"),
    f"model.family={family!r} is a {'causal_lm' if causal else 'masked_lm'} model, not "
    f"{c.objective}; set --config.objective={'causal_lm' if causal else 'masked_lm'} or choose "
    f"model.family {'llama or gpt2' if c.objective == 'causal_lm' else 'modernbert or bert'}.",
  )
  rotary = family in ("llama", "modernbert")
  kv = m.num_kv_heads or m.num_heads
  _require(
    isinstance(m.num_kv_heads, int) and m.num_kv_heads >= 0 and m.num_heads % kv == 0,
    f"model.num_kv_heads={m.num_kv_heads!r} must divide model.num_heads={m.num_heads} "
    "(0: as many as the query heads).",
  )
  head_dim = m.emb_dim // m.num_heads
  _require(
    not rotary or head_dim % 2 == 0,
    f"rotary positions need an even head width, not emb_dim / num_heads = {head_dim}.",
  )
  _require(m.rope_base > 0 and m.rope_local_base > 0, "model.rope_base must be positive.")
  _require(
    isinstance(m.global_every, int) and m.global_every >= 1,
    f"model.global_every={m.global_every!r} must be 1 (every layer global) or more.",
  )
  _require(
    isinstance(m.sliding_window, int) and m.sliding_window >= 0,
    f"model.sliding_window={m.sliding_window!r} must be 0 (none) or a window in positions.",
  )
  _require(m.norm_epsilon >= 0, f"model.norm_epsilon={m.norm_epsilon} must be 0 or positive.")
  # Each option a family does not have is named, never silently ignored.
  own = {
    "num_kv_heads": family == "llama" or m.num_kv_heads in (0, m.num_heads),
    "qk_norm": family == "llama" or not m.qk_norm,
    "tie_embeddings": family == "llama" or m.tie_embeddings,
    "sliding_window": family == "modernbert" or not m.sliding_window,
    "global_every": family == "modernbert" or m.global_every == 1,
    "rope_base": rotary or m.rope_base == 10000.0,
    "rope_local_base": family == "modernbert" or m.rope_local_base == 10000.0,
  }
  for name, ok in own.items():
    _require(
      ok,
      f"model.{name}={m[name]!r} is not an option of model.family={family!r}; leave it at its "
      "default or choose the family that has it (llama: num_kv_heads, qk_norm, tie_embeddings, "
      "rope_base; modernbert: sliding_window, global_every, rope_base, rope_local_base).",
    )


def _validate_attention(c: ml_collections.ConfigDict) -> None:
  impl, dtype, backend = c.model.attention_impl, derived.compute_dtype(c), jax.default_backend()
  _require(
    impl in ATTENTION_IMPLS,
    f"model.attention_impl={impl!r}: use one of {', '.join(ATTENTION_IMPLS)}.",
  )
  _require(
    impl != "cudnn" or not derived.windowed(c),
    f"model.attention_impl='cudnn' cannot run model.sliding_window={c.model.sliding_window}: "
    "cuDNN's sliding window is causal (keys to the left only), this one reaches both ways. Use "
    "'auto' (the XLA attention on GPU for windowed models) or 'xla'.",
  )
  _require(
    impl != "cudnn" or backend == "gpu",
    f"model.attention_impl='cudnn' needs a GPU; use 'auto' or 'xla' on {backend}.",
  )
  _require(
    impl != "cudnn" or dtype in ("bfloat16", "float16"),
    f"model.attention_impl='cudnn' needs model.dtype bfloat16 or float16, not {dtype}.",
  )
  _require(
    impl != "cudnn" or derived.gpu_capability() >= (9, 0),
    "model.attention_impl='cudnn' takes packed documents as lengths and offsets, which cuDNN "
    f"supports from Hopper (compute capability 9.0) on; this GPU is {derived.gpu_capability()}. "
    "Use 'auto' or 'xla'.",
  )
  _require(
    impl != "splash" or backend in ("tpu", "cpu"),
    f"model.attention_impl='splash' is a TPU kernel; use 'auto' or 'xla' on {backend} (on CPU "
    "it runs in Pallas interpret mode, for tests).",
  )
  for name in ("attention_block_q", "attention_block_kv"):
    _require(
      isinstance(c.model[name], int) and c.model[name] > 0 and c.model[name] % SPLASH_LANES == 0,
      f"model.{name}={c.model[name]!r} must be a positive multiple of {SPLASH_LANES} (splash "
      "attention's blocks); e.g. 512.",
    )
  _require(
    impl != "splash" or c.data.seq_len % SPLASH_LANES == 0,
    f"model.attention_impl='splash' needs data.seq_len to be a multiple of {SPLASH_LANES} (its "
    f"blocks are), not {c.data.seq_len}; change the length or use 'auto' or 'xla'.",
  )
  _require(
    isinstance(c.model.loss_chunk_len, int) and c.model.loss_chunk_len >= 0,
    f"model.loss_chunk_len={c.model.loss_chunk_len!r} must be 0 (one chunk) or a positive "
    "number of positions; set --config.model.loss_chunk_len=N.",
  )


def _validate_compiler_and_init(c: ml_collections.ConfigDict) -> None:
  """compiler_options, and that a run names at most one source of starting weights.

  The Hugging Face directory itself is read by the commands that start a run
  (checkpoints.hf_config.check_init_from_hf), not here: validation reads no model files.
  """
  _require(
    not c.compiler_options or "=" in c.compiler_options.split(",")[0],
    f"compiler_options={c.compiler_options!r}: use 'name=value,name=value' (or '' for none).",
  )
  _require(
    isinstance(c.init_from_hf, str),
    f"init_from_hf={c.init_from_hf!r} must be a directory path (or '' for random init).",
  )
  # Before a run reads the directory: a mismatch with it would hide that one source is too many.
  _require(
    not (c.finetune.task and c.finetune.init_from and c.init_from_hf),
    "finetune.init_from and init_from_hf both name starting weights; set only one of them.",
  )


def _validate_opt(c: ml_collections.ConfigDict) -> None:
  """The optimizer and its schedule; a warmup longer than the run is only warned about."""
  _require(
    c.opt.decay in ("cosine", "linear", "constant"),
    f"opt.decay={c.opt.decay!r}: use 'cosine', 'linear' or 'constant'.",
  )
  _require(
    c.opt.name in ("adamw", "muon"),
    f"opt.name={c.opt.name!r}: use 'adamw' or 'muon' (Muon for the weight matrices).",
  )
  _require(
    isinstance(c.opt.muon_learning_rate, (int, float)) and c.opt.muon_learning_rate >= 0,
    f"opt.muon_learning_rate={c.opt.muon_learning_rate!r} must be >= 0 (0: opt.learning_rate).",
  )
  _require(
    c.opt.schedule in ("warmup_decay", "wsd"),
    f"opt.schedule={c.opt.schedule!r}: use 'warmup_decay' or 'wsd' (warmup-stable-decay).",
  )
  _require(
    isinstance(c.opt.decay_fraction, (int, float)) and 0 < c.opt.decay_fraction <= 1,
    f"opt.decay_fraction={c.opt.decay_fraction!r} must lie in (0, 1]; e.g. 0.2 decays over the "
    "last 20% of the steps.",
  )
  _require(
    isinstance(c.opt.z_loss, (int, float)) and c.opt.z_loss >= 0,
    f"opt.z_loss={c.opt.z_loss!r} must be >= 0 (0: off; PaLM used 1e-4).",
  )
  _require(
    c.opt.schedule != "wsd" or c.opt.decay != "constant",
    "opt.schedule='wsd' needs a decay; set --config.opt.decay=cosine or linear (or use "
    "opt.schedule='warmup_decay' for a constant rate after the warmup).",
  )
  _require(
    c.opt.grad_accum_steps >= 1 and c.batch_size % c.opt.grad_accum_steps == 0,
    f"opt.grad_accum_steps={c.opt.grad_accum_steps} must be >= 1 and divide "
    f"batch_size={c.batch_size}.",
  )
  _require(
    isinstance(c.opt.warmup_steps, int) and c.opt.warmup_steps >= 0,
    f"opt.warmup_steps={c.opt.warmup_steps!r} must be an integer >= 0.",
  )
  _require(
    isinstance(c.opt.warmup_fraction, (int, float)) and 0 <= c.opt.warmup_fraction < 1,
    f"opt.warmup_fraction={c.opt.warmup_fraction!r} must lie in [0, 1); e.g. 0.1 warms up over "
    "the first 10% of the steps (0: use opt.warmup_steps).",
  )
  if not c.opt.warmup_fraction and c.opt.warmup_steps > c.num_train_steps:  # a short smoke run
    logging.warning(
      "opt.warmup_steps=%d is longer than num_train_steps=%d: warming up over all %d steps.",
      c.opt.warmup_steps,
      c.num_train_steps,
      c.num_train_steps,
    )
