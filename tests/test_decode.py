"""KV-cache generation: the cache matches the full forward pass; generate() keeps its word."""

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

EOS = 3


def _cfg(scan_layers: bool = True, seq_len: int = 64) -> ModelConfig:
  config = tiny_config("causal_lm")
  config.data.seq_len = seq_len
  # Larger weights than GPT-2's init: greedy continuations then vary instead of repeating.
  return dataclasses.replace(config_lib.model_config(config), scan_layers=scan_layers, init_std=0.3)


@pytest.fixture(scope="module")
def gpt():
  return model_lib.build(_cfg(), seed=0)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, ids_1T):
  t = ids_1T.shape[1]
  model = nnx.merge(graphdef, params)
  return model(ids_1T, jnp.arange(t)[None], jnp.ones_like(ids_1T))[0]


def _full_logits(model, ids, window: int | None = None):
  """Logits [T, V] of the full forward pass over `ids`, zero-padded to `window` (causal: the
  padding after them changes nothing)."""
  ids_1T = np.zeros((1, window or len(ids)), np.int32)
  ids_1T[0, : len(ids)] = ids
  return _forward(*nnx.split(model), ids_1T)[: len(ids)]


def _naive_greedy(model, prompt, n):
  """Greedy decoding that re-runs the whole sequence for every new token (no cache)."""
  ids = list(prompt)
  for _ in range(n):
    logits_V = _full_logits(model, ids, window=len(prompt) + n)[-1]
    ids.append(int(jnp.argmax(logits_V)))
  return ids[len(prompt) :]


def _favour(model, favourite_ids):
  """Make `favourite_ids` the model's clear favourites at every position."""
  model.final_norm.scale[...] = jnp.zeros_like(model.final_norm.scale[...])
  b_D = np.asarray(model.final_norm.bias[...]) + 1.0
  model.final_norm.bias[...] = b_D
  emb_VD = np.array(model.token_embed.embedding[...])
  emb_VD[list(favourite_ids)] = 100.0 * b_D / (b_D @ b_D)
  model.token_embed.embedding[...] = emb_VD


@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_decoding_matches_the_full_forward_pass(scan_layers):
  model = model_lib.build(_cfg(scan_layers), seed=0)
  ids = np.random.default_rng(0).integers(7, 256, (2, 12)).astype(np.int32)
  pad = 3  # row 1 is left-padded: its real tokens are ids[1, pad:]
  prompt_BT = ids[:, :8].copy()
  prompt_BT[1, :pad] = 0
  start_B = np.asarray([0, pad], np.int32)
  positions_BT = np.maximum(np.arange(8) - start_B[:, None], 0)
  want = [_full_logits(model, ids[0]), _full_logits(model, ids[1, pad:])]

  @functools.partial(jax.jit, static_argnums=1)
  def run(weights, rows: tuple[int, ...]):
    rows = list(rows)
    decoding = decoder.DecodeModel(model.cfg, weights)
    cache = decoder.init_cache(decoding, len(rows), 32, start_B[rows])
    x_BTD, cache = decoder.extend(decoding, prompt_BT[rows], positions_BT[rows], cache, 0)
    steps = [decoder.logits(decoding, x_BTD)]
    for t in range(8, 12):
      x_BTD, cache = decoder.extend(
        decoding, ids[rows, t : t + 1], t - start_B[rows, None], cache, t
      )  # fmt: skip
      steps.append(decoder.logits(decoding, x_BTD))
    return jnp.concatenate(steps, axis=1)

  weights = decoder.to_decode_layout(model).weights
  got_BTV = run(weights, (0, 1))
  assert float(jnp.abs(got_BTV[0] - want[0]).max()) < 1e-5
  assert float(jnp.abs(got_BTV[1, pad:] - want[1]).max()) < 1e-5
  # The two rows really differ, so row 1's match is not a copy of row 0's.
  assert float(jnp.abs(got_BTV[1, pad:] - got_BTV[0, pad:]).max()) > 1e-3
  # A single row keeps its cache without the B axis: the same logits.
  for row in (0, 1):
    assert float(jnp.abs(run(weights, (row,))[0] - got_BTV[row]).max()) < 1e-5


