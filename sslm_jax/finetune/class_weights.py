"""finetune.class_weights: how much each label's examples weigh in the training loss.

  --config.finetune.class_weights=balanced        # n / (K * n_k) from the training label counts
  --config.finetune.class_weights=spam=4,ham=1    # per label; labels not named weigh 1
  --config.finetune.class_weights=''              # (default) every example weighs 1

The training loss is the weighted mean sum_i w[y_i] * loss_i / sum_i w[y_i] (train_loss in
metrics.jsonl is that mean); eval_loss and the eval metrics stay unweighted, so evals of runs with
and without weights compare. Classification and pair_classification only. Pure Python and NumPy:
config.py checks the setting with `error`.
"""

from __future__ import annotations

import numpy as np

BALANCED = "balanced"
TASKS = ("classification", "pair_classification")
_FORM = "'' (none), 'balanced', or per label 'LABEL=WEIGHT,...' (e.g. spam=4,ham=1)"


def _pairs(setting: str) -> list[tuple[str, str]]:
  return [tuple(p.rsplit("=", 1)) for p in setting.split(",") if p.strip()]


def error(task: str, setting: str) -> str | None:
  """None when `setting` is a valid finetune.class_weights for `task`, else the one-line error."""
  if not setting:
    return None
  if task not in TASKS:
    return (
      f"finetune.class_weights={setting!r} is for {' and '.join(TASKS)}; leave it '' for {task}."
    )
  if setting == BALANCED:
    return None
  for pair in _pairs(setting):
    try:
      ok = len(pair) == 2 and pair[0].strip() != "" and float(pair[1]) > 0
    except ValueError:
      ok = False
    if not ok:
      return (
        f"finetune.class_weights={setting!r}: {'='.join(pair)!r} is not LABEL=WEIGHT with a "
        f"weight > 0; use {_FORM}."
      )
  return None


def weights(setting: str, labels: tuple[str, ...], train_labels_N: np.ndarray) -> np.ndarray | None:
  """float32 [K] weight per label id, or None for ''; ValueError (one line) for a label the
  training files do not have."""
  if not setting:
    return None
  k = len(labels)
  if setting == BALANCED:
    counts_K = np.bincount(np.asarray(train_labels_N, np.int64), minlength=k).astype(np.float64)
    return (len(train_labels_N) / (k * np.maximum(counts_K, 1.0))).astype(np.float32)
  out_K = np.ones(k, np.float32)
  for name, value in _pairs(setting):
    name = name.strip()
    if name not in labels:
      raise ValueError(
        f"finetune.class_weights names the label {name!r}, which the training files do not "
        f"have; their labels: {', '.join(labels[:20])}."
      )
    out_K[labels.index(name)] = float(value)
  return out_K
