"""A user's paraphrase function (`paraphrase:callable=module:function`) as an augment transform.

Two forms, chosen in the spec:

  callable=mod:fn            fn(texts: list[str], seed: int) -> list[str], called once per example
                             copy with that copy's texts (one, or the pieces split_sentences cut)
  callable=mod:fn,batch=N    fn(texts: list[str], seeds: list[int]) -> list[str], called with the
                             texts of up to N example copies at once (a back-translation model runs
                             a batch in about the time of one text); seeds[j] is the seed of the
                             copy texts[j] comes from, so a function that seeds each text with it
                             gives every copy the same paraphrase whatever batch it lands in.

Each copy's seed is drawn from its own generator (augment.rng_for), so both forms are
deterministic in (seed, example, copy). An exception raised by the function becomes one
AugmentError line naming the function and the example (for a failed batch, the first of its
copies that fails alone, else the batch's first); a wrong return value, too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from sslm_jax.config.augment_spec import AugmentError


class CallableFailed(AugmentError):
  """The function raised or returned the wrong thing; Augmenter adds which example it was on."""


def _reason(e: BaseException) -> str:
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}".rstrip(": ")


class Paraphraser:
  """The transform's apply (one example copy) and apply_batch (many copies); see above."""

  def __init__(self, fn: Callable, ref: str, batch: int | None):
    self.fn, self.ref, self.batch = fn, ref, batch

  def _call(self, texts: list[str], seed_arg) -> list[str]:
    try:
      out = self.fn(list(texts), seed_arg)
    except Exception as e:  # noqa: BLE001 (any user error becomes one line)
      raise CallableFailed(f"paraphrase callable {self.ref} raised {_reason(e)}") from e
    if not isinstance(out, list | tuple) or len(out) != len(texts):
      got = f"{len(out)} texts" if isinstance(out, list | tuple) else type(out).__name__
      raise CallableFailed(
        f"paraphrase callable {self.ref} must return a list of {len(texts)} texts (got {got})"
      )
    if not all(isinstance(t, str) for t in out):
      raise CallableFailed(
        f"paraphrase callable {self.ref} returned a non-string; return list[str]"
      )
    return list(out)

  def apply(self, texts: list[str], rng: np.random.Generator) -> list[str]:
    seed = int(rng.integers(2**31))
    if self.batch is None:
      return self._call(texts, seed)
    return self._call(texts, [seed] * len(texts))

  def _culprit(self, jobs, seeds: list[int], chunk: range) -> None:
    """Raise the error of the first copy of a failed batch that fails alone, if one does."""
    for j in chunk if len(chunk) > 1 else ():
      try:
        self._call(jobs[j][0], [seeds[j]] * len(jobs[j][0]))
      except CallableFailed as e:
        e.job, e.batch_size = j, 1
        raise

  def apply_batch(self, jobs: Sequence[tuple[list[str], np.random.Generator]]) -> list[list[str]]:
    """Outputs of many copies' texts, in calls of up to `batch` copies."""
    seeds = [int(rng.integers(2**31)) for _, rng in jobs]
    out = []
    for first in range(0, len(jobs), self.batch):
      chunk = range(first, min(first + self.batch, len(jobs)))
      texts = [t for j in chunk for t in jobs[j][0]]
      try:
        flat = self._call(texts, [seeds[j] for j in chunk for _ in jobs[j][0]])
      except CallableFailed as e:
        self._culprit(jobs, seeds, chunk)
        e.job, e.batch_size = first, len(chunk)  # no copy fails alone: name the batch
        raise
      for j in chunk:
        out.append(flat[: len(jobs[j][0])])
        flat = flat[len(jobs[j][0]) :]
    return out


def on_example(
  e: AugmentError, item: tuple[str, int, int], batch_size: int, position: int
) -> AugmentError:
  """The function's error with the example (index, copy, start of the text) it was working on;
  `position` (its place in Augmenter.many's items) lets the caller name the example's row."""
  text, i, copy = item
  shown = " ".join(text.split())
  shown = shown if len(shown) <= 60 else shown[:57] + "..."
  batch = f" (in a batch of {batch_size} copies)" if batch_size > 1 else ""
  err = AugmentError(
    f"augment: {e} on example {i} copy {copy}{batch}, text {shown!r}; fix the function, or "
    "remove paraphrase from data.augment."
  )
  err.position = position
  return err