@pytest.mark.parametrize("scan_layers", [True, False])
def test_greedy_with_cache_equals_greedy_without(scan_layers):
  model = model_lib.build(_cfg(scan_layers), seed=0)
  prompt = [2, 17, 99, 45, 200]
  (got,) = decode.generate(model, [prompt], max_new_tokens=12, temperature=0, eos_id=-1)
  assert got == _naive_greedy(model, prompt, 12)
  assert len(set(got)) > 1  # not a constant run that any bug could produce


def test_a_model_in_decode_layout_generates_what_the_model_does(gpt):
  prompts = [[2, 9, 10], [2, 30, 31, 32]]
  kwargs = dict(max_new_tokens=8, eos_id=-1, seed=3, num_samples=2)
  decoding = decoder.to_decode_layout(gpt)
  assert decode.generate(decoding, prompts, **kwargs) == decode.generate(gpt, prompts, **kwargs)


def test_left_padded_batch_equals_each_prompt_alone(gpt):
  prompts = [[2, 9, 10], [2, 30, 31, 32, 33, 34, 35], [2] + list(range(40, 51))]
  batch = decode.generate(gpt, prompts, max_new_tokens=8, temperature=0, eos_id=-1)
  alone = [
    decode.generate(gpt, [p], max_new_tokens=8, temperature=0, eos_id=-1)[0] for p in prompts
  ]
  assert batch == alone
  assert len({tuple(r) for r in batch}) == 3
  # Samples of each prompt come prompt-major; greedy samples are all the same.
  twice = decode.generate(gpt, prompts, max_new_tokens=8, temperature=0, eos_id=-1, num_samples=2)
  assert twice == [r for r in batch for _ in range(2)]


def test_top_k_1_equals_greedy(gpt):
  prompts = [[2, 5, 6, 7], [2, 8]]
  greedy = decode.generate(gpt, prompts, max_new_tokens=10, temperature=0, eos_id=-1)
  top1 = decode.generate(gpt, prompts, max_new_tokens=10, temperature=1.0, top_k=1, eos_id=-1)
  assert top1 == greedy
  sampled = decode.generate(gpt, prompts, max_new_tokens=10, temperature=1.0, eos_id=-1)
  assert sampled != greedy


def test_generation_compiles_once_per_bucket(gpt):
  greedy = dict(temperature=0, eos_id=-1)
  # 9 and 12 rows share the rows bucket of 16 (no other test uses it), prompts 5 and 7 long the
  # bucket of 8, and 8 + 10 and 8 + 20 the cache bucket of 32.
  before = decode.cache_size()
  a = decode.generate(gpt, [[2, 4, 5, 6, 7]] * 9, max_new_tokens=10, **greedy)
  b = decode.generate(gpt, [[2, 9, 8, 7, 6, 5, 4]] * 12, max_new_tokens=20, **greedy)
  assert decode.cache_size() == before + 1
  assert [len(r) for r in a] == [10] * 9 and [len(r) for r in b] == [20] * 12
  # A new cache bucket does compile.
  decode.generate(gpt, [[2, 4, 5, 6, 7]] * 9, max_new_tokens=40, **greedy)
  assert decode.cache_size() == before + 2
  # 3 prompts (or 3 prompts x 1 sample) and 4 prompts: one compile.
  decode.generate(gpt, [[2, 5]] * 3, max_new_tokens=6, seed=1, eos_id=-1)
  after_three = decode.cache_size()
  decode.generate(gpt, [[2, 5]] * 4, max_new_tokens=6, seed=1, eos_id=-1)
  decode.generate(gpt, [[2, 5]] * 2, max_new_tokens=6, seed=1, eos_id=-1, num_samples=2)
  assert decode.cache_size() == after_three


