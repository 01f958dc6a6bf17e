"""BERT-style masking, vectorized over a batch, in plain numpy.

Every random number is a hash of (seed, example id, position, stream), so an example is masked
the same way whatever batch or process it lands in, and a resumed run masks exactly as before.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

# Distinct constants so the selection, the action and the replacement id are independent draws.
_STREAM_SELECT = np.uint64(0x5E1EC7)
_STREAM_ACTION = np.uint64(0xAC7104)
_STREAM_REPLACE = np.uint64(0x4E91ACE)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finalizer: a bijective scramble of uint64 values (wraps on overflow)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def uniforms(
  seed: int, example_ids_b: np.ndarray, positions: np.ndarray, stream: np.uint64
) -> np.ndarray:
  """float64 [b, ...] in [0, 1), a pure function of (seed, example id, position, stream).

  `positions` is [b, X] (or [X], shared by every row).
  """
  with np.errstate(over="ignore"):
    h = _mix(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + _GOLDEN * stream)
    h_b1 = _mix(h ^ (np.asarray(example_ids_b, np.uint64)[:, None] * _GOLDEN))
    h_bX = _mix(h_b1 ^ (np.asarray(positions, np.uint64) + _GOLDEN))
  return (h_bX >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def mask_tokens(
  rows_bT: np.ndarray,
  example_ids_b: np.ndarray,
  *,
  seed: int,
  mlm_probability: float,
  num_predictions: int,
  vocab_size: int,
  mask_id: int = 4,
  special_ids: Collection[int] = range(7),
) -> dict[str, np.ndarray]:
  """Choose positions to predict and corrupt them (80% [MASK], 10% random id, 10% unchanged).

  Each row gets exactly min(num_predictions, max(1, round(n * mlm_probability))) predictions
  among its n non-special tokens (none if n == 0); random ids are drawn uniformly from the ids
  below vocab_size that are not special. Returns int32 `inputs` [b, T],
  `masked_positions` / `masked_targets` [b, P] (ascending, unused slots 0) and float32
  `masked_weights` [b, P].
  """
  rows_bT = np.asarray(rows_bT)
  b, length = rows_bT.shape
  slots = min(num_predictions, length)
  specials = np.asarray(sorted(special_ids), np.int64)
  candidate_bT = ~np.isin(rows_bT, specials)
  n_b = candidate_bT.sum(axis=1)
  k_b = np.where(n_b > 0, np.clip(np.rint(n_b * mlm_probability), 1, slots), 0).astype(np.int64)

  # Uniform choice of k among the candidates: the k smallest random keys (specials get key 2).
  key_bT = np.where(
    candidate_bT, uniforms(seed, example_ids_b, np.arange(length), _STREAM_SELECT), 2.0
  )
  order_bT = np.argsort(key_bT, axis=1, kind="stable")
  valid_bP = np.arange(num_predictions)[None, :] < k_b[:, None]
  picked_bP = np.full((b, num_predictions), length, np.int64)
  picked_bP[:, :slots] = order_bT[:, :slots]
  positions_bP = np.sort(np.where(valid_bP, picked_bP, length), axis=1)
  positions_bP = np.where(valid_bP, positions_bP, 0)

  rows_idx = np.arange(b)[:, None]
  targets_bP = np.where(valid_bP, rows_bT[rows_idx, positions_bP], 0)
  action_bP = uniforms(seed, example_ids_b, positions_bP, _STREAM_ACTION)
  replace_u_bP = uniforms(seed, example_ids_b, positions_bP, _STREAM_REPLACE)
  ordinary_ids = np.setdiff1d(np.arange(vocab_size), specials)
  random_ids_bP = ordinary_ids[(replace_u_bP * len(ordinary_ids)).astype(np.int64)]
  new_bP = np.where(action_bP < 0.8, mask_id, np.where(action_bP < 0.9, random_ids_bP, targets_bP))

  inputs_bT = rows_bT.astype(np.int32, copy=True)
  # Write only the used slots: unused ones point at position 0, which may itself be chosen.
  hit_b, hit_p = np.nonzero(valid_bP)
  inputs_bT[hit_b, positions_bP[hit_b, hit_p]] = new_bP[hit_b, hit_p]
  return {
    "inputs": inputs_bT,
    "masked_positions": positions_bP.astype(np.int32),
    "masked_targets": targets_bP.astype(np.int32),
    "masked_weights": valid_bP.astype(np.float32),
  }
