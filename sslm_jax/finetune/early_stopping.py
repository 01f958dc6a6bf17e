"""Early stopping for fine-tuning runs: which eval metric decides, and when to stop.

  --config.finetune.early_stopping_metric=eval_macro_f1   # '' = the task's default (DEFAULTS)
  --config.finetune.early_stopping_patience=3             # evals without improvement; 0 = never

Metrics whose name contains `loss` are minimised, the others maximised. Only a strict improvement
counts (a tie keeps the earlier best). The untrained baseline eval at step 0 is not counted.

The tracker's whole state goes into each checkpoint's metadata, so a resumed run takes exactly
the decisions an uninterrupted one would. Pure Python: config.py checks metric names with it.
"""

from __future__ import annotations

import dataclasses
import math

# What each fine-tuning task writes to metrics.jsonl at every eval (finetune.summarize).
METRICS = {
  "classification": ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_mcc"),
  "pair_classification": ("eval_loss", "eval_accuracy", "eval_macro_f1", "eval_mcc"),
  "regression": ("eval_loss", "eval_pearson", "eval_spearman", "eval_mse"),
  "tagging": (
    "eval_loss",
    "eval_accuracy",
    "eval_entity_f1",
    "eval_entity_precision",
    "eval_entity_recall",
  ),
}
# The metric '' stands for, per task. Classification keeps the best macro-F1: accuracy rewards a
# model that predicts only the majority class of unbalanced data (80/15/5: 0.8), macro-F1 does not.
DEFAULTS = {
  "classification": "eval_macro_f1",
  "pair_classification": "eval_macro_f1",
  "regression": "eval_pearson",
  "tagging": "eval_entity_f1",
}


def metric_for(task: str, name: str) -> str:
  """The metric a run of `task` tracks: `name`, or the task's default when it is ''."""
  return name or DEFAULTS.get(task, "eval_loss")


def check_metric(task: str, name: str) -> str | None:
  """None when `name` is a metric `task` writes ('' included), else the one-line error."""
  valid = METRICS.get(task)
  if valid is None or not name or name in valid:
    return None
  return (
    f"finetune.early_stopping_metric={name!r} is not written by task {task!r}; use one of "
    f"{', '.join(valid)}, or '' for {DEFAULTS[task]}."
  )


def minimises(metric: str) -> bool:
  return "loss" in metric


@dataclasses.dataclass
class Tracker:
  """The best eval so far and the evals since it; `update` once per eval, in step order."""

  metric: str
  patience: int  # 0: never stop
  best_value: float | None = None
  best_step: int | None = None
  evals_since_best: int = 0

  def improves(self, value: float) -> bool:
    if not math.isfinite(value):
      return False
    if self.best_value is None:
      return True
    return value < self.best_value if minimises(self.metric) else value > self.best_value

  def update(self, step: int, record: dict) -> bool:
    """Count the eval `record` of `step`; True when it is the new best."""
    value = float(record[self.metric])
    if self.improves(value):
      self.best_value, self.best_step, self.evals_since_best = value, step, 0
      return True
    self.evals_since_best += 1
    return False

  @property
  def should_stop(self) -> bool:
    return self.patience > 0 and self.evals_since_best >= self.patience

  def describe_best(self) -> str:
    return f"best step {self.best_step} ({self.metric}={self.best_value:.6g})"

  def to_meta(self) -> dict:
    return {
      "metric": self.metric,
      "best_value": self.best_value,
      "best_step": self.best_step,
      "evals_since_best": self.evals_since_best,
    }

  @classmethod
  def from_meta(cls, metric: str, patience: int, meta: dict | None) -> Tracker:
    """The tracker saved in a checkpoint's metadata; a fresh one when there is none or it
    tracked another metric (the patience may change between runs: it only decides)."""
    if not meta or meta.get("metric") != metric:
      return cls(metric, patience)
    return cls(
      metric,
      patience,
      best_value=meta["best_value"],
      best_step=meta["best_step"],
      evals_since_best=int(meta["evals_since_best"]),
    )
