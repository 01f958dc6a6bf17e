"""Prepare a token-row cache once, then serve batches as a pure function of (seed, step).

Because batch k depends only on (seed, k), a resumed run and a run on a different number of
hosts see exactly the same global batches, and no iterator state is ever saved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from sslm_jax import config as config_lib
from sslm_jax.data import cache, masking, permute, preparation, shards
from sslm_jax.data.corpus import DataError
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib

__all__ = [
  "Data",
  "DataError",
  "build",
  "causal_features",
  "masked_features",
  "prepare",
  "size_packing",
]

# Eval rows and eval masks use this fixed seed, so runs with different seeds are compared on the
# same examples.
EVAL_SEED = 0xE7A1


# ----------------------------------------------------------------------------- batch features


def segments(tokens_bT: np.ndarray, start_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Segment ids (>= 1, a new one at each start_id) and positions within segments.

  A row that begins mid-document still begins at segment 1, position 0.
  """
  is_start_bT = tokens_bT == start_id
  segment_bT = np.cumsum(is_start_bT, axis=1) + (~is_start_bT[:, :1])
  t_T = np.arange(tokens_bT.shape[1])
  last_start_bT = np.maximum.accumulate(np.where(is_start_bT, t_T, 0), axis=1)
  return segment_bT.astype(np.int32), (t_T - last_start_bT).astype(np.int32)


def causal_features(
  rows_bR: np.ndarray, bos_id: int = tokenizer_lib.BOS_ID, eos_id: int = tokenizer_lib.EOS_ID
) -> dict[str, np.ndarray]:
  """Next-token batch from rows of seq_len + 1 tokens."""
  rows_bR = np.asarray(rows_bR, np.int32)
  inputs_bT, targets_bT = rows_bR[:, :-1], rows_bR[:, 1:]
  segment_bT, positions_bT = segments(inputs_bT, bos_id)
  # A BOS target starts the next document: predicting it from the previous one is noise. Where
  # BOS is also EOS (GPT-2) that target ends the document and is learned.
  weights_bT = targets_bT != bos_id if bos_id != eos_id else np.ones_like(targets_bT, bool)
  return {
    "inputs": inputs_bT,
    "targets": targets_bT,
    "segment_ids": segment_bT,
    "positions": positions_bT,
    "weights": weights_bT.astype(np.float32),
  }


def masked_features(
  rows_bT: np.ndarray,
  example_ids_b: np.ndarray,
  c: ml_collections.ConfigDict,
  seed: int,
  tok=tokenizer_lib.Tokenizer,
) -> dict[str, np.ndarray]:
  """Masked-LM batch from rows of seq_len tokens; masks depend on (seed, example id) only.

  `tok` gives cls_id, mask_id and special_ids (a tokenizer; the default is our fixed ids).
  """
  rows_bT = np.asarray(rows_bT, np.int32)
  segment_bT, positions_bT = segments(rows_bT, tok.cls_id)
  masked = masking.mask_tokens(
    rows_bT,
    example_ids_b,
    seed=seed,
    mlm_probability=c.data.mlm_probability,
    num_predictions=config_lib.num_predictions(c),
    vocab_size=c.data.vocab_size,
    mask_id=tok.mask_id,
    special_ids=tok.special_ids,
  )
  return {**masked, "segment_ids": segment_bT, "positions": positions_bT}


# ----------------------------------------------------------------------------- serving

prepare = preparation.prepare


