"""The best eval's parameters of a fine-tuning run, kept apart from the rotated checkpoints.

  WORKDIR/best.json        {"step": 40, "metric": "eval_accuracy", "value": 0.93}
  WORKDIR/best/40/         the parameters at that step (Orbax, no optimizer state)

The parameters are saved first (Orbax writes a directory under a temporary name and renames it
when complete), then best.json is replaced in one rename, then older directories are removed: a
run killed at any point leaves best.json naming a complete directory. checkpoints/ rotation
(keep_checkpoints) never touches these. `KeepBest` is the train loop's watcher that writes them
and stops the run early (finetune/early_stopping.py). Reading them back (the layout's names, the
step 'best' of a loaded model) is checkpoints/restore.py's, which needs no training code.
"""

from __future__ import annotations

import json

import jax
import orbax.checkpoint as ocp
from absl import logging

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import restore
from sslm_jax.finetune import early_stopping
from sslm_jax.training import hooks as hooks_lib


def save(workdir: str, step: int, params, record: dict) -> None:
  """Keep `params` (a TrainState's params) as the best, described by `record`. Every process
  calls this (the save is collective); process 0 writes best.json and removes older ones."""
  target = restore.best_params_dir(workdir, step)
  with ocp.PyTreeCheckpointer() as checkpointer:  # synchronous: the next step donates params
    checkpointer.save(target, {"params": params}, force=True)
  if jax.process_index() != 0:
    return
  best = restore.workdir_path(workdir, restore.BEST_FILE)
  partial = restore.workdir_path(workdir, restore.BEST_FILE + ".partial")
  partial.write_text(json.dumps({"step": step, **record}, indent=2) + "\n")
  partial.replace(best)
  for other in restore.workdir_path(workdir, restore.BEST_DIR).iterdir():
    if other.name != str(step):
      other.rmtree()


class KeepBest(hooks_lib.Watcher):
  """Tracks the run's eval metric: saves the best parameters, stops after `patience` evals
  without improvement, and keeps its tracker in every checkpoint's metadata."""

  def __init__(self, config, workdir: str):
    f = config.finetune
    self.workdir = workdir
    self.metric = early_stopping.metric_for(f.task, f.early_stopping_metric)
    self.patience = f.early_stopping_patience
    self.tracker = early_stopping.Tracker(self.metric, self.patience)

  def resume(self, meta: dict | None) -> str | None:
    saved = (meta or {}).get("early_stopping")
    self.tracker = early_stopping.Tracker.from_meta(self.metric, self.patience, saved)
    if saved and saved.get("metric") != self.metric:
      logging.warning(
        "The checkpoint tracked %s; tracking %s from here on.", saved.get("metric"), self.metric
      )
    if meta and self.tracker.should_stop:
      return (
        f"Early stopping already ended this run at step {meta['step']} "
        f"({self.tracker.describe_best()}, kept in {self.workdir}/{restore.BEST_DIR}); nothing to "
        "train. Raise finetune.early_stopping_patience to train on."
      )
    return None

  def after_eval(self, step: int, record: dict, params) -> str | None:
    if self.metric not in record:  # a task config.finetune.EARLY_STOPPING_METRICS lacks
      written = ", ".join(sorted(k for k in record if k.startswith("eval_")))
      raise config_lib.ConfigError(
        f"finetune.early_stopping_metric: the evals write no {self.metric}; use one of {written}."
      )
    if self.tracker.update(step, record):
      value = self.tracker.best_value
      save(self.workdir, step, params, {"metric": self.metric, "value": value})
    if not self.tracker.should_stop:
      return None
    return (
      f"Early stopping at step {step}: {self.metric} did not improve for {self.patience} "
      f"evals; {self.tracker.describe_best()} is kept in {self.workdir}/{restore.BEST_DIR}."
    )

  def meta(self) -> dict:
    return {"early_stopping": self.tracker.to_meta()}
