"""Token classification (tagging) features: one label per word, on the word's first piece.

numpy only. `text.split()` gives the words (finetune/labelled.py checks one label per word). Each
word is encoded on its own, so the word -> pieces mapping is exact: with our SentencePiece tokenizer
(dummy prefix, pieces never cross a space) the concatenated pieces are exactly those of the
single-spaced text. A Hugging Face tokenizer.json also encodes each word on its own; for a
byte-level BPE such as GPT-2's, the pieces then lack the space they carry in running text.
The first piece of each word carries the word's label with weight 1; the other pieces, the
special tokens and padding get weight 0 (and label 0, which is never scored).

Layout as finetune/tasks.py's single-text features: BERT reads [CLS] words [SEP], GPT [BOS] words
[EOS]. Words that do not fit in data.seq_len are dropped whole (never split) and not scored; how
many is logged once per call. With `word_index=True` the features also map each scored position
back to its word (finetune/task_model.py's `tag`); training leaves it out.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from sslm_jax.finetune.labelled import Example, LabelVocab


def _kept_words(pieces: list[list[int]], budget: int) -> int:
  """How many leading words fit, whole, in `budget` pieces."""
  used = 0
  for n, word in enumerate(pieces):
    if used + len(word) > budget:
      return n
    used += len(word)
  return len(pieces)


def featurize(
  examples: list[Example],
  tok,
  vocab: LabelVocab,
  seq_len: int,
  causal: bool,
  word_index: bool = False,
) -> dict[str, np.ndarray]:
  """inputs/token_types/labels [N, T] int32, label_weights [N, T] float32 (1 on each kept
  word's first piece), lengths [N] int32; with `word_index`, also word_index [N, T] int32 (the
  word's position in `text.split()` where label_weights is 1, else -1)."""
  n = len(examples)
  inputs_NT = np.full((n, seq_len), tok.pad_id, np.int32)
  labels_NT = np.zeros((n, seq_len), np.int32)
  label_weights_NT = np.zeros((n, seq_len), np.float32)
  lengths_N = np.zeros((n,), np.int32)
  word_index_NT = np.full((n, seq_len), -1, np.int32)
  words = [e.text.split() for e in examples]
  flat = tok.encode_batch([w for ws in words for w in ws])  # one call: SentencePiece's threads
  start_id, end_id = (tok.bos_id, tok.eos_id) if causal else (tok.cls_id, tok.sep_id)
  total = dropped = rows_cut = 0
  first_cut = None
  for i, (e, ws) in enumerate(zip(examples, words, strict=True)):
    pieces = flat[total : total + len(ws)]
    kept = _kept_words(pieces, seq_len - 2)
    ids, position = [start_id], 1
    for j, (word, label) in enumerate(zip(pieces[:kept], vocab.encode(e)[:kept], strict=True)):
      if not word:  # a word the tokenizer normalizes away has no piece to label
        continue
      labels_NT[i, position], label_weights_NT[i, position] = label, 1.0
      word_index_NT[i, position] = j
      ids += word
      position += len(word)
    ids.append(end_id)
    inputs_NT[i, : len(ids)], lengths_N[i] = ids, len(ids)
    total, dropped = total + len(ws), dropped + len(ws) - kept
    if kept < len(ws):
      rows_cut += 1
      first_cut = first_cut or e.where
  if dropped:
    logging.warning(
      "tagging: %d of %d words (in %d of %d examples, the first %s) do not fit in "
      "data.seq_len=%d and are not scored; raise data.seq_len to keep them.",
      dropped, total, rows_cut, n, first_cut or "unnamed", seq_len,
    )  # fmt: skip
  features = {
    "inputs": inputs_NT,
    "token_types": np.zeros_like(inputs_NT),
    "lengths": lengths_N,
    "labels": labels_NT,
    "label_weights": label_weights_NT,
  }
  return dict(features, word_index=word_index_NT) if word_index else features
