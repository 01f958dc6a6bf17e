"""Fine-tuning with a task head: the same loop, mesh, checkpoints and resume as pretraining.

  python -m sslm_jax.main --config=configs/finetune_bert_tiny.py --workdir=runs/cls \\
    --config.finetune.init_from=runs/bert_tiny

What differs from pretraining is an Objective (training/hooks.py's seam): the model is the
task's (finetune/build.py: heads.Classifier, or tagging.Tagger), the loss the task's, eval
gathers predictions for task_metrics, and step 0 starts from the encoder of `finetune.init_from`
(one of our pretraining workdirs) or `init_from_hf` (finetune/sources.py). The data (numpy only)
is finetune/tasks.py and data/labelled.py. The workdir is self-contained: the label
vocabulary is saved as WORKDIR/labels.json, the tokenizer copied in (tokenizer.model or
tokenizer.json), and init_from recorded as an absolute path. Tagging (finetune.task='tagging')
takes its features, model, loss and metrics from finetune/tagging.py. `prepare_finetuning` reads
and checks everything a run needs before it writes the workdir's files; `run` trains.
finetune/keep_best.py keeps the best eval's parameters in WORKDIR/best and stops the run early;
finetune/freeze.py freezes the encoder; finetune/class_weights.py weighs the training loss per
label.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil

import jax
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.checkpoints import hf
from sslm_jax.cluster import join as cluster
from sslm_jax.data import labelled
from sslm_jax.data.augment import apply as augment_data
from sslm_jax.finetune import (
  build,
  class_weights,
  freeze,
  heads,
  keep_best,
  labelled_cache,
  tagging,
  tasks,
)
from sslm_jax.finetune import metrics as task_metrics
from sslm_jax.finetune import sources as finetune_sources
from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.training import hooks as hooks_lib
from sslm_jax.training import loop as train
from sslm_jax.training import optimizer as optim

BUILTIN_TRAIN_PER_CLASS, BUILTIN_EVAL_PER_CLASS = 1000, 250
# finetune fields that do not change what a step computes: a resumed run may change them.
_DECIDE_ONLY = ("init_step", "early_stopping_metric", "early_stopping_patience", "num_epochs")
# finetune fields recorded only when set, so workdirs written before they existed still resume.
_RECORDED_WHEN_SET = ("class_weights",)


class FinetuneObjective(hooks_lib.Objective):
  """A task head on the encoder: classification (cross-entropy), regression (squared error) or
  tagging (cross-entropy per word, tagging.py)."""

  def __init__(
    self,
    config,
    num_labels: int,
    starting_encoder=None,
    label_names=(),
    class_weights_K=None,
    truncated: dict | None = None,
  ):
    super().__init__(config)
    self.task = config.finetune.task
    self.num_labels = num_labels
    self.num_outputs = heads.num_outputs(self.task, num_labels)
    self._starting_encoder = starting_encoder  # () -> pure dict of the encoder, or None
    self.label_names = tuple(label_names)  # tagging's entity metrics read the B-/I- prefixes
    self._heads = tagging if self.task == tagging.TASK else heads  # the task's loss and outputs
    self.class_weights_K = class_weights_K  # float32 [K] (finetune/class_weights.py), or None
    self.truncated = truncated or {}  # {"train_examples_truncated": n, ...} for each eval

  def build(self, seed: int):
    return build.task_model(self.model_cfg, self.task, self.num_labels, seed)

  def optimizer(self) -> optax.GradientTransformation:
    f = self.config.finetune
    tx = optim.make(self.config.opt, self.config.num_train_steps)
    if f.freeze_encoder or f.freeze_encoder_steps:
      return freeze.freeze_encoder(tx, None if f.freeze_encoder else f.freeze_encoder_steps)
    return tx

  def initial_params(self) -> dict | None:
    if self._starting_encoder is None:
      return None
    fresh = nnx.to_pure_dict(nnx.state(self.build(self.config.seed), nnx.Param))
    fresh["encoder"] = self._starting_encoder()
    return jax.tree.map(np.asarray, fresh)

  def metric_sums(self, model, batch, key=None) -> dict:
    if self.config.finetune.freeze_encoder:
      model = freeze.without_encoder_gradients(model)
    if self.class_weights_K is not None:
      return heads.task_sums(model, batch, self.task, key, self.class_weights_K)
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
    return {**record, **self.truncated}


def task_examples(config) -> tuple[list, list]:
  """(training, eval) examples of the run: a TFDS dataset's, the labelled files', or the built-in
  task's."""
  f = config.finetune
  if f.tfds_name:
    from sslm_jax.data import labelled_tfds  # imports TensorFlow: only for a TFDS dataset

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
  record = {k: v for k, v in record.items() if v or k not in _RECORDED_WHEN_SET}
  if not f.tfds_name:
    return {k: v for k, v in record.items() if not k.startswith("tfds_")}
  from sslm_jax.data import labelled_tfds  # imports TensorFlow: only for a TFDS dataset

  return {**record, "tfds_dataset": labelled_tfds.dataset_name(config)}


