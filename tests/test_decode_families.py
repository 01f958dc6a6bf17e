"""KV-cache generation of the llama family: the cache matches the full forward pass, and holds the
key/value heads of grouped-query attention only."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.inference import decode, decoder
from sslm_jax.models import transformer as model_lib
from sslm_jax.models.config import ModelConfig
from sslm_jax.training import sharding


def _cfg(kv_heads=2, qk_norm=False, tie=True, scan_layers=True) -> ModelConfig:
  config = tiny_config("causal_lm")
  config.data.seq_len = 64
  config.model.family = "llama"
  config.model.num_kv_heads = kv_heads  # of tiny_config's 4 query heads
  config.model.qk_norm = qk_norm
  config.model.tie_embeddings = tie
  config.model.mlp_dim = 96
  config_lib.validate(config)
  # Larger weights than the init: greedy continuations then vary instead of repeating.
  return dataclasses.replace(config_lib.model_config(config), scan_layers=scan_layers, init_std=0.3)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, ids_BT, positions_BT, segments_BT):
  return nnx.merge(graphdef, params)(ids_BT, positions_BT, segments_BT)


def _full_logits(model, ids, window: int | None = None):
  """Logits [T, V] of the full forward pass over `ids`, zero-padded to `window`."""
  ids_1T = np.zeros((1, window or len(ids)), np.int32)
  ids_1T[0, : len(ids)] = ids
  positions_1T = np.arange(ids_1T.shape[1])[None]
  return _forward(*nnx.split(model), ids_1T, positions_1T, np.ones_like(ids_1T))[0, : len(ids)]


def _cached_logits(model, ids_BT, start_B, prompt_len: int):
  """(logits [B, T, V], cache) of a prefill of ids_BT[:, :prompt_len] (row b left-padded up to
  start_B[b]), then one decode step per further token."""
  weights = decoder.to_decode_layout(model).weights
  return _cached(model.cfg, weights, ids_BT, np.asarray(start_B, np.int32), prompt_len)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _cached(cfg, weights, ids_BT, start_B, prompt_len: int, cache_len: int = 32):
  positions_BT = jnp.maximum(jnp.arange(ids_BT.shape[1]) - start_B[:, None], 0)
  decoding = decoder.DecodeModel(cfg, weights)
  cache = decoder.init_cache(decoding, len(ids_BT), cache_len, start_B)
  x_BTD, cache = decoder.extend(
    decoding, ids_BT[:, :prompt_len], positions_BT[:, :prompt_len], cache, 0
  )
  steps = [decoder.logits(decoding, x_BTD)]
  for t in range(prompt_len, ids_BT.shape[1]):
    x_BTD, cache = decoder.extend(
      decoding, ids_BT[:, t : t + 1], positions_BT[:, t : t + 1], cache, t
    )
    steps.append(decoder.logits(decoding, x_BTD))
  return jnp.concatenate(steps, axis=1), cache


@pytest.mark.parametrize(
  "kv_heads, qk_norm, tie, scan_layers", [(2, False, True, True), (1, True, False, False)]
)
def test_cached_decoding_matches_the_full_forward_pass(kv_heads, qk_norm, tie, scan_layers):
  model = model_lib.build(_cfg(kv_heads, qk_norm, tie, scan_layers), seed=0)
  ids = np.random.default_rng(0).integers(7, 256, (2, 12)).astype(np.int32)
  pad = 3  # row 1 is left-padded: its real tokens are ids[1, pad:]
  ids[1, :pad] = 0
  start_B = np.asarray([0, pad], np.int32)
  got_BTV, _ = _cached_logits(model, ids, start_B, prompt_len=8)
  want = [_full_logits(model, ids[0]), _full_logits(model, ids[1, pad:], window=12)]
  scale = float(jnp.abs(want[0]).max())
  assert scale > 1.0  # logits far from 0, so the tolerance below is a tight one
  assert float(jnp.abs(got_BTV[0] - want[0]).max()) < 1e-5 * scale
  assert float(jnp.abs(got_BTV[1, pad:] - want[1]).max()) < 1e-5 * scale
  # The two rows really differ, so row 1's match is not a copy of row 0's.
  assert float(jnp.abs(got_BTV[1, pad:] - got_BTV[0, pad:]).max()) > 1e-3
  # One row alone keeps its cache without the B axis: the same logits.
  alone_1TV, _ = _cached_logits(model, ids[1:], start_B[1:], prompt_len=8)
  assert float(jnp.abs(alone_1TV[0] - got_BTV[1]).max()) < 1e-5 * scale


def test_the_cache_holds_the_key_value_heads_only():
  gqa, mha = _cfg(kv_heads=2), _cfg(kv_heads=4)
  ids = np.random.default_rng(1).integers(7, 256, (2, 10)).astype(np.int32)
  caches = {}
  for cfg in (gqa, mha):
    _, caches[cfg.kv_heads] = _cached_logits(
      model_lib.build(cfg, seed=0), ids, np.zeros(2, np.int32), prompt_len=8
    )
  layers, h, slots = gqa.num_layers, gqa.head_dim, 32
  assert caches[2].keys.shape == (layers, 2, 2, h, slots)  # [L, B, K, H, S]
  assert caches[2].values.shape == (layers, 2, 2, slots, h)  # [L, B, K, S, H]
  assert caches[4].keys.shape == (layers, 2, 4, h, slots)
  cache_bytes = {k: c.keys.nbytes + c.values.nbytes for k, c in caches.items()}
  assert cache_bytes[4] == 2 * cache_bytes[2]  # N / K = 4 / 2
  # The fused projection reads N query heads and K key and value heads, nothing repeated.
  layer = decoder.to_decode_layout(model_lib.build(gqa, seed=0)).weights.layers
  assert layer.qkv_ED.shape == (layers, (gqa.num_heads + 2 * 2) * h, gqa.emb_dim)


def _naive_greedy(model, prompt, n):
  """Greedy decoding that re-runs the whole sequence for every new token (no cache)."""
  ids = list(prompt)
  for _ in range(n):
    ids.append(int(jnp.argmax(_full_logits(model, ids, window=len(prompt) + n)[-1])))
  return ids[len(prompt) :]


def test_greedy_generation_equals_greedy_without_a_cache():
  model = model_lib.build(_cfg(qk_norm=True, tie=False), seed=0)
  prompts = [[2, 17, 99, 45, 200], [2, 9], [2, 30, 31, 32, 33, 34, 35]]
  got = decode.generate(model, prompts, max_new_tokens=10, temperature=0, eos_id=-1)
  assert got[0] == _naive_greedy(model, prompts[0], 10)
  assert len(set(got[0])) > 1  # not a constant run that any bug could produce
  # The left-padded batch gives each prompt what it gets alone.
  alone = [decode.generate(model, [p], max_new_tokens=10, temperature=0, eos_id=-1)[0]
           for p in prompts]  # fmt: skip
  assert got == alone and len({tuple(r) for r in got}) == 3


def test_tensor_parallel_decode_equals_single_device():
  model = model_lib.build(_cfg(kv_heads=2, qk_norm=True, tie=False), seed=0)
  prompts = [[2, 5, 6, 7, 8], [2, 9]]
  kwargs = dict(max_new_tokens=8, eos_id=-1, seed=1, num_samples=2, top_p=0.9)
  single = decode.generate(model, prompts, **kwargs)
  mesh = jax.make_mesh((2, 1, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=jax.devices()[:4])  # fmt: skip
  rules = sharding.DEFAULT_RULES
  graphdef, params = nnx.split(model)
  shardings = sharding.specs_to_shardings(sharding.param_specs(params, rules), mesh)
  sharded = nnx.merge(graphdef, jax.device_put(params, shardings))
  kernel = sharded.stack.blocks.attention.key.kernel[...]
  assert kernel.sharding.shard_shape(kernel.shape)[2] == 1  # each device: one key/value head
  with sharding.activate(mesh, rules):
    assert decode.generate(sharded, prompts, **kwargs) == single


def test_an_encoder_is_refused():
  config = tiny_config("masked_lm")
  config.model.family = "modernbert"
  model = model_lib.build(config_lib.model_config(config), seed=0)
  with pytest.raises(ValueError, match="causal_lm model .gpt2 or llama., not a modernbert"):
    decoder.to_decode_layout(model)
