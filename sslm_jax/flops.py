"""Model FLOPs of one training step, the numerator of model FLOPs utilisation (MFU).

Counts the work the model needs, not what the implementation happens to run: rematerialised
forward passes are not counted, and neither is the masked-out half of causal attention scores
(XLA computes it anyway, so causal MFU is a slight underestimate of hardware use).
"""

from __future__ import annotations

import dataclasses

from sslm_jax.model import ModelConfig

# A matmul [M, K] x [K, N] is 2*M*N*K FLOPs forward; the backward pass needs two such matmuls
# (gradients for the input and for the weight), hence training = 3 x forward = 6 FLOPs per
# parameter per token.
_TRAIN_PER_FORWARD = 3


def model_flops_per_token(model_cfg: ModelConfig, num_predictions: int | None) -> float:
  """Training FLOPs (forward + backward = 3 x forward) per input token at length `max_len`.

  With L layers, width D, MLP hidden F, padded vocab V (as the model runs it), T = max_len:
  - layer matmuls: 6 * L * (4*D*D + 2*D*F)  (query, key, value, out; fc, proj)
  - output head: causal_lm, the tied logits 6*D*V on every token; masked_lm, the MLM head
    (transform D x D, then tied logits D x V) on P = `num_predictions` of the T positions only,
    6*(D*D + D*V)*P/T per token
  - attention scores QK^T and the weighted sum AV: forward 2*T*D each per token and layer with
    all S = T keys, training 12*L*T*D; causal counts half of the score matrix, 6*L*T*D.
  Biases, LayerNorm, GELU, softmax, dropout and the embedding lookups are left out: elementwise
  work is a few FLOPs per activation against thousands per token in the matmuls.
  """
  d, f, v, t = model_cfg.emb_dim, model_cfg.mlp_dim, model_cfg.vocab_size, model_cfg.max_len
  layers = model_cfg.num_layers
  forward_per_weight = 2
  layer_weights = 4 * d * d + 2 * d * f
  if model_cfg.causal:
    head_weights_per_token = d * v
  else:
    if num_predictions is None:
      raise ValueError("masked_lm needs num_predictions (gathered positions per sequence).")
    head_weights_per_token = (d * d + d * v) * num_predictions / t
  matmul_forward = forward_per_weight * (layers * layer_weights + head_weights_per_token)
  # QK^T and AV: each a [T, H] x [H, S] matmul per head, summed over heads: 2*S*D per token.
  attention_forward = layers * 2 * (2 * t * d)
  if model_cfg.causal:
    attention_forward /= 2
  return float(_TRAIN_PER_FORWARD * (matmul_forward + attention_forward))


def step_flops(
  model_cfg: ModelConfig, batch_size: int, seq_len: int, num_predictions: int | None
) -> float:
  """Training FLOPs of one step on `batch_size` sequences of `seq_len` tokens."""
  at_len = dataclasses.replace(model_cfg, max_len=seq_len)
  return model_flops_per_token(at_len, num_predictions) * batch_size * seq_len
