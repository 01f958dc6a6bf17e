"""Token classification (tagging): its features, a head on every position of the encoder's hidden
states, its loss and its metrics.

Features (numpy only): `text.split()` gives the words (data/labelled.py checks one label per
word). Each word is encoded on its own, so the word -> pieces mapping is exact: with our
SentencePiece tokenizer (dummy prefix, pieces never cross a space) the concatenated pieces are
exactly those of the single-spaced text. A Hugging Face tokenizer.json also encodes each word on
its own; for a byte-level BPE such as GPT-2's, the pieces then lack the space they carry in running
text. The first piece of each word carries the word's label with weight 1; the other pieces, the
special tokens and padding get weight 0 (and label 0, which is never scored). The layout is
finetune/tasks.py's single-text features: BERT reads [CLS] words [SEP], GPT [BOS] words [EOS].
Words that do not fit in data.seq_len are dropped whole (never split) and not scored; how many is
logged once per call. With `word_index=True` the features also map each scored position back to
its word (finetune/task_model.py's `tag`); training leaves it out.

Model: `TokenHead` is dropout and a linear layer to K label logits at each position, for BERT and
GPT alike (GPT's position sees the words before it and the word's first piece only). `Tagger`
keeps heads.Classifier's layout, the encoder under `encoder/` and the head under `head/`, so
finetune.init_from, init_from_hf and the encoder freezing apply unchanged.

Only positions with `label_weights` 1 are scored: the first piece of each word. The loss is their
summed cross-entropy with its count. Eval gathers per-word predictions; the host turns them into
word accuracy and entity precision, recall and F1 (task_metrics.entity_f1, BIO/IOB2 chunks). A
label that is neither O nor B-X/I-X counts as B-label: each such word is an entity of its own, so
with no BIO labels at all entity F1 is the micro F1 over the non-O labels.

Einsum letters are models/transformer.py's, plus K for labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from sslm_jax.data.labelled import Example, LabelVocab
from sslm_jax.finetune import heads
from sslm_jax.finetune import metrics as task_metrics
from sslm_jax.models import transformer as model_lib
from sslm_jax.models.config import ModelConfig
from sslm_jax.models.layers import constrain, dense, dropout

TASK = "tagging"


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


class TokenHead(nnx.Module):
  """Hidden state at each position -> K label logits."""

  def __init__(self, cfg: ModelConfig, num_labels: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, k = cfg.emb_dim, num_labels
    self.output = dense(
      cfg,
      "BTD,DK->BTK",
      (d, k),
      (k,),
      ("embed", "labels"),
      ("labels",),
      std=cfg.init_std,
      rngs=rngs,
    )

  def __call__(self, x_BTD, dropout_key=None):
    x_BTD = dropout(x_BTD, self.cfg.dropout_rate, dropout_key)
    return self.output(x_BTD).astype(jnp.float32)


class Tagger(nnx.Module):
  """An encoder (any family, as pretrained) with a token head on its hidden states."""

  def __init__(self, encoder, head: TokenHead):
    self.encoder = encoder
    self.head = head

  def __call__(self, batch: dict, dropout_key=None):
    """[B, T, K] float32 logits for a batch as heads.Classifier takes it."""
    k_encoder, k_head = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    x_BTD = heads.hidden_states(self.encoder, batch, k_encoder)
    logits_BTK = self.head(x_BTD, k_head)
    return constrain(logits_BTK, ("act_batch", "act_len", None))


def build(cfg: ModelConfig, num_labels: int, seed: int) -> Tagger:
  """A fresh Tagger; its encoder is initialised exactly as model.build(cfg, seed) would be."""
  encoder = model_lib.build(cfg, seed)
  with nnx.use_eager_sharding(False):
    head = TokenHead(cfg, num_labels, rngs=nnx.Rngs(params=seed + 1))
  return Tagger(encoder, head)


def _scored(batch: dict):
  """[B, T] weights: first pieces of words, in rows with weight 1 (eval pads with 0 rows)."""
  return batch["label_weights"].astype(jnp.float32) * batch["weights"].astype(jnp.float32)[:, None]


def task_sums(model: Tagger, batch: dict, task: str = TASK, dropout_key=None) -> dict:
  """Summed cross-entropy over the scored positions, and their count."""
  del task  # heads.task_sums's signature
  logits_BTK = model(batch, dropout_key)
  loss_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTK, batch["labels"])
  weights_BT = _scored(batch)
  return {"loss_sum": jnp.sum(loss_BT * weights_BT), "count": jnp.sum(weights_BT)}


def eval_outputs(model: Tagger, batch: dict, task: str = TASK) -> dict:
  """Per-position predictions, labels, losses and weights (0: not a scored word)."""
  del task
  logits_BTK = model(batch)
  return {
    "predictions": jnp.argmax(logits_BTK, axis=-1),
    "labels": batch["labels"],
    "weights": _scored(batch),
    "loss": optax.softmax_cross_entropy_with_integer_labels(logits_BTK, batch["labels"]),
  }


def as_bio(label: str) -> str:
  """`label` when it is O, B-X or I-X; else B-label (an entity of one word)."""
  prefix, _, kind = label.partition("-")
  return label if label == "O" or (prefix in ("B", "I") and kind) else f"B-{label}"


def summarize(outputs: list[dict], label_names: tuple[str, ...]) -> dict:
  """eval_loss (per word), eval_accuracy (word level) and eval_entity_{f1,precision,recall}."""
  if not outputs:
    return {}
  joined = {k: np.concatenate([np.asarray(o[k]) for o in outputs]) for k in outputs[0]}
  scored_NT = joined["weights"] > 0
  if not scored_NT.any():
    return {}
  names = np.asarray([as_bio(x) for x in label_names], dtype=object)
  rows = [i for i in range(len(scored_NT)) if scored_NT[i].any()]
  true_tags = [names[joined["labels"][i][scored_NT[i]]].tolist() for i in rows]
  pred_tags = [names[joined["predictions"][i][scored_NT[i]]].tolist() for i in rows]
  found = task_metrics.entity_f1(true_tags, pred_tags)
  return {
    "eval_loss": float(np.mean(joined["loss"][scored_NT])),
    "eval_accuracy": float(found["token_accuracy"]),
    "eval_entity_f1": found["f1"],
    "eval_entity_precision": found["precision"],
    "eval_entity_recall": found["recall"],
  }
