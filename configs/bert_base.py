"""BERT-base (110M parameters: 12 layers, width 768, 12 heads, seq 512, vocab 30522).

  python -m sslm_jax.main --config=configs/bert_base.py --workdir=runs/bert_base \
      --config.data.source=tfds --config.data.tfds_name=wikipedia/20230601.en

TFDS builds Wikipedia with Apache Beam: prepare it once where it can be downloaded
(`pip install apache-beam mwparserfromhell && tfds build wikipedia/20230601.en --data_dir=DIR`)
and pass --config.data.tfds_data_dir=DIR.

Hyperparameters follow BERT (AdamW lr 1e-4, b2 0.999, eps 1e-6, weight decay 0.01, 10k warmup,
linear decay, dropout 0.1 on the residuals, 15% masking with 80/10/10) without next-sentence
prediction.
Sized for accelerators: expect eval_mlm_accuracy above 0.5 after ~50k steps of batch 256.
On TPU and GPU it computes in bfloat16 with float32 parameters and optimizer state
(model.dtype='auto'; float32 on CPU; --config.model.dtype=float32 overrides it). No dropout on
the attention probabilities, as in recent BERT recipes, so attention runs as a flash kernel (splash
on TPU, cuDNN on Hopper GPUs), which moves far fewer HBM bytes per layer (docs/performance.md).
--config.model.attention_dropout=0.1 is Hugging Face BERT's attention_probs_dropout_prob; it needs
XLA's attention.
"""

from sslm_jax.config import defaults


def get_config():
  c = defaults()
  c.objective = "masked_lm"
  c.num_train_steps = 1_000_000
  c.batch_size = 256
  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.eval_steps = 50
  c.checkpoint_every_steps = 5000

  # TFDS wikipedia has a train split only: the first 5,000 articles are held out for eval.
  c.data.tfds_train_split = "train[5000:]"
  c.data.tfds_eval_split = "train[:5000]"
  c.data.seq_len = 512
  c.data.vocab_size = 30522
  c.data.mlm_probability = 0.15

  c.model.num_layers = 12
  c.model.num_heads = 12
  c.model.emb_dim = 768
  c.model.mlp_dim = 3072
  c.model.dropout_rate = 0.1
  c.model.attention_dropout = 0.0  # 0.1 is Hugging Face BERT's; it rules out flash attention

  c.opt.learning_rate = 1e-4
  c.opt.warmup_steps = 10_000
  c.opt.decay = "linear"
  c.opt.final_lr_fraction = 0.0
  c.opt.b1 = 0.9
  c.opt.b2 = 0.999
  c.opt.eps = 1e-6
  c.opt.weight_decay = 0.01
  return c
