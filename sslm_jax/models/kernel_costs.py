"""FLOPs and HBM bytes of the Pallas kernels a train step runs, which XLA's cost analysis does
not see (it reports ~0 FLOPs for a Pallas call). The plan adds these to XLA's counts.

Splash attention (models/splash.py) is flash attention over blocks of `bq` queries and `bkv` keys:
a block whose static mask is all False (causal: above the diagonal; a sliding window: wholly
outside it) is skipped, every other block is computed whole; packed documents (segment ids) are
masked inside computed blocks, not skipped. Per example and query head, with `pairs` computed
blocks out of (T/bq) * (S/bkv):
- forward: Q K^T and P V, 2 matmuls of bq x bkv x H per block (2 FLOPs per multiply-add);
- backward, two kernels as models/splash.py runs them: dK/dV (Q K^T again, dP = dO V^T, dV = P^T dO,
  dK = dS^T Q: 4) and dQ (Q K^T, dP, dQ = dS K: 3);
- bytes: the forward pass reads Q and writes O and the log-sum-exp once, and reads K and V once
  per computed block; the dK/dV kernel reads K, V and writes dK, dV once per key/value head (the
  query heads of a group run one after another over the same blocks: grouped-query attention),
  and reads Q, dO, the log-sum-exp and the row sums of dO * O once per computed block; the dQ
  kernel the other way round (Q, dO and the row statistics once, K and V per computed block, dQ
  written once).
Softmax exponentials and scaling are left out, as matmul-free elementwise work.
"""

from __future__ import annotations

import jax.numpy as jnp

from sslm_jax.models import modern
from sslm_jax.models.config import ModelConfig
from sslm_jax.models.splash import fit_block

_MATMULS_FORWARD = 2
_MATMULS_BACKWARD = 4 + 3  # the dK/dV kernel, the dQ kernel


def computed_blocks(
  seq_len: int, block_q: int, block_kv: int, causal: bool, radius: int | None = None
) -> int:
  """Blocks of the [T, S] score matrix the kernel computes: those with any unmasked entry, i.e.
  any key j and query i with j - i <= 0 when causal and |j - i| <= radius in a window."""
  lowest = -seq_len if radius is None else -radius  # of j - i
  highest = 0 if causal else (seq_len if radius is None else radius)
  count = 0
  for i in range(seq_len // block_q):
    for j in range(seq_len // block_kv):
      # j - i over the block runs from its last query and first key to the reverse.
      low, high = j * block_kv - ((i + 1) * block_q - 1), (j + 1) * block_kv - 1 - i * block_q
      count += low <= highest and high >= lowest
  return count


def splash_step_costs(cfg: ModelConfig, batch_size: int, seq_len: int) -> dict[str, float]:
  """{"flops", "bytes"} of every splash call of one training step (all layers, forward and
  backward), summed over the whole batch: divide by the chips for a per-chip figure."""
  bq, bkv = fit_block(cfg.attention_block_q, seq_len), fit_block(cfg.attention_block_kv, seq_len)
  local = sum(bool(modern.is_local(cfg, i)) for i in range(cfg.num_layers))
  layers = {None: cfg.num_layers - local, cfg.sliding_window // 2: local}
  flops = bytes_ = 0.0
  for radius, count in layers.items():
    pairs = computed_blocks(seq_len, bq, bkv, cfg.causal, radius)
    layer = _layer_costs(cfg, seq_len, bq, bkv, pairs)
    flops += count * layer["flops"] * batch_size
    bytes_ += count * layer["bytes"] * batch_size
  return {"flops": float(flops), "bytes": float(bytes_)}


def _layer_costs(cfg: ModelConfig, seq_len: int, bq: int, bkv: int, pairs: int) -> dict:
  """{"flops", "bytes"} of one layer's kernels on one example, all query heads."""
  h, e = cfg.head_dim, jnp.dtype(cfg.dtype).itemsize
  flops = (_MATMULS_FORWARD + _MATMULS_BACKWARD) * pairs * 2 * bq * bkv * h
  row = seq_len * h * e  # one [T, H] operand of one example and head
  stats = seq_len * 4  # one float32 per query: the log-sum-exp, or the row sums of dO * O
  kv_per_block = pairs * 2 * bkv * h * e  # K and V, read again for every computed block
  forward = 2 * row + stats + kv_per_block
  group = cfg.kv_heads / cfg.num_heads  # key/value heads per query head
  dkv = 4 * row * group + pairs * (2 * bq * h * e + 2 * bq * 4)
  dq = 3 * row + 2 * stats + kv_per_block
  return {"flops": flops * cfg.num_heads, "bytes": (forward + dkv + dq) * cfg.num_heads}
