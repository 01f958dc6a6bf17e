"""Fine-tuning data: the built-in task, tokenized features and batches (numpy only, no TensorFlow).

The built-in task needs no files. Its examples are snippets of this Python's standard library
sources (the built-in pretraining corpus): four consecutive non-blank lines, each cut to 80
characters. The label is "def" when one of the lines starts, after its indentation, with `def `,
`async def ` or `class `, else "no_def". Classes are balanced (at most two snippets of each per
file) and files are split into train and eval by a hash of their path, as the pretraining corpus
is (so the eval snippets come from files the model never saw). A model must find one keyword
among ~50 tokens and tell it from `def` inside names, strings and comments: learnable, not given.

Features, per example: BERT reads [CLS] text [SEP] (text_pair [SEP]) with token types 0 for the
first part and 1 for the pair; GPT reads [BOS] text ([SEP] text_pair) [EOS]. Both are truncated
to data.seq_len (the longer part loses tokens first) and padded with the pad id; `segment_ids` is
1 on real tokens and 0 on padding. The train order is a pure function of (seed, step).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sysconfig
import zlib
from collections.abc import Iterator

import numpy as np

from sslm_jax.data import permute
from sslm_jax.data.labelled import Example, LabelVocab

BUILTIN_LABELS = ("def", "no_def")
_SKIP_DIRS = frozenset(
  {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
_LINES, _LINE_CHARS, _PER_FILE = 4, 80, 2
_EVAL_PER_10000 = 1500  # files whose path hashes below this are eval files
_KEYWORDS = ("def ", "async def ", "class ")
ENCODE_BATCH = 4096  # examples tokenized per encode_batch call


def _stdlib_files() -> list[tuple[str, pathlib.Path]]:
  """(relative path, path) of the standard library's own .py files, sorted: corpus.py's list,
  repeated here because corpus.py imports TensorFlow."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  found = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*.py")]
  return sorted((k, p) for k, p in found if not _SKIP_DIRS.intersection(k.split("/")[:-1]))


def _snippets(text: str) -> Iterator[tuple[str, str]]:
  lines = [line.rstrip()[:_LINE_CHARS] for line in text.splitlines() if line.strip()]
  for start in range(0, len(lines) - _LINES + 1, _LINES):
    window = lines[start : start + _LINES]
    defines = any(line.lstrip().startswith(_KEYWORDS) for line in window)
    yield "\n".join(window), BUILTIN_LABELS[0] if defines else BUILTIN_LABELS[1]


def builtin_examples(split: str, per_class: int) -> list[Example]:
  """`per_class` examples of each label for split 'train' or 'eval', in a fixed order.

  A first pass takes at most two snippets of each label per file; when the split's files run
  short of `per_class` (the eval files do), later passes take two more per file, so the count
  asked for is the count served while the corpus has the snippets."""
  files = [
    (key, path)
    for key, path in _stdlib_files()
    if (zlib.crc32(key.encode()) % 10000 < _EVAL_PER_10000) == (split == "eval")
  ]
  out: dict[str, list[Example]] = {label: [] for label in BUILTIN_LABELS}
  low = 0
  while any(len(v) < per_class for v in out.values()):
    before = sum(map(len, out.values()))
    for key, path in files:
      seen = dict.fromkeys(BUILTIN_LABELS, 0)
      for text, label in _snippets(path.read_bytes().decode("utf-8", errors="replace")):
        seen[label] += 1
        if low < seen[label] <= low + _PER_FILE and len(out[label]) < per_class:
          out[label].append(Example(text, None, label, f"{key} snippet"))
      if all(len(v) >= per_class for v in out.values()):
        break
    if sum(map(len, out.values())) == before:
      break  # the corpus has no more snippets of the missing label
    low += _PER_FILE
  return [e for pair in zip(*out.values(), strict=False) for e in pair]


