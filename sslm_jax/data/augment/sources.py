"""Augmentation sources: thesaurus files, a WordNet dict directory, paraphrase files, callables.

Thesaurus file: UTF-8 lines `word<TAB>syn1,syn2,...`, blank lines and lines starting with `#`
skipped; entries are lowercased, `_` reads as a space, and the mapping is one-way (as written).
WordNet: a local `dict` directory of the wndb files data.noun, data.verb, data.adj, data.adv
(Debian/Ubuntu's `wordnet-base` installs them in /usr/share/wordnet). Header lines start with
two spaces; a synset line reads `offset lex_filenum ss_type w_cnt word lex_id [word lex_id...]
p_cnt ...` with w_cnt in hexadecimal, `_` for spaces and an adjective marker such as `(a)` or
`(p)` that is dropped. Every lemma of a synset is a synonym of the others, over all its senses.
Paraphrase file: UTF-8 lines `original<TAB>paraphrase`, several lines per original allowed, `#`
comments; originals are keyed with their whitespace normalised.
"""

from __future__ import annotations

import importlib
import pathlib
import re
from collections.abc import Callable, Sequence

from sslm_jax.config.augment_spec import AugmentError

WORDNET_FILES = ("data.noun", "data.verb", "data.adj", "data.adv")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")

Thesaurus = dict[str, tuple[str, ...]]


def normalize(word: str) -> str:
  return " ".join(word.replace("_", " ").lower().split())


def _add(thesaurus: Thesaurus, word: str, synonyms: Sequence[str]) -> None:
  key = normalize(word)
  new = tuple(s for s in map(normalize, synonyms) if s and s != key)
  if key and new:
    thesaurus[key] = tuple(dict.fromkeys(thesaurus.get(key, ()) + new))


def _lines(path: pathlib.Path):
  """(line number, line without its newline) of the non-blank, non-comment lines of a file."""
  with path.open(encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if line.strip() and not line.lstrip().startswith("#"):
        yield lineno, line.rstrip("\r\n")


def load_thesaurus(path: str | pathlib.Path) -> Thesaurus:
  """A `word<TAB>syn1,syn2,...` file as {word: synonyms}, in file order."""
  path, thesaurus = pathlib.Path(path), {}
  for lineno, line in _lines(path):
    word, tab, synonyms = line.partition("\t")
    if not tab:
      raise AugmentError(
        f"{path}:{lineno}: {line[:40]!r} has no tab; write 'word<TAB>syn1,syn2,...' per line."
      )
    _add(thesaurus, word, synonyms.split(","))
  return thesaurus


def _synset_lemmas(line: str, where: str) -> list[str]:
  """The lemmas of a wndb synset line: offset lex_filenum ss_type w_cnt word lex_id ..."""
  fields = line.split(" ")
  try:
    n = int(fields[3], 16)
  except (IndexError, ValueError):
    n = -1
  if n < 1 or len(fields) < 4 + 2 * n:
    raise AugmentError(
      f"{where}: not a WordNet synset line; give the wndb data.* files' directory."
    )
  return [_ADJ_MARKER.sub("", w) for w in fields[4 : 4 + 2 * n : 2]]


def load_wordnet(directory: str | pathlib.Path) -> Thesaurus:
  """Synonyms from a WordNet dict directory; multi-word lemmas are synonyms, never keys."""
  directory = pathlib.Path(directory)
  thesaurus: Thesaurus = {}
  for name in WORDNET_FILES:
    path = directory / name
    if not path.is_file():
      continue
    with path.open(encoding="utf-8", errors="replace") as f:
      for lineno, line in enumerate(f, 1):
        if line.startswith("  ") or not line.strip():  # the license header
          continue
        lemmas = _synset_lemmas(line, f"{path}:{lineno}")
        for lemma in lemmas:
          if "_" not in lemma:
            _add(thesaurus, lemma, lemmas)
  return thesaurus


def load_paraphrases(path: str | pathlib.Path) -> dict[str, tuple[str, ...]]:
  """An `original<TAB>paraphrase` file as {original with normalised whitespace: paraphrases}."""
  path, table = pathlib.Path(path), {}
  for lineno, line in _lines(path):
    original, tab, paraphrase = line.partition("\t")
    if not tab or not paraphrase.strip():
      raise AugmentError(
        f"{path}:{lineno}: {line[:40]!r} is not 'original<TAB>paraphrase'; one pair per line."
      )
    key = " ".join(original.split())
    table[key] = table.get(key, ()) + (paraphrase.strip(),)
  return table


def load_callable(ref: str) -> Callable:
  """`module:function` imported now, so a bad name fails before any data is read."""
  module, colon, attr = ref.partition(":")
  if not (colon and module and attr):
    raise AugmentError(f"paraphrase callable={ref!r}: write it as 'package.module:function'.")
  try:
    fn = getattr(importlib.import_module(module), attr)
  except (ImportError, AttributeError) as e:
    reason = (str(e).splitlines() or [type(e).__name__])[0]
    raise AugmentError(
      f"paraphrase callable={ref!r} cannot be imported ({reason}); put its module on PYTHONPATH."
    ) from e
  if not callable(fn):
    raise AugmentError(f"paraphrase callable={ref!r} is a {type(fn).__name__}, not a function.")
  return fn