def test_padding_rows_leave_the_real_rows_samples_unchanged(gpt):
  prompts = [[2, 5, 6], [2, 9], [2, 30, 31, 32]]
  kwargs = dict(max_new_tokens=12, seed=4, eos_id=-1, top_p=0.95)
  three = decode.generate(gpt, prompts, **kwargs)  # padded to 4 rows
  four = decode.generate(gpt, prompts + [[2, 7, 7]], **kwargs)  # no padding
  five = decode.generate(gpt, prompts + [[2, 7, 7], [2, 8]], **kwargs)  # padded to 8 rows
  assert three == four[:3] == five[:3]
  assert len(three) == 3 and len({tuple(r) for r in three}) == 3


def test_same_seed_same_output_other_seed_differs(gpt):
  def draw(seed):
    return decode.generate(gpt, [[2, 5, 6]], max_new_tokens=16, seed=seed, num_samples=3, eos_id=-1)

  first = draw(0)
  assert draw(0) == first
  assert draw(1) != first
  assert len({tuple(r) for r in first}) == 3  # each sample of a prompt draws its own tokens


def test_banned_ids_are_never_produced():
  model = model_lib.build(_cfg(), seed=0)
  banned = (7, 8, 9)
  _favour(model, banned)
  free = decode.generate(model, [[2, 11, 12]], max_new_tokens=8, eos_id=-1, num_samples=2)
  assert all(t in banned for row in free for t in row)  # the bias works ...
  kept = decode.generate(
    model, [[2, 11, 12]], max_new_tokens=8, eos_id=-1, num_samples=2, banned_ids=banned
  )
  assert all(len(row) == 8 and not set(row) & set(banned) for row in kept)  # ... and is undone
  greedy = decode.generate(model, [[2, 11]], max_new_tokens=8, temperature=0, eos_id=-1,
                           banned_ids=banned)  # fmt: skip
  assert not set(greedy[0]) & set(banned)


def test_generation_stops_at_eos():
  model = model_lib.build(_cfg(), seed=0)
  _favour(model, [EOS])
  assert decode.generate(model, [[2, 5], [2, 6, 7]], max_new_tokens=8, eos_id=EOS) == [[EOS]] * 2
  # Without EOS stopping, the same model keeps producing its favourite.
  assert decode.generate(model, [[2, 5]], max_new_tokens=8, eos_id=-1) == [[EOS] * 8]


def test_prompt_too_long_raises_and_rows_stop_at_max_len(gpt):
  max_len = gpt.cfg.max_len
  with pytest.raises(ValueError, match="leaves no room for a new token"):
    decode.generate(gpt, [[2] * 5, [2] * max_len], max_new_tokens=4, eos_id=-1)
  # One slot left: one token, even when more were asked for; a shorter row gets them all.
  out = decode.generate(gpt, [[2] * (max_len - 1), [2] * 5], max_new_tokens=4, eos_id=-1)
  assert [len(r) for r in out] == [1, 4]


def test_tensor_parallel_decode_equals_single_device(gpt):
  prompts = [[2, 5, 6, 7, 8], [2, 9]]
  kwargs = dict(max_new_tokens=10, eos_id=-1, seed=1, num_samples=2, top_p=0.9)
  single = decode.generate(gpt, prompts, **kwargs)
  single_greedy = decode.generate(gpt, prompts, max_new_tokens=10, temperature=0, eos_id=-1)

  mesh = jax.make_mesh((2, 1, 4), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  rules = sharding.DEFAULT_RULES
  graphdef, params = nnx.split(gpt)
  shardings = sharding.specs_to_shardings(sharding.param_specs(params, rules), mesh)
  sharded = nnx.merge(graphdef, jax.device_put(params, shardings))
  kernel = sharded.stack.blocks.attention.query.kernel[...]
  assert kernel.sharding.shard_shape(kernel.shape)[2] == gpt.cfg.num_heads // 4
  with sharding.activate(mesh, rules):
    assert decode.generate(sharded, prompts, **kwargs) == single
    greedy = decode.generate(sharded, prompts, max_new_tokens=10, temperature=0, eos_id=-1)
  assert greedy == single_greedy
