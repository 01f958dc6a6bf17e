"""Labelled examples for fine-tuning, from .jsonl, .csv and .tsv files, and their label vocabulary.

Files come from comma-separated paths or globs, local or gs://, read through etils.epath (not
tf.io.gfile as in `corpus`), so fine-tuning data loads where TensorFlow is not installed.

Formats, chosen by extension:
- .jsonl: one JSON object per line with `text`, an optional `text_pair` and `label`.
- .csv, .tsv: a header row naming those columns. TSV is read without quoting, like GLUE files.

Labels by task: classification kinds compare labels as strings (JSON numbers through str());
regression labels must be finite floats; tagging `text` is whitespace-separated words and `label`
one label per word (a JSON list, or a space-separated string in CSV/TSV).

Row numbers in errors are 1-based lines as an editor shows them: in .csv/.tsv the header is row 1
(a quoted field over several lines is numbered by its first line); in .jsonl each line is a row.
Files are read in sorted path order, rows in file order, line by line (lines end at "\n").
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import re
from collections.abc import Iterable, Iterator

from etils import epath

from sslm_jax.errors import SslmError

TASKS = ("classification", "pair_classification", "regression", "tagging")
VOCAB_FILE = "labels.json"  # the label vocabulary's name in the workdir
_EXTENSIONS = (".jsonl", ".csv", ".tsv")
_PATTERN_FIX = (
  "fix finetune.train_files / finetune.eval_files (comma-separated paths or globs such as "
  "/data/train-*.jsonl)"
)
_MAX_LISTED_LABELS = 10  # labels shown in an unknown-label error


class LabelledDataError(SslmError, ValueError):
  """Labelled data that cannot be used; the message names the file, the row and the fix."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One labelled row; `where` ("path row N") is for error messages and not compared.

  `label` is a str (classification kinds), a float (regression) or a tuple of str, one per
  word of `text.split()` (tagging); None in rows read to predict without a gold label.
  """

  text: str
  text_pair: str | None
  label: str | float | tuple[str, ...] | None
  where: str = dataclasses.field(default="", compare=False)


def _fixed_dir(pattern: str) -> tuple[str, str] | None:
  """(directory above the first wildcard, the rest), or None when there is no wildcard."""
  cut = next((i for i, ch in enumerate(pattern) if ch in "*?["), None)
  if cut is None:
    return None
  slash = pattern.rfind("/", 0, cut)
  if slash < 0:
    return ".", pattern
  return pattern[:slash] or "/", pattern[slash + 1 :]


def _matches(pattern: str) -> list[str]:
  split = _fixed_dir(pattern)
  if split is None:
    return [pattern] if epath.Path(pattern).exists() else []
  base, rest = split
  try:
    return [str(p) for p in epath.Path(base).glob(rest)]
  except NotImplementedError as e:  # epath refuses '**'
    raise LabelledDataError(
      f"labelled file pattern {pattern!r} is not supported ({e}); {_PATTERN_FIX}."
    ) from e


def matching_paths(patterns: str) -> list[str]:
  """Paths matched by comma-separated paths or globs, each of which must match; sorted, unique."""
  found = set()
  for pattern in (p.strip() for p in patterns.split(",")):
    if not pattern:
      continue
    matched = _matches(pattern)
    if not matched:
      raise LabelledDataError(
        f"labelled file pattern {pattern!r} matches no files; {_PATTERN_FIX}."
      )
    found.update(matched)
  if not found:
    raise LabelledDataError(f"no labelled file patterns given ({patterns!r}); {_PATTERN_FIX}.")
  return sorted(found)


def _required(task: str, labelled: bool = True) -> tuple[str, ...]:
  texts = ("text", "text_pair") if task == "pair_classification" else ("text",)
  return texts + ("label",) if labelled else texts


def _lines(path: str) -> Iterator[tuple[int, str]]:
  """(row, line with its newline) of a UTF-8 file, read line by line (a file of labelled rows
  is never held whole); a spreadsheet's byte-order mark is not part of the first line."""
  with epath.Path(path).open("rb") as f:
    for row, raw in enumerate(f, start=1):
      try:
        yield row, raw.decode("utf-8-sig" if row == 1 else "utf-8")
      except UnicodeDecodeError as e:
        raise LabelledDataError(
          f"{path} row {row} is not valid UTF-8 ({e.reason}); fix: save the file as UTF-8."
        ) from e


def _jsonl_rows(path: str, task: str, labelled: bool) -> Iterator[tuple[int, dict]]:
  for row, line in _lines(path):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise LabelledDataError(
        f"{path} row {row} is not valid JSON ({e.msg} at column {e.colno}); "
        "fix: write one JSON object per line."
      ) from e
    if not isinstance(record, dict):
      raise LabelledDataError(
        f"{path} row {row} is a JSON {type(record).__name__}, not an object; fix: write one "
        f"object per line with the fields {list(_required(task, labelled))}."
      )
    missing = [k for k in _required(task, labelled) if k not in record]
    if missing:
      raise LabelledDataError(
        f"{path} row {row} has no {missing[0]!r} field (it has {sorted(record)}); fix: add it "
        "to every line, or check the task (finetune.task)."
      )
    yield row, record


