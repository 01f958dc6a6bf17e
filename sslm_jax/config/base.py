"""Every field a config may set, with its default: what config files start from and override."""

from __future__ import annotations

import ml_collections

from sslm_jax.config import finetune as finetune_config


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
  # A local Hugging Face GPT2LMHeadModel / BertForMaskedLM / LlamaForCausalLM /
  # ModernBertForMaskedLM directory (config.json and model.safetensors, of model.family's class)
  # whose weights start the run instead of random ones; its shape must match
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
  # auto (gpt2 for causal_lm, bert for masked_lm) | gpt2 | bert | llama (causal_lm: rotary
  # positions, RMSNorm, SwiGLU, grouped-query attention, no biases) | modernbert (masked_lm: rotary
  # positions, GeGLU, pre-norm, no biases, global and sliding-window layers); models/modern.py.
  s.family = "auto"
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
  # The rotary families (llama, modernbert) only:
  s.num_kv_heads = 0  # heads of keys and values (grouped-query attention; 1: multi-query); 0: all
  s.rope_base = 10000.0  # rotary base (theta); modernbert's global layers
  s.rope_local_base = 10000.0  # modernbert's sliding-window layers
  s.qk_norm = False  # llama: RMSNorm on queries and keys (Qwen3, OLMo-2)
  s.tie_embeddings = True  # llama: False gives the output projection its own [vocab, width] table
  # modernbert: layer i attends globally when i % global_every == 0, else only to keys at most
  # sliding_window // 2 positions away (0: every layer global). ModernBERT's are 3 and 128.
  s.global_every = 1
  s.sliding_window = 0
  # Epsilon of every LayerNorm/RMSNorm; 0: the family's (1e-12 bert, 1e-5 the others).
  s.norm_epsilon = 0.0
  # Documents per row that cuDNN's packed layout holds; 0: measured on the data at start.
  s.max_segments_per_row = 0
  return s


def _opt_defaults() -> ml_collections.ConfigDict:
  """AdamW (or Muon) with warmup, then decay."""
  s = ml_collections.ConfigDict()
  # 'adamw' | 'muon': Muon for the weight matrices and AdamW for the rest (training/muon.py).
  s.name = "adamw"
  s.muon_learning_rate = 0.0  # 'muon': the matrices' peak rate; 0: learning_rate
  s.learning_rate = 1e-3
  s.warmup_steps = 100
  s.warmup_fraction = 0.0  # > 0: warm up over this fraction of num_train_steps instead
  s.decay = "cosine"  # 'cosine' | 'linear' | 'constant'
  # 'warmup_decay': warm up, then decay over the rest of the run; 'wsd' (warmup-stable-decay):
  # warm up, hold the peak, and decay over the last decay_fraction of the run only.
  s.schedule = "warmup_decay"
  s.decay_fraction = 0.2  # 'wsd' only: the fraction of num_train_steps that decays
  # > 0: add z_loss * logsumexp(logits)^2 per predicted token to the training loss (PaLM's
  # z-loss, 1e-4 there), logged as train_z_loss; pretraining objectives only.
  s.z_loss = 0.0
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
