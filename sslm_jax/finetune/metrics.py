"""Fine-tuning metrics, computed on the host from predictions gathered over the whole eval set.

numpy only. Each function takes the already-filtered examples (no weights or masks) and returns a
dict of Python floats. An empty input raises ValueError: a metric of nothing is a bug upstream, not
a zero to log.
"""

from __future__ import annotations

import numpy as np


def _int_vector(name: str, values, num_classes: int) -> np.ndarray:
  values_N = np.asarray(values)
  if values_N.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {values_N.shape}")
  if values_N.size and not np.issubdtype(values_N.dtype, np.integer):
    raise ValueError(f"{name} must hold integer class ids, got dtype {values_N.dtype}")
  values_N = values_N.astype(np.int64)
  bad_N = (values_N < 0) | (values_N >= num_classes)
  if bad_N.any():
    raise ValueError(f"{name} has class id {values_N[bad_N][0]} outside [0, {num_classes})")
  return values_N


def confusion_matrix(labels_N, predictions_N, num_classes: int) -> np.ndarray:
  """[true class, predicted class] -> count, shape (num_classes, num_classes), int64."""
  labels_N = _int_vector("labels", labels_N, num_classes)
  predictions_N = _int_vector("predictions", predictions_N, num_classes)
  if labels_N.shape != predictions_N.shape:
    raise ValueError(f"labels {labels_N.shape} and predictions {predictions_N.shape} differ")
  flat_N = labels_N * num_classes + predictions_N
  return np.bincount(flat_N, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification(labels_N, predictions_N, num_classes: int) -> dict:
  """accuracy, macro_f1 and mcc of integer class predictions.

  macro_f1: the unweighted mean over classes of F1 = 2TP / (2TP + FP + FN), over the classes that
  occur among the labels or the predictions (scikit-learn's default `labels` = those present). A
  class that is predicted but never right, or present but never predicted, has F1 0 and counts.

  mcc: Gorodkin's R_K from the confusion matrix C (rows true, columns predicted), with t_k the true
  and p_k the predicted count of class k, c the trace and s the number of examples:
    (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2)),
  and 0.0 when the denominator is 0 (one class only on either side), as scikit-learn does.
  """
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}")
  counts_KK = confusion_matrix(labels_N, predictions_N, num_classes).astype(np.float64)
  total = counts_KK.sum()
  if total == 0:
    raise ValueError("classification metrics of an empty eval set")
  true_K, pred_K, hits_K = counts_KK.sum(axis=1), counts_KK.sum(axis=0), np.diag(counts_KK)
  # 2TP + FP + FN = (TP + FN) + (TP + FP) = true count + predicted count.
  f1_denominator_K = true_K + pred_K
  present_K = f1_denominator_K > 0
  macro_f1 = np.mean(2 * hits_K[present_K] / f1_denominator_K[present_K])
  correct = hits_K.sum()
  numerator = correct * total - pred_K @ true_K
  denominator_sq = (total**2 - pred_K @ pred_K) * (total**2 - true_K @ true_K)
  mcc = numerator / np.sqrt(denominator_sq) if denominator_sq > 0 else 0.0
  return {"accuracy": float(correct / total), "macro_f1": float(macro_f1), "mcc": float(mcc)}


def _float_vector(name: str, values) -> np.ndarray:
  values_N = np.asarray(values, dtype=np.float64)
  if values_N.ndim != 1:
    raise ValueError(f"{name} must be 1-D, got shape {values_N.shape}")
  if not np.isfinite(values_N).all():
    raise ValueError(f"{name} has non-finite values")
  return values_N


def _correlation(x_N: np.ndarray, y_N: np.ndarray) -> float:
  """Pearson's r; 0.0 when either side is constant (checked exactly, not by a centred sum that
  rounding can leave a hair above zero)."""
  if (x_N == x_N[0]).all() or (y_N == y_N[0]).all():
    return 0.0
  xc_N, yc_N = x_N - x_N.mean(), y_N - y_N.mean()
  r = (xc_N @ yc_N) / np.sqrt((xc_N @ xc_N) * (yc_N @ yc_N))
  return float(np.clip(r, -1.0, 1.0))


