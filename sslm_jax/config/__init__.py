"""Config defaults, validation and derived values. Fails before anything compiles."""

from __future__ import annotations

import difflib
import math
import os

import jax
import ml_collections
from absl import logging

from sslm_jax.config import finetune as finetune_config
from sslm_jax.config import mixture as mixture_config
from sslm_jax.errors import SslmError
from sslm_jax.models.transformer import ModelConfig


class ConfigError(SslmError, ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def defaults() -> ml_collections.ConfigDict:
  """Every field a config file may set. Config files start from this and override."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objective = "causal_lm"  # 'causal_lm' (GPT) | 'masked_lm' (BERT)
  c.num_train_steps = 1000
  c.batch_size = 32  # global sequences per step
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.eval_steps = 20
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  c.keep_every_steps = 0  # also keep every step divisible by this (0: none)
  c.sample_at_end = True
  # A jax.profiler trace of `profile_steps` steps from `profile_start_step` into
  # workdir/tensorboard (0 steps: none). Start after the first step, which includes compiling.
  c.profile_start_step = 5
  c.profile_steps = 0
  # XLA options for compiling the train step only, 'name=value,...'; e.g.
  # xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT. None is set by default: see
  # docs/performance.md for what was measured.
  c.compiler_options = ""
  # Run-to-run deterministic GPU kernels (XLA's --xla_gpu_deterministic_ops), so a resumed GPU run
  # repeats an uninterrupted one bit for bit; slower (scatters serialize, no autotuning choice).
  # CPU and TPU steps are deterministic without it.
  c.deterministic = False
  # A local Hugging Face GPT2LMHeadModel / BertForMaskedLM directory (config.json and
  # model.safetensors) whose weights start the run instead of random ones; its shape must match
  # the model fields (mismatches are named). Ignored when resuming from a checkpoint.
  c.init_from_hf = ""

  c.data = _data_defaults()

  c.model = _model_defaults()

  c.opt = _opt_defaults()

  c.finetune = finetune_config.defaults()

  c.mesh = _mesh_defaults()
  return c


def _data_defaults() -> ml_collections.ConfigDict:
  """Where the text comes from and how it is tokenized."""
  s = ml_collections.ConfigDict()
  s.source = "builtin"  # 'builtin' | 'text' | 'tfds'
  s.text_files = ""  # comma-separated paths or glob patterns (local or gs://)
  s.eval_text_files = ""  # optional; else a held-out fraction of documents
  s.text_key = "text"  # field of a .jsonl record
  s.eval_fraction = 0.05  # documents held out when no eval files are given
  s.tfds_name = ""
  s.tfds_text_key = "text"
  s.tfds_train_split = "train"
  s.tfds_eval_split = "test"
  s.tfds_data_dir = ""
  s.seq_len = 128
  s.vocab_size = 8192
  # A sentencepiece .model or a Hugging Face tokenizer.json; empty: one is trained.
  s.tokenizer_path = ""
  s.tokenizer_sample_bytes = 20_000_000
  s.mlm_probability = 0.15
  # Text augmentation of the training split (config/augment_spec.py), e.g.
  # 'synonym:p=0.5,alpha=0.1,thesaurus=/data/syn.tsv;swap:p=0.3'; '' is off. Each training
  # example is kept and followed by up to augment_copies augmented copies.
  s.augment = ""
  s.augment_copies = 1
  # Preparing the cache (data/preparation.py): worker processes per host, and rows per shard
  # (0: about 64 MiB). Neither changes the rows, so neither is recorded in checkpoints.
  s.prepare_workers = 1
  s.shard_rows = 0
  # Remote shards (gs://...) are read by ranged reads: this many at once, and this many batches
  # fetched ahead. Raise both when a fast step waits on a far-away bucket.
  s.read_threads = 128
  s.read_ahead_batches = 16
  # Several sources with weights (config/mixture.py); empty: data.source alone.
  s.mixture = ml_collections.ConfigDict()
  return s


def _model_defaults() -> ml_collections.ConfigDict:
  """The Transformer's shape and numerics."""
  s = ml_collections.ConfigDict()
  s.num_layers = 2
  s.num_heads = 4
  s.emb_dim = 128
  s.mlp_dim = 512
  s.dropout_rate = 0.0
  s.attention_dropout = 0.0  # on attention probabilities (BERT's); XLA attention only, not fused
  # Compute dtype. 'auto' (the default): bfloat16 on TPU and GPU, float32 on CPU (whose bf16 matmuls
  # run no faster). Parameters and optimizer state stay model.param_dtype (float32); LayerNorm,
  # softmax, the logsumexp of the loss and its reductions run in float32 whatever this says.
  # Override with --config.model.dtype=float32 (or bfloat16) to force one everywhere.
  s.dtype = "auto"
  s.param_dtype = "float32"
  s.vocab_multiple = 128  # embedding rows padded to a multiple of this
  # Rows of the position table: the longest sequence the model takes; 0 means data.seq_len.
  # Set it above seq_len to train short now and longer later (BERT's 128-then-512 recipe).
  s.max_positions = 0
  s.scan_layers = True
  s.remat_policy = "none"  # none | full | dots | dots_no_batch
  # auto (splash on TPU, cudnn on Hopper+ GPUs for bf16/fp16, else xla) | xla | cudnn | splash
  s.attention_impl = "auto"
  # Splash attention's query and key/value blocks, multiples of 128: each runs as the largest
  # multiple of 128 at most this size that divides the sequence length. The backward pass too.
  s.attention_block_q = 512
  s.attention_block_kv = 512
  # The output projection and cross-entropy (training/vocab_loss.py) run over chunks of this many
  # sequence positions (masked_lm: gathered predictions). 0, one chunk, moves the fewest HBM bytes;
  # chunks hold less memory at once (for a large vocabulary), and each re-reads the embedding.
  s.loss_chunk_len = 0
  s.gelu = "auto"  # auto (tanh for causal_lm like GPT-2, erf for masked_lm like BERT) | tanh | erf
  # Documents per row that cuDNN's packed layout holds; 0: measured on the data at start.
  s.max_segments_per_row = 0
  return s


def _opt_defaults() -> ml_collections.ConfigDict:
  """AdamW with warmup, then decay."""
  s = ml_collections.ConfigDict()
  s.learning_rate = 1e-3
  s.warmup_steps = 100
  s.warmup_fraction = 0.0  # > 0: warm up over this fraction of num_train_steps instead
  s.decay = "cosine"  # 'cosine' | 'linear' | 'constant'
  s.final_lr_fraction = 0.1
  s.b1 = 0.9
  s.b2 = 0.95
  s.eps = 1e-8
  s.weight_decay = 0.1
  s.decay_embeddings = False
  s.grad_clip_norm = 1.0
  s.grad_accum_steps = 1  # microbatches per step, accumulated inside one jitted step
  return s


def _mesh_defaults() -> ml_collections.ConfigDict:
  """Device mesh axes and sharding-rule overrides."""
  s = ml_collections.ConfigDict()
  s.data = -1  # -1: all devices not used by the other axes
  s.fsdp = 1
  s.tensor = 1
  s.dcn_data = 1  # multi-slice TPU: slices spanned by the data axis (hybrid mesh)
  s.dcn_fsdp = 1
  s.rules = ()  # ((logical_name, mesh_axes), ...) overriding sharding.DEFAULT_RULES
  return s


OBJECTIVES = ("causal_lm", "masked_lm")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SOURCES = ("builtin", "text", "tfds")


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
    from sslm_jax.config import augment_spec

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


def _validate_attention(c: ml_collections.ConfigDict) -> None:
  impl, dtype, backend = c.model.attention_impl, compute_dtype(c), jax.default_backend()
  _require(
    impl in ATTENTION_IMPLS,
    f"model.attention_impl={impl!r}: use one of {', '.join(ATTENTION_IMPLS)}.",
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
    impl != "cudnn" or _gpu_capability() >= (9, 0),
    "model.attention_impl='cudnn' takes packed documents as lengths and offsets, which cuDNN "
    f"supports from Hopper (compute capability 9.0) on; this GPU is {_gpu_capability()}. "
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
  """compiler_options, and the Hugging Face directory a run may start from."""
  _require(
    not c.compiler_options or "=" in c.compiler_options.split(",")[0],
    f"compiler_options={c.compiler_options!r}: use 'name=value,name=value' (or '' for none).",
  )
  _require(
    isinstance(c.init_from_hf, str),
    f"init_from_hf={c.init_from_hf!r} must be a directory path (or '' for random init).",
  )
  # Before the directory is read: a mismatch with it would hide that one source is too many.
  _require(
    not (c.finetune.task and c.finetune.init_from and c.init_from_hf),
    "finetune.init_from and init_from_hf both name starting weights; set only one of them.",
  )
  if c.init_from_hf and os.path.isdir(c.init_from_hf):
    from sslm_jax.checkpoints import hf

    hf.check_dir(c.init_from_hf, c)


def _validate_opt(c: ml_collections.ConfigDict) -> None:
  """The optimizer and its schedule; a warmup longer than the run is only warned about."""
  _require(
    c.opt.decay in ("cosine", "linear", "constant"),
    f"opt.decay={c.opt.decay!r}: use 'cosine', 'linear' or 'constant'.",
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


DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"


def request_determinism(c: ml_collections.ConfigDict, environ=os.environ) -> None:
  """With c.deterministic, add DETERMINISTIC_XLA_FLAG to XLA_FLAGS (replacing any other value).

  On GPU the flag makes XLA use deterministic scatters (the embedding gradient), pick kernels
  without timing them, and ask cuDNN for its deterministic attention backward. XLA reads
  XLA_FLAGS once, when the backend starts, so this runs before anything touches a device.
  """
  if not c.deterministic:
    return
  from jax._src import xla_bridge  # no public way to ask whether the backend has started

  _require(
    not xla_bridge.backends_are_initialized(),
    "deterministic=True must be applied before JAX starts its backend; set it in the config "
    f"file or on the command line, or put {DETERMINISTIC_XLA_FLAG} in XLA_FLAGS yourself.",
  )
  name = DETERMINISTIC_XLA_FLAG.split("=")[0]
  kept = [f for f in environ.get("XLA_FLAGS", "").split() if f.split("=")[0] != name]
  environ["XLA_FLAGS"] = " ".join([*kept, DETERMINISTIC_XLA_FLAG])
  logging.info("deterministic=True: XLA_FLAGS=%s", environ["XLA_FLAGS"])


def padded_vocab_size(c: ml_collections.ConfigDict) -> int:
  multiple = max(1, c.model.vocab_multiple)
  return int(math.ceil(c.data.vocab_size / multiple) * multiple)


def positions(c: ml_collections.ConfigDict) -> int:
  """Rows of the position table: model.max_positions, or data.seq_len when that is 0."""
  return c.model.max_positions or c.data.seq_len


def model_config(c: ml_collections.ConfigDict, platform: str | None = None) -> ModelConfig:
  """The frozen model description the model code takes (never the ConfigDict), with 'auto'
  fields resolved for `platform` ('cpu', 'gpu', 'tpu'; default: JAX's backend here)."""
  causal = c.objective == "causal_lm"
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
    layer_norm_epsilon=1e-5 if causal else 1e-12,
    scan_layers=bool(c.model.scan_layers),
    remat_policy=c.model.remat_policy,
    attention_impl=attention_impl(c, platform),
    attention_block_q=c.model.attention_block_q,
    attention_block_kv=c.model.attention_block_kv,
    loss_chunk_len=c.model.loss_chunk_len,
    max_segments=max(1, c.model.max_segments_per_row),
    real_vocab_size=c.data.vocab_size,
    gelu=gelu_form(c),
  )


GELU_FORMS = ("auto", "tanh", "erf")


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


def attention_impl(c: ml_collections.ConfigDict, platform: str | None = None) -> str:
  """'auto' resolved for `platform` (default: JAX's backend here): splash on TPU, cuDNN flash
  attention on GPUs where it applies, else XLA's (always XLA's with model.attention_dropout)."""
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
    and _gpu_capability() >= (9, 0)
    and compute_dtype(c, platform) in ("bfloat16", "float16")
    and head_dim <= 128
    and head_dim % 8 == 0
  )
  return "cudnn" if cudnn_ok else "xla"


SPLASH_LANES = (
  128  # splash attention's blocks are multiples of the TPU's 128 lanes (models/splash.py)
)


def resolved(c: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
  """A copy of `c` whose 'auto' dtype and attention are spelt out for `platform`: what a run
  there would use (the plan compiles for a TPU from a CPU process)."""
  out = c.copy_and_resolve_references()
  out.model.dtype = compute_dtype(c, platform)
  out.model.attention_impl = attention_impl(c, platform)
  return out


def _gpu_capability() -> tuple[int, ...]:
  """The first local GPU's compute capability, (0,) without one or on ROCm."""
  if jax.default_backend() != "gpu":
    return (0,)
  capability = getattr(jax.local_devices()[0], "compute_capability", None)
  return tuple(int(x) for x in capability.split(".")) if capability else (0,)


def num_predictions(c: ml_collections.ConfigDict) -> int:
  """Masked positions gathered per sequence for the MLM head (BERT's max_predictions_per_seq)."""
  return max(1, int(math.ceil(c.data.seq_len * c.data.mlm_probability)))