def _digest(features: dict) -> str:
  h = hashlib.sha256()
  for k in sorted(features):
    h.update(k.encode() + np.ascontiguousarray(features[k]).tobytes())
  return h.hexdigest()[:16]


@dataclasses.dataclass
class FinetuneSetup:
  """What prepare_finetuning read and checked: the run's batches, objective and fingerprint."""

  data: tasks.TaskData
  objective: FinetuneObjective
  fingerprint: dict


def _files_record(config) -> dict | None:
  """A digest of each labelled file's bytes, by split, so a changed file is named on resume."""
  f = config.finetune
  if not f.train_files:
    return None
  return {
    split: {p: hashlib.sha256(epath.Path(p).read_bytes()).hexdigest()[:16] for p in paths}
    for split, paths in (
      ("train", labelled.matching_paths(f.train_files)),
      ("eval", labelled.matching_paths(f.eval_files)),
    )
  }


def _truncated(config, tok, examples, features: dict) -> int:
  """How many examples tasks.featurize cut to data.seq_len: of the rows that fill it, those whose
  pieces (plus two special tokens, three with a pair) do not fit."""
  candidates = np.flatnonzero(np.asarray(features["lengths"]) >= config.data.seq_len)
  if not len(candidates):
    return 0
  picked = [examples[i] for i in candidates]
  texts = tok.encode_batch([e.text for e in picked])
  pairs = tok.encode_batch([e.text_pair or "" for e in picked])
  room = [config.data.seq_len - 2 - (e.text_pair is not None) for e in picked]
  return sum(len(a) + len(b) > r for a, b, r in zip(texts, pairs, room, strict=True))


def _report_truncation(config, tok, examples: tuple, features: tuple) -> dict:
  """{train,eval}_examples_truncated, logged once; {} for tagging (finetune/tagging.py drops
  whole words and counts them itself)."""
  if config.finetune.task == tagging.TASK:
    return {}
  (train, eval_), (train_f, eval_f) = examples, features
  counts = {
    "train_examples_truncated": _truncated(config, tok, train, train_f),
    "eval_examples_truncated": _truncated(config, tok, eval_, eval_f),
  }
  if any(counts.values()):
    logging.warning(
      "%d of %d training and %d of %d eval examples are longer than data.seq_len=%d tokens and "
      "are cut to it (the counts are in every eval record); raise data.seq_len to keep more.",
      counts["train_examples_truncated"], len(train),
      counts["eval_examples_truncated"], len(eval_), config.data.seq_len,
    )  # fmt: skip
  return counts


def _class_weights(config, vocab, train_examples) -> np.ndarray | None:
  if vocab is None or not config.finetune.class_weights:
    return None
  labels_N = np.asarray([vocab.encode(e) for e in train_examples], np.int64)
  try:
    return class_weights.weights(config.finetune.class_weights, vocab.labels, labels_N)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from e


def _sources(config, workdir: str, resuming: bool):
  """(tokenizer or None, () -> encoder params or None) for this run; reads only.

  A resumed run whose workdir keeps its tokenizer copy reads neither finetune.init_from nor
  init_from_hf (its checkpoint holds every parameter): it resumes after they moved or went."""
  given, encoder = None, None
  if resuming and tokenizer_files.workdir_file(workdir) is not None:
    return finetune_sources.tokenizer(config, workdir, resuming=True), None
  if config.finetune.init_from:
    given, encoder = finetune_sources.from_workdir(config)
  elif config.init_from_hf:
    encoder = lambda: hf.load_params(config.init_from_hf, config)  # noqa: E731
  return finetune_sources.tokenizer(config, workdir, given), encoder


