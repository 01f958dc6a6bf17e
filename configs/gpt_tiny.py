"""A tiny GPT (causal LM) on the built-in corpus: the Python standard library's own source.

  python -m sslm_jax.main --config=configs/gpt_tiny.py --workdir=runs/gpt_tiny

Expect, on a 2-core laptop CPU, about 5 minutes including tokenizer training (~8k tokens/s):
eval_loss falls from 8.3 (ln of the vocab) to about 3.9 and eval_bits_per_byte from 3.8 to about
1.8, then a short continuation of a held-out prompt. Rerun the command to resume; raise
num_train_steps to go on.
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

  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.emb_dim = 128
  c.model.mlp_dim = 512

  c.opt.learning_rate = 3e-3
  c.opt.warmup_steps = 30
  c.opt.weight_decay = 0.1
  return c
