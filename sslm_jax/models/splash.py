"""Splash attention, JAX's Pallas TPU kernel, over packed documents.

The kernel takes one example at a time as [heads, seq, head_dim] and the segment ids of its
queries and keys; it never sees a [T, S] mask (its causal mask is computed block by block).
It runs natively only on TPU: elsewhere (CPU tests) it runs through Pallas' interpreter.

Einsum letters as in models/transformer.py.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from sslm_jax.models.layers import logical_spec

# The kernel lays query and key blocks along the TPU's 128 lanes (keys in the forward pass,
# queries in the key/value gradient pass), so both block sizes are multiples of 128.
BLOCK_MULTIPLE = 128


def splash_attention(q_BTNH, k_BSNH, v_BSNH, segment_ids_BT, *, causal, block_q, block_kv):
  """Attention within the segments of `segment_ids_BT` (0 is padding), causal or not.

  Query i attends to key j iff their ids are equal (and j <= i when causal). Padding positions
  therefore attend to each other: their outputs are never used, and every query row keeps at
  least one key (itself), which the kernel's softmax needs.

  With a mesh and logical rules in scope the kernel runs per shard under shard_map: rows split
  as `act_batch` is, heads as `act_heads` is, each shard's kernel built for its own heads.
  """
  t, h = q_BTNH.shape[1], q_BTNH.shape[-1]
  if t % BLOCK_MULTIPLE or any(b < BLOCK_MULTIPLE for b in (block_q, block_kv)):
    raise ValueError(
      f"splash attention runs blocks of multiples of {BLOCK_MULTIPLE} positions: the sequence "
      f"length ({t}) must be one and model.attention_block_q / attention_block_kv ({block_q}, "
      f"{block_kv}) at least {BLOCK_MULTIPLE}; or use model.attention_impl='xla'."
    )
  block_q, block_kv = fit_block(block_q, t), fit_block(block_kv, t)
  # The kernel does not scale the logits; scaling q is the cheapest place to do it.
  q_BTNH = q_BTNH * (1.0 / math.sqrt(h))  # a Python float keeps q's dtype
  local = functools.partial(
    _local_attention,
    causal=causal,
    block_q=block_q,
    block_kv=block_kv,
    interpret=not compiling_for_tpu(),
  )
  spec = logical_spec(("act_batch", "act_heads"))
  if spec is None:
    return local(q_BTNH, k_BSNH, v_BSNH, segment_ids_BT)
  batch, heads = spec
  qkv_spec = P(batch, None, heads, None)
  sharded = jax.shard_map(
    local,
    in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch, None)),
    out_specs=qkv_spec,
    # The kernel's pallas_call states no variance over mesh axes for its outputs, which
    # shard_map's check_vma demands (it raises); each shard's output is its own.
    check_vma=False,
  )
  return sharded(q_BTNH, k_BSNH, v_BSNH, segment_ids_BT)


def fit_block(asked: int, seq_len: int) -> int:
  """The block splash runs for a length: the largest multiple of 128 that divides `seq_len`
  and is at most `asked` (at least 128)."""
  lanes = seq_len // BLOCK_MULTIPLE
  fits = [k for k in range(1, lanes + 1) if lanes % k == 0 and k * BLOCK_MULTIPLE <= asked]
  return max(fits, default=1) * BLOCK_MULTIPLE


def compiling_for_tpu() -> bool:
  """Whether the program being traced is compiled for TPU.

  The mesh in scope says so: `--plan --topology` compiles for TPU devices from a process whose
  default backend is the CPU. Its abstract form is read because the concrete mesh
  (jax.sharding.get_mesh) cannot be asked inside jit. Without a mesh, JAX's default backend.
  """
  device = jax.sharding.get_abstract_mesh().abstract_device
  platform = jax.default_backend() if device is None else device.platform
  return platform == "tpu"


def _local_attention(
  q_BTNH, k_BSNH, v_BSNH, segment_ids_BT, *, causal, block_q, block_kv, interpret
):
  """The kernel over the rows and heads at hand, one example at a time."""
  _, t, n, _ = q_BTNH.shape
  kernel = _kernel(n, t, causal, block_q, block_kv, interpret)

  def one_example(q_NTH, k_NSH, v_NSH, segment_ids_T):
    return kernel(
      q_NTH, k_NSH, v_NSH, segment_ids=splash.SegmentIds(q=segment_ids_T, kv=segment_ids_T)
    )

  to_heads_first = (0, 2, 1, 3)
  out_BNTH = jax.vmap(one_example)(
    q_BTNH.transpose(to_heads_first),
    k_BSNH.transpose(to_heads_first),
    v_BSNH.transpose(to_heads_first),
    segment_ids_BT,
  )
  return out_BNTH.transpose(to_heads_first)


def _kernel(num_heads, seq_len, causal, block_q, block_kv, interpret):
  """The kernel for `num_heads` heads; one block size serves the forward and both backward
  passes. Built per trace, not cached: it holds its block tables as arrays, which inside a
  trace become that trace's values (the tables themselves are cached by JAX)."""
  one_head = (
    splash.CausalMask((seq_len, seq_len)) if causal else splash.FullMask((seq_len, seq_len))
  )
  blocks = splash.BlockSizes(
    block_q=block_q,
    block_kv=block_kv,
    block_kv_compute=block_kv,
    block_q_dkv=block_q,
    block_kv_dkv=block_kv,
    block_kv_dkv_compute=block_kv,
    block_q_dq=block_q,
    block_kv_dq=block_kv,
  )
  return splash.make_splash_mha(
    splash.MultiHeadMask([one_head] * num_heads),
    block_sizes=blocks,
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
  )