@dataclasses.dataclass
class Data:
  """Batches for this process: rows `row_ids` (sorted) of each global batch, in that order.

  Processes that are replicas of each other under the mesh (a `tensor` axis across hosts) are
  given the same rows, so they load the same data.
  """

  tokenizer: tokenizer_lib.Tokenizer  # or an hf_tokenizer.HFTokenizer
  num_train_rows: int
  num_eval_rows: int
  config: ml_collections.ConfigDict = dataclasses.field(repr=False)
  train_rows: np.ndarray = dataclasses.field(repr=False)  # or shards.ShardedRows
  eval_rows: np.ndarray = dataclasses.field(repr=False)
  samples: list[str] = dataclasses.field(repr=False)
  row_ids: np.ndarray | None = None  # None: the whole global batch
  order: str = "train"  # names the train order's permutations (a mixture source's own name)
  _eval_cache: list | None = dataclasses.field(default=None, init=False, repr=False)

  @property
  def local_batch_size(self) -> int:
    return self.config.batch_size if self.row_ids is None else len(self.row_ids)

  @property
  def _specials(self):
    """What gives the special ids: the tokenizer, or our fixed ids where Data has none."""
    return tokenizer_lib.Tokenizer if self.tokenizer is None else self.tokenizer

  def _rows(self) -> np.ndarray:
    return np.arange(self.config.batch_size) if self.row_ids is None else self.row_ids

  def _permutation(self, epoch: int) -> permute.KeyedPermutation:
    """The epoch's order of train rows; indexing it computes only the rows asked for."""
    return permute.KeyedPermutation(self.num_train_rows, self.order, self.config.seed, epoch)

  def _features(self, rows: np.ndarray, example_ids_b: np.ndarray, seed: int) -> dict:
    if self.config.objective == "causal_lm":
      return causal_features(rows, self._specials.bos_id, self._specials.eos_id)
    return masked_features(rows, example_ids_b, self.config, seed, self._specials)

  def train_rows_for(self, g_b: np.ndarray) -> np.ndarray:
    """The rows of train examples g_b: example g is row perm_e[g % n] of epoch e = g // n."""
    epoch_b, offset_b = np.divmod(g_b, self.num_train_rows)
    row_b = np.empty(len(g_b), np.int64)
    for epoch in np.unique(epoch_b):
      here = epoch_b == epoch
      row_b[here] = self._permutation(int(epoch))[offset_b[here]]
    return self.train_rows[row_b]

  def batch_for_step(self, step: int) -> dict[str, np.ndarray]:
    """This process's part of global batch `step`, with no dependence on earlier calls."""
    g_b = step * self.config.batch_size + self._rows().astype(np.int64)
    return self._features(self.train_rows_for(g_b), g_b, self.config.seed)

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches for steps start_step, start_step + 1, ... forever, computed ahead in parallel."""
    example = self.batch_for_step(start_step)
    keys = sorted(example)
    dtypes = [tf.as_dtype(example[k].dtype) for k in keys]

    def numpy_batch(step):
      batch = self.batch_for_step(int(step))
      return [batch[k] for k in keys]

    def tf_batch(step):
      out = tf.numpy_function(numpy_batch, [step], dtypes, stateful=False)
      return {k: tf.ensure_shape(v, example[k].shape) for k, v in zip(keys, out, strict=True)}

    # Remote rows wait on the network, not on a core: fetch many batches at once.
    ranged = getattr(self.train_rows, "ranged", False)
    parallel = self.config.data.read_ahead_batches if ranged else tf.data.AUTOTUNE
    ds = tf.data.Dataset.range(start_step, 2**62)
    ds = ds.map(tf_batch, num_parallel_calls=parallel, deterministic=True)
    return ds.prefetch(parallel).as_numpy_iterator()

  def _make_eval_batches(self) -> list[dict[str, np.ndarray]]:
    big_b = self.config.batch_size
    steps = min(self.config.eval_steps, self.num_eval_rows // big_b)
    order = permute.KeyedPermutation(self.num_eval_rows, "eval", EVAL_SEED, 0)
    batches = []
    for j in range(steps):
      row_b = order[j * big_b + self._rows()]
      batch = self._features(self.eval_rows[row_b], row_b, EVAL_SEED)
      if self.config.objective == "causal_lm":
        bytes_bT = self.tokenizer.target_bytes(
          batch["inputs"], batch["targets"], self.tokenizer.bos_id
        )
        batch["target_bytes"] = (bytes_bT * batch["weights"]).astype(np.int32)
      batches.append(batch)
    return batches

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """The same fixed eval batches, in the same order, on every call."""
    if self._eval_cache is None:
      self._eval_cache = self._make_eval_batches()
    return iter(self._eval_cache)

  def max_segments_per_row(self, chunk: int = 8192) -> int:
    """The most documents (whole or cut) that any train or eval row holds."""
    start, t = cache.doc_ids(self.config, self._specials)[0], self.config.data.seq_len
    most = 1
    for rows in (self.train_rows, self.eval_rows):
      for i in range(0, len(rows), chunk):
        inputs_bT = np.asarray(rows[i : i + chunk])[:, :t]
        starts_b = (inputs_bT == start).sum(axis=1) + (inputs_bT[:, 0] != start)
        most = max(most, int(starts_b.max(initial=1)))
    return most

  def sample_texts(self, n: int) -> list[str]:
    """Up to n held-out snippets (the first lines of eval documents) to prompt samples with."""
    return list(self.samples[:n])


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
  """Open the cache prepare() wrote; this process serves `rows` (sorted indices) of each batch.

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
    raise DataError(f"no data cache in {paths['dir']}; run prepare(config, workdir) first.")
  if meta["request"] != cache.request(c, tok):
    raise DataError(
      f"the data cache in {paths['dir']} was built for another config or tokenizer; run "
      "prepare(config, workdir) again to rebuild it."
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
  from sslm_jax.config import mixture as mixture_config
  from sslm_jax.data import mixture

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
