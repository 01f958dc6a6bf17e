"""Tokenized documents framed by their start and end ids, cut into fixed-length token rows.

A document's tokens may run on from one row into the next; the stream's remainder, too short
for a whole row, is dropped.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator

import numpy as np
from absl import logging

from sslm_jax import tokenizer as tokenizer_lib

_TOKENIZE_DOCS = 1024  # documents per encode_batch call
_TOKENIZE_CHARS = 4_000_000  # and at most this much text per call, for very long documents
_LOG_EVERY_S = 15.0


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
  batch, chars = [], 0
  for text in texts:
    batch.append(text)
    chars += len(text)
    if len(batch) >= _TOKENIZE_DOCS or chars >= _TOKENIZE_CHARS:
      yield batch
      batch, chars = [], 0
  if batch:
    yield batch


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


@dataclasses.dataclass
class Packed:
  rows: np.ndarray  # [num_rows, row_len]
  num_docs: int
  num_tokens: int  # including the start and end ids


def pack(
  texts: Iterator[str],
  tok: tokenizer_lib.Tokenizer,
  *,
  start_id: int,
  end_id: int,
  row_len: int,
  what: str,
) -> Packed:
  """Tokenize documents in batches and cut their concatenation into rows (remainder dropped)."""
  dtype = np.uint16 if tok.vocab_size <= 65535 else np.int32
  chunks, carry = [], np.empty(0, np.int64)
  num_docs = num_tokens = 0
  last_log = time.monotonic()
  for batch in _batches(texts):
    stream = np.concatenate([carry, frame(tok.encode_batch(batch), start_id, end_id)])
    num_docs += len(batch)
    num_tokens += len(stream) - len(carry)
    usable = len(stream) // row_len * row_len
    chunks.append(stream[:usable].reshape(-1, row_len).astype(dtype))
    carry = stream[usable:]
    if time.monotonic() - last_log > _LOG_EVERY_S:
      logging.info("prepare %s: %d documents, %d tokens so far", what, num_docs, num_tokens)
      last_log = time.monotonic()
  rows = np.concatenate(chunks) if chunks else np.empty((0, row_len), dtype)
  logging.info(
    "prepare %s: %d documents, %d tokens, %d rows", what, num_docs, num_tokens, len(rows)
  )
  return Packed(rows=rows, num_docs=num_docs, num_tokens=num_tokens)


def pack_separated(texts, tok, sep_id: int, row_len: int, what: str) -> Packed:
  """`pack` for a tokenizer whose start and end id are one (GPT-2's <|endoftext|>): each
  document is opened by it and not closed, so the stream reads sep d1 sep d2 ..."""
  dtype = np.uint16 if tok.vocab_size <= 65535 else np.int32
  chunks, carry, num_docs, num_tokens = [], np.empty(0, np.int64), 0, 0
  texts = iter(texts)
  while batch := list(itertools.islice(texts, _TOKENIZE_DOCS)):
    ids = [[sep_id, *doc] for doc in tok.encode_batch(batch)]
    stream = np.concatenate([carry, np.fromiter(itertools.chain.from_iterable(ids), np.int64)])
    num_docs += len(batch)
    num_tokens += len(stream) - len(carry)
    usable = len(stream) // row_len * row_len
    chunks.append(stream[:usable].reshape(-1, row_len).astype(dtype))
    carry = stream[usable:]
  rows = np.concatenate(chunks) if chunks else np.empty((0, row_len), dtype)
  logging.info(
    "prepare %s: %d documents, %d tokens, %d rows", what, num_docs, num_tokens, len(rows)
  )
  return Packed(rows=rows, num_docs=num_docs, num_tokens=num_tokens)