def _check_header(path: str, header: list[str], task: str, labelled: bool) -> None:
  missing = [k for k in _required(task, labelled) if k not in header]
  if missing:
    raise LabelledDataError(
      f"{path} row 1 (the header) has no {missing[0]!r} column (it has {header}); fix: name "
      f"the columns {list(_required(task, labelled))} in the first row, or check the task "
      "(finetune.task)."
    )


def _csv_rows(path: str, task: str, tsv: bool, labelled: bool) -> Iterator[tuple[int, dict]]:
  quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
  reader = csv.reader(
    (line for _, line in _lines(path)),
    delimiter="\t" if tsv else ",",
    quoting=quoting,
    strict=True,
  )
  header, end = None, 0
  try:
    for values in reader:
      start, end = end + 1, reader.line_num  # a quoted field may span lines: report the first
      if not values:  # a blank line
        continue
      if header is None:
        header = values
        _check_header(path, header, task, labelled)
        continue
      if len(values) != len(header):
        fix = "remove tabs from inside fields" if tsv else "quote fields with commas in them"
        raise LabelledDataError(
          f"{path} row {start} has {len(values)} fields but the header has {len(header)}; "
          f"fix: {fix}."
        )
      yield start, dict(zip(header, values, strict=True))
  except csv.Error as e:
    raise LabelledDataError(
      f"{path} row {end + 1} cannot be parsed as {'TSV' if tsv else 'CSV'} ({e}); "
      "fix: correct the quoting on that row."
    ) from e


def _text(value, name: str, where: str) -> str:
  if not isinstance(value, str):
    raise LabelledDataError(
      f"{where}: {name!r} is not a string (got {type(value).__name__}); fix: write it as a string."
    )
  if not value.strip():
    raise LabelledDataError(f"{where}: {name!r} is empty; fix: fill it in or remove the row.")
  return value


def _class_label(value, where: str) -> str:
  if isinstance(value, bool):
    value = json.dumps(value)  # true/false, as the file spells it
  elif isinstance(value, int | float):
    value = str(value)
  if not isinstance(value, str) or not value.strip():
    raise LabelledDataError(
      f"{where}: label {value!r} is not a non-empty string or number; fix: give every row a label."
    )
  return value.strip()


def _float_label(value, where: str) -> float:
  try:
    if isinstance(value, bool):
      raise TypeError("a boolean")
    number = float(value)
  except (TypeError, ValueError):
    number = math.nan
  if not math.isfinite(number):
    raise LabelledDataError(
      f"{where}: regression label {value!r} is not a finite number; fix: write a number such "
      "as 3.5, or use a classification task."
    )
  return number


def _tag_labels(value, text: str, where: str, from_json: bool) -> tuple[str, ...]:
  if from_json and not isinstance(value, list):
    raise LabelledDataError(
      f"{where}: tagging label is not a list (got {type(value).__name__}); fix: write one label "
      'per word as a JSON list, e.g. ["B-PER", "O"].'
    )
  items = value if from_json else value.split()
  labels = tuple(_class_label(item, f"{where} word {i}") for i, item in enumerate(items, 1))
  num_words = len(text.split())
  if len(labels) != num_words:
    raise LabelledDataError(
      f"{where}: {len(labels)} labels for {num_words} words; fix: give exactly one label per "
      "whitespace-separated word."
    )
  return labels


def _example(record: dict, task: str, where: str, from_json: bool, labelled: bool) -> Example:
  text = _text(record["text"], "text", where)
  pair = record.get("text_pair")
  if task == "pair_classification":
    pair = _text(pair, "text_pair", where)
  elif pair in (None, ""):
    pair = None
  elif task == "tagging":
    raise LabelledDataError(
      f"{where}: tagging takes one text per row but text_pair is set; fix: remove text_pair."
    )
  else:
    pair = _text(pair, "text_pair", where)
  label = record.get("label")
  if not labelled and label in (None, ""):
    label = None  # a row to predict, without a gold label
  elif task == "regression":
    label = _float_label(label, where)
  elif task == "tagging":
    label = _tag_labels(label, text, where, from_json)
  else:
    label = _class_label(label, where)
  return Example(text, pair, label, where)


