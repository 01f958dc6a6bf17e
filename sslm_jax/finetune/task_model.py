"""A fine-tuned workdir as a Python object: `classify` texts (or text pairs), or `tag` words.

  import sslm_jax
  model = sslm_jax.load("runs/cls")                 # the best checkpoint, else the newest
  model.classify(["def main():", "x = 1"])[0].label  # 'def'; .probabilities per label
  sslm_jax.load("runs/tags").tag(["Ada Lovelace met Babbage"])[0]
  # [('Ada', 'B-PER'), ('Lovelace', 'I-PER'), ('met', 'O'), ('Babbage', 'B-PER')]

`sslm_jax.load` returns a TaskModel for a workdir whose finetune.task is set (sslm_jax/loading.py).
`step=None` loads WORKDIR/best (finetune/keep_best.py) when the run kept one, else the newest
checkpoint; `step='best'` or an int chooses (checkpoints/restore.read_workdir, which reads the
workdir once). Parameters only (no optimizer state), on the first local device, whatever mesh wrote
them. Inputs are featurized exactly as the run's eval was (finetune/tasks.py, and
finetune/tagging.py for tagging). Nothing here writes to the workdir, TensorFlow is never
imported, and neither is any training code: the model is built by finetune/build.py.

`tag` (tagging workdirs) splits each text on whitespace, as the training files are, and gives one
(word, label) per word. A word whose first piece falls beyond data.seq_len (the eval's limit:
whole words only) gets the label None, as does a word the tokenizer encodes to no piece; the
eval does not score those words either. `classify` and `tag` each name the other for a workdir
of the other kind. Loading, batching and the forward pass are shared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import restore
from sslm_jax.data import labelled
from sslm_jax.errors import UsageError
from sslm_jax.finetune import build, heads, tagging, tasks
from sslm_jax.finetune import metrics as task_metrics

SEQUENCE_TASKS = ("classification", "pair_classification", heads.REGRESSION)
_ROWS_PER_CALL = 16  # rows per forward pass: one compiled shape


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One text's prediction: a label with every label's probability, or a regression value."""

  label: str | None = None
  probabilities: dict[str, float] | None = None
  value: float | None = None


@nnx.jit
def _forward(model, batch):
  return model(batch)


def _softmax(logits_NK: np.ndarray) -> np.ndarray:
  shifted_NK = logits_NK - logits_NK.max(axis=-1, keepdims=True)
  return np.exp(shifted_NK) / np.exp(shifted_NK).sum(axis=-1, keepdims=True)


def _texts(texts: str | Sequence[str]) -> list[str]:
  texts = [texts] if isinstance(texts, str) else list(texts)
  if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
    raise UsageError("give at least one text, and no empty ones.")
  return texts


def load(workdir: str, step: int | str | None = None) -> TaskModel:
  """The fine-tuned model of `workdir`; see the module docstring for `step`."""
  return from_saved(restore.read_workdir(workdir, step))


def from_saved(run: restore.SavedRun) -> TaskModel:
  """The TaskModel of a fine-tuning workdir read by restore.read_workdir."""
  config = run.config
  if not run.fine_tuned:
    raise UsageError(
      f"{run.workdir} is a pretraining run (finetune.task is empty) and has no task head; load "
      "it with sslm_jax.load, which gives its LanguageModel."
    )
  vocab = None
  if config.finetune.task != heads.REGRESSION:
    try:
      vocab = labelled.LabelVocab.load(f"{run.workdir}/{labelled.VOCAB_FILE}")
    except labelled.LabelledDataError as e:
      raise UsageError(str(e)) from e
  tokenizer = restore.load_tokenizer(run)
  model_cfg, num_labels = config_lib.model_config(config), len(vocab) if vocab else 1
  model = restore.restore_model(
    run, lambda: build.task_model(model_cfg, config.finetune.task, num_labels, 0)
  )
  return TaskModel(config, model, tokenizer, vocab, run.step, run.source)


