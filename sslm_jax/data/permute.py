"""The data order: keyed permutations of row indices, defined here rather than by NumPy.

NumPy does not promise that a Generator's stream stays the same from one release to the next, so
an upgrade between a preemption and the resume could reorder the data. This permutation depends
on nothing but (purpose, seed, epoch): a Feistel network over the smallest power-of-four domain
that holds [0, n), walked back into [0, n) (cycle walking), with round keys from SHA-512. The
image of any index is computed on its own, so a batch's rows never need the whole epoch's order.
"""

from __future__ import annotations

import hashlib

import numpy as np

# Recorded in checkpoints: 1 was numpy.random.default_rng([seed, epoch]).permutation (before the
# order was defined here), 2 is KeyedPermutation. A resume across versions is refused.
ORDER_VERSION = 2
ROUNDS = 6
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def round_keys(purpose: str, seed: int, epoch: int) -> list[int]:
  """ROUNDS 64-bit keys from a hash whose input text is part of the data order's definition."""
  digest = hashlib.sha512(f"sslm_jax/data order/{purpose}/{seed}/{epoch}".encode()).digest()
  return [int.from_bytes(digest[8 * i : 8 * i + 8], "little") for i in range(ROUNDS)]


def half_bits(n: int) -> int:
  """Bits in each half of the Feistel domain [0, 4**h): the smallest h >= 1 with 4**h >= n."""
  return max(1, ((n - 1).bit_length() + 1) // 2)


def _round(r: np.ndarray, key: np.uint64, mask: np.uint64) -> np.ndarray:
  """The round function: SplitMix64's finalizer of (r xor key), cut to the half width."""
  y = r ^ key
  y = (y ^ (y >> np.uint64(30))) * _MUL1
  y = (y ^ (y >> np.uint64(27))) * _MUL2
  return (y ^ (y >> np.uint64(31))) & mask


class KeyedPermutation:
  """A bijection of [0, n) onto itself; `perm[indices]` maps an int array or a slice of indices."""

  def __init__(self, n: int, purpose: str, seed: int, epoch: int):
    self.n = int(n)
    self._h = half_bits(self.n)
    self._keys = [np.uint64(k) for k in round_keys(purpose, seed, epoch)]

  def __len__(self) -> int:
    return self.n

  def _feistel(self, x: np.ndarray) -> np.ndarray:
    h, mask = np.uint64(self._h), np.uint64((1 << self._h) - 1)
    left, right = x >> h, x & mask
    with np.errstate(over="ignore"):  # the multiplications wrap modulo 2**64 on purpose
      for key in self._keys:
        left, right = right, left ^ _round(right, key, mask)
    return (left << h) | right

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, slice):
      index = np.arange(*index.indices(self.n), dtype=np.int64)
    i = np.asarray(index, np.int64)
    if i.size and (i.min() < 0 or i.max() >= self.n):
      raise IndexError(f"indices outside [0, {self.n})")
    x = self._feistel(i.astype(np.uint64))
    outside = x >= self.n
    while outside.any():  # cycle walking: at most a few rounds, as the domain is < 4n
      x[outside] = self._feistel(x[outside])
      outside = x >= self.n
    return x.astype(np.int64)
