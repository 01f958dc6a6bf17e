"""Fine-tuning features cached in the workdir: tokenized once, memory-mapped at every start.

  WORKDIR/finetune_data/KEY/meta.json, inputs.npy, token_types.npy, lengths.npy, labels.npy, ...

KEY is a sha256 of what the features are a function of: the examples (texts, pairs, labels, in
order; so an edited or replaced file, or other augmented copies, is a new key), the tokenizer
file's sha256, the label vocabulary, data.seq_len, the objective (causal or not) and the
featurizing function. A start finds its features by that key and maps them (np.load with
mmap_mode='r': batches read the rows they index), so a restart does not tokenize again; a miss
tokenizes in memory, and `write()`, called once the workdir was checked, stores them (written to
a temporary directory, then renamed) and removes the entries of other keys. NumPy only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging
from etils import epath

DIR = "finetune_data"
_FORMAT = 1  # bump when the stored arrays change meaning


def key(examples: Sequence, tok, vocab, seq_len: int, causal: bool, featurize: Callable) -> str:
  h = hashlib.sha256()
  head = [_FORMAT, f"{featurize.__module__}.{featurize.__qualname__}", tok.sha256, seq_len, causal]
  head.append([vocab.task, list(vocab.labels)] if vocab is not None else None)
  h.update(json.dumps(head).encode())
  for e in examples:
    pair = "\x01" if e.text_pair is None else e.text_pair
    h.update(f"{len(e.text)}\0{e.text}\0{len(pair)}\0{pair}\0{e.label!r}\0".encode())
  return h.hexdigest()[:32]


def _load(directory: epath.Path) -> dict[str, np.ndarray] | None:
  meta = directory / "meta.json"
  if not meta.exists():
    return None
  try:
    names = json.loads(meta.read_text())["arrays"]
    if str(directory).startswith(("gs://", "s3://")):  # no mmap on object stores
      return {n: np.load(str(directory / f"{n}.npy")) for n in names}
    return {n: np.load(str(directory / f"{n}.npy"), mmap_mode="r") for n in names}
  except (OSError, ValueError, KeyError) as e:
    logging.warning(
      "fine-tuning features in %s cannot be read (%s); tokenizing again", directory, e
    )
    return None


class FeatureCache:
  """`features()` from WORKDIR/finetune_data when there, else computed; `write()` stores them."""

  def __init__(self, workdir: str):
    self.root = epath.Path(workdir) / DIR
    self._used: dict[str, dict[str, np.ndarray] | None] = {}  # key -> features to write

  def features(
    self, examples: Sequence, tok, vocab, seq_len: int, causal: bool, featurize: Callable
  ) -> dict[str, np.ndarray]:
    """featurize(examples, tok, vocab, seq_len, causal), or its stored result."""
    k = key(examples, tok, vocab, seq_len, causal, featurize)
    found = _load(self.root / k)
    if found is not None:
      logging.info("fine-tuning features of %d examples read from %s", len(examples), self.root / k)
      self._used.setdefault(k, None)
      return found
    features = featurize(examples, tok, vocab, seq_len, causal)
    self._used[k] = features
    return features

  def write(self) -> None:
    """Store the features computed by this start and remove entries no longer used. Call on one
    process, after the workdir was checked."""
    for k, features in self._used.items():
      if features is None or (self.root / k / "meta.json").exists():
        continue
      tmp = self.root / f".{k}.tmp-{uuid.uuid4().hex[:8]}"
      tmp.mkdir(parents=True, exist_ok=True)
      for name, array in features.items():
        with (tmp / f"{name}.npy").open("wb") as f:
          np.save(f, np.ascontiguousarray(array))
      (tmp / "meta.json").write_text(json.dumps({"arrays": sorted(features)}) + "\n")
      tmp.rename(self.root / k)
    for entry in self.root.iterdir() if self.root.exists() else ():
      if entry.name not in self._used:
        _remove(entry)


def _remove(path: epath.Path) -> None:
  if "://" in str(path):
    path.rmtree(missing_ok=True)
  else:
    shutil.rmtree(os.fspath(path), ignore_errors=True)
