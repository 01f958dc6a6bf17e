"""A fine-tuned workdir as a Python object: `classify` texts (or text pairs), or `tag` words.

  import sslm_jax
  model = sslm_jax.load("runs/cls")                 # the best checkpoint, else the newest
  model.classify(["def main():", "x = 1"])[0].label  # 'def'; .probabilities per label
  sslm_jax.load("runs/tags").tag(["Ada Lovelace met Babbage"])[0]
  # [('Ada', 'B-PER'), ('Lovelace', 'I-PER'), ('met', 'O'), ('Babbage', 'B-PER')]

`sslm_jax.load` returns a TaskModel for a workdir whose finetune.task is set. `step=None` loads
WORKDIR/best (finetune/keep_best.py) when the run kept one, else the newest checkpoint;
`step='best'` or an int chooses. Parameters only (no optimizer state), on the first local device,
whatever mesh wrote them. Inputs are featurized exactly as the run's eval was (finetune/tasks.py,
and finetune/tagging.py for tagging). Nothing here writes to the workdir, and TensorFlow is
never imported.

`tag` (tagging workdirs) splits each text on whitespace, as the training files are, and gives one
(word, label) per word. A word whose first piece falls beyond data.seq_len (the eval's limit:
whole words only) gets the label None, as does a word the tokenizer encodes to no piece; the
eval does not score those words either. `classify` and `tag` each name the other for a workdir
of the other kind. Loading, batching and the forward pass are shared.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import restore, saved_tree
from sslm_jax.errors import UsageError
from sslm_jax.finetune import heads, keep_best, labelled, tagging, tasks
from sslm_jax.finetune import loop as finetune
from sslm_jax.finetune import metrics as task_metrics
from sslm_jax.tokenizer import files as tokenizer_files

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


def _tokenizer_file(config, workdir: str) -> str:
  """The workdir's own tokenizer copy; a workdir written before runs kept one names the file its
  run used (finetune.init_from's, data.tokenizer_path or init_from_hf's), read relative to the
  directory the run started in, which is why the error below names it with the fix."""
  own = tokenizer_files.workdir_file(workdir)
  if own is not None:
    return own
  f = config.finetune
  path = config.data.tokenizer_path
  if not path and f.init_from:
    where = f"finetune.init_from={f.init_from}"
    try:
      pretrained = restore.read_config(f.init_from)
    except UsageError:
      pretrained = None
    if pretrained is not None:
      path = tokenizer_files.workdir_file(f.init_from) or pretrained.data.tokenizer_path
    path = path or f"{f.init_from}/tokenizer.model"
  elif not path and config.init_from_hf:
    where, path = f"init_from_hf={config.init_from_hf}", f"{config.init_from_hf}/tokenizer.json"
  else:
    where = f"data.tokenizer_path={path}"
  if not path or ("://" not in path and not os.path.exists(path)):
    raise UsageError(
      f"{workdir} holds no copy of its tokenizer, and its run's tokenizer ({where}, from its "
      f"config.json) is not at {path or 'any path'} from here; copy that tokenizer file into "
      f"{workdir} (as tokenizer.model, or tokenizer.json for a Hugging Face one)."
    )
  return path


def _tokenizer(config, workdir: str, recorded: str | None):
  """The tokenizer the run trained with, checked against the hash its checkpoints recorded."""
  tokenizer = tokenizer_files.load(_tokenizer_file(config, workdir))
  if recorded and recorded != tokenizer.sha256:
    raise UsageError(
      f"{tokenizer.path} is not the tokenizer {workdir} was fine-tuned with (its SHA-256 "
      "differs); restore the run's tokenizer file."
    )
  return tokenizer


def _choose(workdir: str, step: int | str | None) -> tuple:
  """(directory of the params tree, step, 'best' or 'checkpoint') that `step` selects."""
  best = keep_best.read(workdir)
  directory = restore.checkpoint_dir(workdir)
  steps = sorted(ocp.step.checkpoint_steps(directory)) if directory.exists() else []
  if step == "best" or (step is None and best is not None):
    if best is None:
      raise UsageError(
        f"{workdir} has no best checkpoint yet ({workdir}/{keep_best.BEST_FILE} is written at "
        "the first eval after step 0); wait for one, or give a step number."
      )
    return keep_best.params_dir(workdir, best["step"]), best["step"], "best"
  if best is not None and step == best["step"]:
    return keep_best.params_dir(workdir, step), step, "best"
  if step is None and not steps:
    raise UsageError(
      f"{workdir} has no checkpoints yet (none in {directory}); let its fine-tuning run save "
      "one (every checkpoint_every_steps, and at the end), or pass another workdir."
    )
  step = steps[-1] if step is None else step
  if step not in steps:
    available = ", ".join(map(str, steps)) or "none"
    also = f", and 'best' (step {best['step']})" if best else ""
    raise UsageError(
      f"{workdir} has no checkpoint at step {step}; available steps: {available}{also}. "
      "Pick one of them, or leave the step out."
    )
  return directory / str(step) / "state", step, "checkpoint"


def load(workdir: str, step: int | str | None = None, config=None) -> TaskModel:
  """The fine-tuned model of `workdir`; see the module docstring for `step`."""
  workdir = str(workdir).rstrip("/")
  config = config or restore.read_config(workdir)
  task = config.finetune.task
  vocab = None
  if task != heads.REGRESSION:
    try:
      vocab = labelled.LabelVocab.load(f"{workdir}/{labelled.VOCAB_FILE}")
    except labelled.LabelledDataError as e:
      raise UsageError(str(e)) from e
  tree_dir, step, source = _choose(workdir, step)
  newest = restore.checkpoint_dir(workdir)
  meta = {}
  if newest.exists() and (steps := ocp.step.checkpoint_steps(newest)):
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
      meta = checkpointer.restore(newest / str(max(steps)) / "meta") or {}
  tokenizer = _tokenizer(config, workdir, meta.get("fingerprint", {}).get("tokenizer_sha256"))
  objective = finetune.FinetuneObjective(config, len(vocab) if vocab else 1)
  build = lambda: objective.build(0)  # noqa: E731
  try:
    model = restore.restore_params(tree_dir, build)  # checks the saved tree first
  except saved_tree.TreeMismatch as e:
    raise UsageError(str(e)) from e
  except Exception as e:  # Orbax and TensorStore raise many types for missing or damaged files
    text = " ".join(str(e).split())[:300]
    raise UsageError(
      f"{tree_dir} cannot be read ({type(e).__name__}: {text}); load another step."
    ) from e
  return TaskModel(config, model, tokenizer, vocab, step, source)


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
