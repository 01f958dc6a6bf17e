"""Fine-tune a tiny GPT on the built-in task (does a Python snippet define a function or class?).

  python -m sslm_jax.main --config=configs/gpt_tiny.py --workdir=runs/gpt_tiny
  python -m sslm_jax.main --config=configs/finetune_gpt_tiny.py --workdir=runs/cls_gpt \\
    --config.finetune.init_from=runs/gpt_tiny

The head reads the hidden state of the last real token ([EOS]). Without init_from the run starts
from random weights (the baseline). The model fields match configs/gpt_tiny.py. Every eval writes
eval_accuracy, eval_macro_f1 and eval_mcc to WORKDIR/metrics.jsonl (majority class: 0.5).
"""

from sslm_jax.config import defaults


def get_config():
  c = defaults()
  c.objective = "causal_lm"
  c.num_train_steps = 300
  c.batch_size = 32
  c.log_every_steps = 10
  c.eval_every_steps = 50
  c.checkpoint_every_steps = 100
  c.sample_at_end = False

  c.finetune.task = "classification"

  c.data.seq_len = 128
  c.data.vocab_size = 4096

  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.emb_dim = 128
  c.model.mlp_dim = 512
  c.model.dropout_rate = 0.1

  # Warmup over 10% of the steps, linear decay to 0, weight decay 0.01.
  c.opt.learning_rate = 2e-4
  c.opt.warmup_fraction = 0.1
  c.opt.decay = "linear"
  c.opt.final_lr_fraction = 0.0
  c.opt.b2 = 0.999
  c.opt.weight_decay = 0.01
  return c
