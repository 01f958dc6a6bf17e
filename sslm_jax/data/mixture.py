"""Serving a data mixture: which source each example of each batch comes from, and its rows.

Weights become integer counts per period (0.7/0.3 -> 7 and 3 in every 10 examples), and a
fixed interleaving spreads each source evenly over the period (smooth weighted round robin).
Example g of the run (g = step * batch_size + row) is slot g % P of period g // P, so its
source and its index within that source's own stream are computed directly: the composition
of batch k is a pure function of k, proportions are exact over every period, and each source
walks through its own rows in its own seeded order, epoch after epoch, as a single source does.
"""

from __future__ import annotations

import dataclasses
import fractions
import math

import numpy as np

from sslm_jax.data.batches import Data

_MAX_DENOMINATOR = 1000  # weights are taken to 1/1000 of the total
_MAX_PERIOD = 100_000


class Schedule:
  """Source and per-source example index of every example of the run."""

  def __init__(self, weights: list[float]):
    total = sum(weights)
    shares = [fractions.Fraction(w / total).limit_denominator(_MAX_DENOMINATOR) for w in weights]
    denominator = math.lcm(*(s.denominator for s in shares))
    counts = [max(1, int(s * denominator)) for s in shares]
    divisor = math.gcd(*counts)
    self.counts = [n // divisor for n in counts]
    period = sum(self.counts)
    if period > _MAX_PERIOD:
      raise ValueError(f"mixture weights {weights} need a period of {period} examples.")
    self.period = period
    source = np.empty(period, np.int64)
    rank = np.empty(period, np.int64)
    credit, seen = np.zeros(len(counts), np.int64), np.zeros(len(counts), np.int64)
    for slot in range(period):  # smooth weighted round robin: most credit goes next
      credit += self.counts
      s = int(np.argmax(credit))
      credit[s] -= period
      source[slot], rank[slot] = s, seen[s]
      seen[s] += 1
    self._source, self._rank = source, rank

  def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, index within that source's stream) of run examples g."""
    cycle, slot = np.divmod(np.asarray(g, np.int64), self.period)
    source = self._source[slot]
    return source, cycle * np.asarray(self.counts, np.int64)[source] + self._rank[slot]


@dataclasses.dataclass
class MixtureData(Data):
  """Data over several sources (each a Data of its own cache)."""

  names: list[str] = dataclasses.field(default_factory=list)
  sources: list[Data] = dataclasses.field(default_factory=list, repr=False)
  schedule: Schedule | None = dataclasses.field(default=None, repr=False)

  def batch_for_step(self, step: int) -> dict[str, np.ndarray]:
    g_b = step * self.config.batch_size + self._rows().astype(np.int64)
    source_b, index_b = self.schedule.locate(g_b)
    rows = np.empty(
      (len(g_b), self.sources[0].train_rows.shape[1]), self.sources[0].train_rows.dtype
    )
    for s in np.unique(source_b):
      here = source_b == s
      rows[here] = self.sources[s].train_rows_for(index_b[here])
    return self._features(rows, g_b, self.config.seed)

  def eval_batches(self) -> dict[str, list]:
    """Each source's fixed eval batches, by name (the loop reports each and all together)."""
    return {name: list(d.eval_batches()) for name, d in zip(self.names, self.sources, strict=True)}

  def max_segments_per_row(self, chunk: int = 8192) -> int:
    return max(d.max_segments_per_row(chunk) for d in self.sources)
