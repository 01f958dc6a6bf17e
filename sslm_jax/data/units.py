"""Units of preparation work: the configured source cut into pieces that are prepared alone.

A unit is a group of built-in files, a text file or a byte range of one, or an even slice of a
TFDS split. A text file over TEXT_BYTES_PER_UNIT is cut into ranges of about that size, each
starting where the reader is between documents (corpus.unit_cut: after a blank line, or at a
line of .jsonl), so its documents, their keys and their split are those of the whole file.
Units are defined by the source alone, never by the number of workers or hosts, and each is
packed into rows on its own (its remainder, too short for a row, dropped), so the rows of a
split are the concatenation of its units' rows in unit order whoever prepared them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import ml_collections
import tensorflow_datasets as tfds

from sslm_jax.data import corpus, gfile

BUILTIN_FILES_PER_UNIT = 64
TEXT_BYTES_PER_UNIT = 32 << 20
TFDS_DOCS_PER_UNIT = 50_000
TFDS_MAX_UNITS = 1024
SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class Unit:
  index: int
  name: str  # for logs and errors
  splits: tuple[str, ...]  # the splits its documents go to
  files: tuple[tuple[str, str], ...] = ()  # (key name, path) of builtin and text units
  tfds_split: object = ""  # a tfds unit's split: its name, or one of tfds.even_splits(name, n)
  size: int = 0  # bytes of its files, or documents of its tfds slice: how hosts share the work
  byte_range: tuple[int, int] | None = None  # [start, end) of a text unit's one file; None: all
  file_number: int = 0  # a text unit's file among the source's files (augmentation seeds)


def _builtin_units() -> list[Unit]:
  files = [(key, str(path)) for key, path in corpus.builtin_files()]
  n = BUILTIN_FILES_PER_UNIT
  groups = [files[j : j + n] for j in range(0, len(files), n)]
  return [
    Unit(
      i,
      f"builtin files {i * n}-{i * n + len(group) - 1}",
      SPLITS,
      tuple(group),
      size=sum(os.path.getsize(path) for _, path in group),
    )  # fmt: skip
    for i, group in enumerate(groups)
  ]


def _byte_ranges(path: str, size: int) -> list[tuple[int, int]] | None:
  """[start, end) ranges of about TEXT_BYTES_PER_UNIT that cut `path` between documents; None
  for a file of one unit."""
  cuts = [0]
  for target in range(TEXT_BYTES_PER_UNIT, size, TEXT_BYTES_PER_UNIT):
    if target <= cuts[-1]:
      continue  # the last cut was past this target
    cut = corpus.unit_cut(path, target)
    if cut is None or cut >= size:
      break
    cuts.append(cut)
  if len(cuts) == 1:
    return None
  return list(zip(cuts, cuts[1:] + [size], strict=True))


def _file_units(first: int, number: int, name: str, path: str, splits, label: str) -> list[Unit]:
  size = gfile.stat(path).length
  ranges = _byte_ranges(path, size)
  if ranges is None:
    return [Unit(first, label, splits, ((name, path),), size=size, file_number=number)]
  return [
    Unit(
      first + i,
      f"{label} bytes {a}-{b}",
      splits,
      ((name, path),),
      size=b - a,
      byte_range=(a, b),
      file_number=number,
    )  # fmt: skip
    for i, (a, b) in enumerate(ranges)
  ]


def _text_units(d: ml_collections.ConfigDict) -> list[Unit]:
  if not d.eval_text_files:
    files = [(SPLITS, name, path, path) for name, path in corpus.text_paths(d.text_files)]
  else:
    files = [
      ((split,), name, path, f"{path} ({split})")
      for split, patterns in (("train", d.text_files), ("eval", d.eval_text_files))
      for name, path in corpus.text_paths(patterns)
    ]
  out = []
  for number, (splits, name, path, label) in enumerate(files):
    out += _file_units(len(out), number, name, path, splits, label)
  return out


def _tfds_units(d: ml_collections.ConfigDict) -> list[Unit]:
  builder = corpus.prepared_tfds_builder(d.tfds_name, d.tfds_data_dir)
  out = []
  for split, name in (("train", d.tfds_train_split), ("eval", d.tfds_eval_split)):
    corpus.tfds_split(builder, name, f"data.tfds_{split}_split")  # a bad split fails here
    try:
      examples = builder.info.splits[name].num_examples
    except (KeyError, ValueError):  # no split metadata (e.g. tfds.testing.mock_data): one unit
      examples = 0
    n = max(1, min(TFDS_MAX_UNITS, examples // TFDS_DOCS_PER_UNIT))
    parts = [name] if n == 1 else tfds.even_splits(name, n=n)
    for i, part in enumerate(parts):
      label = f"tfds {d.tfds_name}:{name}" + (f" part {i + 1}/{n}" if n > 1 else "")
      out.append(Unit(len(out), label, (split,), tfds_split=part, size=examples // n))
  return out


def units(c: ml_collections.ConfigDict) -> list[Unit]:
  """The source's units, in the order their rows are concatenated."""
  source = c.data.source
  if source == "builtin":
    return _builtin_units()
  if source == "text":
    return _text_units(c.data)
  if source == "tfds":
    return _tfds_units(c.data)
  raise corpus.DataError(f"data.source={source!r}: use 'builtin', 'text' or 'tfds'.")


