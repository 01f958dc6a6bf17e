"""Batches of an opened token-row cache, as a pure function of (seed, step): each row's features
(causal_features, masked_features) and Data, which serves a process's rows of each global batch.

Because batch k depends only on (seed, k), a resumed run and a run on a different number of
hosts see exactly the same global batches, and no iterator state is ever saved.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from sslm_jax import config as config_lib
from sslm_jax.data import cache, masking, permute
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib

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