class TaskModel:
  """A fine-tuned encoder with its task head, tokenizer and label vocabulary; see `load`."""

  def __init__(self, config, model, tokenizer, vocab: labelled.LabelVocab | None, step, source):
    self.config = config
    self.model_cfg = config_lib.model_config(config)
    self.model = model
    self.tokenizer = tokenizer
    self.vocab = vocab  # None for regression
    self.task = config.finetune.task
    self.step = step
    self.source = source  # 'best' (WORKDIR/best) or 'checkpoint'

  def __repr__(self) -> str:
    labels = f"labels {list(self.vocab.labels)}" if self.vocab else "one value"
    return f"TaskModel({self.task}, step {self.step} ({self.source}), {labels})"

  def _batches(self, features: dict):
    """(first row, float32 head outputs of the batch's real rows) per forward pass."""
    data = tasks.TaskData(features, features, _ROWS_PER_CALL, seed=0)
    for i, batch in enumerate(data.eval_batches()):
      outputs = np.asarray(jax.device_get(_forward(self.model, batch)), np.float32)
      yield i * _ROWS_PER_CALL, outputs[batch["weights"] > 0]

  def outputs(self, examples: list[labelled.Example]) -> np.ndarray:
    """float32 [len(examples), K]: the head's outputs (logits, or the value) per example."""
    self._require_task("outputs")
    if self.vocab is not None:  # featurize encodes a label; any known one does here
      fill = self.vocab.labels[0]
      examples = [dataclasses.replace(e, label=fill) for e in examples]
    else:
      examples = [dataclasses.replace(e, label=0.0) for e in examples]
    causal = self.model_cfg.causal
    features = tasks.featurize(
      examples, self.tokenizer, self.vocab, self.config.data.seq_len, causal
    )
    return np.concatenate([outputs_BK for _, outputs_BK in self._batches(features)])

  def classify(
    self, texts: str | Sequence[str], text_pairs: Sequence[str | None] | None = None
  ) -> list[Prediction]:
    """Per text (with its pair, if given): the label and every label's probability
    (classification), or the value (regression)."""
    self._require_task("classify")
    texts = _texts(texts)
    pairs = [None] * len(texts) if text_pairs is None else list(text_pairs)
    if len(pairs) != len(texts):
      raise UsageError(f"{len(texts)} texts but {len(pairs)} text_pairs; give one per text.")
    if self.task == "pair_classification" and any(p is None for p in pairs):
      raise UsageError("this model classifies text pairs; give text_pairs, one per text.")
    examples = [labelled.Example(t, p, "") for t, p in zip(texts, pairs, strict=True)]
    outputs_NK = self.outputs(examples)
    if self.vocab is None:
      return [Prediction(value=float(v)) for v in outputs_NK[:, 0]]
    probs_NK = _softmax(outputs_NK)
    return [
      Prediction(
        label=self.vocab.labels[int(np.argmax(row))],
        probabilities={k: float(p) for k, p in zip(self.vocab.labels, row, strict=True)},
      )
      for row in probs_NK
    ]

  def _require_task(self, method: str) -> None:
    if method == "tag" and self.task != tagging.TASK:
      raise UsageError(f"tag takes a tagging model; this is a {self.task} model: use classify.")
    if method != "tag" and self.task == tagging.TASK:
      raise UsageError(
        f"{method} takes the tasks {', '.join(SEQUENCE_TASKS)}; this is a tagging model: use tag."
      )

  def word_logits(self, texts: list[str]) -> list[np.ndarray]:
    """Per text float32 [words, K]: each word's label logits, at its first piece; NaN rows for
    the words with no prediction (see the module docstring)."""
    self._require_task("tag")
    fill = self.vocab.labels[0]  # featurize encodes labels; any known one does here
    examples = [
      labelled.Example(t, None, (fill,) * len(t.split()), f"text {i}") for i, t in enumerate(texts)
    ]
    seq_len, causal = self.config.data.seq_len, self.model_cfg.causal
    features = tagging.featurize(
      examples, self.tokenizer, self.vocab, seq_len, causal, word_index=True
    )
    word_index_NT = features.pop("word_index")
    found = [np.full((len(t.split()), len(self.vocab)), np.nan, np.float32) for t in texts]
    for start, logits_BTK in self._batches(features):
      for b, logits_TK in enumerate(logits_BTK):
        word_index_T = word_index_NT[start + b]
        scored_T = word_index_T >= 0
        found[start + b][word_index_T[scored_T]] = logits_TK[scored_T]
    return found

  def tag(self, texts: str | Sequence[str], probabilities: bool = False) -> list[list[tuple]]:
    """Per text, one (word, label) per word of `text.split()`, or (word, label, {label:
    probability}) with `probabilities`; label (and probabilities) None for a word with no
    prediction (see the module docstring)."""
    texts = _texts(texts)
    out = []
    for text, logits_WK in zip(texts, self.word_logits(texts), strict=True):
      words = []
      for word, logits_K in zip(text.split(), logits_WK, strict=True):
        if np.isnan(logits_K).any():
          words.append((word, None, None) if probabilities else (word, None))
          continue
        label = self.vocab.labels[int(np.argmax(logits_K))]
        if probabilities:
          probs_K = _softmax(logits_K.astype(np.float64))
          words.append((word, label, dict(zip(self.vocab.labels, probs_K.tolist(), strict=True))))
        else:
          words.append((word, label))
      out.append(words)
    return out

  def _tagging_metrics(self, examples: list[labelled.Example], tagged: list[list[tuple]]) -> dict:
    """tagging.summarize over the words with a prediction (those the eval scores)."""
    shape = (len(examples), max(len(words) for words in tagged))
    predicted_NW, gold_NW = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    weights_NW, loss_NW = np.zeros(shape), np.zeros(shape)
    for i, (e, words) in enumerate(zip(examples, tagged, strict=True)):
      try:
        gold = self.vocab.encode(e)
      except labelled.LabelledDataError as err:
        raise UsageError(str(err)) from err
      for j, (_, label, probs) in enumerate(words):
        if label is not None:
          predicted_NW[i, j], gold_NW[i, j] = self.vocab.labels.index(label), gold[j]
          weights_NW[i, j] = 1.0
          loss_NW[i, j] = -np.log(max(probs[self.vocab.labels[gold[j]]], 1e-30))
    outputs = {"predictions": predicted_NW, "labels": gold_NW, "weights": weights_NW}
    return tagging.summarize([dict(outputs, loss=loss_NW)], self.vocab.labels)

  def metrics(self, examples: list[labelled.Example], predictions: list[Prediction]) -> dict:
    """The eval metrics (metrics.jsonl's names) of `predictions` against the examples' gold
    labels (every example must have one). For tagging, `predictions` are tag(...,
    probabilities=True)'s."""
    if self.task == tagging.TASK:
      return self._tagging_metrics(examples, predictions)
    if self.vocab is None:
      gold_N = np.asarray([e.label for e in examples], np.float64)
      predicted_N = np.asarray([p.value for p in predictions], np.float64)
      found = task_metrics.regression(gold_N, predicted_N)
      found["loss"] = found["mse"]
    else:
      try:
        gold_N = np.asarray([self.vocab.encode(e) for e in examples], np.int64)
      except labelled.LabelledDataError as e:
        raise UsageError(str(e)) from e
      probs_NK = np.asarray([list(p.probabilities.values()) for p in predictions])
      found = task_metrics.classification(gold_N, probs_NK.argmax(axis=1), len(self.vocab))
      gold_probs_N = probs_NK[np.arange(len(gold_N)), gold_N]
      found["loss"] = float(-np.mean(np.log(np.maximum(gold_probs_N, 1e-30))))
    return {f"eval_{k}": v for k, v in sorted(found.items())}