def average_ranks(values_N: np.ndarray) -> np.ndarray:
  """1-based ranks; tied values share the mean of the ranks they span."""
  _, inverse_N, counts_U = np.unique(values_N, return_inverse=True, return_counts=True)
  # The values equal to unique value u span ranks first+1 .. first+count: mean first + (count+1)/2.
  first_U = np.cumsum(counts_U) - counts_U
  return (first_U + (counts_U + 1) / 2.0)[inverse_N.reshape(-1)]


def regression(targets_N, predictions_N) -> dict:
  """pearson, spearman (Pearson's r of average ranks, so ties are handled exactly) and mse.

  Both correlations are 0.0, not NaN, when either side is constant (that includes N == 1).
  """
  targets_N = _float_vector("targets", targets_N)
  predictions_N = _float_vector("predictions", predictions_N)
  if targets_N.shape != predictions_N.shape:
    raise ValueError(f"targets {targets_N.shape} and predictions {predictions_N.shape} differ")
  if targets_N.size == 0:
    raise ValueError("regression metrics of an empty eval set")
  return {
    "pearson": _correlation(targets_N, predictions_N),
    "spearman": _correlation(average_ranks(targets_N), average_ranks(predictions_N)),
    "mse": float(np.mean((predictions_N - targets_N) ** 2)),
  }


def entities(tags: list[str], row: int = 0) -> set[tuple[int, int, int, str]]:
  """(row, start, end, type) of each entity in one row of BIO tags, end exclusive.

  B-X starts an entity; I-X continues the open entity only when that entity has type X, and
  otherwise starts a new one (conlleval's and seqeval's default); O closes any open entity.
  """
  found = set()
  start, kind = None, None
  for position, tag in enumerate([*tags, "O"]):  # the sentinel O closes a trailing entity
    prefix, _, tag_kind = tag.partition("-")
    if tag == "O" or (prefix in ("B", "I") and tag_kind):
      continues = prefix == "I" and kind == tag_kind
    else:
      raise ValueError(f"row {row}: tag {tag!r} at position {position} is not O, B-X or I-X")
    if start is not None and not continues:
      found.add((row, start, position, kind))
      start, kind = None, None
    if tag != "O" and not continues:
      start, kind = position, tag_kind
  return found


def entity_f1(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
  """Entity-level precision, recall and f1 over BIO tags, micro-averaged over entity types: an
  entity counts as found only when its start, end and type all match. Each is 0.0 when its
  denominator is 0 (no predicted / no true entities), as conlleval and seqeval report it.
  token_accuracy is the fraction of tags equal to the true tag, over every token.
  """
  if len(true_tags) != len(pred_tags):
    raise ValueError(f"{len(true_tags)} true rows but {len(pred_tags)} predicted rows")
  true_set, pred_set = set(), set()
  num_tokens = num_correct = 0
  for row, (true_row, pred_row) in enumerate(zip(true_tags, pred_tags, strict=True)):
    if len(true_row) != len(pred_row):
      raise ValueError(f"row {row}: {len(true_row)} true tags but {len(pred_row)} predicted tags")
    true_set |= entities(true_row, row)
    pred_set |= entities(pred_row, row)
    num_tokens += len(true_row)
    num_correct += sum(t == p for t, p in zip(true_row, pred_row, strict=True))
  if num_tokens == 0:
    raise ValueError("entity metrics of an eval set with no tokens")
  hits = len(true_set & pred_set)
  precision = hits / len(pred_set) if pred_set else 0.0
  recall = hits / len(true_set) if true_set else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
  return {
    "precision": float(precision),
    "recall": float(recall),
    "f1": float(f1),
    "token_accuracy": num_correct / num_tokens,
  }
