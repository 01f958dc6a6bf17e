"""Losses and metrics for both objectives, as (sum, count) pairs reduced by the caller.

The output projection and the cross-entropy run together in training/vocab_loss.py: logits stored in
the compute dtype (never whole [tokens, vocab] float32 ones in bf16 runs), optionally in chunks.
"""

from __future__ import annotations

import jax.numpy as jnp

from sslm_jax.training import vocab_loss


def _token_sums(model, head_inputs, targets_Bx, weights_Bx, z_loss=0.0) -> tuple[dict, jnp.ndarray]:
  """(loss/accuracy sums, the per-token negative log-likelihood); with z_loss > 0 the loss_sum
  includes the z-loss, and z_loss_sum is that part of it."""
  cfg = model.cfg
  sums = vocab_loss.cross_entropy_sums(
    *head_inputs,
    targets_Bx,
    weights_Bx,
    num_ids=cfg.num_ids,
    dtype=cfg.dtype,
    chunk_len=cfg.loss_chunk_len,
    z_loss=z_loss,
  )
  out = {"loss_sum": sums.loss_sum, "correct_sum": sums.correct_sum, "count": jnp.sum(weights_Bx)}
  if z_loss:
    out["z_loss_sum"] = z_loss * sums.z_sum
  return out, sums.nll_BX


def metric_sums(model, batch: dict, dropout_key=None, z_loss: float = 0.0) -> dict:
  """Forward pass + summed loss/accuracy over the positions that are predicted.

  causal_lm predicts every weighted target; masked_lm predicts only the gathered
  masked positions (the MLM head never runs on the others). `z_loss` > 0 (training only) adds
  z_loss * logsumexp(logits)^2 per predicted token to loss_sum, and reports it as z_loss_sum.
  """
  if model.cfg.causal:
    head = model.head_inputs(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key)
    sums, nll_BT = _token_sums(model, head, batch["targets"], batch["weights"], z_loss)
    if "target_bytes" in batch:  # eval: bits per byte of the text the targets stand for
      bytes_BT = batch["target_bytes"].astype(jnp.float32)
      # EOS (and other byteless targets) cost nats but stand for no text: left out of both sides.
      text_BT = batch["weights"] * (bytes_BT > 0)
      sums["byte_sum"] = jnp.sum(bytes_BT * text_BT)
      sums["byte_loss_sum"] = jnp.sum(nll_BT * text_BT)
    return sums
  head = model.head_inputs(
    batch["inputs"],
    batch["positions"],
    batch["segment_ids"],
    batch["masked_positions"],
    dropout_key,
  )
  return _token_sums(model, head, batch["masked_targets"], batch["masked_weights"], z_loss)[0]


def mean_loss(sums: dict):
  return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)
