"""Splash attention, JAX's Pallas TPU kernel, over packed documents.

The kernel takes one example at a time as [heads, seq, head_dim] and the segment ids of its
queries and keys; it never sees a [T, S] mask (its causal and sliding-window masks are computed
block by block). It runs natively only on TPU: elsewhere (CPU tests) it runs through Pallas'
interpreter.

Einsum letters as in models/transformer.py; K is the key/value heads (grouped-query attention).
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


def splash_attention(
  q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, causal, block_q, block_kv, window=0, local=None
):
  """Attention within the segments of `segment_ids_BT` (0 is padding), causal or not.

  Query i attends to key j iff their ids are equal (and j <= i when causal). Padding positions
  therefore attend to each other: their outputs are never used, and every query row keeps at
  least one key (itself), which the kernel's softmax needs.

  Grouped-query attention is the kernel's own: K key/value heads for N query heads (K divides
  N), query head n reading key/value head n // (N / K); no copies of the keys are made.

  `local` (a traced bool, or None when no layer is windowed) picks between two kernels: where it
  holds, query i also attends only to keys at most `window` // 2 positions away (the XLA path's
  attention.window_mask), whose blocks the kernel skips wholly outside the window.

  With a mesh and logical rules in scope the kernel runs per shard under shard_map: rows split
  as `act_batch` is, query and key/value heads as `act_heads` is (so the key/value heads must
  divide evenly too: sharding.check_heads), each shard's kernel built for its own heads.
  """
  t, h = q_BTNH.shape[1], q_BTNH.shape[-1]
  if t % BLOCK_MULTIPLE or any(b < BLOCK_MULTIPLE for b in (block_q, block_kv)):
    raise ValueError(
      f"splash attention runs blocks of multiples of {BLOCK_MULTIPLE} positions: the sequence "
      f"length ({t}) must be one and model.attention_block_q / attention_block_kv ({block_q}, "
      f"{block_kv}) at least {BLOCK_MULTIPLE}; or use model.attention_impl='xla'."
    )
  # The kernel does not scale the logits; scaling q is the cheapest place to do it.
  q_BTNH = q_BTNH * (1.0 / math.sqrt(h))  # a Python float keeps q's dtype
  kernel = functools.partial(
    _shard_attention,
    causal=causal,
    block_q=fit_block(block_q, t),
    block_kv=fit_block(block_kv, t),
    interpret=not compiling_for_tpu(),
  )
  full = _sharded(functools.partial(kernel, radius=None))
  if local is None:
    return full(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  windowed = _sharded(functools.partial(kernel, radius=window // 2))
  return jax.lax.cond(local, windowed, full, q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)


def _sharded(shard_fn):
  """`shard_fn` under shard_map over the mesh in scope, or itself without one."""
  spec = logical_spec(("act_batch", "act_heads"))
  if spec is None:
    return shard_fn
  batch, heads = spec
  qkv_spec = P(batch, None, heads, None)
  return jax.shard_map(
    shard_fn,
    in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch, None)),
    out_specs=qkv_spec,
    # The kernel's pallas_call states no variance over mesh axes for its outputs, which
    # shard_map's check_vma demands (it raises); each shard's output is its own.
    check_vma=False,
  )


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


def _shard_attention(
  q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, *, causal, block_q, block_kv, interpret, radius
):
  """The kernel over the rows and heads at hand, one example at a time."""
  _, t, n, _ = q_BTNH.shape
  kernel = _kernel(n, t, causal, block_q, block_kv, interpret, radius)

  def one_example(q_NTH, k_KSH, v_KSH, segment_ids_T):
    return kernel(
      q_NTH, k_KSH, v_KSH, segment_ids=splash.SegmentIds(q=segment_ids_T, kv=segment_ids_T)
    )

  to_heads_first = (0, 2, 1, 3)
  out_BNTH = jax.vmap(one_example)(
    q_BTNH.transpose(to_heads_first),
    k_BSKH.transpose(to_heads_first),
    v_BSKH.transpose(to_heads_first),
    segment_ids_BT,
  )
  return out_BNTH.transpose(to_heads_first)


def head_mask(seq_len: int, causal: bool, radius: int | None):
  """One head's static mask: causal or full, and with `radius` keys within that distance of
  the query only (a LocalMask: its blocks wholly outside the window are skipped)."""
  shape = (seq_len, seq_len)
  if radius is not None:
    return splash.LocalMask(shape, window_size=(radius, 0 if causal else radius), offset=0)
  return splash.CausalMask(shape) if causal else splash.FullMask(shape)


def _kernel(num_heads, seq_len, causal, block_q, block_kv, interpret, radius):
  """The kernel for `num_heads` query heads (make_splash_mha takes any number of key/value heads
  that divides them); one block size serves the forward and both backward passes. Built per
  trace, not cached: it holds its block tables as arrays, which inside a trace become that
  trace's values (the tables themselves are cached by JAX)."""
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
    splash.MultiHeadMask([head_mask(seq_len, causal, radius)] * num_heads),
    block_sizes=blocks,
    head_shards=1,
    q_seq_shards=1,
    interpret=interpret,
  )
