"""Cross-entropy over the tied output embedding, in chunks of positions: with bf16 compute the
[tokens, vocab] logits are never stored in float32.

Computed whole by `jnp.einsum` + optax, gpt_base's f32[8, 1024, 50304] logits are 1.65 GB per
chip, written and re-read ~4 times a step. Here each chunk's logits are computed in float32 and
stored in the compute dtype (bf16 on accelerators; float32 on CPU, where this changes nothing),
their softmax statistics and, under differentiation, their gradient pieces made in the same
pass; only [tokens]-sized statistics, d x and the float32 [V, D] gradient accumulator outlive a
chunk. Compiled for TPU v5p (fsdp=4, gpt_base's loss and gradient alone, 8 x 1024 tokens per
chip, bf16): 7.6e9 bytes accessed and 1.61 GiB of temporaries per chip for the float32 logits
of the dense path; 4.3e9 bytes and 1.02 GiB here in one chunk. More chunks hold less at once
(0.89 GiB in 2, 0.67 GiB in 4) but each extra chunk re-reads the gathered embedding twice and
the [V, D] accumulator (~0.46 GB), so one chunk is the default (model.loss_chunk_len=0).

Under a mesh the chunk loop runs in `jax.shard_map` with explicit collectives, because left to the
SPMD partitioner a per-chunk loop re-gathers the fsdp-split embedding and all-reduces a whole
embedding gradient in every chunk. Here the embedding is gathered over its `embed` axes once
before the loop, the vocabulary stays split over its `vocab` axes (each chunk combines its
per-token max / sum-exp / target logit / argmax over them with small pmax / psum / pmin), and the
embedding and bias gradients are summed locally over all chunks and reduced once after it.

Letters: B batch rows, X predicted positions per row (T for GPT, P for BERT), C chunks, K
positions per chunk, D model width, V vocabulary rows, v this device's slice of them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sslm_jax.models.layers import PADDING_LOGIT, logical_spec


class Sums(NamedTuple):
  # sum(weights * nll), plus z_loss * z_sum when z_loss > 0; the only output with a gradient
  loss_sum: jax.Array
  correct_sum: jax.Array  # sum(weights * (argmax == target))
  nll_BX: jax.Array  # per-token negative log-likelihood, float32
  z_sum: jax.Array  # sum(weights * logsumexp(logits)^2) when z_loss > 0, else 0


def chunk_length(num_positions: int, chunk_len: int) -> int:
  """Positions per chunk: all of them for chunk_len 0 or >= num_positions, else the largest
  divisor of num_positions that is <= chunk_len (chunks must tile the axis exactly)."""
  if chunk_len <= 0 or chunk_len >= num_positions:
    return num_positions
  return max(k for k in range(1, chunk_len + 1) if num_positions % k == 0)


@dataclasses.dataclass(frozen=True)
class _Axes:
  """Mesh axes (of size > 1) the rules give the batch, the vocabulary and the embedding width."""

  batch: tuple[str, ...] = ()
  vocab: tuple[str, ...] = ()
  embed: tuple[str, ...] = ()
  sizes: tuple[tuple[str, int], ...] = ()

  def size(self, names: tuple[str, ...]) -> int:
    return math.prod(dict(self.sizes)[a] for a in names)

  def spec(self, *dims: tuple[str, ...]) -> PartitionSpec:
    return PartitionSpec(*(d or None for d in dims))


def _mesh_axes(num_rows: int) -> _Axes | None:
  """The axes under the rules in scope; None outside a mesh or when every axis has size 1."""
  batch_spec, vocab_embed_spec = logical_spec(("act_batch",)), logical_spec(("vocab", "embed"))
  if batch_spec is None:
    return None
  sizes = dict(jax.sharding.get_abstract_mesh().shape)

  def axes(entry) -> tuple[str, ...]:
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(a for a in names if sizes[a] > 1)

  batch, (vocab, embed) = axes(batch_spec[0]), map(axes, vocab_embed_spec)
  if num_rows % math.prod(sizes[a] for a in batch):
    batch = ()  # rows that do not split evenly (a small microbatch) run whole on every device
  # Every vocabulary shard must see the same tokens: an axis that splits both (a mesh.rules
  # override) keeps the batch, and the embedding is gathered over it before the loop instead.
  vocab = tuple(a for a in vocab if a not in batch)
  if not (batch or vocab or embed):
    return None
  return _Axes(batch, vocab, embed, tuple(sorted(sizes.items())))


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x


def _pmax(x, axes):
  return jax.lax.pmax(x, axes) if axes else x


def _pmin(x, axes):
  return jax.lax.pmin(x, axes) if axes else x


def _vocab_offset(axes: _Axes, rows: int):
  """The global id of this device's first vocabulary row."""
  index = 0
  for a in axes.vocab:  # major to minor, as a tuple of mesh axes splits a dimension
    index = index * axes.size((a,)) + jax.lax.axis_index(a)
  return index * rows


