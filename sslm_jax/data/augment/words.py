"""Words of a text as (lead, words, gaps), with text == lead + sum(word + gap): the unit every
word-level transform (transforms.py, contextual.py) edits, so that joining puts the text back."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

_WORD = re.compile(r"\S+")
_AFFIXES = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)

# A transform's work on a batch of texts: apply(texts, rng) -> texts.
Apply = Callable[[list[str], np.random.Generator], list[str]]


def split_words(text: str) -> tuple[str, list[str], list[str]]:
  spans = [m.span() for m in _WORD.finditer(text)]
  if not spans:
    return text, [], []
  ends = [start for start, _ in spans[1:]] + [len(text)]
  words = [text[a:b] for a, b in spans]
  gaps = [text[b:end] for (_, b), end in zip(spans, ends, strict=True)]
  return text[: spans[0][0]], words, gaps


def affixes(token: str) -> tuple[str, str, str]:
  """(leading punctuation, core, trailing punctuation) of a token."""
  return _AFFIXES.match(token).groups()


def count(alpha: float, n: int) -> int:
  """How many of n words a transform with rate alpha edits: at least one."""
  return max(1, int(alpha * n + 0.5))


def word_spans(text: str) -> list[tuple[int, int]]:
  return [m.span() for m in _WORD.finditer(text)]