def documents(
  c: ml_collections.ConfigDict, unit: Unit, stats: corpus.DecodeStats
) -> Iterator[tuple[str, str]]:
  """(split, text) of each non-empty document of the unit, in a fixed order."""
  for split, text, _ in keyed_documents(c, unit, stats):
    yield split, text


def augment_index(unit: Unit, key: str | None) -> int | None:
  """The augmentation example number of a text document: its file and byte offset, the same
  however the file is cut into units; None for other sources (numbered within the unit)."""
  if key is None or "@" not in key:
    return None
  return unit.file_number * TEXT_AUGMENT_STRIDE + int(key.rpartition("@")[2])


TEXT_AUGMENT_STRIDE = 1 << 48  # past any file's byte offsets


def keyed_documents(
  c: ml_collections.ConfigDict, unit: Unit, stats: corpus.DecodeStats
) -> Iterator[tuple[str, str, str | None]]:
  """(split, text, key) of each non-empty document of the unit; the key is None for tfds."""
  d = c.data
  if d.source == "tfds":
    split = unit.splits[0]
    for text in corpus.tfds_texts(c, unit.tfds_split, f"data.tfds_{split}_split", stats):
      yield split, text, None
    return
  for name, path in unit.files:
    records = corpus.file_records(d.source, name, path, d.text_key, unit.byte_range)
    for key, text, bad in records:
      if len(unit.splits) == 1:
        split = unit.splits[0]
      else:
        split = "eval" if corpus.is_eval(key, d.eval_fraction) else "train"
      stats.add(path if d.source == "text" else key, bad)
      if text.strip():
        yield split, text, key


def split_documents(
  c: ml_collections.ConfigDict, split: str, stats: corpus.DecodeStats
) -> Iterator[str]:
  """Texts of the 'train' or 'eval' split, unit after unit (read lazily, in a fixed order)."""
  for unit in units(c):
    if split in unit.splits:
      yield from (text for s, text in documents(c, unit, stats) if s == split)


def assign(all_units: list[Unit], process_count: int) -> list[list[Unit]]:
  """Each process's units, largest first: every unit, from the largest, goes to the process
  with the least work so far (ties: the lowest index), so no host idles while another works
  through a long tail. Depends on the units alone, not on timing."""
  loads, out = [0] * process_count, [[] for _ in range(process_count)]
  for unit in sorted(all_units, key=lambda u: (-u.size, u.index)):
    p = min(range(process_count), key=lambda i: (loads[i], i))
    out[p].append(unit)
    loads[p] += max(unit.size, 1)
  return out
