"""A tiny BERT (masked LM) on the built-in corpus: the Python standard library's own source.

  python -m sslm_jax.main --config=configs/bert_tiny.py --workdir=runs/bert_tiny

Expect, on a 2-core laptop CPU, about 4 minutes including tokenizer training (~19k tokens/s):
eval_loss falls from 8.4 (ln of the vocab) to about 5.5 and eval_mlm_accuracy rises from 0 to
about 0.14 (it sits near the unigram distribution, 6.1 and 0.07, for the first ~200 steps), then
a held-out line with one [MASK] and the model's top-5 guesses for it.
"""

from sslm_jax.config import defaults


def get_config():
  c = defaults()
  c.objective = "masked_lm"
  c.num_train_steps = 800
  c.batch_size = 32
  c.log_every_steps = 10
  c.eval_every_steps = 200
  c.eval_steps = 10
  c.checkpoint_every_steps = 200

  c.data.source = "builtin"
  c.data.seq_len = 128
  c.data.vocab_size = 4096
  c.data.tokenizer_sample_bytes = 5_000_000
  c.data.mlm_probability = 0.15

  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.emb_dim = 128
  c.model.mlp_dim = 512

  # Post-LayerNorm BERT collapses to the unigram distribution at 2e-3 and above here.
  c.opt.learning_rate = 1e-3
  c.opt.warmup_steps = 50
  c.opt.b2 = 0.98
  c.opt.weight_decay = 0.01
  return c
