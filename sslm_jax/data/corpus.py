"""Documents from the configured source, the train/eval split, and what the data came from.

Sources: 'builtin' (this Python's standard library sources, nothing downloaded), 'text' (.txt
paragraphs or .jsonl records, local or gs://) and 'tfds' (a TensorFlow Datasets text feature).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import pathlib
import sys
import sysconfig
import zlib
from collections.abc import Iterator

import ml_collections
import tensorflow_datasets as tfds
from absl import logging

from sslm_jax.data import gfile
from sslm_jax.errors import SslmError

# Third-party packages and the test suites are not the standard library's own code.
_BUILTIN_SKIP_DIRS = frozenset(
  {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
_TFDS_BATCH_DOCS = 1024  # documents per batch read from a tfds dataset
NUM_SAMPLE_TEXTS = 64  # held-out snippets kept for end-of-run samples
_SNIPPET_CHARS = 200


class DataError(SslmError, ValueError):
  """Data that cannot be prepared or served; the message names the problem and the fix."""


@dataclasses.dataclass
class DecodeStats:
  """Files and documents whose bytes were not valid UTF-8 (decoded with U+FFFD instead)."""

  files: set[str] = dataclasses.field(default_factory=set)  # a set: both splits read a file
  docs: int = 0

  def add(self, file: str | None, bad: bool) -> None:
    if bad:
      self.docs += 1
      if file is not None:
        self.files.add(file)


def _decode(raw: bytes) -> tuple[str, bool]:
  """Text and whether any bytes had to be replaced; never raises."""
  try:
    return raw.decode("utf-8"), False
  except UnicodeDecodeError:
    return raw.decode("utf-8", errors="replace"), True


def is_eval(key: str, eval_fraction: float) -> bool:
  """The held-out split: a stable hash of the document key, independent of listing order."""
  return zlib.crc32(key.encode("utf-8")) % 10000 < eval_fraction * 10000


@functools.cache
def builtin_files() -> list[tuple[str, pathlib.Path]]:
  """(path relative to the stdlib, absolute path) of the stdlib's own .py files, sorted.

  Skipped directories are pruned from the walk (site-packages can hold far more files than the
  stdlib), and the listing is made once per process.
  """
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  found = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = [d for d in subdirs if d not in _BUILTIN_SKIP_DIRS]
    for name in files:
      if name.endswith(".py"):
        path = pathlib.Path(directory, name)
        found.append((path.relative_to(root).as_posix(), path))
  return sorted(found)


def _pattern_base(pattern: str) -> str:
  """The directory above the first wildcard: matched files are named relative to it."""
  cut = min((i for i, ch in enumerate(pattern) if ch in "*?["), default=len(pattern))
  return pattern[:cut].rsplit("/", 1)[0] if "/" in pattern[:cut] else ""


def text_paths(patterns: str) -> list[tuple[str, str]]:
  """(name, path) of files matched by comma-separated paths or globs; each must match.

  The name (the path below the pattern's fixed directory) keys the held-out split, so moving
  the data elsewhere, e.g. to gs://, keeps every document in its split.
  """
  found = {}
  for pattern in (p.strip() for p in patterns.split(",")):
    if not pattern:
      continue
    matched = gfile.glob(pattern)
    if not matched:
      raise DataError(
        f"text file pattern {pattern!r} matches no files; fix data.text_files / "
        "data.eval_text_files (comma-separated paths or globs such as /data/*.txt)."
      )
    base = _pattern_base(pattern)
    for path in matched:
      found.setdefault(path, path[len(base) :].lstrip("/") if base else path)
  return [(name, path) for path, name in sorted(found.items())]


# Longer paragraphs (or single lines) become several documents, so memory stays bounded even
# for a file that is one enormous line.
MAX_DOC_BYTES = 1 << 20


def _cut(data: bytes, limit: int) -> int:
  """A cut point <= limit that does not split a UTF-8 character."""
  cut = limit
  while cut > limit - 3 and data[cut] & 0xC0 == 0x80:
    cut -= 1
  return cut


def _bounded_lines(f, start: int = 0, end: int | None = None, chunk: int = 1 << 20):
  """Lines of a binary file from byte `start` to `end`, read in chunks aligned to the file (so a
  line over MAX_DOC_BYTES is cut into the same pieces whatever `start` is)."""
  rest, pos = b"", start
  while block := f.read(
    chunk - pos % chunk if end is None else min(chunk - pos % chunk, end - pos)
  ):
    pos += len(block)
    *lines, rest = (rest + block).split(b"\n")
    yield from (line + b"\n" for line in lines)
    while len(rest) > MAX_DOC_BYTES:
      cut = _cut(rest, MAX_DOC_BYTES)
      yield rest[:cut]
      rest = rest[cut:]
  if rest:
    yield rest


def _open_at(path: str, start: int):
  f = gfile.GFile(path, "rb")
  if start:
    f.seek(start)
  return f


def _paragraphs(
  path: str, name: str, start: int = 0, end: int | None = None
) -> Iterator[tuple[str, str, bool]]:
  """(key, text, had bad bytes) of each blank-line-separated paragraph of a text file, or of
  its bytes [start, end) when they begin at a paragraph (units.py cuts files there). The key
  is name@offset of the paragraph's first byte: the same however the file is cut."""
  first, lines, size, pos = 0, [], 0, start
  with _open_at(path, start) as f:
    for line in itertools.chain(_bounded_lines(f, start, end), [b""]):  # "" flushes the last
      if line.strip():
        if not lines:
          first = pos
        lines.append(line)
        size += len(line)
        pos += len(line)
        if size < MAX_DOC_BYTES:
          continue
      else:
        pos += len(line)
      if lines:
        text, bad = _decode(b"".join(lines))
        yield f"{name}@{first}", text.strip(), bad
        lines, size = [], 0


def _jsonl_records(
  path: str, name: str, text_key: str, start: int = 0, end: int | None = None
) -> Iterator[tuple[str, str, bool]]:
  """(key, text, had bad bytes) of each .jsonl record's `text_key` field, from the line at byte
  `start` to byte `end`; the key is name@offset of the record's line."""
  pos = start
  with _open_at(path, start) as f:
    for number, line in enumerate(f, start=1):
      if end is not None and pos >= end:
        break
      offset, pos = pos, pos + len(line)
      if not line.strip():
        continue
      raw, bad = _decode(line)
      try:
        record = json.loads(raw)
        text = record[text_key]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        where = f"{path}:{number}" if start == 0 else f"{path} (the line at byte {offset})"
        raise DataError(
          f"{where} is not a JSON object with a {text_key!r} field ({e}); fix the file "
          "or set --config.data.text_key to the field that holds the text."
        ) from e
      yield f"{name}@{offset}", str(text), bad


def unit_cut(path: str, target: int) -> int | None:
  """The first place at or after byte `target` where a unit of `path` may begin, or None: the
  start of a line (.jsonl), or the end of a blank line (other text files), which the reader
  leaves with no paragraph open. A pure function of the file's bytes and `target`."""
  pos, line_started = target, False
  with _open_at(path, max(target - 1, 0)) as f:
    if target and f.read(1) == b"\n":
      line_started = True  # the item at `target` is a whole line
      if path.endswith(".jsonl"):
        return target
    if path.endswith(".jsonl"):
      for line in _bounded_lines(f, target):
        pos += len(line)
        if line.endswith(b"\n"):
          return pos
      return None
    for line in _bounded_lines(f, target):
      pos += len(line)
      complete = line_started and line.endswith(b"\n")
      if complete and not line.strip():
        return pos
      line_started = line.endswith(b"\n")  # the next item starts a line
  return None


def file_records(
  source: str, name: str, path: str, text_key: str, byte_range: tuple[int, int] | None = None
) -> Iterator[tuple[str, str, bool]]:
  """(key, text, had bad bytes) of each document of a built-in or text file: a whole built-in
  file, a .jsonl record's `text_key` field, or a paragraph of any other text file; of a text
  file's bytes [start, end) when `byte_range` is given (a unit_cut to a unit_cut or the end)."""
  if source == "builtin":
    text, bad = _decode(pathlib.Path(path).read_bytes())
    return iter([(name, text, bad)])
  start, end = byte_range or (0, None)
  if path.endswith(".jsonl"):
    return _jsonl_records(path, name, text_key, start, end)
  return _paragraphs(path, name, start, end)


def tfds_builder(name: str, data_dir: str, name_field: str = "data.tfds_name"):
  """The builder of tfds dataset `name` in `data_dir` ('' = the default); `name_field` is the
  config field that named it, for the error."""
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.DatasetNotFoundError as e:
    raise DataError(f"tfds dataset {name!r} is unknown ({e}); fix --config.{name_field}.") from e


def prepared_tfds_builder(
  name: str, data_dir: str, name_field: str = "data.tfds_name", download: bool = True
):
  """The dataset's builder, prepared here if it is not yet (which needs its download to work);
  with download=False an unprepared dataset is refused at once."""
  builder = tfds_builder(name, data_dir, name_field)
  if builder.is_prepared():
    return builder
  fix = (
    f"Prepare it where it can be downloaded (`tfds build {name} --data_dir=DIR`), copy DIR here "
    "and pass --config.data.tfds_data_dir=DIR."
  )
  if not download:
    raise DataError(f"tfds dataset {name!r} is not prepared in {builder.data_dir}. {fix}")
  logging.info(
    "tfds %s is not prepared in %s: preparing it", builder.info.full_name, builder.data_dir
  )
  try:
    builder.download_and_prepare()
  except Exception as e:  # no network, a gated dataset, a missing optional dependency, ...
    reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    raise DataError(
      f"tfds dataset {name!r} is not prepared in {builder.data_dir} and preparing it "
      f"here failed ({reason}). {fix}"
    ) from e
  return builder


def tfds_split(builder, split: str, split_field: str):
  """One split as a tf.data.Dataset, in file order; `split_field` is the config field naming it."""
  try:
    return builder.as_dataset(split=split, shuffle_files=False)
  except (ValueError, KeyError) as e:  # an unknown split or a bad slice
    raise DataError(
      f"tfds dataset {builder.info.full_name!r} has no split {split!r} ({e}); it has "
      f"{sorted(builder.info.splits)}: set --config.{split_field}."
    ) from e


def tfds_texts(
  c: ml_collections.ConfigDict, split: str, split_field: str, stats: DecodeStats
) -> Iterator[str]:
  """Non-empty texts of tfds split (or slice) `split` of data.tfds_name, in file order."""
  builder = prepared_tfds_builder(c.data.tfds_name, c.data.tfds_data_dir)
  ds = tfds_split(builder, split, split_field)
  key = c.data.tfds_text_key
  if key not in ds.element_spec:
    raise DataError(
      f"tfds dataset {c.data.tfds_name!r} has no feature {key!r} (it has "
      f"{sorted(ds.element_spec)}); set --config.data.tfds_text_key to one of them."
    )
  for batch in ds.map(lambda x: x[key]).batch(_TFDS_BATCH_DOCS).prefetch(2).as_numpy_iterator():
    for raw in batch:
      text, bad = _decode(bytes(raw))
      stats.add(None, bad)
      if text.strip():
        yield text


def snippet(text: str) -> str:
  """The first non-empty line(s) of a document, at most _SNIPPET_CHARS characters."""
  out = ""
  for line in text.splitlines():
    if not line.strip():
      continue
    joined = f"{out}\n{line.rstrip()}" if out else line.rstrip()
    if len(joined) > _SNIPPET_CHARS:
      return out or joined[:_SNIPPET_CHARS].rstrip()
    out = joined
    if len(out) >= _SNIPPET_CHARS // 4:
      break
  return out


def keep_snippets(texts: Iterator[str], out: list[str]) -> Iterator[str]:
  """Pass texts through, keeping snippets of the first NUM_SAMPLE_TEXTS in `out`."""
  for text in texts:
    if len(out) < NUM_SAMPLE_TEXTS:
      out.append(snippet(text))
    yield text


def tokenizer_sample(texts: Iterator[str], budget: int) -> list[str]:
  """About the first `budget` bytes of documents, in source order (the last one is cut)."""
  sample, used = [], 0
  for text in texts:
    if used >= budget:
      break
    size = len(text.encode("utf-8"))
    sample.append(text if used + size <= budget else text[: budget - used])
    used += size
  return sample


def _listing_digest(entries: list[str]) -> str:
  return hashlib.sha256("\n".join(entries).encode("utf-8")).hexdigest()


def describe(c: ml_collections.ConfigDict) -> dict:
  """What the cache was built from; a difference means the cache must be rebuilt."""
  d = c.data
  if d.source == "builtin":
    files = builtin_files()
    listing = [f"{key}:{path.stat().st_size}" for key, path in files]
    return {
      "source": "builtin",
      "python": sys.version.split()[0],
      "num_files": len(files),
      "listing_sha256": _listing_digest(listing),
      "eval_fraction": d.eval_fraction,
    }
  if d.source == "tfds":
    keys = ("tfds_name", "tfds_train_split", "tfds_eval_split", "tfds_data_dir", "tfds_text_key")
    return {"source": "tfds", **{k: d[k] for k in keys}}
  desc = {"source": "text", "text_files": d.text_files, "text_key": d.text_key}
  groups = {"train": d.text_files}
  if d.eval_text_files:
    desc["eval_text_files"] = groups["eval"] = d.eval_text_files
  else:
    desc["eval_fraction"] = d.eval_fraction
  for split, patterns in groups.items():
    paths = text_paths(patterns)
    desc[f"{split}_num_files"] = len(paths)
    desc[f"{split}_listing_sha256"] = _listing_digest(
      [f"{p}:{gfile.stat(p).length}" for _, p in paths]
    )
  return desc


# Longer listings are recorded as a count and a digest, so every checkpoint stays small; a change
# is then still refused, but its message cannot name the files.
MAX_LISTED_FILES = 5000


def _file_list(files: list[tuple[str, int]]) -> list | dict:
  if len(files) <= MAX_LISTED_FILES:
    return [[name, size] for name, size in files]
  return {
    "num_files": len(files),
    "sha256": _listing_digest([f"{name}:{size}" for name, size in files]),
  }


def listing(c: ml_collections.ConfigDict) -> dict:
  """The files the data comes from (names and sizes), or the tfds dataset version and splits.

  Only reads: a checkpoint records it, and a resume compares it before anything is rebuilt.
  Names are relative to each pattern's fixed directory, so moving the data keeps the listing.
  """
  d = c.data
  if d.source == "builtin":
    return {
      "source": "builtin",
      "files": _file_list([(key, path.stat().st_size) for key, path in builtin_files()]),
    }
  if d.source == "tfds":
    builder = tfds_builder(d.tfds_name, d.tfds_data_dir)
    return {
      "source": "tfds",
      "dataset": builder.info.full_name,  # name/config/version, e.g. lm1b/1.1.0
      "splits": [d.tfds_train_split, d.tfds_eval_split],
    }
  groups = {"train": d.text_files, "eval": d.eval_text_files} if d.eval_text_files else {}
  groups = groups or {"files": d.text_files}
  return {
    "source": "text",
    **{
      group: _file_list([(n, gfile.stat(p).length) for n, p in text_paths(patterns)])
      for group, patterns in groups.items()
    },
  }
