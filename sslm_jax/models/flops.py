"""Model FLOPs of one training step, the numerator of model FLOPs utilisation (MFU).

Counts the work the model needs, not what the implementation happens to run: rematerialised
forward passes are not counted, and neither is the masked-out half of causal attention scores
(XLA computes it anyway, so causal MFU is a slight underestimate of hardware use). Sliding-window
layers count the (query, key) pairs inside their window only, as MaxText counts sliding windows:
the XLA path computes and masks the whole score matrix, splash skips whole blocks outside the
window (models/kernel_costs.py counts what it does run).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from sslm_jax.models import modern
from sslm_jax.models.config import ModelConfig

# A matmul [M, K] x [K, N] is 2*M*N*K FLOPs forward; the backward pass needs two such matmuls
# (gradients for the input and for the weight), hence training = 3 x forward = 6 FLOPs per
# parameter per token.
_TRAIN_PER_FORWARD = 3


def attended_pairs(seq_len: int, causal: bool, radius: int | None = None) -> float:
  """(query, key) pairs one sequence's attention counts: all T*T, half of them (T*T/2) when
  causal, or with `radius` exactly those with |i - j| <= radius (and j <= i when causal)."""
  t = seq_len
  if radius is None:
    return t * t / 2 if causal else float(t * t)
  r = min(radius, t - 1)  # each query loses the keys its window reaches past either end
  if causal:
    return float(t * (r + 1) - r * (r + 1) // 2)
  return float(t * (2 * r + 1) - r * (r + 1))


def model_flops_per_token(model_cfg: ModelConfig, num_predictions: int | None) -> float:
  """Training FLOPs (forward + backward = 3 x forward) per input token at length `max_len`.

  With L layers, width D, N query heads and K key/value heads of width H (N*H = D), MLP hidden
  F, padded vocab V (as the model runs it), T = max_len:
  - layer matmuls: 6 * L * (2*D*N*H + 2*D*K*H + m*D*F): query and out, key and value (K = N
    but in llama's grouped-query attention), and m = 2 MLP matrices (fc, proj) or 3 in the
    gated MLPs of llama and modernbert (gate, up, down)
  - output head: causal_lm, the logits 6*D*V on every token (the tied embedding or llama's own
    lm_head: a matmul either way); masked_lm, the MLM head (transform D x D, then the tied
    logits D x V) on P = `num_predictions` of the T positions only, 6*(D*D + D*V)*P/T per token
  - attention scores QK^T and the weighted sum AV: forward 2*N*H FLOPs each per (query, key)
    pair a layer attends (attended_pairs: T*T, causal T*T/2, a windowed layer its window's);
    all T*T pairs give training 12*L*T*D per token.
  Biases, norms (qk_norm's too), GELU/SiLU, rotary rotations, softmax, dropout and the embedding
  lookups are left out: elementwise work is a few FLOPs per activation against thousands per
  token in the matmuls.
  """
  cfg = model_cfg
  d, f, v, t = cfg.emb_dim, cfg.mlp_dim, cfg.vocab_size, cfg.max_len
  nh, kh = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
  layers = cfg.num_layers
  forward_per_weight = 2
  mlp_matrices = 3 if cfg.rotary else 2  # the rotary families' MLPs are gated
  layer_weights = 2 * d * nh + 2 * d * kh + mlp_matrices * d * f
  if cfg.causal:
    head_weights_per_token = d * v
  else:
    if num_predictions is None:
      raise ValueError("masked_lm needs num_predictions (gathered positions per sequence).")
    head_weights_per_token = (d * d + d * v) * num_predictions / t
  matmul_forward = forward_per_weight * (layers * layer_weights + head_weights_per_token)
  # QK^T and AV: per pair, an H-long dot product per query head for each: 2 * 2*N*H FLOPs.
  local = sum(bool(modern.is_local(cfg, i)) for i in range(layers))
  pairs = (layers - local) * attended_pairs(t, cfg.causal)
  if local:
    pairs += local * attended_pairs(t, cfg.causal, cfg.sliding_window // 2)
  attention_forward = 2 * (2 * nh) * pairs / t
  return float(_TRAIN_PER_FORWARD * (matmul_forward + attention_forward))


def step_flops(
  model_cfg: ModelConfig, batch_size: int, seq_len: int, num_predictions: int | None
) -> float:
  """Training FLOPs of one step on `batch_size` sequences of `seq_len` tokens."""
  at_len = dataclasses.replace(model_cfg, max_len=seq_len)
  return model_flops_per_token(at_len, num_predictions) * batch_size * seq_len


# Dense (never 2:4 sparse) peak matmul FLOP/s per GPU or TPU chip, from the vendor datasheets:
# NVIDIA A100, H100 (SXM, PCIe, NVL) and H200 Tensor Core GPU datasheets; Google Cloud TPU
# system architecture pages for v4, v5e, v5p and v6e (Trillium). Rows: lower-case substrings of
# `device.device_kind` (first match wins, so variants come before the family), the name, then the
# bf16, TF32 and plain fp32 (non-tensor-core) figures. TPUs have no fp32 figures: their fp32
# matmuls run as bf16 passes.
_PEAKS = (
  (("h100 pcie",), "NVIDIA H100 PCIe", 756e12, 378e12, 51e12),
  (("h100 nvl", "h200 nvl"), "NVIDIA H100/H200 NVL", 835e12, 417.5e12, 60e12),
  (("h200",), "NVIDIA H200 (H100 SXM figures)", 989e12, 494.5e12, 67e12),
  (("h100",), "NVIDIA H100 SXM", 989e12, 494.5e12, 67e12),
  (("a100",), "NVIDIA A100", 312e12, 156e12, 19.5e12),
  (("tpu v6 lite", "tpu v6e"), "TPU v6e (Trillium)", 918e12, None, None),
  (("tpu v5 lite", "tpu v5e"), "TPU v5e", 197e12, None, None),
  (("tpu v5p", "tpu v5"), "TPU v5p", 459e12, None, None),
  (("tpu v4",), "TPU v4", 275e12, None, None),
)
_SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# jax_default_matmul_precision values under which XLA runs fp32 matmuls in full fp32 on GPU;
# with the default (None) and the others, fp32 dots use TF32 tensor cores.
_FULL_FP32 = ("highest", "float32")


def table_peak(
  device_kind: str, dtype: str, matmul_precision: str | None = "from_jax"
) -> tuple[float | None, str]:
  """(peak FLOP/s per device or None, where it came from) for a compute dtype.

  fp32 on NVIDIA GPUs counts the precision XLA actually runs: TF32 tensor cores unless
  `jax_default_matmul_precision` asks for full fp32 ("highest"/"float32").
  """
  if matmul_precision == "from_jax":
    matmul_precision = jax.config.jax_default_matmul_precision
  kind = device_kind.lower()
  for patterns, name, bf16, tf32, fp32 in _PEAKS:
    if not any(p in kind for p in patterns):
      continue
    if dtype != "float32":
      return bf16, f"table: {name} bf16 dense"
    if fp32 is None:
      return bf16, f"table: {name} bf16 dense (fp32 matmuls run as bf16 passes on TPU)"
    if str(matmul_precision).lower() in _FULL_FP32:
      return fp32, f"table: {name} fp32 dense (non-tensor-core; matmul precision highest)"
    return tf32, f"table: {name} TF32 dense (XLA runs fp32 matmuls as TF32 by default)"
  return None, f"unknown accelerator {device_kind!r}: no peak figure, so no mfu"


def measured_peak(dtype: str, n: int = 2048, runs: int = 10) -> tuple[float, str]:
  """FLOP/s of a jitted square GEMM on this host, median of `runs` after a warmup."""
  x = jax.random.normal(jax.random.key(0), (n, n), dtype)
  y = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(jnp.dot)
  for _ in range(2):
    matmul(x, y).block_until_ready()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    matmul(x, y).block_until_ready()
    times.append(time.perf_counter() - t0)
  short = _SHORT_DTYPE.get(dtype, dtype)
  platform = jax.devices()[0].platform
  return 2 * n**3 / statistics.median(
    times
  ), f"measured: {short} GEMM {n}^3 on {platform}, this run"


def peak_and_units(dtype: str, gemm_size: int = 2048) -> tuple[float | None, str, int]:
  """(peak FLOP/s per unit, its source, units): CPU is measured per host, whatever it simulates."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    peak, source = measured_peak(dtype, n=gemm_size)
    if jax.local_device_count() > 1:
      source += f" (whole host, shared by its {jax.local_device_count()} simulated devices)"
    return peak, source, jax.process_count()
  peak, source = table_peak(device.device_kind, dtype)
  return peak, source, jax.device_count()
