"""Contextual substitution: words replaced by a trained BERT's guesses for them in context.

  data.augment='contextual:workdir=runs/bert_tiny,alpha=0.15,top_k=10'

alpha of the words (at least one) whose core is alphabetic are chosen with the transform's rng;
each in turn becomes [MASK] among the original words around it (as many as fit in a quarter of
the model's positions on each side), and the model
(`sslm_jax.inference.language_model`'s LanguageModel.fill_mask) proposes top_k tokens: one forward
pass per chosen word, of a few compiled shapes. Only whole words are kept (a piece that starts a
word and holds a letter or digit, not the original word); one is drawn with probability proportional
to the model's, again from the transform's rng, and takes the original's punctuation and capitalised
first letter. A word with no such guess is left as it was.

The model runs on the default JAX device; with the same checkpoint and device kind the output
is a pure function of (seed, example, copy, text), like the other transforms.
"""

from __future__ import annotations

import os

import numpy as np

from sslm_jax.config.augment_spec import AugmentError
from sslm_jax.data.augment import words as words_lib
from sslm_jax.errors import UsageError

DEFAULT_TOP_K = 10
MASK_TEXT = "[MASK]"


def _load(spec: dict):
  """The BERT of spec['workdir'], refused in one line when it is missing, a GPT or fine-tuned."""
  # Only a contextual transform loads a model: JAX, Flax and Orbax are imported for it alone.
  from sslm_jax.checkpoints import restore  # for its cost
  from sslm_jax.inference import language_model as api  # for its cost

  workdir = spec.get("workdir")
  if not workdir or ("://" not in str(workdir) and not os.path.isdir(str(workdir))):
    raise AugmentError(
      f"augment contextual: workdir={workdir!r} is not a directory; give the --workdir of a "
      "BERT (masked_lm) training run, e.g. contextual:workdir=runs/bert_tiny."
    )
  try:
    config = restore.read_config(str(workdir))
    objective, task = config.objective, config.finetune.task
    if task:  # a fine-tuned BERT keeps masked_lm as its objective but has a task head instead
      raise AugmentError(
        f"augment contextual: {workdir} holds a fine-tuned {task} model, whose task head cannot "
        "fill in a [MASK]; give the workdir of the BERT (masked_lm) pretraining run."
      )
    if objective != "masked_lm":
      raise AugmentError(
        f"augment contextual: {workdir} holds a GPT ({objective}) model, which cannot fill in "
        "a [MASK]; give the workdir of a BERT (masked_lm) run."
      )
    return api.from_saved(restore.read_workdir(str(workdir), spec.get("step"), config))
  except UsageError as e:
    raise AugmentError(f"augment contextual: {e}") from e


def _window(lm, words: list[str], gaps: list[str], i: int) -> str | None:
  """Word i as [MASK] among as many words around it as fit the model's positions."""
  limit, half = lm.model_cfg.max_len, max(1, lm.model_cfg.max_len // 4)
  while True:
    start, end = max(0, i - half), min(len(words), i + half + 1)
    text = _masked_text(words, gaps, start, end, i)
    if len(lm.encode(text)) <= limit:
      return text
    if half == 0:
      return None
    half //= 2


def _masked_text(words, gaps, start: int, end: int, masked: int) -> str:
  out = []
  for i in range(start, end):
    word = words[i]
    if i == masked:
      lead, _, trail = words_lib.affixes(word)
      word = lead + MASK_TEXT + trail
    out.append(word + (gaps[i] if i < end - 1 else ""))
  return "".join(out)


def _choose(guesses, core: str, rng: np.random.Generator) -> str | None:
  """A whole-word guess other than `core`, drawn in proportion to its probability."""
  kept = [
    (token.strip(), p)
    for token, p in guesses
    if token.startswith(" ")
    and any(ch.isalnum() for ch in token)
    and token.strip().lower() != core.lower()
    and MASK_TEXT not in token
  ]
  if not kept:
    return None
  probs = np.asarray([p for _, p in kept], np.float64)
  probs = probs / probs.sum() if probs.sum() > 0 else np.full(len(kept), 1 / len(kept))
  word = kept[int(rng.choice(len(kept), p=probs))][0]
  return word[:1].upper() + word[1:] if core[:1].isupper() else word


def build(spec: dict, alpha: float) -> words_lib.Apply:
  """The transform's apply(texts, rng), with the model loaded now (errors before any data)."""
  lm = _load(spec)
  top_k = spec.get("top_k", DEFAULT_TOP_K)

  def one(text: str, rng: np.random.Generator) -> str:
    lead, words, gaps = words_lib.split_words(text)
    candidates = [i for i, w in enumerate(words) if words_lib.affixes(w)[1].isalpha()]
    if not candidates:
      return text
    k = min(len(candidates), words_lib.count(alpha, len(words)))
    new = list(words)
    for i in sorted(int(i) for i in rng.choice(candidates, size=k, replace=False)):
      window = _window(lm, words, gaps, i)  # the original words around it, not earlier guesses
      if window is None:
        continue
      w_lead, core, trail = words_lib.affixes(words[i])
      word = _choose(lm.fill_mask(window, top_k=top_k)[0], core, rng)
      if word is not None:
        new[i] = w_lead + word + trail
    if new == words:
      return text
    return lead + "".join(map(str.__add__, new, gaps))

  return lambda texts, rng: [one(t, rng) for t in texts]
