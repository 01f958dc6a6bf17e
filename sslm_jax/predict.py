"""Predict with a fine-tuned model over labelled files; the label column is optional.

  python -m sslm_jax.predict --workdir=runs/cls --input=dev.jsonl --output=predictions.jsonl

Reads .jsonl/.csv/.tsv files as fine-tuning does (data/labelled.py; JSONL for texts that hold
newlines, as the built-in task's snippets do) and writes one JSON object
per row: its text (and text_pair), the predicted `label` with every label's `probabilities`
(classification) or the `value` (regression), and the row's `gold` label when it has one. A
tagging workdir writes `labels`, one per word of the text (null for a word beyond data.seq_len,
which the eval does not score either; see finetune/task_model.py), and `gold`, the row's label list.
Then prints how many rows it wrote and, over the rows with a gold label, the eval metrics under
metrics.jsonl's names. --step: a checkpoint step or 'best' (default: the best, else the newest).
"""

from __future__ import annotations

import json

from absl import flags
from etils import epath

from sslm_jax import commands
from sslm_jax.checkpoints import restore
from sslm_jax.data import labelled
from sslm_jax.errors import UsageError
from sslm_jax.finetune import tagging, task_model

flags.DEFINE_string("workdir", None, "Workdir of a fine-tuning run.")
flags.DEFINE_string("input", None, "Labelled .jsonl/.csv/.tsv files (comma-separated, globs).")
flags.DEFINE_string("output", None, "Where to write the predictions, one JSON object per row.")
flags.DEFINE_string("step", None, "Checkpoint step or 'best' (default: best, else the newest).")
flags.DEFINE_bool("json", False, "Print the summary as one JSON object.")
flags.mark_flags_as_required(["workdir", "input", "output"])
FLAGS = flags.FLAGS


def _step(text: str | None) -> int | str | None:
  if text is None or text == "best":
    return text
  try:
    return int(text)
  except ValueError:
    raise UsageError(f"--step={text}: give a checkpoint step (a number) or 'best'.") from None


def _examples(patterns: str, task: str) -> list[labelled.Example]:
  try:
    labelled.matching_paths(patterns)
  except labelled.LabelledDataError:
    raise UsageError(
      f"--input={patterns} matches no files; give .jsonl/.csv/.tsv files (paths or globs, "
      "comma-separated)."
    ) from None
  try:
    return labelled.read_examples(patterns, task, labelled=False)
  except labelled.LabelledDataError as e:
    raise UsageError(str(e)) from e


def _row(example: labelled.Example, prediction) -> dict:
  row = {"text": example.text}
  if example.text_pair is not None:
    row["text_pair"] = example.text_pair
  if isinstance(prediction, list):  # tagging: (word, label, probabilities) per word
    row["labels"] = [label for _, label, _ in prediction]
  elif prediction.value is None:
    row.update(label=prediction.label, probabilities=prediction.probabilities)
  else:
    row["value"] = prediction.value
  if example.label is not None:
    row["gold"] = example.label
  return row


def main(argv):
  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; give the files with --input.")
  config = restore.read_config(FLAGS.workdir)
  if not config.finetune.task:
    raise UsageError(
      f"{FLAGS.workdir} is a pretraining run (finetune.task is empty) and has no task head; "
      "pass the --workdir of a fine-tuning run, or use sslm_jax.generate / score / fill_mask."
    )
  step = _step(FLAGS.step)
  output = epath.Path(FLAGS.output)
  if not output.parent.is_dir():
    raise UsageError(f"--output={FLAGS.output}: its directory does not exist; create it.")
  examples = _examples(FLAGS.input, config.finetune.task)
  model = task_model.from_saved(restore.read_workdir(FLAGS.workdir, step, config))
  if model.task == tagging.TASK:
    predictions = model.tag([e.text for e in examples], probabilities=True)
  else:
    predictions = model.classify([e.text for e in examples], [e.text_pair for e in examples])
  rows = [_row(e, p) for e, p in zip(examples, predictions, strict=True)]
  gold = [(e, p) for e, p in zip(examples, predictions, strict=True) if e.label is not None]
  # Before writing: a gold label the model does not know stops here, leaving no output behind.
  metrics = model.metrics(*map(list, zip(*gold, strict=True))) if gold else {}
  output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  summary = {
    "rows": len(rows),
    "output": FLAGS.output,
    "step": model.step,
    "checkpoint": model.source,
    "rows_with_gold": len(gold),
    **metrics,
  }
  if FLAGS.json:
    print(json.dumps(summary))
    return
  print(f"Wrote {len(rows)} predictions to {FLAGS.output} (step {model.step}, {model.source}).")
  if metrics:
    shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    print(f"{len(gold)} rows with gold labels: {shown}")


if __name__ == "__main__":
  commands.run_command(main)