def prepare_finetuning(config, workdir: str, rows=None, allow_changes=frozenset()) -> FinetuneSetup:
  """Examples, tokenizer, labels, features and the objective of a fine-tuning run.

  Everything is read and checked before anything is written: a pretraining workdir, a workdir
  whose checkpoints are of another run (checkpoint.CheckpointMismatch), a bad init_from or
  init_step, a tokenizer that cannot be trained. Then process 0 writes the tokenizer copy and
  labels.json, and every process waits for them before reading them.
  """
  f = config.finetune
  f.init_from = finetune_sources.absolute(f.init_from)
  train_examples, eval_examples = task_examples(config)
  augmentation = augment_data.Augmentation.from_config(config)
  augmented = augmentation.examples(train_examples) if augmentation else train_examples
  resuming = checkpoint.saved_fingerprint(f"{workdir}/checkpoints") is not None
  tok, encoder = _sources(config, workdir, resuming)
  vocab = _label_vocab(config, train_examples)
  cache = labelled_cache.FeatureCache(workdir)  # written below, once the workdir is checked
  features = _features(config, tok, vocab, augmented, eval_examples, cache) if tok else None
  fingerprint = _fingerprint(config, tok, vocab, features)
  checkpoint.check_resumable(workdir, fingerprint, allow_changes)
  labels_file = epath.Path(workdir) / labelled.VOCAB_FILE
  if vocab and resuming and labels_file.exists():
    if labelled.LabelVocab.load(str(labels_file)) != vocab:
      raise config_lib.ConfigError(
        f"{labels_file} holds other labels than the training files; use a new --workdir."
      )
  weights_K = _class_weights(config, vocab, augmented)
  trained = finetune_sources.train(config, train_examples) if tok is None else None
  cluster.barrier("fine-tuning workdir read")  # no process reads what process 0 writes next

  primary = jax.process_index() == 0
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if augmentation:
    augmentation.report(workdir if primary else None, "fine-tuning examples")  # train only
  if vocab and primary:  # a start that failed before its first checkpoint may have left one
    vocab.save(str(labels_file))
  if primary:
    tokenizer_files.adopt(trained or tok.path, workdir)
    if trained:
      shutil.rmtree(os.path.dirname(trained), ignore_errors=True)
  cluster.barrier("fine-tuning files written")
  if tok is None:
    tok = tokenizer_files.load(tokenizer_files.workdir_file(workdir))
    features = _features(config, tok, vocab, augmented, eval_examples, cache)
    fingerprint = _fingerprint(config, tok, vocab, features)
  if jax.process_index() == 0:
    cache.write()
  data = tasks.TaskData(*features, config.batch_size, config.seed, rows)
  _steps_from_epochs(config, len(features[0]["labels"]))
  truncated = _report_truncation(config, tok, (augmented, eval_examples), features)
  labels = vocab.labels if vocab else ()
  objective = FinetuneObjective(
    config, len(vocab) if vocab else 1, encoder, labels, weights_K, truncated
  )
  return FinetuneSetup(data, objective, fingerprint)


def _features(config, tok, vocab, train_examples, eval_examples, cache) -> tuple[dict, dict]:
  causal, seq_len = config.objective == "causal_lm", config.data.seq_len
  featurize = tagging.featurize if config.finetune.task == tagging.TASK else tasks.featurize
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
  files = _files_record(config)
  if files is not None:
    record["finetune_files"] = files
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


def run(config, workdir: str, mesh, rows=None, allow_changes=frozenset(), setup=None) -> dict:
  """Fine-tune to num_train_steps, resuming from workdir's newest checkpoint if it has one.

  `setup`: prepare_finetuning()'s result when the caller has it already.
  """
  setup = setup or prepare_finetuning(config, workdir, rows, allow_changes)
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
  hooks = hooks_lib.DataHooks(
    train_batches=setup.data.train_batches, eval_batches=setup.data.eval_batches
  )
  return train.train_and_evaluate(
    config,
    workdir,
    mesh,
    hooks,
    setup.fingerprint,
    allow_changes,
    setup.objective,
    keep_best.KeepBest(config, workdir),
  )