def _embedding_grad_to_shards(g_vD, axes: _Axes):
  """This device's [v, D] gradient (its tokens only) -> the sum over all tokens, in the
  embedding's own [v, D / embed shards] layout: one reduce-scatter over the embed axes that also
  split the batch, a slice for those that do not, and one all-reduce over the other batch axes."""
  if axes.embed:
    v, d = g_vD.shape
    g = g_vD.reshape(v, *(axes.size((a,)) for a in axes.embed), d // axes.size(axes.embed))
    for a in axes.embed:  # each step removes dimension 1, the block index along axis a
      if a in axes.batch:
        g = jax.lax.psum_scatter(g, a, scatter_dimension=1)
      else:  # tokens are the same on every device of this axis: nothing to sum
        g = jax.lax.dynamic_index_in_dim(g, jax.lax.axis_index(a), axis=1, keepdims=False)
    g_vD = g
  return _psum(g_vD, tuple(a for a in axes.batch if a not in axes.embed))


def _chunk_stats(x_BKD, emb_vD, bias_v, ids_v, targets_BK, num_ids, dtype, vocab_axes):
  """One chunk's float32 logits [B, K, v] and the per-token statistics over the whole vocab."""
  logits_BKv = jnp.einsum(
    "BKD,vD->BKv", x_BKD.astype(dtype), emb_vD, preferred_element_type=jnp.float32
  )
  # Stored in the compute dtype (bf16 on accelerators: half the bytes of the largest tensor of
  # the step, read three times), accumulated and reduced in float32.
  logits_BKv = logits_BKv.astype(dtype).astype(jnp.float32)
  if bias_v is not None:
    logits_BKv = logits_BKv + bias_v.astype(jnp.float32)
  logits_BKv = jnp.where(ids_v < num_ids, logits_BKv, PADDING_LOGIT)
  local_max_BK = jnp.max(logits_BKv, axis=-1)
  max_BK = _pmax(local_max_BK, vocab_axes)
  sum_exp_BK = _psum(jnp.sum(jnp.exp(logits_BKv - max_BK[..., None]), axis=-1), vocab_axes)
  lse_BK = max_BK + jnp.log(sum_exp_BK)
  is_target_BKv = ids_v == targets_BK[..., None]
  target_logit_BK = _psum(jnp.sum(jnp.where(is_target_BKv, logits_BKv, 0.0), -1), vocab_axes)
  # argmax's first-index rule across shards: the smallest id among the shards holding the max.
  local_arg_BK = ids_v[0] + jnp.argmax(logits_BKv, axis=-1).astype(ids_v.dtype)
  no_max = jnp.iinfo(ids_v.dtype).max
  argmax_BK = _pmin(jnp.where(local_max_BK == max_BK, local_arg_BK, no_max), vocab_axes)
  return logits_BKv, lse_BK, is_target_BKv, lse_BK - target_logit_BK, argmax_BK


def _local(
  x_BXD, emb_vD, bias_v, targets_BX, weights_BX, *, axes, num_ids, dtype, k, z_loss, grads
):
  """The loss on this device's tokens and vocabulary rows; with `grads`, also d loss_sum / d x,
  embedding, bias (the softmax minus the one-hot target, times the weight; with z_loss, plus
  the z-loss's 2 z lse softmax)."""
  emb_vD = emb_vD.astype(dtype)  # cast before the gather: half the bytes in bfloat16
  if axes.embed:
    emb_vD = jax.lax.all_gather(emb_vD, axes.embed, axis=1, tiled=True)
  v, d = emb_vD.shape
  ids_v = _vocab_offset(axes, v) + jnp.arange(v, dtype=jnp.int32)
  b, n = targets_BX.shape

  def chunks(a):  # [B, X, ...] -> [C, B, K, ...]
    return jnp.swapaxes(a.reshape(b, n // k, k, *a.shape[2:]), 0, 1)

  def unchunk(a):
    return jnp.swapaxes(a, 0, 1).reshape(b, n, *a.shape[3:])

  def body(carry, xs):
    x_BKD, targets_BK, w_BK = xs
    logits_BKv, lse_BK, is_target_BKv, nll_BK, argmax_BK = _chunk_stats(
      x_BKD, emb_vD, bias_v, ids_v, targets_BK, num_ids, dtype, axes.vocab
    )
    loss, correct, z = carry[:3]
    loss += jnp.sum(w_BK * nll_BK)
    correct += jnp.sum(w_BK * (argmax_BK == targets_BK))
    if z_loss:
      z += jnp.sum(w_BK * jnp.square(lse_BK))
    if not grads:
      return (loss, correct, z), nll_BK
    p_BKv = jnp.exp(logits_BKv - lse_BK[..., None])
    if z_loss:  # d (z lse^2) / d logits = 2 z lse softmax
      p_BKv = p_BKv * (1.0 + 2.0 * z_loss * lse_BK)[..., None]
    g_BKv = (p_BKv - is_target_BKv) * w_BK[..., None]
    g_low_BKv = g_BKv.astype(dtype)
    dx_BKD = jnp.einsum("BKv,vD->BKD", g_low_BKv, emb_vD, preferred_element_type=jnp.float32)
    d_emb_vD = carry[3] + jnp.einsum(
      "BKv,BKD->vD", g_low_BKv, x_BKD.astype(dtype), preferred_element_type=jnp.float32
    )
    d_bias_v = carry[4] + jnp.sum(g_BKv, axis=(0, 1))
    return (loss, correct, z, d_emb_vD, d_bias_v), (nll_BK, dx_BKD)

  zero = jnp.zeros((), jnp.float32)
  carry = (zero, zero, zero)
  if grads:
    carry += (jnp.zeros((v, d), jnp.float32), jnp.zeros((v,), jnp.float32))
  xs = (chunks(x_BXD), chunks(targets_BX), chunks(weights_BX.astype(jnp.float32)))
  carry, ys = jax.lax.scan(body, carry, xs)
  nll_BX = unchunk(ys[0] if grads else ys)
  loss, correct = _psum(carry[0], axes.batch), _psum(carry[1], axes.batch)
  z = _psum(carry[2], axes.batch) if z_loss else carry[2]
  sums = Sums(loss + z_loss * z if z_loss else loss, correct, nll_BX, z)
  if not grads:
    return sums
  # Each vocabulary shard holds part of every token's d x: summed once, after the loop.
  dx_BXD = _psum(unchunk(ys[1]), axes.vocab).astype(x_BXD.dtype)
  d_bias_v = _psum(carry[4], axes.batch) if bias_v is not None else None
  return sums, (dx_BXD, _embedding_grad_to_shards(carry[3], axes), d_bias_v)


def _runner(axes: _Axes | None, has_bias: bool, grads: bool, **static):
  """_local as a function of the global arrays: direct without a mesh, else in shard_map."""
  local = lambda *args: _local(*args, axes=axes or _Axes(), grads=grads, **static)
  if axes is None:
    return local
  rows, vocab = axes.spec(axes.batch, ()), axes.spec(axes.vocab)
  emb = axes.spec(axes.vocab, axes.embed)
  bias = vocab if has_bias else None
  sums = Sums(PartitionSpec(), PartitionSpec(), rows, PartitionSpec())
  out = (sums, (axes.spec(axes.batch, (), ()), emb, bias)) if grads else sums
  # check_vma off: the scan's zero carries would need pvary, and every out spec is stated here.
  return jax.shard_map(
    local,
    in_specs=(axes.spec(axes.batch, (), ()), emb, bias, rows, rows),
    out_specs=out,
    check_vma=False,
  )


def cross_entropy_sums(
  x_BXD, embedding_VD, bias_V, targets_BX, weights_BX, *, num_ids, dtype, chunk_len, z_loss=0.0
) -> Sums:
  """Weighted softmax cross-entropy of `targets_BX` under logits x @ embedding.T (+ bias).

  x_BXD: hidden states in the compute dtype; embedding_VD: the tied embedding (param dtype);
  bias_V: the decoder bias or None. Rows of the embedding at or past `num_ids` are vocabulary
  padding and take no part in the softmax (or the argmax). Logits are float32 (a `dtype` matmul
  accumulated in float32), made `chunk_length(X, chunk_len)` positions at a time.

  With `z_loss` > 0, loss_sum adds PaLM's auxiliary z-loss, z_loss * sum(weights * lse^2) with
  lse the logsumexp of each token's logits, which keeps the softmax normaliser near 1 (log 0);
  z_sum is that sum of squares. Only loss_sum carries a gradient (to x, embedding and bias);
  correct_sum, nll_BX and z_sum are stop_gradient'ed. The gradient pieces are made in the
  forward pass, chunk by chunk, so the backward pass only scales them by the cotangent: no
  logits are recomputed.
  """
  b, n = targets_BX.shape
  k = chunk_length(n, chunk_len)
  static = dict(num_ids=num_ids, dtype=jnp.dtype(dtype), k=k, z_loss=float(z_loss))
  axes, has_bias = _mesh_axes(b), bias_V is not None

  @jax.custom_vjp
  def loss(x, emb, bias, targets, weights):
    return _runner(axes, has_bias, False, **static)(x, emb, bias, targets, weights)

  def fwd(x, emb, bias, targets, weights):
    return _runner(axes, has_bias, True, **static)(x, emb, bias, targets, weights)

  def bwd(residuals, cotangents):
    g = cotangents[0]  # only loss_sum's: the other outputs are stop_gradient'ed below
    dx, d_emb, d_bias = residuals
    d_bias = None if d_bias is None else (g * d_bias).astype(bias_V.dtype)
    return (g * dx).astype(x_BXD.dtype), (g * d_emb).astype(embedding_VD.dtype), d_bias, None, None

  loss.defvjp(fwd, bwd)
  sums = loss(x_BXD, embedding_VD, bias_V, targets_BX, weights_BX)
  return Sums(sums.loss_sum, *jax.lax.stop_gradient(tuple(sums[1:])))
