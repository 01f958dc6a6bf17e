"""Packed documents reach cuDNN flash attention as lengths and offsets, never as a [T, S] mask.

The fused kernel itself needs a Hopper GPU: `test_fused_equals_xla_on_gpu` runs there
(JAX_PLATFORMS=cuda python -m pytest tests/test_attention.py). Everywhere, the kernel is
replaced by a reference that reads its documented arguments, so the conversion from segment
ids and the wiring through both models are checked on CPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import synthetic_batch, tiny_config
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.data import batches, pipeline
from sslm_jax.models import attention
from sslm_jax.models import transformer as model_lib

LAYOUTS = {
  "one document": [[1] * 12],
  "several": [[1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 4, 4]],
  "one-token documents": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]],
  "padded tail": [[1, 1, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0]],
  "rows differ": [[1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2], [1, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 0]],
}


def _mask_from_packing(lengths_BM, offsets_BM1, t):
  """[B, T, S] from the kernel's arguments: i and j attend iff one segment spans both."""
  lengths_BM, offsets_BM1 = np.asarray(lengths_BM), np.asarray(offsets_BM1)
  mask = np.zeros((lengths_BM.shape[0], t, t), bool)
  for b, (lengths, offsets) in enumerate(zip(lengths_BM, offsets_BM1[:, :-1], strict=True)):
    for length, start in zip(lengths, offsets, strict=True):
      assert (length < 0) == (start < 0), "a slot is used in both arrays or in neither"
      if length > 0:
        mask[b, start : start + length, start : start + length] = True
  return mask


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_packing_spans_exactly_the_segment_mask(layout):
  segment_ids_BT = jnp.asarray(LAYOUTS[layout], jnp.int32)
  b, t = segment_ids_BT.shape
  packed = attention.packing(segment_ids_BT, max_segments=t)
  assert packed.lengths_BM.shape == (b, t) and packed.offsets_BM1.shape == (b, t + 1)
  assert np.all(np.asarray(packed.offsets_BM1)[:, -1] == -1)
  expected = np.asarray(attention.segment_mask(segment_ids_BT))[:, 0]
  np.testing.assert_array_equal(_mask_from_packing(*packed, t), expected)
  # Used slots come first, in order, then -1.
  lengths = np.asarray(packed.lengths_BM)
  for row in lengths:
    used = row > 0
    assert not np.any(used[1:] & ~used[:-1])


def _reference_kernel(calls):
  """Stands in for cuDNN's fused attention: the same arguments, computed densely."""

  def kernel(query, key, value, bias=None, mask=None, *, scale, mask_type, qkv_layout, **kw):
    q_seqlen, kv_seqlen = kw.pop("q_seqlen"), kw.pop("kv_seqlen")
    q_offsets, kv_offsets = kw.pop("q_offsets"), kw.pop("kv_offsets")
    unused = kw
    from jax._src.cudnn.fused_attention_stablehlo import MaskType

    assert bias is None and mask is None and qkv_layout == "BTNH" and not unused
    np.testing.assert_array_equal(q_seqlen, kv_seqlen)
    np.testing.assert_array_equal(q_offsets, kv_offsets)
    calls.append(mask_type)
    t = query.shape[1]
    allowed_BTS = _mask_from_packing(q_seqlen, q_offsets, t)
    if mask_type == MaskType.PADDING_CAUSAL:
      allowed_BTS &= np.tril(np.ones((t, t), bool))
    else:
      assert mask_type == MaskType.PADDING
    scores_BNTS = jnp.einsum("BTNH,BSNH->BNTS", query, key) * scale
    scores_BNTS = jnp.where(allowed_BTS[:, None], scores_BNTS, -jnp.inf)
    probs_BNTS = jnp.nan_to_num(jax.nn.softmax(scores_BNTS, axis=-1))
    return jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS, value)

  return kernel


