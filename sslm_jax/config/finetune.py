"""The fine-tuning section of the config (`c.finetune`): its defaults and its checks.

sslm_jax.config builds and validates the whole config; this module holds the part only
fine-tuning runs read (finetune/heads.py, finetune/loop.py, data/labelled*.py), with the
tables of legal values its checks need: the metrics each task writes (which
finetune/early_stopping.py tracks) and the forms of finetune.class_weights (which
finetune/class_weights.py turns into weights).
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections


def defaults() -> ml_collections.ConfigDict:
  """Fine-tuning with a task head (finetune/heads.py, finetune/loop.py); task '' is pretraining."""
  s = ml_collections.ConfigDict()
  s.task = ""  # '' | classification | pair_classification | regression | tagging
  s.init_from = ""  # a workdir of ours whose parameters start the encoder ('' = random)
  s.init_step = 0  # its checkpoint to load; 0: the newest
  # Labelled .jsonl/.csv/.tsv (see data/labelled.py); empty: the built-in task
  # (finetune/tasks.py).
  s.train_files = ""
  s.eval_files = ""
  # Or a TensorFlow Datasets dataset (see data/labelled_tfds.py), e.g. glue/sst2, read from
  # data.tfds_data_dir. Empty text keys: found by name (sentence1+sentence2, ..., sentence, text).
  s.tfds_name = ""
  s.tfds_train_split = "train"
  s.tfds_eval_split = "validation"
  s.tfds_text_key = ""
  s.tfds_text_pair_key = ""
  s.tfds_label_key = "label"
  s.num_labels = 0  # 0: from the training labels; else must equal their count
  s.freeze_encoder = False  # train the head only (a linear probe)
  s.freeze_encoder_steps = 0  # train the head only for this many first steps
  s.num_epochs = 0.0  # > 0: num_train_steps = this many passes over the training examples
  # Per-label weights of the training loss: '' (none), 'balanced', or 'LABEL=WEIGHT,...'
  # (finetune/class_weights.py); classification and pair_classification only.
  s.class_weights = ""
  # The eval metric whose best parameters are kept in WORKDIR/best (a metrics.jsonl key, e.g.
  # eval_loss; '' = eval_macro_f1 for classification, eval_pearson for regression,
  # eval_entity_f1 for tagging; see finetune/early_stopping.py), and the evals without improvement
  # after which the run stops (0: never).
  s.early_stopping_metric = ""
  s.early_stopping_patience = 0
  return s


FINETUNE_TASKS = ("", "classification", "pair_classification", "regression", "tagging")


def validate(c: ml_collections.ConfigDict, require: Callable[[bool, str], None]) -> None:
  """Check c.finetune; `require(ok, message)` raises config.ConfigError when not ok."""
  f = c.finetune
  require(
    f.task in FINETUNE_TASKS,
    f"finetune.task={f.task!r}: use one of {', '.join(repr(t) for t in FINETUNE_TASKS)}.",
  )
  if not f.task:
    return
  # finetune.init_from is checked when a fresh start reads it (finetune/sources.py, from_workdir): a
  # resumed run needs only its own workdir.
  require(
    isinstance(f.num_epochs, (int, float)) and f.num_epochs >= 0,
    f"finetune.num_epochs={f.num_epochs!r} must be a number >= 0 (0: use num_train_steps).",
  )
  for name in ("init_step", "num_labels", "freeze_encoder_steps", "early_stopping_patience"):
    require(
      isinstance(f[name], int) and f[name] >= 0,
      f"finetune.{name}={f[name]!r} must be an integer >= 0.",
    )
  require(
    f.task != "regression" or f.num_labels in (0, 1),
    f"finetune.num_labels={f.num_labels} with task 'regression': regression has one output; "
    "leave it 0.",
  )
  require(
    bool(f.train_files) == bool(f.eval_files),
    "finetune.train_files and finetune.eval_files go together; set both, or neither for the "
    "built-in task.",
  )
  error = early_stopping_metric_error(f.task, f.early_stopping_metric)
  require(error is None, error)
  error = class_weights_error(f.task, f.class_weights)
  require(error is None, error)
  _validate_tfds(f, require)
  require(
    bool(f.train_files or f.tfds_name) or f.task == "classification",
    f"the built-in task is a classification task; set finetune.task='classification' or give "
    f"finetune.train_files (or finetune.tfds_name) for task {f.task!r}.",
  )


def _validate_tfds(f: ml_collections.ConfigDict, require) -> None:
  if not f.tfds_name:
    return
  require(
    not f.train_files,
    "finetune.tfds_name and finetune.train_files both name the training data; set only one.",
  )
  require(
    f.task != "tagging",
    "finetune.tfds_name reads classification, pair_classification and regression data; "
    "give tagging data as finetune.train_files.",
  )
  require(
    bool(f.tfds_train_split and f.tfds_eval_split),
    "finetune.tfds_train_split and finetune.tfds_eval_split must name splits, e.g. train and "
    "validation.",
  )
  require(
    bool(f.tfds_label_key),
    "finetune.tfds_label_key is empty; set it to the dataset's label feature, e.g. label.",
  )
  require(
    bool(f.tfds_text_key) or not f.tfds_text_pair_key,
    "finetune.tfds_text_pair_key is set without finetune.tfds_text_key; set both, or neither "
    "to find them by name.",
  )


# ---- finetune.early_stopping_metric ----------------------------------------------------------

# What each fine-tuning task writes to metrics.jsonl at every eval (finetune.summarize).
EARLY_STOPPING_METRICS = {
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
EARLY_STOPPING_DEFAULTS = {
  "classification": "eval_macro_f1",
  "pair_classification": "eval_macro_f1",
  "regression": "eval_pearson",
  "tagging": "eval_entity_f1",
}


def early_stopping_metric_error(task: str, name: str) -> str | None:
  """None when `name` is a metric `task` writes ('' included), else the one-line error."""
  valid = EARLY_STOPPING_METRICS.get(task)
  if valid is None or not name or name in valid:
    return None
  return (
    f"finetune.early_stopping_metric={name!r} is not written by task {task!r}; use one of "
    f"{', '.join(valid)}, or '' for {EARLY_STOPPING_DEFAULTS[task]}."
  )


# ---- finetune.class_weights ------------------------------------------------------------------

CLASS_WEIGHTS_BALANCED = "balanced"
CLASS_WEIGHTS_TASKS = ("classification", "pair_classification")
_CLASS_WEIGHTS_FORM = "'' (none), 'balanced', or per label 'LABEL=WEIGHT,...' (e.g. spam=4,ham=1)"


def class_weight_pairs(setting: str) -> list[tuple[str, str]]:
  """The (label, weight) texts of a per-label finetune.class_weights setting."""
  return [tuple(p.rsplit("=", 1)) for p in setting.split(",") if p.strip()]


def class_weights_error(task: str, setting: str) -> str | None:
  """None when `setting` is a valid finetune.class_weights for `task`, else the one-line error."""
  if not setting:
    return None
  if task not in CLASS_WEIGHTS_TASKS:
    return (
      f"finetune.class_weights={setting!r} is for {' and '.join(CLASS_WEIGHTS_TASKS)}; leave it "
      f"'' for {task}."
    )
  if setting == CLASS_WEIGHTS_BALANCED:
    return None
  for pair in class_weight_pairs(setting):
    try:
      ok = len(pair) == 2 and pair[0].strip() != "" and float(pair[1]) > 0
    except ValueError:
      ok = False
    if not ok:
      return (
        f"finetune.class_weights={setting!r}: {'='.join(pair)!r} is not LABEL=WEIGHT with a "
        f"weight > 0; use {_CLASS_WEIGHTS_FORM}."
      )
  return None
