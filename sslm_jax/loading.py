"""`sslm_jax.load(workdir)`: the model a training workdir holds, of whichever kind its run made.

The workdir is read once (checkpoints/restore.read_workdir: config.json, the step, the tokenizer
file); a fine-tuning run (finetune.task set) gives a finetune/task_model.TaskModel (`classify`,
`tag`), by default at its best eval, a pretraining run an inference/language_model.LanguageModel
(`generate`, `fill_mask`, `score`, `embed`, `logits`). The dispatch lives here, above both
layers, so that neither the inference layer nor fine-tuning imports the other, and loading a
fine-tuned model imports no training code.
"""

from __future__ import annotations

from sslm_jax.checkpoints import restore
from sslm_jax.finetune import task_model
from sslm_jax.inference import language_model


def load(workdir: str, step: int | str | None = None):
  """The model of `workdir` at `step`: a checkpoint step (an int, or one typed as text), 'best'
  for a fine-tuning run's best eval, or None for the default (best, else the newest)."""
  run = restore.read_workdir(workdir, step)
  if run.fine_tuned:
    return task_model.from_saved(run)
  return language_model.from_saved(run)
