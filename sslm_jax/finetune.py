"""Fine-tuning with a task head: the same loop, mesh, checkpoints and resume as pretraining.

  python -m sslm_jax.main --config=configs/finetune_bert_tiny.py --workdir=runs/cls \\
    --config.finetune.init_from=runs/bert_tiny

What differs from pretraining is an Objective (train.py's seam): the model is heads.Classifier,
the loss the task's, eval gathers predictions for task_metrics, and step 0 starts from the
encoder of `finetune.init_from` (one of our workdirs) or `init_from_hf`. The data (numpy only)
is data/tasks.py and data/labelled.py; the label vocabulary is saved as WORKDIR/labels.json.
Tagging (finetune.task='tagging') takes its model, loss and metrics from tagging.py and its
features from data/tagging.py. keep_best.py keeps the best eval's parameters in WORKDIR/best and
stops the run early.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import jax
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from sslm_jax import checkpoint, heads, keep_best, optim, restore, tagging, task_metrics, train
from sslm_jax import config as config_lib
from sslm_jax import model as model_lib
from sslm_jax import tokenizer as tokenizer_lib
from sslm_jax.data import augment_data, labelled, labelled_cache, tasks
from sslm_jax.data import tagging as tagging_data

BUILTIN_TRAIN_PER_CLASS, BUILTIN_EVAL_PER_CLASS = 1000, 250
# finetune fields that do not change what a step computes: a resumed run may change them.
_DECIDE_ONLY = ("init_step", "early_stopping_metric", "early_stopping_patience", "num_epochs")
# Model fields that fix the encoder's array shapes, with the config field that sets each. The
# position table is not one of them: model.fit_positions cuts or extends it.
_SHAPES = {
  "objective": "objective",
  "vocab_size": "data.vocab_size",
  "num_layers": "model.num_layers",
  "num_heads": "model.num_heads",
  "emb_dim": "model.emb_dim",
  "mlp_dim": "model.mlp_dim",
}


def freeze_encoder(until_step: int | None) -> optax.GradientTransformation:
  """Zero the encoder's updates while fewer than `until_step` updates were made (None: always),
  so its parameters stay bit-identical; the head trains from the first step."""

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jax.numpy.zeros([], jax.numpy.int32))

  def update(updates, state, params=None):
    del params
    keep = jax.numpy.asarray(False if until_step is None else state.count >= until_step)

    def mask(path, u):
      in_encoder = str(getattr(path[0], "key", path[0])) == "encoder"
      return jax.numpy.where(keep, u, jax.numpy.zeros_like(u)) if in_encoder else u

    updates = jax.tree_util.tree_map_with_path(mask, updates)
    return updates, optax.ScaleByScheduleState(count=state.count + 1)

  return optax.GradientTransformation(init, update)


class FinetuneObjective(train.Objective):
  """A task head on the encoder: classification (cross-entropy), regression (squared error) or
  tagging (cross-entropy per word, tagging.py)."""

  def __init__(self, config, num_labels: int, starting_encoder=None, label_names=()):
    super().__init__(config)
    self.task = config.finetune.task
    self.num_labels = num_labels
    self.num_outputs = heads.num_outputs(self.task, num_labels)
    self._starting_encoder = starting_encoder  # () -> pure dict of the encoder, or None
    self.label_names = tuple(label_names)  # tagging's entity metrics read the B-/I- prefixes
    self._heads = tagging if self.task == tagging.TASK else heads

  def build(self, seed: int):
    return self._heads.build(self.model_cfg, self.num_outputs, seed)

  def optimizer(self) -> optax.GradientTransformation:
    f = self.config.finetune
    tx = optim.make(self.config.opt, self.config.num_train_steps)
    if f.freeze_encoder or f.freeze_encoder_steps:
      return optax.chain(tx, freeze_encoder(None if f.freeze_encoder else f.freeze_encoder_steps))
    return tx

  def initial_params(self) -> dict | None:
    if self._starting_encoder is None:
      return None
    fresh = nnx.to_pure_dict(nnx.state(self.build(self.config.seed), nnx.Param))
    fresh["encoder"] = self._starting_encoder()
    return jax.tree.map(np.asarray, fresh)

  def metric_sums(self, model, batch, key=None) -> dict:
    return self._heads.task_sums(model, batch, self.task, key)

  def eval_outputs(self, model, batch) -> dict:
    return self._heads.eval_outputs(model, batch, self.task)

  def summarize(self, outputs: list[dict]) -> dict:
    if self.task == tagging.TASK:
      return tagging.summarize(outputs, self.label_names)
    if not outputs:
      return {}
    joined = {k: np.concatenate([np.asarray(o[k]) for o in outputs]) for k in outputs[0]}
    real = joined["weights"] > 0
    record = {"eval_loss": float(np.mean(joined["loss"][real]))}
    labels, predictions = joined["labels"][real], joined["predictions"][real]
    if self.task == heads.REGRESSION:
      metrics = task_metrics.regression(labels, predictions)
    else:
      metrics = task_metrics.classification(labels, predictions, self.num_labels)
    record.update({f"eval_{k}": v for k, v in metrics.items()})
    return record


def _check_shapes(config, pretrained, where: str) -> None:
  ours, theirs = config_lib.model_config(config), config_lib.model_config(pretrained)
  for field, name in _SHAPES.items():
    if getattr(ours, field) != getattr(theirs, field):
      raise config_lib.ConfigError(
        f"finetune.init_from={where} has {name}={pretrained[name]} but this config has "
        f"{config[name]}; set --config.{name}={pretrained[name]} (the encoder keeps its shapes)."
      )


def _from_workdir(config):
  """(tokenizer, () -> the encoder's parameters) of finetune.init_from, checked against config.

  The parameters are read only when called: a resumed run never reads them.
  """
  f = config.finetune
  try:
    pretrained = restore.read_config(f.init_from)
  except restore.UsageError as e:
    raise config_lib.ConfigError(f"finetune.init_from: {e}") from e
  _check_shapes(config, pretrained, f.init_from)
  tok = tokenizer_lib.load(pretrained.data.tokenizer_path or f"{f.init_from}/tokenizer.model")

  def encoder() -> dict:
    try:
      restored = restore.from_workdir(f.init_from, f.init_step or None)
    except restore.UsageError as e:
      raise config_lib.ConfigError(f"finetune.init_from: {e}") from e
    logging.info("Starting the encoder from %s at step %d", f.init_from, restored.step)
    params = nnx.to_pure_dict(nnx.state(restored.model, nnx.Param))
    table = np.asarray(params["position_embed"]["embedding"])
    rows = config_lib.positions(config)
    params["position_embed"]["embedding"] = model_lib.fit_positions(table, rows, f.init_from)
    return params

  return tok, encoder


def _tokenizer(config, workdir: str, given=None):
  """The init_from run's tokenizer, else data.tokenizer_path, else init_from_hf's tokenizer.json,
  else WORKDIR/tokenizer.model; None when there is none yet (_train_tokenizer makes it). Writes
  nothing."""
  path = config.data.tokenizer_path
  if given is None and not path and config.init_from_hf:  # the weights' own tokenizer
    path = f"{config.init_from_hf}/tokenizer.json"
    if not epath.Path(path).exists():
      raise config_lib.ConfigError(
        f"init_from_hf={config.init_from_hf} has no tokenizer.json; pass the tokenizer its "
        "weights were trained with as --config.data.tokenizer_path=FILE."
      )
  if given is not None:
    if path and tokenizer_lib.load(path).sha256 != given.sha256:
      raise config_lib.ConfigError(
        f"data.tokenizer_path={path} is not the tokenizer finetune.init_from was trained with; "
        "leave data.tokenizer_path empty to use that one."
      )
    return _checked_size(config, given)
  if path:
    return _checked_size(config, tokenizer_lib.load(path))
  if epath.Path(f"{workdir}/tokenizer.model").exists():
    return _checked_size(config, tokenizer_lib.load(f"{workdir}/tokenizer.model"))
  return None


def _train_tokenizer(config, workdir: str, train_examples):
  """WORKDIR/tokenizer.model, trained on the training texts by process 0; the others wait for
  it and load it."""
  path = f"{workdir}/tokenizer.model"
  if jax.process_index() == 0:
    texts = [t for e in train_examples for t in (e.text, e.text_pair) if t]
    tokenizer_lib.train(texts, config.data.vocab_size, path)
    logging.info("Trained the tokenizer %s on %d training texts", path, len(texts))
  _barrier("fine-tuning tokenizer trained")
  return _checked_size(config, tokenizer_lib.load(path))


def _barrier(name: str) -> None:
  """Every process waits here for all the others (as pretraining does around its data)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _checked_size(config, tok):
  if tok.vocab_size != config.data.vocab_size:
    raise config_lib.ConfigError(
      f"the tokenizer {tok.path} has {tok.vocab_size} pieces but data.vocab_size="
      f"{config.data.vocab_size}; set --config.data.vocab_size={tok.vocab_size}."
    )
  return tok


def _examples(config) -> tuple[list, list]:
  f = config.finetune
  if f.tfds_name:
    from sslm_jax.data import labelled_tfds  # TensorFlow, only for this source

    return labelled_tfds.read_examples(config)
  if not f.train_files:
    return (
      tasks.builtin_examples("train", BUILTIN_TRAIN_PER_CLASS),
      tasks.builtin_examples("eval", BUILTIN_EVAL_PER_CLASS),
    )
  return (
    labelled.read_examples(f.train_files, f.task),
    labelled.read_examples(f.eval_files, f.task),
  )


def _label_vocab(config, train_examples) -> labelled.LabelVocab | None:
  """The training labels' vocabulary (None for regression)."""
  if config.finetune.task == heads.REGRESSION:
    return None
  vocab = labelled.LabelVocab.from_examples(train_examples, config.finetune.task)
  wanted = config.finetune.num_labels
  if wanted and wanted != len(vocab):
    raise config_lib.ConfigError(
      f"finetune.num_labels={wanted} but the training files have {len(vocab)} labels "
      f"{list(vocab.labels)[:10]}; set it to {len(vocab)} or 0."
    )
  return vocab


def _finetune_record(config) -> dict:
  """The finetune fields a resume must match. The tfds_* fields enter only with a dataset (so
  workdirs written before they existed still resume), and then with its version too; its content
  is in finetune_data's digest of the features."""
  f = config.finetune
  record = {k: f[k] for k in f if k not in _DECIDE_ONLY}
  if not f.tfds_name:
    return {k: v for k, v in record.items() if not k.startswith("tfds_")}
  from sslm_jax.data import labelled_tfds

  return {**record, "tfds_dataset": labelled_tfds.dataset_name(config)}


def _digest(features: dict) -> str:
  h = hashlib.sha256()
  for k in sorted(features):
    h.update(k.encode() + np.ascontiguousarray(features[k]).tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass
class Prepared:
  data: tasks.TaskData
  objective: FinetuneObjective
  fingerprint: dict


def prepare(config, workdir: str, rows=None, allow_changes=frozenset()) -> Prepared:
  """Examples, tokenizer, labels, features and the objective of a fine-tuning run.

  A workdir whose checkpoints are of another run is refused (checkpoint.CheckpointMismatch)
  before anything is written; then process 0 trains the tokenizer (if there is none yet) and
  writes labels.json, and every process waits for it before reading them.
  """
  train_examples, eval_examples = _examples(config)
  augmentation = augment_data.Augmentation.from_config(config)
  augmented = augmentation.examples(train_examples) if augmentation else train_examples
  given, encoder = None, None
  if config.finetune.init_from:
    given, encoder = _from_workdir(config)
  elif config.init_from_hf:
    from sslm_jax import hf

    encoder = lambda: hf.load_params(config.init_from_hf, config)  # noqa: E731
  tok = _tokenizer(config, workdir, given)
  vocab = _label_vocab(config, train_examples)
  cache = labelled_cache.FeatureCache(workdir)  # written below, once the workdir is checked
  features = _features(config, tok, vocab, augmented, eval_examples, cache) if tok else None
  checkpoint.check_resumable(workdir, _fingerprint(config, tok, vocab, features), allow_changes)
  labels_file = epath.Path(workdir) / labelled.VOCAB_FILE
  if vocab and labels_file.exists() and labelled.LabelVocab.load(str(labels_file)) != vocab:
    raise config_lib.ConfigError(
      f"{labels_file} holds other labels than the training files; use a new --workdir."
    )
  _barrier("fine-tuning workdir read")  # no process reads what process 0 writes next

  primary = jax.process_index() == 0
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if augmentation:
    augmentation.report(workdir if primary else None, "fine-tuning examples")  # train only
  if vocab and primary and not labels_file.exists():
    vocab.save(str(labels_file))
  if tok is None:
    tok = _train_tokenizer(config, workdir, train_examples)
    features = _features(config, tok, vocab, augmented, eval_examples, cache)
  _barrier("fine-tuning files written")
  if jax.process_index() == 0:
    cache.write()
  data = tasks.TaskData(*features, config.batch_size, config.seed, rows)
  _steps_from_epochs(config, len(features[0]["labels"]))
  labels = vocab.labels if vocab else ()
  objective = FinetuneObjective(config, len(vocab) if vocab else 1, encoder, labels)
  return Prepared(data, objective, _fingerprint(config, tok, vocab, features))


def _features(config, tok, vocab, train_examples, eval_examples, cache) -> tuple[dict, dict]:
  causal, seq_len = config.objective == "causal_lm", config.data.seq_len
  featurize = tagging_data.featurize if config.finetune.task == tagging.TASK else tasks.featurize
  return (
    cache.features(train_examples, tok, vocab, seq_len, causal, featurize),
    cache.features(eval_examples, tok, vocab, seq_len, causal, featurize),
  )


def _fingerprint(config, tok, vocab, features) -> dict:
  """What a checkpoint of this run records; without a tokenizer yet, what can be known."""
  record = {
    "tokenizer_sha256": tok.sha256 if tok else "none yet (this run would train a new one)",
    "finetune": _finetune_record(config),
    "finetune_labels": list(vocab.labels) if vocab else None,
  }
  if features is not None:
    record["finetune_data"] = _digest(features[0]) + _digest(features[1])
  return checkpoint.fingerprint(config, record)


def _steps_from_epochs(config, num_examples: int) -> None:
  """finetune.num_epochs > 0 sets num_train_steps: that many passes over the training examples
  (augmented copies included), the last batch rounded up."""
  epochs = config.finetune.num_epochs
  if not epochs:
    return
  config.num_train_steps = max(1, math.ceil(epochs * num_examples / config.batch_size))
  logging.info(
    "finetune.num_epochs=%g over %d training examples in batches of %d: num_train_steps=%d",
    epochs, num_examples, config.batch_size, config.num_train_steps,
  )  # fmt: skip


def run(config, workdir: str, mesh, rows=None, allow_changes=frozenset(), prepared=None) -> dict:
  """Fine-tune to num_train_steps, resuming from workdir's newest checkpoint if it has one.

  `prepared`: prepare()'s result when the caller has it already.
  """
  prepared = prepared or prepare(config, workdir, rows, allow_changes)
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
  hooks = train.DataHooks(
    train_batches=prepared.data.train_batches, eval_batches=prepared.data.eval_batches
  )
  return train.train_and_evaluate(
    config,
    workdir,
    mesh,
    hooks,
    prepared.fingerprint,
    allow_changes,
    prepared.objective,
    keep_best.KeepBest(config, workdir),
  )
