"""Task heads on the pretrained encoder's hidden states, and the fine-tuning losses.

Sequence classification and regression read one position of `encoder.hidden(...)`:
- a masked_lm encoder (BERT, ModernBERT): the [CLS] token (position 0) -> pooler (dense + tanh)
  -> dropout -> linear to K outputs;
- a causal_lm encoder (GPT, Llama): the last non-padding token -> dropout -> linear to K outputs.
Regression is the same head with K = 1 and a squared-error loss.

`Classifier` keeps the encoder under `encoder/` with exactly the parameter paths of pretraining
(so a pretrained model's params drop in as the `encoder` subtree) and the head under `head/`.

Einsum letters are models/transformer.py's, plus K for the head's outputs (labels). The head's
weights use the logical names `embed`, `mlp` and `labels` (the last is replicated in
training/sharding.py's table). The token head for tagging, on every position, is tagging.py's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sslm_jax.models import transformer as model_lib
from sslm_jax.models.config import ModelConfig
from sslm_jax.models.layers import constrain, dense, dropout

REGRESSION = "regression"


class SequenceHead(nnx.Module):
  """Pooled hidden state -> K outputs (class logits, or one regression value)."""

  def __init__(self, cfg: ModelConfig, num_outputs: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, k = cfg.emb_dim, num_outputs
    if not cfg.causal:  # BERT's pooler; GPT-2 has none
      self.pooler = dense(
        cfg, "BD,DE->BE", (d, d), (d,), ("embed", "mlp"), ("mlp",), std=cfg.init_std, rngs=rngs
      )
    self.output = dense(
      cfg, "BD,DK->BK", (d, k), (k,), ("embed", "labels"), ("labels",), std=cfg.init_std, rngs=rngs
    )

  def __call__(self, pooled_BD, dropout_key=None):
    if not self.cfg.causal:
      pooled_BD = jnp.tanh(self.pooler(pooled_BD))
    pooled_BD = dropout(pooled_BD, self.cfg.dropout_rate, dropout_key)
    return self.output(pooled_BD).astype(jnp.float32)


def pooled(cfg: ModelConfig, x_BTD, segment_ids_BT):
  """The position a sequence head reads: [CLS] at 0 for a masked_lm, the last real token for a
  causal_lm."""
  if not cfg.causal:
    return x_BTD[:, 0]
  last_B = jnp.maximum(jnp.sum(segment_ids_BT > 0, axis=1) - 1, 0)
  return jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)[:, 0]


class Classifier(nnx.Module):
  """An encoder (any family, as pretrained) with a sequence head on its hidden states."""

  def __init__(self, encoder, head: SequenceHead):
    self.encoder = encoder
    self.head = head

  def __call__(self, batch: dict, dropout_key=None):
    """[B, K] float32 outputs for a batch of `inputs`, `positions`, `segment_ids` (0: padding)
    and, for a masked_lm, `token_types` (which ModernBERT, having no token types, ignores)."""
    k_encoder, k_head = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    x_BTD = hidden_states(self.encoder, batch, k_encoder)
    x_BD = pooled(self.encoder.cfg, x_BTD, batch["segment_ids"])
    return self.head(constrain(x_BD, ("act_batch", "act_embed")), k_head)


def hidden_states(encoder, batch: dict, dropout_key=None):
  """The encoder's hidden states [B, T, D] for a fine-tuning batch; a masked_lm's hidden() also
  takes the token types."""
  args = (batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key)
  if encoder.cfg.causal:
    return encoder.hidden(*args)
  return encoder.hidden(*args, batch.get("token_types"))


def build(cfg: ModelConfig, num_outputs: int, seed: int) -> Classifier:
  """A fresh Classifier; its encoder is initialised exactly as model.build(cfg, seed) would be."""
  encoder = model_lib.build(cfg, seed)
  with nnx.use_eager_sharding(False):
    head = SequenceHead(cfg, num_outputs, rngs=nnx.Rngs(params=seed + 1))
  return Classifier(encoder, head)


def num_outputs(task: str, num_labels: int) -> int:
  return 1 if task == REGRESSION else num_labels


def task_sums(
  model: Classifier, batch: dict, task: str, dropout_key=None, class_weights_K=None
) -> dict:
  """Summed loss over the rows with weight 1 (eval pads its last batch with weight-0 rows).

  `class_weights_K` (finetune/class_weights.py) weighs each row by its label's weight, in the sum
  and in the count alike: the loss is then the weighted mean.
  """
  outputs_BK = model(batch, dropout_key)
  weights_B = batch["weights"].astype(jnp.float32)
  if class_weights_K is not None:
    weights_B = weights_B * jnp.asarray(class_weights_K, jnp.float32)[batch["labels"]]
  if task == REGRESSION:
    loss_B = jnp.square(outputs_BK[:, 0] - batch["labels"].astype(jnp.float32))
  else:
    loss_B = optax.softmax_cross_entropy_with_integer_labels(outputs_BK, batch["labels"])
  return {"loss_sum": jnp.sum(loss_B * weights_B), "count": jnp.sum(weights_B)}


def eval_outputs(model: Classifier, batch: dict, task: str) -> dict:
  """Per-row predictions (class id, or value) with labels and weights, for host-side metrics."""
  outputs_BK = model(batch)
  if task == REGRESSION:
    predictions_B = outputs_BK[:, 0]
    loss_B = jnp.square(predictions_B - batch["labels"].astype(jnp.float32))
  else:
    predictions_B = jnp.argmax(outputs_BK, axis=-1)
    loss_B = optax.softmax_cross_entropy_with_integer_labels(outputs_BK, batch["labels"])
  return {
    "predictions": predictions_B,
    "labels": batch["labels"],
    "weights": batch["weights"],
    "loss": loss_B,
  }