def test_models_feed_packing_to_the_fused_kernel(objective, monkeypatch):
  """GPT and BERT with the cuDNN path (kernel stood in for) equal the XLA path on packed rows."""
  from jax._src.cudnn import fused_attention_stablehlo

  calls = []
  monkeypatch.setattr(fused_attention_stablehlo, "dot_product_attention", _reference_kernel(calls))
  config = tiny_config(objective)
  batch = synthetic_batch(config, num_segments=3)
  xla_cfg = config_lib.model_config(config)
  fused_cfg = dataclasses.replace(xla_cfg, attention_impl="cudnn", max_segments=3)
  xla_model = model_lib.build(xla_cfg, seed=0)
  fused_model = model_lib.build(fused_cfg, seed=0)
  nnx.update(fused_model, nnx.state(xla_model))
  args = [batch["inputs"], batch["positions"], batch["segment_ids"]]
  if objective == "masked_lm":
    args.append(batch["masked_positions"])
  want, got = xla_model(*args), fused_model(*args)
  from jax._src.cudnn.fused_attention_stablehlo import MaskType

  causal = MaskType.PADDING_CAUSAL if objective == "causal_lm" else MaskType.PADDING
  assert calls and set(calls) == {causal}  # traced once per scan of the layers
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # The packing matters: one segment per row gives other logits.
  one_segment = [args[0], args[1], np.ones_like(batch["segment_ids"]), *args[3:]]
  assert not np.allclose(np.asarray(fused_model(*one_segment)), np.asarray(want), atol=1e-3)


def _data(objective, train_rows, eval_rows):
  config = tiny_config(objective)
  config.model.attention_impl = "cudnn"
  config.data.seq_len = train_rows.shape[1] - (objective == "causal_lm")
  return config, batches.Data(
    tokenizer=None,
    num_train_rows=len(train_rows),
    num_eval_rows=len(eval_rows),
    config=config,
    train_rows=train_rows,
    eval_rows=eval_rows,
    samples=[],
  )


def test_packing_bound_is_measured_on_the_data():
  bos = batches.tokenizer_lib.BOS_ID
  # Row 0: a cut document, then two more (3); eval row: four documents; the trailing BOS of a
  # causal row is a target, not an input, and does not count.
  train = np.array([[9, 9, bos, 9, bos, 9, bos], [bos, 9, 9, 9, 9, 9, 9]], np.int32)
  evals = np.array([[bos, 9, bos, bos, 9, bos, 9]], np.int32)
  config, data = _data("causal_lm", train, evals)
  assert data.max_segments_per_row(chunk=1) == 4
  pipeline.size_packing(config, data)
  assert config.model.max_segments_per_row == 4
  assert config_lib.model_config(config).max_segments == 4
  config.model.max_segments_per_row = 3
  with pytest.raises(pipeline.DataError, match="max_segments_per_row=3.*hold 4 documents"):
    pipeline.size_packing(config, data)


def _gpu_reason():
  if jax.default_backend() != "gpu":
    return f"needs a GPU (backend here: {jax.default_backend()}; run with JAX_PLATFORMS=cuda)"
  if config_lib.gpu_capability() < (9, 0):
    return "cuDNN's packed layout needs compute capability 9.0 or later"
  return None


@pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))
@pytest.mark.parametrize("causal", [True, False])
def test_fused_equals_xla_on_gpu(causal):
  """The real kernel, forward and gradients, against XLA's attention with the dense mask."""
  rng = np.random.default_rng(0)
  b, t, n, h = 4, 256, 4, 64
  segment_ids_BT = np.repeat(np.array([[1] * 100 + [2] * 60 + [3] * 96]), b, axis=0)
  segment_ids_BT[1] = np.repeat(np.arange(1, 9), 32)
  segment_ids_BT[2, 200:] = 0  # padding
  qkv = [jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.bfloat16) for _ in range(3)]
  out_w = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
  real_BT1 = jnp.asarray(segment_ids_BT > 0)[:, :, None, None]

  def loss(fn, *qkv):
    return jnp.sum(jnp.where(real_BT1, fn(*qkv).astype(jnp.float32) * out_w, 0.0))

  def xla(q, k, v):
    mask = attention.segment_mask(jnp.asarray(segment_ids_BT))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")

  def fused(q, k, v):
    packed = attention.packing(jnp.asarray(segment_ids_BT), max_segments=8)
    return attention.fused_packed_attention(q, k, v, packed, causal=causal)

  want = jax.jit(jax.value_and_grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2)))(*qkv)
  got = jax.jit(jax.value_and_grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2)))(*qkv)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=2e-2, atol=2e-2 * np.abs(w).max())
