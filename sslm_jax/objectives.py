"""Losses and metrics for both objectives, as (sum, count) pairs reduced by the caller."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def _token_sums(logits_BxV, targets_Bx, weights_Bx) -> tuple[dict, jnp.ndarray]:
  """(loss/accuracy sums, the per-token negative log-likelihood)."""
  nll_Bx = optax.softmax_cross_entropy_with_integer_labels(logits_BxV, targets_Bx)
  correct_Bx = (jnp.argmax(logits_BxV, axis=-1) == targets_Bx).astype(jnp.float32)
  sums = {
    "loss_sum": jnp.sum(nll_Bx * weights_Bx),
    "correct_sum": jnp.sum(correct_Bx * weights_Bx),
    "count": jnp.sum(weights_Bx),
  }
  return sums, nll_Bx


def metric_sums(model, batch: dict, dropout_key=None) -> dict:
  """Forward pass + summed loss/accuracy over the positions that are predicted.

  causal_lm predicts every weighted target; masked_lm predicts only the gathered
  masked positions (the MLM head never runs on the others).
  """
  if model.cfg.causal:
    logits_BTV = model(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key)
    sums, nll_BT = _token_sums(logits_BTV, batch["targets"], batch["weights"])
    if "target_bytes" in batch:  # eval: bits per byte of the text the targets stand for
      bytes_BT = batch["target_bytes"].astype(jnp.float32)
      # EOS (and other byteless targets) cost nats but stand for no text: left out of both sides.
      text_BT = batch["weights"] * (bytes_BT > 0)
      sums["byte_sum"] = jnp.sum(bytes_BT * text_BT)
      sums["byte_loss_sum"] = jnp.sum(nll_BT * text_BT)
    return sums
  logits_BPV = model(
    batch["inputs"],
    batch["positions"],
    batch["segment_ids"],
    batch["masked_positions"],
    dropout_key,
  )
  return _token_sums(logits_BPV, batch["masked_targets"], batch["masked_weights"])[0]


def mean_loss(sums: dict):
  return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)
