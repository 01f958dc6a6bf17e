"""GPT-2 small (124M parameters: 12 layers, width 768, 12 heads, seq 1024, vocab 50257).

  python -m sslm_jax.main --config=configs/gpt_base.py --workdir=runs/gpt_base \
      --config.data.source=tfds --config.data.tfds_name=lm1b

Hyperparameters follow GPT-2 / nanoGPT (AdamW b2=0.95, lr 6e-4 cosine to 10%, 2k warmup,
weight decay 0.1, ~0.25M tokens per step). Sized for accelerators: on one 8-device host expect
eval_loss to fall below ~3.5 on lm1b within the first 10k steps. Use mesh.* to shard it.
On TPU and GPU it computes in bfloat16 with float32 parameters and optimizer state
(model.dtype='auto'; float32 on CPU) and runs flash attention (splash on TPU, cuDNN on Hopper
GPUs); --config.model.dtype=float32 or --config.model.attention_impl=xla override them.
"""

from sslm_jax.config import defaults


def get_config():
  c = defaults()
  c.objective = "causal_lm"
  c.num_train_steps = 100_000
  c.batch_size = 256
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.eval_steps = 50
  c.checkpoint_every_steps = 2000

  c.data.seq_len = 1024
  c.data.vocab_size = 50257

  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.emb_dim = 768
  c.model.mlp_dim = 3072
  c.model.dropout_rate = 0.0
  c.model.attention_dropout = 0.0

  c.opt.learning_rate = 6e-4
  c.opt.warmup_steps = 2000
  c.opt.final_lr_fraction = 0.1
  c.opt.weight_decay = 0.1
  return c
