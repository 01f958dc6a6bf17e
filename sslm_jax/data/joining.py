"""Rows of a text file cut into byte-range units (units.py), made those of the whole file.

Each unit is packed on its own, so a range unit's rows start at its own first token and its
remainder (under a row) is left over. Read as one stream, the file's rows would run on from
one range into the next. After every unit is prepared, `join_ranges` carries each range's
remainder into the next range of the same file and rewrites that range's rows (shards named
`{split}-{unit:05d}-joined-NNNN.bin`), so the rows are those of the unsplit file, whatever the
number of units, workers or hosts; the file's last remainder is dropped, as before. This is one
pass over the split files' tokens on the process that finishes the cache.
"""

from __future__ import annotations

import os

import numpy as np

from sslm_jax.data import gfile, shards, units

CARRY = "carry"  # a range unit's record: its remainder tokens, per split


def _read_rows(data_dir: str, part: dict, row_len: int, dtype) -> np.ndarray:
  chunks = []
  for name, _ in part["shards"]:
    with gfile.GFile(os.path.join(data_dir, name), "rb") as f:
      chunks.append(np.frombuffer(f.read(), dtype))
  return np.concatenate(chunks) if chunks else np.empty(0, dtype)


def _rewrite(data_dir, prefix, stream, row_len, dtype, shard_rows) -> tuple[list, np.ndarray]:
  """Shards of `stream`'s whole rows; (their list, the remainder)."""
  usable = len(stream) // row_len * row_len
  writer = shards.ShardWriter(data_dir, prefix, row_len, dtype, shard_rows)
  writer.write(stream[:usable].reshape(-1, row_len))
  return [list(s) for s in writer.close()], stream[usable:]


def join_ranges(
  data_dir: str, all_units: list[units.Unit], records: list[dict], row_len: int, dtype,
  shard_rows: int,
) -> None:  # fmt: skip
  """Rewrite, in `records` (in memory) and on disk, the rows of every range unit that follows
  a range with a remainder; see the module docstring."""
  dtype = np.dtype(dtype)
  for split in units.SPLITS:
    carry = np.empty(0, dtype)
    for unit, record in zip(all_units, records, strict=True):
      part = record["splits"].get(split)
      if part is None:
        continue
      if unit.byte_range is None or unit.byte_range[0] == 0:  # a file's first (or only) unit
        carry = np.asarray(part.get(CARRY, []), dtype)
        continue
      tail = np.asarray(part.get(CARRY, []), dtype)
      if not len(carry):  # already aligned with the file's stream
        carry = tail
        continue
      stream = np.concatenate([carry, _read_rows(data_dir, part, row_len, dtype), tail])
      prefix = f"{split}-{unit.index:05d}-joined"
      part["shards"], carry = _rewrite(data_dir, prefix, stream, row_len, dtype, shard_rows)
      part["rows"] = sum(rows for _, rows in part["shards"])
