"""Token classification (tagging): a head on every position of the encoder's hidden states.

`TokenHead` is dropout and a linear layer to K label logits at each position, for BERT and GPT
alike (GPT's position sees the words before it and the word's first piece only). `Tagger` keeps
heads.Classifier's layout, the encoder under `encoder/` and the head under `head/`, so
finetune.init_from, init_from_hf and the encoder freezing apply unchanged.

Only positions with `label_weights` 1 are scored: the first piece of each word
(finetune/tagging_data.py). The loss is their summed cross-entropy with its count. Eval gathers
per-word predictions; the host turns them into word accuracy and entity precision, recall and F1
(task_metrics.entity_f1, BIO/IOB2 chunks). A label that is neither O nor B-X/I-X counts as B-label:
each such word is an entity of its own, so with no BIO labels at all entity F1 is the micro F1 over
the non-O labels.

Einsum letters are models/transformer.py's, plus K for labels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sslm_jax.finetune import heads
from sslm_jax.finetune import metrics as task_metrics
from sslm_jax.models import transformer as model_lib
from sslm_jax.models.config import ModelConfig
from sslm_jax.models.layers import constrain, dense, dropout

TASK = "tagging"


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
  """An encoder (GPT or BERT, as pretrained) with a token head on its hidden states."""

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
