"""Early stopping for fine-tuning runs: which eval metric decides, and when to stop.

  --config.finetune.early_stopping_metric=eval_macro_f1   # '' = the task's default
  --config.finetune.early_stopping_patience=3             # evals without improvement; 0 = never

Metrics whose name contains `loss` are minimised, the others maximised. Only a strict improvement
counts (a tie keeps the earlier best). The untrained baseline eval at step 0 is not counted.

The tracker's whole state goes into each checkpoint's metadata, so a resumed run takes exactly
the decisions an uninterrupted one would. The metrics each task writes, its default and the check
of a metric name live with the config (config.finetune), which checks the name before a run.
"""

from __future__ import annotations

import dataclasses
import math

from sslm_jax.config.finetune import EARLY_STOPPING_DEFAULTS


def metric_for(task: str, name: str) -> str:
  """The metric a run of `task` tracks: `name`, or the task's default when it is ''."""
  return name or EARLY_STOPPING_DEFAULTS.get(task, "eval_loss")


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
