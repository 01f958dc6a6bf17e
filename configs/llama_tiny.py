"""A tiny Llama-style decoder (causal LM) on the built-in corpus: gpt_tiny's width and depth with
rotary positions, RMSNorm, SwiGLU, grouped-query attention (2 key/value heads for 4 query
heads) and no biases.

  python -m sslm_jax.main --config=configs/llama_tiny.py --workdir=runs/llama_tiny

Expect, on a 2-core laptop CPU, about 5 minutes including tokenizer training: eval_loss falls from
8.3 (ln of the vocab) to about 3.8 and eval_bits_per_byte to about 1.7, then a short
continuation of a held-out prompt. Rerun the command to resume; raise num_train_steps to go on.
"""

from sslm_jax.config import defaults


def get_config():
  c = defaults()
  c.objective = "causal_lm"
  c.num_train_steps = 500
  c.batch_size = 32
  c.log_every_steps = 10
  c.eval_every_steps = 100
  c.eval_steps = 10
  c.checkpoint_every_steps = 100

  c.data.source = "builtin"
  c.data.seq_len = 128
  c.data.vocab_size = 4096
  c.data.tokenizer_sample_bytes = 5_000_000

  c.model.family = "llama"
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.emb_dim = 128
  # SwiGLU has three matrices: 2/3 of gpt_tiny's 512, rounded to 32, keeps the MLP's parameters.
  c.model.mlp_dim = 352
  c.model.rope_base = 10000.0

  c.opt.learning_rate = 3e-3
  c.opt.warmup_steps = 30
  c.opt.weight_decay = 0.1
  return c
