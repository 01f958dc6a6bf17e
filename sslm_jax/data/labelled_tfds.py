"""Labelled examples from a TensorFlow Datasets dataset (finetune.tfds_name), e.g. glue/sst2.

  python -m sslm_jax.main --config=configs/finetune_bert_tiny.py --workdir=runs/sst2 \\
    --config.finetune.tfds_name=glue/sst2 --config.data.tfds_data_dir=DIR

The dataset is read, offline, from data.tfds_data_dir. One that is not prepared there is refused
at once with one line saying how to prepare it elsewhere (`tfds build NAME --data_dir=DIR`):
unlike pretraining's tfds source, nothing is downloaded (offline, TFDS retries a download for
minutes before it gives up).

Texts: finetune.tfds_text_key (and tfds_text_pair_key for a second text). Left empty, the first
pair in PAIR_KEYS whose two features the dataset has is taken (glue/mrpc: sentence1, sentence2;
glue/qqp: question1, question2), else the first of TEXT_KEYS (glue/sst2: sentence; imdb_reviews:
text) alone.

Labels: finetune.tfds_label_key ('label'). A ClassLabel gives its names (glue/sst2: negative,
positive), so WORKDIR/labels.json holds those; other values are taken as text. Regression takes a
number (glue/stsb). A ClassLabel of -1 means "no label" (GLUE test splits hide theirs): such rows
are refused, as is a regression split whose labels are all -1.
"""

from __future__ import annotations

import tensorflow_datasets as tfds
from absl import logging

from sslm_jax.data import corpus
from sslm_jax.data.labelled import Example, LabelledDataError

PAIR_KEYS = (
  ("sentence1", "sentence2"),
  ("question1", "question2"),
  ("premise", "hypothesis"),
  ("question", "sentence"),
)
TEXT_KEYS = ("sentence", "text")
TASKS = ("classification", "pair_classification", "regression")
_BATCH = 1024  # rows read from the dataset at a time


def builder(config):
  """The prepared builder of finetune.tfds_name in data.tfds_data_dir."""
  return corpus.prepared_tfds_builder(
    config.finetune.tfds_name, config.data.tfds_data_dir, "finetune.tfds_name", download=False
  )


def _keys(f, features) -> tuple[str, str | None]:
  """(text key, text pair key or None) of the dataset, as configured or found."""
  if f.tfds_text_key:
    chosen = (f.tfds_text_key, f.tfds_text_pair_key or None)
  else:
    pairs = [p for p in PAIR_KEYS if set(p) <= set(features)]
    singles = [(k, None) for k in TEXT_KEYS if k in features]
    if not pairs and not singles:
      known = sorted({k for p in PAIR_KEYS for k in p} | set(TEXT_KEYS))
      raise LabelledDataError(
        f"tfds dataset {f.tfds_name!r} has none of the text features {known} (it has "
        f"{sorted(features)}); "
        "set --config.finetune.tfds_text_key (and tfds_text_pair_key for a second text)."
      )
    chosen = (pairs or singles)[0]
  fields = ("tfds_text_key", "tfds_text_pair_key", "tfds_label_key")
  for key, field in zip((*chosen, f.tfds_label_key), fields, strict=True):
    if key is not None and key not in features:
      raise LabelledDataError(
        f"tfds dataset {f.tfds_name!r} has no feature {key!r} (it has {sorted(features)}); "
        f"set --config.finetune.{field} to one of them."
      )
  if f.task == "pair_classification" and chosen[1] is None:
    raise LabelledDataError(
      f"finetune.task='pair_classification' needs two texts but tfds dataset {f.tfds_name!r} "
      f"gives one ({chosen[0]!r}); set --config.finetune.tfds_text_pair_key, or use task "
      "'classification'."
    )
  return chosen


def _no_labels(f, split: str, field: str, where: str) -> LabelledDataError:
  return LabelledDataError(
    f"{where} has label -1, i.e. no label (GLUE test splits hide theirs); fine-tune and evaluate "
    f"on labelled splits: set --config.finetune.{field} to another split, e.g. validation "
    f"(tfds dataset {f.tfds_name!r} split {split!r})."
  )


def _labeller(f, feature, split: str, field: str):
  """(raw value, where) -> the Example's label."""
  named = isinstance(feature, tfds.features.ClassLabel)
  if f.task == "regression":
    if named:
      raise LabelledDataError(
        f"tfds dataset {f.tfds_name!r} feature {f.tfds_label_key!r} is a class label, not a "
        "number; use finetune.task='classification' (or 'pair_classification')."
      )
    return lambda value, where: float(value)

  def label(value, where: str) -> str:
    if named:
      if int(value) < 0:
        raise _no_labels(f, split, field, where)
      return feature.int2str(int(value))
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if not text.strip():
      raise LabelledDataError(f"{where} has an empty label; set --config.finetune.tfds_label_key.")
    return text.strip()

  return label


def _text(value) -> str:
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _split_examples(config, ds_builder, keys, which: str) -> list[Example]:
  f = config.finetune
  split = f.tfds_train_split if which == "train" else f.tfds_eval_split
  field = f"tfds_{which}_split"
  ds = corpus.tfds_split(ds_builder, split, f"finetune.{field}")
  text_key, pair_key = keys
  wanted = [k for k in (text_key, pair_key, f.tfds_label_key) if k]
  label = _labeller(f, ds_builder.info.features[f.tfds_label_key], split, field)
  examples, skipped = [], 0
  rows = ds.map(lambda x: {k: x[k] for k in wanted}).batch(_BATCH).as_numpy_iterator()
  for number, batch in enumerate(rows):
    for i in range(len(batch[text_key])):
      where = f"tfds {f.tfds_name}[{split}] example {number * _BATCH + i}"
      text = _text(batch[text_key][i])
      pair = _text(batch[pair_key][i]) if pair_key else None
      if not text.strip() or (pair is not None and not pair.strip()):
        skipped += 1  # a public dataset's empty text cannot be fixed by the user: leave it out
        continue
      examples.append(Example(text, pair, label(batch[f.tfds_label_key][i], where), where))
  if skipped:
    logging.warning(
      "tfds %s[%s]: left out %d examples with an empty text", f.tfds_name, split, skipped
    )
  if not examples:
    raise LabelledDataError(
      f"tfds dataset {f.tfds_name!r} split {split!r} has no examples with text; set "
      f"--config.finetune.{field}."
    )
  if f.task == "regression" and all(e.label == -1.0 for e in examples):
    raise _no_labels(f, split, field, f"every example of tfds {f.tfds_name}[{split}]")
  return examples


def read_examples(config) -> tuple[list[Example], list[Example]]:
  """(train, eval) examples of finetune.tfds_name's tfds_train_split and tfds_eval_split."""
  f = config.finetune
  if f.task not in TASKS:
    raise LabelledDataError(
      f"finetune.tfds_name reads tasks {list(TASKS)}, not {f.task!r}; give finetune.train_files."
    )
  ds_builder = builder(config)
  keys = _keys(f, ds_builder.info.features)
  logging.info(
    "Fine-tuning on tfds %s, texts %s, labels %r", ds_builder.info.full_name, keys, f.tfds_label_key
  )
  return _split_examples(config, ds_builder, keys, "train"), _split_examples(
    config, ds_builder, keys, "eval"
  )


def dataset_name(config) -> str:
  """The dataset's name, config and version (e.g. glue/sst2/2.0.0), without reading it."""
  return corpus.tfds_builder(
    config.finetune.tfds_name, config.data.tfds_data_dir, "finetune.tfds_name"
  ).info.full_name
