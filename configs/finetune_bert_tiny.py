"""Fine-tune a tiny BERT on the built-in task (does a Python snippet define a function or class?).

  python -m sslm_jax.main --config=configs/bert_tiny.py --workdir=runs/bert_tiny
  python -m sslm_jax.main --config=configs/finetune_bert_tiny.py --workdir=runs/cls \\
    --config.finetune.init_from=runs/bert_tiny

Without --config.finetune.init_from the same run starts from random weights (the baseline; pass
--config.data.tokenizer_path=runs/bert_tiny/tokenizer.model to give it the same tokenizer).
The model fields match configs/bert_tiny.py, as init_from requires. Every eval writes
eval_accuracy, eval_macro_f1 and eval_mcc to WORKDIR/metrics.jsonl; the classes are balanced,
so the majority class scores 0.5. Own labelled files: --config.finetune.train_files=... and
--config.finetune.eval_files=... (.jsonl/.csv/.tsv with text, optional text_pair, label).
"""

from sslm_jax.config import defaults


def get_config():
  c = defaults()
  c.objective = "masked_lm"
  c.num_train_steps = 300
  c.batch_size = 32
  c.log_every_steps = 10
  c.eval_every_steps = 50
  c.checkpoint_every_steps = 100
  c.sample_at_end = False

  c.finetune.task = "classification"

  c.data.seq_len = 128
  c.data.vocab_size = 4096

  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.emb_dim = 128
  c.model.mlp_dim = 512
  c.model.dropout_rate = 0.1

  # BERT's fine-tuning recipe (warmup over 10% of the steps, linear decay to 0, weight decay
  # 0.01, b2 0.999) with a larger peak learning rate for a model this small.
  c.opt.learning_rate = 2e-4
  c.opt.warmup_fraction = 0.1
  c.opt.decay = "linear"
  c.opt.final_lr_fraction = 0.0
  c.opt.b2 = 0.999
  c.opt.weight_decay = 0.01
  return c
