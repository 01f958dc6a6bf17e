"""A Llama-style decoder of ~125M parameters (12 layers, width 768, 12 query and 4 key/value
heads, SwiGLU 2048, seq 2048, vocab 32000, untied output embedding).

  python -m sslm_jax.main --config=configs/llama_base.py --workdir=runs/llama_base \
      --config.data.source=tfds --config.data.tfds_name=lm1b

Hyperparameters follow current small decoders (AdamW b2=0.95, lr 3e-4 with a warmup-stable-decay
schedule whose last 20% decays, weight decay 0.1, z-loss 1e-4, ~0.5M tokens per step).
Sized for accelerators: expect eval_loss below ~3.5 on lm1b within the first 10k steps. Check
the layout for a pod before renting it: --plan --topology=v5p-64 compiles the step for 32 v5p
chips on this machine and prints memory and step-time estimates. On TPU and GPU it computes in
bfloat16 with float32 parameters and optimizer state and runs flash attention (splash on TPU,
cuDNN on Hopper GPUs).
"""

from sslm_jax.config import defaults


def get_config():
  c = defaults()
  c.objective = "causal_lm"
  c.num_train_steps = 50_000
  c.batch_size = 256
  c.log_every_steps = 100
  c.eval_every_steps = 2000
  c.eval_steps = 50
  c.checkpoint_every_steps = 2000

  c.data.seq_len = 2048
  c.data.vocab_size = 32000

  c.model.family = "llama"
  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.num_kv_heads = 4
  c.model.emb_dim = 768
  c.model.mlp_dim = 2048
  c.model.rope_base = 10000.0
  c.model.tie_embeddings = False

  c.opt.learning_rate = 3e-4
  c.opt.warmup_steps = 2000
  c.opt.schedule = "wsd"
  c.opt.decay_fraction = 0.2
  c.opt.decay = "linear"
  c.opt.final_lr_fraction = 0.0
  c.opt.z_loss = 1e-4
  c.opt.b2 = 0.95
  c.opt.weight_decay = 0.1
  return c
