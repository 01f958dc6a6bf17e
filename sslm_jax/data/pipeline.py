"""Open a prepared token-row cache (or a mixture of them) as this process's batches.

`build` checks the cache against the config and returns a batches.Data, or for a data mixture a
mixture.MixtureData over one Data per source; `size_packing` fits cuDNN's packed attention to it.
"""

from __future__ import annotations

import ml_collections
import numpy as np
from absl import logging

from sslm_jax import config as config_lib
from sslm_jax.config import mixture as mixture_config
from sslm_jax.data import cache, mixture, shards
from sslm_jax.data.batches import Data
from sslm_jax.data.corpus import DataError

__all__ = ["DataError", "build", "size_packing"]


def size_packing(c: ml_collections.ConfigDict, data: Data) -> None:
  """Set model.max_segments_per_row for cuDNN's packed attention, which is compiled for a
  fixed number of documents per row, from the data (or check the user's bound against it)."""
  if config_lib.attention_impl(c) != "cudnn":
    return
  needed, bound = data.max_segments_per_row(), c.model.max_segments_per_row
  if bound and bound < needed:
    raise DataError(
      f"model.max_segments_per_row={bound}, but some rows of the data hold {needed} documents; "
      f"set it to {needed} or more, or to 0 to measure it on the data."
    )
  if not bound:
    c.model.max_segments_per_row = needed
    logging.info("cuDNN packed attention: up to %d documents per row.", needed)


def build(
  c: ml_collections.ConfigDict,
  workdir: str,
  process_index: int = 0,
  process_count: int = 1,
  rows: np.ndarray | None = None,
  opener: shards.Opener | None = None,
) -> Data:
  """Open the cache preparation.build_cache() wrote; this process serves `rows` (sorted
  indices) of each batch.

  Training passes the rows its mesh places on this process (sharding.batch_rows); without them,
  process p of n serves the even share [p*b, (p+1)*b), b = batch_size // n. Shards are read
  by memory map when local, by ranged reads when remote or when `opener` (path -> binary file
  object) is given.
  """
  if rows is None:
    if c.batch_size % process_count:
      raise DataError(
        f"batch_size={c.batch_size} is not divisible by the {process_count} processes; set "
        f"--config.batch_size to a multiple of {process_count}."
      )
    b = c.batch_size // process_count
    rows = np.arange(process_index * b, (process_index + 1) * b)
  rows = np.asarray(rows, np.int64)
  if c.data.mixture:
    return _build_mixture(c, workdir, rows, opener)
  if not len(rows) or rows.min() < 0 or rows.max() >= c.batch_size or (np.diff(rows) <= 0).any():
    raise DataError(f"rows {rows} are not sorted, distinct indices into a batch of {c.batch_size}.")
  paths = cache.paths(workdir)
  tok = cache.tokenizer(c, workdir, may_train=False)
  meta = cache.read_meta(workdir)
  if meta is None:
    raise DataError(
      f"no data cache in {paths['dir']}; run preparation.build_cache(config, workdir) first."
    )
  if meta["request"] != cache.request(c, tok):
    raise DataError(
      f"the data cache in {paths['dir']} was built for another config or tokenizer; run "
      "preparation.build_cache(config, workdir) again to rebuild it."
    )
  cache.check_sizes(c, meta)
  train_rows, eval_rows = (
    cache.split_rows(workdir, s, opener, c.data.read_threads) for s in ("train", "eval")
  )
  return Data(
    tokenizer=tok,
    num_train_rows=len(train_rows),
    num_eval_rows=len(eval_rows),
    config=c,
    train_rows=train_rows,
    eval_rows=eval_rows,
    samples=meta["samples"],
    row_ids=rows,
  )


def _build_mixture(c, workdir: str, rows: np.ndarray, opener) -> Data:
  tok_path = cache.tokenizer_file(c, workdir)
  names = mixture_config.names(c)
  sources = []
  for name in names:
    source = build(
      mixture_config.source_config(c, name, tok_path),
      mixture_config.source_workdir(workdir, name),
      rows=rows,
      opener=opener,
    )
    source.order = f"train/{name}"
    sources.append(source)
  return mixture.MixtureData(
    tokenizer=sources[0].tokenizer,
    num_train_rows=sum(d.num_train_rows for d in sources),
    num_eval_rows=sum(d.num_eval_rows for d in sources),
    config=c,
    train_rows=None,
    eval_rows=None,
    samples=[text for d in sources for text in d.samples],
    row_ids=rows,
    names=names,
    sources=sources,
    schedule=mixture.Schedule(mixture_config.weights(c)),
  )
