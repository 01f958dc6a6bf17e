"""Token rows on disk as shards: raw row-major files of one dtype, listed in data/meta.json.

A shard is written under a temporary name and renamed when complete, so a shard file that
exists is whole. Rows are read without loading whole files: local shards by memory map,
remote ones (gs://, or any path tf.io.gfile reads) by ranged reads of just the rows asked for,
many at once on a thread pool.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np

from sslm_jax.data import gfile

# Rows per shard at most: about this many bytes (64 MiB) of rows.
SHARD_BYTES = 64 << 20


def rows_per_shard(row_len: int, dtype, shard_bytes: int = SHARD_BYTES) -> int:
  return max(1, shard_bytes // (row_len * np.dtype(dtype).itemsize))


def is_remote(path: str) -> bool:
  return "://" in path


class ShardWriter:
  """Appends row chunks to shards named `{prefix}-{part:04d}.bin` in `directory`, each at most
  `max_rows` rows; `close()` returns [(file name, rows), ...] in order."""

  def __init__(self, directory: str, prefix: str, row_len: int, dtype, max_rows: int):
    self.directory, self.prefix, self.row_len = directory, prefix, row_len
    self.dtype, self.max_rows = np.dtype(dtype), max_rows
    self.shards: list[tuple[str, int]] = []
    self._file, self._tmp, self._rows = None, "", 0

  def _open(self) -> None:
    name = f"{self.prefix}-{len(self.shards):04d}.bin"
    self._tmp = os.path.join(self.directory, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    self._file, self._rows = gfile.GFile(self._tmp, "wb"), 0
    self.shards.append((name, 0))

  def _finish(self) -> None:
    self._file.close()
    name = self.shards[-1][0]
    gfile.rename(self._tmp, os.path.join(self.directory, name), overwrite=True)
    self.shards[-1] = (name, self._rows)
    self._file = None

  def write(self, rows: np.ndarray) -> None:
    rows = np.ascontiguousarray(rows, self.dtype)
    while len(rows):
      if self._file is None:
        self._open()
      take = min(len(rows), self.max_rows - self._rows)
      self._file.write(rows[:take].tobytes())
      self._rows += take
      rows = rows[take:]
      if self._rows == self.max_rows:
        self._finish()

  def close(self) -> list[tuple[str, int]]:
    if self._file is not None:
      self._finish()
    return list(self.shards)

  def abort(self) -> None:
    """Drop the shard being written (its temporary file); finished shards stay."""
    if self._file is not None:
      self._file.close()
      gfile.remove(self._tmp)
      self._file = None


# ----------------------------------------------------------------------------- reading

# An opener returns a readable binary file object with seek(); tests and users may pass their
# own (e.g. a filesystem tf.io.gfile does not know).
Opener = Callable[[str], object]


def gfile_opener(path: str):
  return gfile.GFile(path, "rb")


class LatencyOpener:
  """Local files behind `latency_s` of delay per read, as from an object store far away (for
  benchmarks and tests); `reads` records the size of every read."""

  def __init__(self, latency_s: float):
    self.latency_s, self.reads = latency_s, []

  def __call__(self, path: str):
    return _LatencyFile(open(path, "rb"), self)


class _LatencyFile:
  def __init__(self, f, opener: LatencyOpener):
    self.f, self.opener = f, opener

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.f.close()

  def seek(self, offset: int) -> None:
    self.f.seek(offset)

  def read(self, size: int) -> bytes:
    time.sleep(self.opener.latency_s)
    self.opener.reads.append(size)
    return self.f.read(size)


@dataclasses.dataclass
class _Shard:
  path: str
  rows: int
  start: int  # index of its first row among all rows


class ShardedRows:
  """All rows of one split, indexed like a [num_rows, row_len] array; only what is indexed is
  read. Local shards are memory-mapped; remote ones (or any shard when `opener` is given) are
  read row range by row range, concurrently."""

  def __init__(
    self,
    directory: str,
    shards: Sequence[tuple[str, int]],
    row_len: int,
    dtype,
    opener: Opener | None = None,
    read_threads: int = 128,
  ):
    self.row_len, self.dtype = row_len, np.dtype(dtype)
    self._read_threads = read_threads  # concurrent ranged reads: they wait on the network
    self._shards, start = [], 0
    for name, rows in shards:
      self._shards.append(_Shard(os.path.join(directory, name), int(rows), start))
      start += int(rows)
    self._starts = np.array([s.start for s in self._shards] + [start], np.int64)
    self._ranged = opener is not None or is_remote(directory)
    self._opener = opener or gfile_opener
    self._maps: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  @property
  def ranged(self) -> bool:
    """Whether rows are fetched by ranged reads (remote, or through an opener)."""
    return self._ranged

  @property
  def shape(self) -> tuple[int, int]:
    return (int(self._starts[-1]), self.row_len)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __array__(self, dtype=None, copy=None):
    rows = self[np.arange(len(self))]
    return rows if dtype is None else rows.astype(dtype)

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, tuple):  # rows[i, j] / rows[a:b, :t]: rows first, then the rest
      return self[index[0]][(slice(None), *index[1:])]
    if isinstance(index, slice):
      index = np.arange(*index.indices(len(self)), dtype=np.int64)
    scalar = np.ndim(index) == 0
    index = np.atleast_1d(np.asarray(index, np.int64))
    index = np.where(index < 0, index + len(self), index)
    if index.size and (index.min() < 0 or index.max() >= len(self)):
      raise IndexError(f"row indices outside [0, {len(self)})")
    out = np.empty((len(index), self.row_len), self.dtype)
    shard_of = np.searchsorted(self._starts, index, side="right") - 1
    reads = []
    for s in np.unique(shard_of):
      where = np.flatnonzero(shard_of == s)
      local = index[where] - self._starts[s]
      if self._ranged:
        reads += self._ranged_reads(int(s), local, where)
      else:
        out[where] = self._map(int(s))[local]
    if reads:
      self._read_all(reads, out)
    return out[0] if scalar else out

  def _map(self, s: int) -> np.ndarray:
    with self._lock:
      if s not in self._maps:
        shard = self._shards[s]
        self._maps[s] = np.memmap(
          shard.path, self.dtype, mode="r", shape=(shard.rows, self.row_len)
        )
      return self._maps[s]

  def _ranged_reads(self, s: int, local: np.ndarray, where: np.ndarray) -> list:
    """(shard, first row, [positions in the output]) for each run of consecutive rows."""
    order = np.argsort(local, kind="stable")
    local, where = local[order], where[order]
    runs = np.flatnonzero(np.diff(local) != 1) + 1  # duplicates and gaps both cut a run
    return [
      (s, int(rows[0]), pos)
      for rows, pos in zip(np.split(local, runs), np.split(where, runs), strict=True)
    ]

  def _read_one(self, s: int, first: int, count: int) -> np.ndarray:
    size = self.row_len * self.dtype.itemsize
    with self._opener(self._shards[s].path) as f:
      f.seek(first * size)
      data = f.read(count * size)
    if len(data) != count * size:
      raise OSError(f"{self._shards[s].path}: short read at row {first} (a truncated shard?)")
    return np.frombuffer(data, self.dtype).reshape(count, self.row_len)

  def _read_all(self, reads: list, out: np.ndarray) -> None:
    with self._lock:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self._read_threads, "sslm-rows")
    futures = [self._pool.submit(self._read_one, s, first, len(pos)) for s, first, pos in reads]
    for (_, _, pos), future in zip(reads, futures, strict=True):
      out[pos] = future.result()
