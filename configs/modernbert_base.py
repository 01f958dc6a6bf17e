"""A ModernBERT-base-style encoder (149M parameters: 22 layers, width 768, 12 heads, GeGLU 1152,
global attention every third layer and a 128-token sliding window between, seq 1024, vocab
50368).

  python -m sslm_jax.main --config=configs/modernbert_base.py --workdir=runs/modernbert_base \
      --config.data.source=tfds --config.data.tfds_name=wikipedia/20230601.en

Hyperparameters follow ModernBERT's first phase (30% masking, AdamW lr 8e-4, b2 0.98, eps 1e-6,
weight decay 1e-5, rotary base 160k globally and 10k in the window, warmup-stable-decay) at
sequence length 1024; raise data.seq_len and model.rope_base for its long-context phase.
Sized for accelerators: expect eval_mlm_accuracy above 0.5 within ~50k steps of batch 256.
--plan --topology=v5p-64 compiles the step for 32 v5p chips on this machine and prints memory
and step-time estimates. On TPU and GPU it computes in bfloat16 with float32 parameters and
optimizer state.
"""

from sslm_jax.config import defaults


def get_config():
  c = defaults()
  c.objective = "masked_lm"
  c.num_train_steps = 100_000
  c.batch_size = 256
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.eval_steps = 50
  c.checkpoint_every_steps = 2000

  c.data.seq_len = 1024
  # Wikipedia has one split: hold out its first 5000 articles (prepare it as configs/bert_base.py
  # says).
  c.data.tfds_train_split = "train[5000:]"
  c.data.tfds_eval_split = "train[:5000]"
  c.data.vocab_size = 50368
  c.model.vocab_multiple = 64  # ModernBERT's 50368 rows, unpadded
  c.data.mlm_probability = 0.3

  c.model.family = "modernbert"
  c.model.num_layers = 22
  c.model.num_heads = 12
  c.model.emb_dim = 768
  c.model.mlp_dim = 1152
  c.model.global_every = 3
  c.model.sliding_window = 128
  c.model.rope_base = 160000.0
  c.model.rope_local_base = 10000.0

  c.opt.learning_rate = 8e-4
  c.opt.warmup_steps = 3000
  c.opt.schedule = "wsd"
  c.opt.decay_fraction = 0.1
  c.opt.decay = "linear"
  c.opt.final_lr_fraction = 0.0
  c.opt.b2 = 0.98
  c.opt.eps = 1e-6
  c.opt.weight_decay = 1e-5
  return c
