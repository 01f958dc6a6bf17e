"""Show what data.augment does to a config's first training examples; writes nothing.

  python -m sslm_jax.augment --config=configs/gpt_tiny.py \\
    --config.data.augment='swap:p=0.5,alpha=0.1;delete:p=0.3' --num_examples=3

Prints each of the first --num_examples training examples (documents for pretraining, labelled
examples with their labels for fine-tuning configs), every augmented copy with the transforms
that changed it, then the statistics over those examples: the record a training run writes to
WORKDIR/augment.json. The copies are the ones training would make (same seed and indices).
--json prints one object per example and a last {"statistics": ...} line.
"""

from __future__ import annotations

import itertools
import json
import os

from sslm_jax.errors import UsageError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sslm_jax import commands  # noqa: E402
from sslm_jax import config as config_lib  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Experiment config file (ml_collections).")
flags.DEFINE_integer("num_examples", 3, "Training examples to show.")
flags.DEFINE_integer("max_chars", 400, "Characters shown of each text (0: all).")
flags.DEFINE_bool("json", False, "One JSON object per line instead of text for people.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _short(text: str, indent: int) -> str:
  """At most --max_chars of `text`, its later lines indented to line up under the first."""
  limit = FLAGS.max_chars
  if limit and len(text) > limit:
    text = text[:limit] + f" ... [{len(text)} chars]"
  return text.replace("\n", "\n" + " " * indent)


def _pretraining(c, augmentation, n: int) -> list[dict]:
  from sslm_jax.data import corpus, units  # TensorFlow, for pretraining configs only

  try:
    docs = list(itertools.islice(units.split_documents(c, "train", corpus.DecodeStats()), n))
  except corpus.DataError as e:
    raise UsageError(str(e)) from e
  shown = []
  for i, text in enumerate(docs):
    copies = [
      {"copy": copy, "changed_by": changed, "texts": texts if changed else []}
      for copy, changed, texts in augmentation.document_copies(text, i)
    ]
    shown.append({"index": i, "text": text, "copies": copies})
  return shown


def _example_dict(e) -> dict:
  out = {"text": e.text}
  if e.text_pair is not None:
    out["text_pair"] = e.text_pair
  return out | {"label": list(e.label) if isinstance(e.label, tuple) else e.label}


def _finetuning(c, augmentation, n: int) -> list[dict]:
  # The fine-tuning stack (optax, the training loop), for fine-tuning configs only.
  from sslm_jax.data import labelled
  from sslm_jax.finetune import loop as finetune

  try:
    examples = finetune.task_examples(c)[0][:n]  # the training examples, as fine-tuning reads them
  except labelled.LabelledDataError as e:
    raise UsageError(str(e)) from e
  shown = []
  for i, e in enumerate(examples):
    copies = [
      {
        "copy": copy,
        "changed_by": changed,
        "examples": [_example_dict(x) for x in new] if changed else [],
      }
      for copy, changed, new in augmentation.example_copies(e, i)
    ]
    shown.append({"index": i, **_example_dict(e), "copies": copies})
  return shown


def _print(item: dict) -> None:
  label = f"  label={item['label']!r}" if "label" in item else ""
  print(f"== example {item['index']}{label}")
  print("  original: " + _short(item["text"], 12))
  if "text_pair" in item:
    print("  pair:     " + _short(item["text_pair"], 12))
  for copy in item["copies"]:
    if not copy["changed_by"]:
      print(f"  copy {copy['copy']}: unchanged (dropped)")
      continue
    print(f"  copy {copy['copy']} (changed by {', '.join(copy['changed_by'])}):")
    for x in copy.get("examples") or [{"text": t} for t in copy["texts"]]:
      extra = f"  label={x['label']!r}" if "label" in x else ""
      print("    " + _short(x["text"], 4) + extra)
      if "text_pair" in x:
        print("    pair: " + _short(x["text_pair"], 10))


def main(argv):
  # TensorFlow's import (~2 s): not for --help or a bad flag.
  from sslm_jax.data.augment import apply as augment_data

  if len(argv) > 1:
    raise UsageError(f"unexpected arguments {argv[1:]}; options are flags (--name=value).")
  if FLAGS.num_examples < 1:
    raise UsageError(f"--num_examples={FLAGS.num_examples}: show at least 1 example.")
  c = FLAGS.config
  config_lib.validate(c)
  if not c.data.augment:
    raise UsageError(
      "data.augment is empty, so there is nothing to show; set e.g. "
      "--config.data.augment='swap:p=0.5;delete:p=0.3'."
    )
  augmentation = augment_data.Augmentation(c)
  show = _finetuning if c.finetune.task else _pretraining
  shown = show(c, augmentation, FLAGS.num_examples)
  record = augmentation.report(None, "fine-tuning examples" if c.finetune.task else "documents")
  if FLAGS.json:
    for item in shown:
      print(json.dumps(item, ensure_ascii=False))
    print(json.dumps({"statistics": record}, ensure_ascii=False))
    return
  for item in shown:
    _print(item)
  print(f"\nstatistics over the {len(shown)} example(s) shown (as in WORKDIR/augment.json):")
  print(json.dumps(record, indent=1, ensure_ascii=False))


if __name__ == "__main__":
  commands.run_command(main)
