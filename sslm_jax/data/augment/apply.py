"""`data.augment` applied to a run's training data: pretraining documents, fine-tuning examples.

Only the training split is augmented, never eval. Each original is kept and followed by up to
`data.augment_copies` augmented copies; copy k of example i is Augmenter(specs, seed)(text, i,
k), so it depends on (config seed, example index, copy, transform) and not on hosts or order.
A copy that no transform changed is dropped (it would only repeat the original). Pretraining
documents are augmented when the cache is prepared, before tokenization (the tokenizer is
trained on the original text); split_sentences pieces become separate documents.

Fine-tuning: every copy keeps the example's label, and split_sentences pieces each carry it.
For a text pair, `text` is augmented as example 2*i and `text_pair` as example 2*i + 1 (the
same copy), so both sides change independently; a pair side cut into pieces is refused.

What augmentation did is logged and written to WORKDIR/augment.json (the pretraining cache's
meta.json holds the same record): examples, copies added and dropped, texts out, and per
transform the number of copies it changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator

from absl import logging

from sslm_jax.config import augment_spec
from sslm_jax.config.augment_spec import AugmentError
from sslm_jax.data.augment import transforms as augment
from sslm_jax.data.augment.sources import WORDNET_FILES

STATS_FILE = "augment.json"
CHUNK = 256  # examples augmented per Augmenter.many call


def _where(examples: list, owners: list[int], err: AugmentError) -> str:
  """'FILE row N: ' of the example whose text an augmenter error names, or ''."""
  position = getattr(err, "position", None)
  where = examples[owners[position]].where if position is not None else ""
  return f"{where}: " if where else ""


@dataclasses.dataclass
class Counts:
  """What augmentation did to one split; `record()` is what is written and logged."""

  spec: str
  copies: int
  seed: int
  examples: int = 0
  copies_added: int = 0
  copies_unchanged: int = 0
  texts_added: int = 0
  changed: dict[str, int] = dataclasses.field(default_factory=dict)

  def add(self, changed_by: Iterable[str], texts: int) -> None:
    names = set(changed_by)
    if not names:
      self.copies_unchanged += 1
      return
    self.copies_added += 1
    self.texts_added += texts
    for name in names:
      self.changed[name] += 1

  def record(self) -> dict:
    return {
      "augment": self.spec,
      "augment_copies": self.copies,
      "seed": self.seed,
      "examples": self.examples,
      "copies_added": self.copies_added,
      "copies_unchanged": self.copies_unchanged,
      "texts_added": self.texts_added,
      "changed": dict(self.changed),
    }


class Augmentation:
  """The configured transforms and their counts; None from `from_config` when it is off."""

  def __init__(self, c):
    self.specs = augment_spec.specs(c)
    self.copies = c.data.augment_copies
    self.augmenter = augment.Augmenter(self.specs, seed=c.seed)
    self.counts = Counts(augment_spec.canonical(self.specs), self.copies, c.seed)
    self.counts.changed = {spec["name"]: 0 for spec in self.specs}

  @classmethod
  def from_config(cls, c) -> Augmentation | None:
    return cls(c) if c.data.augment else None

  def document_copies(self, text: str, i: int) -> list[tuple[int, list[str], list[str]]]:
    """(copy, transforms that changed it, texts) for each copy of document i; counted."""
    return self._document_chunk([text], [i])[0]

  def _document_chunk(self, texts: list[str], indices: list[int]) -> list[list[tuple]]:
    """document_copies of documents `indices` in one Augmenter.many call (so a batched
    paraphrase callable sees all their copies at once)."""
    self.counts.examples += len(texts)
    items = [
      (t, i, copy) for t, i in zip(texts, indices, strict=True) for copy in range(self.copies)
    ]
    outs = iter(self.augmenter.many(items))
    per_doc = []
    for _ in texts:
      copies = []
      for copy in range(self.copies):
        out, changed = next(outs)
        self.counts.add(changed, len(out))
        copies.append((copy, changed, out))
      per_doc.append(copies)
    return per_doc

  def documents(self, texts: Iterable[str]) -> Iterator[str]:
    """Each document, then its changed copies (pieces of a split copy one after another)."""
    texts, first = iter(texts), 0
    while chunk := list(itertools.islice(texts, CHUNK)):
      yield from self.with_copies(chunk, list(range(first, first + len(chunk))))
      first += len(chunk)

  def with_copies(self, texts: list[str], indices: list[int]) -> list[str]:
    """Each document (of example number `indices[n]`), then its changed copies."""
    out = []
    for text, copies in zip(texts, self._document_chunk(texts, indices), strict=True):
      out.append(text)
      for _, changed, pieces in copies:
        out += pieces if changed else []
    return out

  def example_copies(self, e, i: int) -> list[tuple[int, list[str], list]]:
    """(copy, transforms that changed it, examples) for each copy of example i; counted."""
    return self._example_chunk([e], i)[0]

  def _example_chunk(self, examples: list, first: int) -> list[list[tuple]]:
    """example_copies of examples first, first + 1, ... in one Augmenter.many call. A text
    pair's `text` is example 2i and its `text_pair` example 2i + 1 (the same copy)."""
    items, owners = [], []
    for n, e in enumerate(examples):
      if isinstance(e.label, tuple):
        raise AugmentError(
          f"{e.where}: per-word (tagging) labels cannot follow data.augment's word changes; "
          "set --config.data.augment='' for this data."
        )
      i = first + n
      for copy in range(self.copies):
        if e.text_pair is None:
          items.append((e.text, i, copy))
        else:
          items += [(e.text, 2 * i, copy), (e.text_pair, 2 * i + 1, copy)]
      owners += [n] * (len(items) - len(owners))
    try:
      outs = iter(self.augmenter.many(items))
    except AugmentError as err:
      raise AugmentError(f"{_where(examples, owners, err)}{err}") from err
    per_example = []
    for e in examples:
      self.counts.examples += 1
      copies = []
      for copy in range(self.copies):
        new, changed = self._example(e, copy, outs)
        self.counts.add(changed, len(new))
        copies.append((copy, changed, new))
      per_example.append(copies)
    return per_example

  def examples(self, examples: list) -> list:
    """Fine-tuning examples (labelled.Example), each followed by its changed copies."""
    out = []
    for first in range(0, len(examples), CHUNK):
      chunk = examples[first : first + CHUNK]
      for e, copies in zip(chunk, self._example_chunk(chunk, first), strict=True):
        out.append(e)
        for _, changed, new in copies:
          if changed:
            out += new
    return out

  def _example(self, e, copy: int, outs) -> tuple[list, list[str]]:
    where = f"{e.where} (augmented copy {copy})".strip()
    texts, a = next(outs)
    if e.text_pair is None:
      return [dataclasses.replace(e, text=t, where=where) for t in texts], a
    pairs, b = next(outs)
    if len(texts) != 1 or len(pairs) != 1:
      raise AugmentError(
        f"{e.where}: a transform cut a text pair into pieces; remove split_sentences from "
        "data.augment for text pairs."
      )
    return [dataclasses.replace(e, text=texts[0], text_pair=pairs[0], where=where)], a + b

  def report(self, workdir: str | None, what: str) -> dict:
    """Log the counts and write them to WORKDIR/augment.json (no file when workdir is None)."""
    return write_report(workdir, what, self.counts.record())


