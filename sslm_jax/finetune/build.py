"""The model of a fine-tuning task: the encoder with the task's head, freshly initialised.

Classification and regression put heads.SequenceHead on the encoder (regression with one output),
tagging tagging.TokenHead. Both the fine-tuning loop (finetune/loop.py, whose objective trains it)
and the loaded task model (finetune/task_model.py, which restores its parameters) build it here,
so that loading a fine-tuned workdir needs no training code.
"""

from __future__ import annotations

from sslm_jax.finetune import heads, tagging
from sslm_jax.models.config import ModelConfig


def task_model(
  model_cfg: ModelConfig, task: str, num_labels: int, seed: int
) -> heads.Classifier | tagging.Tagger:
  """A fresh model for `task` with `num_labels` labels (ignored for regression); its encoder is
  initialised exactly as model.build(model_cfg, seed) would be."""
  if task == tagging.TASK:
    return tagging.build(model_cfg, num_labels, seed)
  return heads.build(model_cfg, heads.num_outputs(task, num_labels), seed)
