"""Tokenized documents framed by their start and end ids, cut into fixed-length token rows.

A document's tokens may run on from one row into the next; the stream's remainder, too short
for a whole row, is dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import numpy as np
from absl import logging

_TOKENIZE_DOCS = 1024  # documents per encode_batch call
_TOKENIZE_CHARS = 4_000_000  # and at most this much text per call, for very long documents
_LOG_EVERY_S = 15.0


def frame(ids: list[list[int]], start_id: int, end_id: int) -> np.ndarray:
  """int64 stream: start_id + ids + end_id for every document, concatenated."""
  if not ids:
    return np.empty(0, np.int64)
  lengths = np.fromiter((len(x) for x in ids), np.int64, count=len(ids))
  total = int(lengths.sum()) + 2 * len(ids)
  stream = np.empty(total, np.int64)
  starts = np.concatenate([[0], np.cumsum(lengths + 2)[:-1]]).astype(np.int64)
  ends = starts + lengths + 1
  body = np.ones(total, bool)
  body[starts] = body[ends] = False
  stream[starts], stream[ends] = start_id, end_id
  stream[body] = np.fromiter(itertools.chain.from_iterable(ids), np.int64, count=int(lengths.sum()))
  return stream


def row_dtype(tok) -> np.dtype:
  return np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.int32)


class Packer:
  """Streaming `pack`: documents go in one by one, whole rows come out through `emit` as soon
  as a tokenized batch completes them, so memory stays bounded whatever the corpus size.

  Where start_id == end_id (GPT-2's <|endoftext|>) each document is opened by it and not
  closed, so the stream reads sep d1 sep d2 ...
  """

  def __init__(self, tok, *, start_id: int, end_id: int, row_len: int, emit, what: str):
    self.tok, self.start_id, self.end_id, self.row_len = tok, start_id, end_id, row_len
    self.emit, self.what, self.dtype = emit, what, row_dtype(tok)
    self.num_docs = self.num_tokens = self.num_rows = 0
    self._batch: list[str] = []
    self._chars = 0
    self._carry = np.empty(0, np.int64)
    self._last_log = time.monotonic()

  def add(self, text: str) -> None:
    self._batch.append(text)
    self._chars += len(text)
    if len(self._batch) >= _TOKENIZE_DOCS or self._chars >= _TOKENIZE_CHARS:
      self._flush()

  def _flush(self) -> None:
    if not self._batch:
      return
    ids = self.tok.encode_batch(self._batch)
    if self.start_id == self.end_id:
      framed = np.fromiter(
        itertools.chain.from_iterable([self.start_id, *doc] for doc in ids), np.int64
      )
    else:
      framed = frame(ids, self.start_id, self.end_id)
    stream = np.concatenate([self._carry, framed])
    self.num_docs += len(self._batch)
    self.num_tokens += len(framed)
    usable = len(stream) // self.row_len * self.row_len
    if usable:
      self.emit(stream[:usable].reshape(-1, self.row_len).astype(self.dtype))
      self.num_rows += usable // self.row_len
    self._carry, self._batch, self._chars = stream[usable:], [], 0
    if time.monotonic() - self._last_log > _LOG_EVERY_S:
      logging.info(
        "prepare %s: %d documents, %d tokens so far", self.what, self.num_docs, self.num_tokens
      )
      self._last_log = time.monotonic()

  def close(self) -> None:
    """Tokenize what is left; the stream's remainder, too short for a row, is dropped (kept as
    `remainder` for data/joining.py)."""
    self._flush()
    self.remainder, self._carry = self._carry.astype(self.dtype), np.empty(0, np.int64)


@dataclasses.dataclass
class Packed:
  rows: np.ndarray  # [num_rows, row_len]
  num_docs: int
  num_tokens: int  # including the start and end ids


def pack(texts, tok, *, start_id: int, end_id: int, row_len: int, what: str) -> Packed:
  """Tokenize documents in batches and cut their concatenation into rows (remainder dropped)."""
  chunks = []
  packer = Packer(
    tok, start_id=start_id, end_id=end_id, row_len=row_len, emit=chunks.append, what=what
  )
  for text in texts:
    packer.add(text)
  packer.close()
  rows = np.concatenate(chunks) if chunks else np.empty((0, row_len), packer.dtype)
  logging.info(
    "prepare %s: %d documents, %d tokens, %d rows",
    what,
    packer.num_docs,
    packer.num_tokens,
    len(rows),
  )
  return Packed(rows=rows, num_docs=packer.num_docs, num_tokens=packer.num_tokens)