def _read_file(path: str, task: str, labelled: bool) -> list[Example]:
  ext = next((e for e in _EXTENSIONS if path.lower().endswith(e)), None)
  if ext is None:
    raise LabelledDataError(
      f"{path} has an unknown extension; fix: use .jsonl, .csv or .tsv files, or narrow the "
      "pattern (finetune.train_files / finetune.eval_files)."
    )
  if ext == ".jsonl":
    rows = _jsonl_rows(path, task, labelled)
  else:
    rows = _csv_rows(path, task, ext == ".tsv", labelled)
  examples = [_example(r, task, f"{path} row {n}", ext == ".jsonl", labelled) for n, r in rows]
  if not examples:
    raise LabelledDataError(f"{path} has no examples; fix: add labelled rows or leave it out.")
  return examples


def check_task(task: str) -> None:
  if task not in TASKS:
    raise LabelledDataError(f"finetune.task={task!r} is unknown; fix: use one of {list(TASKS)}.")


def read_examples(patterns: str, task: str, labelled: bool = True) -> list[Example]:
  """Every example in the files matched by `patterns`, files in sorted path order.

  With labelled=False the label column may be missing or empty (rows to predict): such rows
  have label None.
  """
  check_task(task)
  return [e for path in matching_paths(patterns) for e in _read_file(path, task, labelled)]


def _check_one_spelling(labels: Iterable[str]) -> None:
  """Labels are compared as text, so 1 and 1.0 would be two classes: refuse a number spelt two
  ways, naming the spellings."""
  by_value: dict[float, list[str]] = {}
  for label in labels:
    try:
      value = float(label)
    except ValueError:
      continue
    if math.isfinite(value):
      by_value.setdefault(value, []).append(label)
  clashes = [sorted(spellings) for spellings in by_value.values() if len(spellings) > 1]
  if clashes:
    spelt = "; ".join(" and ".join(repr(s) for s in c) for c in sorted(clashes))
    raise LabelledDataError(
      f"the training files spell one label several ways ({spelt}), which would make them "
      "different classes; fix: write each label one way in every file (e.g. 1, not 1.0)."
    )


def _label_order(labels: Iterable[str]):
  """Integers in numeric order when every label is one (so label "3" gets id 3), else text order."""
  if all(re.fullmatch(r"[+-]?\d+", label) for label in labels):
    return lambda label: (int(label), label)
  return lambda label: (0, label)


@dataclasses.dataclass(frozen=True)
class LabelVocab:
  """The training examples' labels in a fixed order; a label's id is its position."""

  task: str
  labels: tuple[str, ...]

  @classmethod
  def from_examples(cls, examples: Iterable[Example], task: str) -> LabelVocab:
    check_task(task)
    if task == "regression":
      raise LabelledDataError(
        "regression labels are numbers and have no label vocabulary; fix: build one only for "
        "classification, pair_classification or tagging."
      )
    found = set()
    for e in examples:
      found.update(e.label if task == "tagging" else (e.label,))
    _check_one_spelling(found)
    if len(found) < 2:
      raise LabelledDataError(
        f"the training files have {len(found)} distinct label(s) {sorted(found)}; fix: a "
        "classifier needs at least two (check finetune.train_files and the label column)."
      )
    return cls(task, tuple(sorted(found, key=_label_order(found))))

  def __len__(self) -> int:
    return len(self.labels)

  @functools.cached_property
  def _ids(self) -> dict[str, int]:
    return {label: i for i, label in enumerate(self.labels)}

  def index(self, label: str, where: str) -> int:
    """The id of `label`; `where` (e.g. "dev.tsv row 7") names its row in the error."""
    if label in self._ids:
      return self._ids[label]
    shown = list(self.labels[:_MAX_LISTED_LABELS]) + (
      ["..."] if len(self) > _MAX_LISTED_LABELS else []
    )
    raise LabelledDataError(
      f"{where}: label {label!r} is not among the {len(self)} labels of the training files "
      f"{shown}; fix: add training examples with it, or correct or remove that row."
    )

  def encode(self, example: Example) -> int | list[int]:
    """The label id (or, for tagging, one id per word) of an example."""
    if self.task == "tagging":
      return [self.index(x, f"{example.where} word {i}") for i, x in enumerate(example.label, 1)]
    return self.index(example.label, example.where)

  def save(self, path: str) -> None:
    data = {"task": self.task, "labels": list(self.labels)}
    epath.Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

  @classmethod
  def load(cls, path: str) -> LabelVocab:
    p = epath.Path(path)
    if not p.exists():
      raise LabelledDataError(
        f"{path} does not exist; fix: fine-tune with training files first, which writes it."
      )
    try:
      data = json.loads(p.read_text())
      task, labels = data["task"], data["labels"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise LabelledDataError(
        f"{path} is not a label vocabulary ({e}); fix: delete it and fine-tune again to rewrite it."
      ) from e
    if task not in TASKS or not all(isinstance(x, str) for x in labels):
      raise LabelledDataError(
        f"{path} holds task {task!r} and labels of the wrong kinds; fix: delete it and "
        "fine-tune again to rewrite it."
      )
    return cls(task, tuple(labels))
