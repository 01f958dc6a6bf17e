"""finetune.class_weights: how much each label's examples weigh in the training loss.

  --config.finetune.class_weights=balanced        # n / (K * n_k) from the training label counts
  --config.finetune.class_weights=spam=4,ham=1    # per label; labels not named weigh 1
  --config.finetune.class_weights=''              # (default) every example weighs 1

The training loss is the weighted mean sum_i w[y_i] * loss_i / sum_i w[y_i] (train_loss in
metrics.jsonl is that mean); eval_loss and the eval metrics stay unweighted, so evals of runs with
and without weights compare. Classification and pair_classification only. The config checks the
setting with `config.finetune.class_weights_error`.
"""

from __future__ import annotations

import numpy as np

from sslm_jax.config.finetune import CLASS_WEIGHTS_BALANCED, class_weight_pairs


def weights(setting: str, labels: tuple[str, ...], train_labels_N: np.ndarray) -> np.ndarray | None:
  """float32 [K] weight per label id, or None for ''; ValueError (one line) for a label the
  training files do not have."""
  if not setting:
    return None
  k = len(labels)
  if setting == CLASS_WEIGHTS_BALANCED:
    counts_K = np.bincount(np.asarray(train_labels_N, np.int64), minlength=k).astype(np.float64)
    return (len(train_labels_N) / (k * np.maximum(counts_K, 1.0))).astype(np.float32)
  out_K = np.ones(k, np.float32)
  for name, value in class_weight_pairs(setting):
    name = name.strip()
    if name not in labels:
      raise ValueError(
        f"finetune.class_weights names the label {name!r}, which the training files do not "
        f"have; their labels: {', '.join(labels[:20])}."
      )
    out_K[labels.index(name)] = float(value)
  return out_K
