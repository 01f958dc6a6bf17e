"""Tokenizer files of either kind: loading one by its type, and a workdir's own copy.

A path ending in .json is a Hugging Face tokenizer.json (`hf_json`), anything else a
SentencePiece model (`sentencepiece`). Every run keeps a copy of its tokenizer in its workdir
(`adopt`), so the workdir alone says how its checkpoints' ids map to text.
"""

from __future__ import annotations

import hashlib
import os

from etils import epath

from sslm_jax.tokenizer import hf_json, sentencepiece
from sslm_jax.tokenizer.sentencepiece import TokenizerError

# A workdir's own tokenizer copy: SentencePiece as tokenizer.model, Hugging Face as tokenizer.json.
WORKDIR_NAMES = ("tokenizer.model", "tokenizer.json")


def load(path: str) -> sentencepiece.Tokenizer | hf_json.HFTokenizer:
  """Load and validate a tokenizer file from a local or remote path: a tokenizer.json (a path
  ending in .json) as `hf_json.HFTokenizer`, else a SentencePiece `sentencepiece.Tokenizer`."""
  if not epath.Path(path).exists():
    raise TokenizerError(
      f"tokenizer file {path} does not exist; fix data.tokenizer_path or leave it empty to "
      "train one."
    )
  if str(path).endswith(".json"):
    return hf_json.load(str(path))
  return sentencepiece.load(str(path))


def workdir_name(source: str) -> str:
  """The name a copy of tokenizer file `source` has in a workdir."""
  return "tokenizer.json" if str(source).endswith(".json") else "tokenizer.model"


def workdir_file(workdir: str) -> str | None:
  """The workdir's own tokenizer copy (tokenizer.model or tokenizer.json), or None."""
  found = [
    str(epath.Path(workdir) / n) for n in WORKDIR_NAMES if (epath.Path(workdir) / n).exists()
  ]
  if len(found) > 1:
    raise TokenizerError(
      f"{workdir} holds both tokenizer.model and tokenizer.json, so which one its run used is "
      "unclear; remove the one the run was not trained with."
    )
  return found[0] if found else None


def check_adoptable(source: str, workdir: str) -> str | None:
  """The workdir's copy of `source` (None where it has no tokenizer yet); TokenizerError where it
  holds a different tokenizer. Reads only."""
  existing = workdir_file(workdir)
  if existing is None:
    return None
  target = str(epath.Path(workdir) / workdir_name(source))
  same = existing == target and _sha256(epath.Path(existing).read_bytes()) == _sha256(
    epath.Path(source).read_bytes()
  )
  if not same:
    raise TokenizerError(
      f"{workdir} already holds a different tokenizer ({existing}) than {source}; use a new "
      "--workdir for a run with another tokenizer, or point data.tokenizer_path at the "
      f"workdir's own {os.path.basename(existing)}."
    )
  return existing


def adopt(source: str, workdir: str) -> str:
  """Copy tokenizer file `source` into `workdir` (as `workdir_name(source)`) unless an identical
  copy is there; refuse where the workdir already holds a different tokenizer. Returns the
  workdir's path of the copy."""
  if not epath.Path(source).exists():
    raise TokenizerError(f"tokenizer file {source} does not exist; fix data.tokenizer_path.")
  existing = check_adoptable(source, workdir)
  if existing is not None:
    return existing
  target = epath.Path(workdir) / workdir_name(source)
  sentencepiece.write_atomically(target, epath.Path(source).read_bytes())
  return str(target)


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()