_SUMMED = ("examples", "copies_added", "copies_unchanged", "texts_added")


def merge_counts(records: list[dict]) -> dict:
  """One Counts.record() of several parts of a split (prepared apart), summed."""
  merged = {**records[0], "changed": dict(records[0]["changed"])}
  for record in records[1:]:
    for key in _SUMMED:
      merged[key] += record[key]
    for name, n in record["changed"].items():
      merged["changed"][name] += n
  return merged


def write_report(workdir: str | None, what: str, counts: dict) -> dict:
  """Log a Counts.record() and write it to WORKDIR/augment.json (none when workdir is None)."""
  record = {"split": "train", "data": what, **counts}
  logging.info("data.augment on %s: %s", what, json.dumps(record))
  if workdir is not None:
    from etils import epath

    path = epath.Path(workdir) / STATS_FILE
    path.write_text(json.dumps(record, indent=1) + "\n")
  return record


def finetune_examples(c, examples: list, workdir: str | None) -> list:
  """The training examples with their augmented copies (the same list when augment is off)."""
  augmentation = Augmentation.from_config(c)
  if augmentation is None:
    return examples
  out = augmentation.examples(examples)
  augmentation.report(workdir, "fine-tuning examples")
  return out


def _digest(path: str) -> str:
  if not os.path.isfile(path):
    return "missing"
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _source_identity(spec: dict) -> dict:
  """What a spec's sources hold, so that an edited thesaurus or a newer BERT means a rebuild."""
  out = {}
  for key in ("thesaurus", "paraphrases"):
    if key in spec:
      out[f"{key}_sha256"] = _digest(str(spec[key]))
  if "wordnet" in spec:
    files = [os.path.join(str(spec["wordnet"]), n) for n in WORDNET_FILES]
    out["wordnet_sizes"] = [os.path.getsize(f) if os.path.isfile(f) else 0 for f in files]
  if "workdir" in spec:
    directory = os.path.join(str(spec["workdir"]), "checkpoints")
    steps = (
      [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []
    )
    out["checkpoint_step"] = spec.get("step") or max(steps, default=0)
  return out


def cache_identity(c) -> dict | None:
  """What the pretraining cache's rows depend on through augmentation; None when it is off."""
  if not c.data.augment:
    return None
  specs = augment_spec.specs(c)
  return {
    "augment": augment_spec.canonical(specs),
    "augment_copies": c.data.augment_copies,
    "seed": c.seed,
    "sources": [_source_identity(s) for s in specs],
  }