def _truncate(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
  """Cut the longer of the two first until both fit in `budget` tokens."""
  a, b = list(a), list(b)
  while len(a) + len(b) > budget:
    (a if len(a) >= len(b) else b).pop()
  return a, b


def _encode_one(tok, a: list[int], b: list[int] | None, seq_len: int, causal: bool):
  """(ids, token types) of one example; see the module docstring for the layout."""
  pair = b is not None
  a, b = _truncate(a, b or [], seq_len - 2 - pair)  # two special tokens, three for a pair
  if causal:
    ids = [tok.bos_id, *a] + ([tok.sep_id, *b] if pair else []) + [tok.eos_id]
    return ids, [0] * len(ids)
  first = [tok.cls_id, *a, tok.sep_id]
  second = [*b, tok.sep_id] if pair else []
  return first + second, [0] * len(first) + [1] * len(second)


def featurize(
  examples: list[Example], tok, vocab: LabelVocab | None, seq_len: int, causal: bool
) -> dict[str, np.ndarray]:
  """inputs/token_types [N, T] int32, lengths [N] int32, labels [N] (int32, or float32 with no
  vocabulary: regression)."""
  n = len(examples)
  inputs_NT = np.full((n, seq_len), tok.pad_id, np.int32)
  types_NT = np.zeros((n, seq_len), np.int32)
  lengths_N = np.zeros((n,), np.int32)
  for first in range(0, n, ENCODE_BATCH):  # bounded: token lists of a whole file take GiBs
    chunk = examples[first : first + ENCODE_BATCH]
    texts = tok.encode_batch([e.text for e in chunk])
    pairs = tok.encode_batch([e.text_pair or "" for e in chunk])
    for i, (e, a, b) in enumerate(zip(chunk, texts, pairs, strict=True), start=first):
      ids, types = _encode_one(tok, a, b if e.text_pair is not None else None, seq_len, causal)
      inputs_NT[i, : len(ids)], types_NT[i, : len(ids)], lengths_N[i] = ids, types, len(ids)
  if vocab is None:
    labels_N = np.asarray([float(e.label) for e in examples], np.float32)
  else:
    labels_N = np.asarray([vocab.encode(e) for e in examples], np.int32)
  return {"inputs": inputs_NT, "token_types": types_NT, "lengths": lengths_N, "labels": labels_N}


def _batch(features: dict[str, np.ndarray], index_B: np.ndarray, weights_B: np.ndarray) -> dict:
  inputs_BT = features["inputs"][index_B]
  positions_BT = np.broadcast_to(np.arange(inputs_BT.shape[1], dtype=np.int32), inputs_BT.shape)
  segment_ids_BT = (positions_BT < features["lengths"][index_B][:, None]).astype(np.int32)
  batch = {
    "inputs": inputs_BT,
    "positions": np.ascontiguousarray(positions_BT),
    "segment_ids": segment_ids_BT,
    "token_types": features["token_types"][index_B],
    "labels": features["labels"][index_B],
    "weights": weights_B.astype(np.float32),
  }
  if "label_weights" in features:  # tagging (finetune/tagging.py): which positions are scored
    batch["label_weights"] = features["label_weights"][index_B]
  return batch


@dataclasses.dataclass
class TaskData:
  """Train and eval features, served as global batches of `batch_size` rows (`rows` of them
  on this process)."""

  train: dict[str, np.ndarray]
  eval: dict[str, np.ndarray]
  batch_size: int
  seed: int
  rows: np.ndarray | None = None  # this process's rows of each global batch; None: all

  def _local(self, batch: dict) -> dict:
    return batch if self.rows is None else {k: v[self.rows] for k, v in batch.items()}

  def batch_for_step(self, step: int) -> dict[str, np.ndarray]:
    """The batch of step `step` (0-based): epochs of keyed permutations, one after another."""
    n = len(self.train["labels"])
    position_B = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    index_B = np.empty_like(position_B)
    for epoch in np.unique(position_B // n):
      here = position_B // n == epoch
      perm = permute.KeyedPermutation(n, "finetune train", self.seed, int(epoch))
      index_B[here] = perm[position_B[here] % n]
    return self._local(_batch(self.train, index_B, np.ones(self.batch_size)))

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    step = start_step
    while True:
      yield self.batch_for_step(step)
      step += 1

  def eval_batches(self) -> list[dict[str, np.ndarray]]:
    """Every eval example once; the last batch is padded with weight-0 copies of row 0."""
    n, out = len(self.eval["labels"]), []
    for start in range(0, n, self.batch_size):
      index_B = np.arange(start, start + self.batch_size)
      weights_B = (index_B < n).astype(np.float32)
      out.append(self._local(_batch(self.eval, np.where(index_B < n, index_B, 0), weights_B)))
    return out
