"""A fine-tuned workdir as a Python object: `classify` texts (or text pairs) with its task head.

  import sslm_jax
  model = sslm_jax.load("runs/cls")                 # the best checkpoint, else the newest
  model.classify(["def main():", "x = 1"])[0].label  # 'def'; .probabilities per label

`sslm_jax.load` returns a TaskModel for a workdir whose finetune.task is set. `step=None` loads
WORKDIR/best (keep_best.py) when the run kept one, else the newest checkpoint; `step='best'` or
an int chooses. Parameters only (no optimizer state), on the first local device, whatever mesh
wrote them. Inputs are featurized exactly as the run's eval was (data/tasks.py). Nothing here
writes to the workdir, and TensorFlow is never imported.

A new kind of task adds its featurization and output decoding beside `classify` (e.g. `tag`);
loading, batching and the forward pass (`outputs`) are shared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax import finetune, heads, keep_best, restore, task_metrics
from sslm_jax import tokenizer as tok
from sslm_jax.data import labelled, tasks
from sslm_jax.restore import UsageError

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


def _tokenizer(config, workdir: str, recorded: str | None):
  """The tokenizer the run trained with (see finetune._tokenizer), checked against the hash
  its checkpoints recorded."""
  f = config.finetune
  path = config.data.tokenizer_path
  if not path and f.init_from:
    pretrained = restore.read_config(f.init_from)
    path = pretrained.data.tokenizer_path or f"{f.init_from}/tokenizer.model"
  tokenizer = tok.load(path or f"{workdir}/tokenizer.model")
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
  try:
    model = restore.restore_params(tree_dir, lambda: objective.build(0))
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

  def outputs(self, examples: list[labelled.Example]) -> np.ndarray:
    """float32 [len(examples), K]: the head's outputs (logits, or the value) per example."""
    if self.vocab is not None:  # featurize encodes a label; any known one does here
      fill = self.vocab.labels[0]
      examples = [dataclasses.replace(e, label=fill) for e in examples]
    else:
      examples = [dataclasses.replace(e, label=0.0) for e in examples]
    causal = self.model_cfg.causal
    features = tasks.featurize(
      examples, self.tokenizer, self.vocab, self.config.data.seq_len, causal
    )
    data = tasks.TaskData(features, features, _ROWS_PER_CALL, seed=0)
    out = []
    for batch in data.eval_batches():
      outputs_BK = np.asarray(jax.device_get(_forward(self.model, batch)), np.float32)
      out.append(outputs_BK[batch["weights"] > 0])
    return np.concatenate(out)

  def classify(
    self, texts: str | Sequence[str], text_pairs: Sequence[str | None] | None = None
  ) -> list[Prediction]:
    """Per text (with its pair, if given): the label and every label's probability
    (classification), or the value (regression)."""
    self._require_sequence_task()
    texts = [texts] if isinstance(texts, str) else list(texts)
    pairs = [None] * len(texts) if text_pairs is None else list(text_pairs)
    if len(pairs) != len(texts):
      raise UsageError(f"{len(texts)} texts but {len(pairs)} text_pairs; give one per text.")
    if self.task == "pair_classification" and any(p is None for p in pairs):
      raise UsageError("this model classifies text pairs; give text_pairs, one per text.")
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
      raise UsageError("give at least one text, and no empty ones.")
    examples = [labelled.Example(t, p, "") for t, p in zip(texts, pairs, strict=True)]
    outputs_NK = self.outputs(examples)
    if self.vocab is None:
      return [Prediction(value=float(v)) for v in outputs_NK[:, 0]]
    shifted_NK = outputs_NK - outputs_NK.max(axis=1, keepdims=True)
    probs_NK = np.exp(shifted_NK) / np.exp(shifted_NK).sum(axis=1, keepdims=True)
    return [
      Prediction(
        label=self.vocab.labels[int(np.argmax(row))],
        probabilities={k: float(p) for k, p in zip(self.vocab.labels, row, strict=True)},
      )
      for row in probs_NK
    ]

  def _require_sequence_task(self) -> None:
    if self.task not in SEQUENCE_TASKS:
      raise UsageError(
        f"classify takes the tasks {', '.join(SEQUENCE_TASKS)}; this is {self.task}."
      )

  def metrics(self, examples: list[labelled.Example], predictions: list[Prediction]) -> dict:
    """The eval metrics (metrics.jsonl's names) of `predictions` against the examples' gold
    labels (every example must have one)."""
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
