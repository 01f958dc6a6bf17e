"""Text augmentation on raw text before tokenization: EDA word edits, sentence splits, paraphrases.

`Augmenter(specs, seed)` applies a list of transforms in order; `augmenter(text, example_index,
copy)` returns (texts, names of the transforms that changed the text). Each spec is a mapping
(a dict or an ml_collections ConfigDict) with `name`, `p` (the chance the transform is applied to
an example, default 1.0), `alpha` (the fraction of words touched, at least one word when
applied, default 0.1) and the transform's own fields:

  synonym          replace alpha of the words by a synonym     thesaurus=FILE or wordnet=DIR
  insert           insert a synonym of a random word at a random position, alpha*n times
                                                               thesaurus=FILE or wordnet=DIR
  swap             swap two random words, alpha*n times
  delete           delete each word with probability alpha (at least one; never all of them)
  split_sentences  cut a long document into runs of consecutive sentences of up to max_words
                   words (default 128); the first run's budget is drawn from [max_words/2,
                   max_words] so copies cut differently. Every piece keeps the example's label:
                   the caller replicates it.
  paraphrase       replace the whole text by a paraphrase      paraphrases=FILE or
                   callable='module:function', called as fn(texts: list[str], seed: int) and
                   returning one paraphrase per text (back-translation models plug in here);
                   with batch=N, fn(texts, seeds: list[int]) on up to N examples' texts at
                   once (see sslm_jax.data.augment.callables)
  contextual       replace alpha of the words by a trained BERT's fill-mask guesses
                   workdir=W (ours, masked_lm), step (default newest), top_k (default 10);
                   see sslm_jax.data.augment.contextual

Formats of the files (thesaurus, WordNet, paraphrases): see sslm_jax.data.augment.sources.

Words are whitespace-separated tokens, and the whitespace between them is kept (newlines
survive). Punctuation stays attached: a token splits into leading punctuation, a core and
trailing punctuation ("(Quick," -> "(", "Quick", ","); the core is looked up lowercased with no
lemmatisation ("dogs" does not find "dog"), the synonym replaces only the core and takes the
core's case pattern: all capitals ("KING" -> "MONARCH"), a capital first letter ("King" ->
"Monarch") or lower case. Sentences end at a token ending in . ! or ? (optionally followed by
closing quotes or brackets) or at a newline, so "Mr." ends one: a heuristic, good enough to cut.

Determinism: every random draw comes from numpy.random.default_rng([seed, example_index, copy,
stable_hash(transform name)]): the output is a pure function of the text and those four, whatever
the host count or the call order, for a given NumPy version (NumPy does not promise that a
Generator's stream stays the same across releases; the data order does not depend on it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import re
from collections.abc import Callable, Sequence

import numpy as np

from sslm_jax.config.augment_spec import AugmentError, check_spec, fraction, one_of
from sslm_jax.data.augment import callables as augment_callable
from sslm_jax.data.augment import contextual as augment_contextual
from sslm_jax.data.augment.sources import (
  WORDNET_FILES,
  Thesaurus,
  load_callable,
  load_paraphrases,
  load_thesaurus,
  load_wordnet,
)
from sslm_jax.data.augment.words import Apply, affixes, count, split_words, word_spans

DEFAULT_ALPHA = 0.1
DEFAULT_MAX_WORDS = 128

_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*$")


def stable_hash(name: str) -> int:
  """A 64-bit hash that, unlike hash(), is the same in every process."""
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def rng_for(seed: int, example_index: int, copy: int, name: str) -> np.random.Generator:
  return np.random.default_rng([seed, example_index, copy, stable_hash(name)])


# --- Word edits on (lead, words, gaps) (words.py) ------------------------------------------


def _synonyms(token: str, thesaurus: Thesaurus) -> tuple[str, tuple[str, ...], str, str]:
  """(lead, synonyms of the core, core, trail) of a token; no synonyms -> an empty tuple."""
  lead, core, trail = affixes(token)
  return lead, thesaurus.get(core.lower(), ()), core, trail


def _pick(rng: np.random.Generator, items: Sequence):
  return items[int(rng.integers(len(items)))]


def match_case(word: str, source: str) -> str:
  """`word` in the case pattern of `source`: "KING" -> "MONARCH", "King" -> "Monarch"."""
  if len(source) > 1 and source.isupper():
    return word.upper()
  if source[:1].isupper():
    return word[:1].upper() + word[1:]
  return word


def _synonym(words, gaps, rng, alpha, thesaurus) -> None:
  candidates = [i for i, w in enumerate(words) if _synonyms(w, thesaurus)[1]]
  if not candidates:
    return
  k = min(len(candidates), count(alpha, len(words)))
  for i in rng.choice(candidates, size=k, replace=False):
    lead, synonyms, core, trail = _synonyms(words[i], thesaurus)
    synonym = _pick(rng, synonyms)
    words[i] = lead + match_case(synonym, core) + trail


def _insert(words, gaps, rng, alpha, thesaurus) -> None:
  sources = [s for s in (_synonyms(w, thesaurus)[1] for w in words) if s]
  if not sources:
    return
  for _ in range(count(alpha, len(words))):
    synonym = _pick(rng, _pick(rng, sources))
    k = int(rng.integers(len(words) + 1))
    if k == len(words):  # at the end: the new word takes over the text's trailing whitespace
      words.append(synonym)
      gaps.append(gaps[-1])
      gaps[-2] = " "
    else:
      words.insert(k, synonym)
      gaps.insert(k, " ")


def _swap(words, gaps, rng, alpha, _) -> None:
  if len(words) < 2:
    return
  for _ in range(count(alpha, len(words))):
    i, j = rng.choice(len(words), size=2, replace=False)
    words[i], words[j] = words[j], words[i]


def _delete(words, gaps, rng, alpha, _) -> None:
  n = len(words)
  if n < 2:
    return
  keep = rng.random(n) >= alpha
  if keep.all():
    keep[rng.integers(n)] = False
  if not keep.any():
    keep[rng.integers(n)] = True
  kept_words, kept_gaps = [], []
  for i, (word, gap, kept) in enumerate(zip(words, gaps, keep, strict=True)):
    if kept:
      kept_words.append(word)
      kept_gaps.append(gap)
    elif kept_gaps and (i == n - 1 or gap.count("\n") > kept_gaps[-1].count("\n")):
      kept_gaps[-1] = gap  # keep line breaks and the text's trailing whitespace
  words[:], gaps[:] = kept_words, kept_gaps


def _on_words(op, alpha: float, thesaurus: Thesaurus | None) -> Apply:
  def apply(texts: list[str], rng: np.random.Generator) -> list[str]:
    out = []
    for text in texts:
      lead, words, gaps = split_words(text)
      before = list(words)
      op(words, gaps, rng, alpha, thesaurus)
      out.append(text if words == before else lead + "".join(map(str.__add__, words, gaps)))
    return out

  return apply


# --- Sentences ---------------------------------------------------------------------------------


def sentence_ranges(text: str) -> list[tuple[int, int]]:
  """Word-index ranges [a, b) of the sentences of a text."""
  _, words, gaps = split_words(text)
  ranges, start = [], 0
  for i, (word, gap) in enumerate(zip(words, gaps, strict=True)):
    if _SENTENCE_END.search(word) or "\n" in gap or i == len(words) - 1:
      ranges.append((start, i + 1))
      start = i + 1
  return ranges


def split_sentences(text: str, rng: np.random.Generator, max_words: int) -> list[str]:
  """Runs of consecutive sentences of at most max_words words; longer sentences are cut."""
  spans = word_spans(text)
  if len(spans) <= max_words:
    return [text]
  budget = int(rng.integers((max_words + 1) // 2, max_words + 1))
  groups, first = [], 0
  for a, b in sentence_ranges(text):
    if a > first and b - first > budget:
      groups.append((first, a))
      first, budget = a, max_words
    while b - first > budget:
      groups.append((first, first + budget))
      first, budget = first + budget, max_words
  if first < len(spans):
    groups.append((first, len(spans)))
  return [text[spans[a][0] : spans[b - 1][1]] for a, b in groups]


def _paraphrase_file(table: dict[str, tuple[str, ...]]) -> Apply:
  def apply(texts, rng):
    return [_pick(rng, table[k]) if (k := " ".join(t.split())) in table else t for t in texts]

  return apply


# --- Specs and the augmenter -------------------------------------------------------------------


@dataclasses.dataclass
class AugmentStats:
  """Host-side counters for metrics: examples seen, texts out, examples changed per transform."""

  examples: int = 0
  outputs: int = 0
  changed: dict[str, int] = dataclasses.field(default_factory=dict)

  def as_dict(self) -> dict[str, int]:
    out = {"augment_examples": self.examples, "augment_outputs": self.outputs}
    return out | {f"augment_changed_{name}": n for name, n in self.changed.items()}


@dataclasses.dataclass(frozen=True)
class Transform:
  name: str
  p: float
  apply: Apply
  apply_batch: Callable | None = None  # [(texts, rng)] -> outputs: many examples in one call


class Augmenter:
  """Applies the transforms of `specs` in order; see the module docstring for the specs."""

  def __init__(self, specs: Sequence | None, seed: int = 0):
    if not isinstance(seed, int) or seed < 0:
      raise AugmentError(f"augment seed={seed!r} must be a non-negative integer.")
    self.seed = seed
    self._sources: dict[tuple[str, str], object] = {}
    self.transforms: list[Transform] = []
    for spec in specs or ():
      spec = check_spec(spec)
      if any(t.name == spec["name"] for t in self.transforms):
        raise AugmentError(f"augment {spec['name']} is listed twice; list each transform once.")
      self.transforms.append(self._build(spec))
    self.stats = AugmentStats(changed={t.name: 0 for t in self.transforms})

  def _source(self, kind: str, path: str, load: Callable):
    """Loads a file or directory once, however many transforms use it."""
    if (kind, path) not in self._sources:
      self._sources[kind, path] = load(path)
    return self._sources[kind, path]

  def _thesaurus(self, spec: dict) -> Thesaurus:
    hint = "thesaurus=<word<TAB>syn1,syn2 file> or wordnet=<WordNet dict dir>"
    kind, path = one_of(spec, ("thesaurus", "wordnet"), hint)
    p = pathlib.Path(path)
    if kind == "thesaurus" and not p.is_file():
      raise AugmentError(f"augment {spec['name']}: thesaurus file {path} does not exist; fix it.")
    if kind == "wordnet" and not any((p / n).is_file() for n in WORDNET_FILES):
      raise AugmentError(
        f"augment {spec['name']}: wordnet={path} has none of {', '.join(WORDNET_FILES)}; "
        "point it at the wndb dict directory (e.g. /usr/share/wordnet from wordnet-base)."
      )
    return self._source(kind, path, load_thesaurus if kind == "thesaurus" else load_wordnet)

  def _paraphrase(self, spec: dict) -> Apply:
    hint = "paraphrases=<original<TAB>paraphrase file> or callable='module:function'"
    kind, ref = one_of(spec, ("paraphrases", "callable"), hint)
    if kind == "callable":
      batch = spec.get("batch")
      if batch is not None and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise AugmentError(f"augment paraphrase: batch={batch!r}; use an int >= 1.")
      return augment_callable.Paraphraser(self._source(kind, ref, load_callable), ref, batch)
    if "batch" in spec:
      raise AugmentError("augment paraphrase: batch=N goes with callable=, not paraphrases=.")
    if not pathlib.Path(ref).is_file():
      raise AugmentError(f"augment paraphrase: paraphrases file {ref} does not exist; fix it.")
    return _paraphrase_file(self._source(kind, ref, load_paraphrases))

  def _build(self, spec: dict) -> Transform:
    name, p, alpha = (
      spec["name"],
      fraction(spec, "p", 1.0),
      fraction(spec, "alpha", DEFAULT_ALPHA),
    )
    if name in ("synonym", "insert"):
      apply = _on_words(_synonym if name == "synonym" else _insert, alpha, self._thesaurus(spec))
    elif name in ("swap", "delete"):
      apply = _on_words(_swap if name == "swap" else _delete, alpha, None)
    elif name == "split_sentences":
      max_words = spec.get("max_words", DEFAULT_MAX_WORDS)
      if not isinstance(max_words, int) or isinstance(max_words, bool) or max_words < 1:
        raise AugmentError(f"augment split_sentences: max_words={max_words!r}; use an int >= 1.")
      apply = lambda texts, rng: [s for t in texts for s in split_sentences(t, rng, max_words)]
    elif name == "contextual":
      apply = augment_contextual.build(spec, alpha)
    else:
      paraphrase = self._paraphrase(spec)
      if isinstance(paraphrase, augment_callable.Paraphraser):
        batched = paraphrase.apply_batch if paraphrase.batch else None
        return Transform(name, p, paraphrase.apply, batched)
      apply = paraphrase
    return Transform(name, p, apply)

  def __call__(self, text: str, example_index: int, copy: int = 0) -> tuple[list[str], list[str]]:
    """(output texts, names of the transforms that changed them) for one example and copy."""
    return self.many([(text, example_index, copy)])[0]

  def many(self, items: Sequence[tuple[str, int, int]]) -> list[tuple[list[str], list[str]]]:
    """__call__ of each (text, example_index, copy), the same outputs; a batched paraphrase
    callable gets the texts of all of them in calls of up to its batch size."""
    if any(min(i, copy) < 0 for _, i, copy in items):
      raise AugmentError(f"example_index and copy must be >= 0 (got {list(items)[:3]}).")
    texts = [[text] for text, _, _ in items]
    changed: list[list[str]] = [[] for _ in items]
    for t in self.transforms:
      jobs = []
      for k, (_, i, copy) in enumerate(items):
        rng = rng_for(self.seed, i, copy, t.name)
        if rng.random() < t.p:  # the first draw decides, so p does not shift the transform's draws
          jobs.append((k, rng))
      if t.apply_batch is not None:
        try:
          outs = t.apply_batch([(texts[k], rng) for k, rng in jobs])
        except augment_callable.CallableFailed as e:
          k = jobs[e.job][0]
          raise augment_callable.on_example(e, items[k], e.batch_size, k) from e
      else:
        outs = [self._apply(t, texts[k], rng, items[k], k) for k, rng in jobs]
      for (k, _), out in zip(jobs, outs, strict=True):
        if out != texts[k]:
          changed[k].append(t.name)
          self.stats.changed[t.name] += 1
          texts[k] = out
    self.stats.examples += len(items)
    self.stats.outputs += sum(map(len, texts))
    return list(zip(texts, changed, strict=True))

  @staticmethod
  def _apply(t: Transform, texts: list[str], rng, item: tuple, position: int) -> list[str]:
    try:
      return t.apply(texts, rng)
    except augment_callable.CallableFailed as e:
      raise augment_callable.on_example(e, item, 1, position) from e
