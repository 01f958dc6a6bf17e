"""Text generation for the causal models (GPT-2, Llama) with a KV cache: prefill, then one token
per step.

The whole loop (prefill, sampling, decode steps, early exit when every row has ended) is one
jitted function of static shapes: it compiles once per (rows bucket, prompt bucket, cache
bucket, greedy or not) and never per token. Prompts of different lengths are left-padded into
one batch so that they all end at the same cache slot, and the batch is padded with rows that
end at once up to a power of two (`rows_bucket`), so 3 and 4 prompts share one compile.

Under `sharding.activate(mesh, rules)` with parameters placed as train_state.create places them,
the cache's heads follow the `act_heads` rule, so tensor-parallel decoding works unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sslm_jax.inference import decoder
from sslm_jax.models.layers import constrain
from sslm_jax.models.transformer import GPT, Llama


def bucket(n: int) -> int:
  """A static length >= n: powers of two up to 64 (at least 8), then multiples of 64."""
  if n <= 64:
    return max(8, 1 << (n - 1).bit_length())
  return -(-n // 64) * 64


def rows_bucket(n: int) -> int:
  """A static batch size >= n: powers of two up to 64, then multiples of 64."""
  if n <= 64:
    return 1 << (n - 1).bit_length()
  return -(-n // 64) * 64


def _filtered(logits_BV, temperature, top_k, top_p):
  """Logits divided by the temperature, with tokens outside the top-k and top-p sets at -inf."""
  logits_BV = logits_BV / temperature
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)
  v = logits_BV.shape[-1]
  kth_B1 = jnp.take(sorted_BV, jnp.clip(top_k - 1, 0, v - 1), axis=-1)[:, None]
  kept_BV = (top_k <= 0) | (sorted_BV >= kth_B1)
  probs_BV = jax.nn.softmax(jnp.where(kept_BV, sorted_BV, -jnp.inf), axis=-1)
  # Then the smallest prefix whose mass reaches top_p (the first token always stays).
  kept_BV &= ((jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p) | (top_p >= 1.0)
  floor_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV >= floor_B1, logits_BV, -jnp.inf)


def _choose(logits_BV, allowed_V, key, sampling, greedy: bool):
  """The next token of each row: argmax, or a draw from the filtered distribution."""
  logits_BV = jnp.where(allowed_V, logits_BV, -jnp.inf)
  if greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  temperature, top_k, top_p = sampling
  filtered_BV = _filtered(logits_BV, temperature, top_k, top_p)
  return jax.random.categorical(key, filtered_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len", "greedy"))
def _generate(
  cfg, weights, prompt_BP, start_B, limit_B, allowed_V, eos_id, key, sampling, *,
  cache_len: int, greedy: bool,
):  # fmt: skip
  """(new tokens [B, cache_len - P], how many each row produced)."""
  decoding = decoder.DecodeModel(cfg, weights)
  b, p = prompt_BP.shape
  length_B = p - start_B
  positions_BP = jnp.maximum(jnp.arange(p) - start_B[:, None], 0)
  cache = decoder.init_cache(decoding, b, cache_len, start_B)
  x_BPD, cache = decoder.extend(decoding, prompt_BP, positions_BP, cache, 0)
  first_B = _choose(decoder.logits(decoding, x_BPD[:, -1]), allowed_V, key, sampling, greedy)
  tokens_BN = jnp.zeros((b, cache_len - p), jnp.int32).at[:, 0].set(first_B)
  count_B = jnp.ones((b,), jnp.int32)
  done_B = (first_B == eos_id) | (limit_B <= 1)

  def more(carry):
    i, _, _, done_B, _ = carry
    return (i + 1 < tokens_BN.shape[1]) & ~jnp.all(done_B)

  def step(carry):
    i, tokens_BN, count_B, done_B, cache = carry
    token_B1 = jax.lax.dynamic_slice_in_dim(tokens_BN, i, 1, axis=1)
    x_B1D, cache = decoder.extend(decoding, token_B1, (length_B + i)[:, None], cache, p + i)
    next_B = _choose(
      decoder.logits(decoding, x_B1D[:, 0]), allowed_V, jax.random.fold_in(key, i + 1), sampling,
      greedy,
    )  # fmt: skip
    next_B = jnp.where(done_B, eos_id, next_B)
    tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, next_B[:, None], i + 1, axis=1)
    count_B = count_B + ~done_B
    done_B = done_B | (next_B == eos_id) | (count_B >= limit_B)
    return i + 1, tokens_BN, count_B, done_B, cache

  carry = (jnp.int32(0), tokens_BN, count_B, done_B, cache)
  _, tokens_BN, count_B, _, _ = jax.lax.while_loop(more, step, carry)
  replicated = constrain  # a no-op outside a rules context
  return replicated(tokens_BN, (None, None)), replicated(count_B, (None,))


def _mesh_of(params):
  """The mesh the parameters live on when none is active (e.g. after training), else None."""
  if not jax.sharding.get_abstract_mesh().empty:
    return None
  for leaf in jax.tree.leaves(params):
    if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding):
      return leaf.sharding.mesh
  return None


def banned_ids(tokenizer) -> list[int]:
  """Never generated: every special id of `tokenizer` but EOS, which ends a sample."""
  return sorted(set(tokenizer.special_ids) - {tokenizer.eos_id})


def generate(
  model: GPT | Llama | decoder.DecodeModel,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  num_samples: int = 1,
  eos_id: int,
  banned_ids: Sequence[int] = (),
) -> list[list[int]]:
  """New token ids for each prompt and each of its `num_samples` samples (prompt-major order).

  temperature 0 is greedy; top_k 0 and top_p 1.0 turn those filters off. A row stops after
  `eos_id` (kept as its last element), after `max_new_tokens`, or when its next position would
  not fit in model.cfg.max_len; an id the model cannot produce (e.g. -1) never stops a row early.
  `banned_ids` and the vocabulary's padding rows are never produced. Deterministic in `seed`.

  `model` is a GPT or a Llama, or `decoder.to_decode_layout(model)` to skip copying its weights
  into decoding layout at every call (a cost of about one pass over the weights).
  """
  cfg = model.cfg
  if not cfg.causal:
    raise ValueError(f"generate needs a causal_lm model (gpt2 or llama), not a {cfg.family} one.")
  if max_new_tokens < 1 or num_samples < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} and num_samples={num_samples} must be >= 1.")
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got "
                     f"{temperature}, {top_k}, {top_p}.")  # fmt: skip
  prompts = [list(p) for p in prompts for _ in range(num_samples)]
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  if not prompts or lengths.min() < 1:
    raise ValueError("every prompt needs at least one token (e.g. BOS).")
  if lengths.max() + 1 > cfg.max_len:
    raise ValueError(
      f"a prompt of {lengths.max()} tokens leaves no room for a new token within the model's "
      f"{cfg.max_len} positions; shorten it to at most {cfg.max_len - 1} tokens."
    )
  p = bucket(int(lengths.max()))
  # Padding rows go last and stop at once: one-token prompts allowed one new token. Real rows
  # keep their draws because threefry is partitionable (a row's random bits depend on its index
  # alone, not on the batch size); where it is not, the batch is not padded.
  b = rows_bucket(len(prompts)) if jax.config.jax_threefry_partitionable else len(prompts)
  lengths = np.concatenate([lengths, np.ones(b - len(prompts), np.int32)])
  limit_B = np.minimum(max_new_tokens, cfg.max_len - lengths)
  limit_B[len(prompts) :] = 1
  prompt_BP = np.zeros((b, p), np.int32)
  for row, ids in enumerate(prompts):
    prompt_BP[row, p - len(ids) :] = ids
  allowed_V = np.arange(cfg.vocab_size) < cfg.num_ids
  allowed_V[[i for i in banned_ids if 0 <= i < cfg.vocab_size]] = False
  sampling = (
    np.float32(max(temperature, 1e-6)),
    np.int32(top_k),
    np.float32(top_p),
  )
  mesh = _mesh_of(model.weights if isinstance(model, decoder.DecodeModel) else nnx.state(model))
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    decoding = model if isinstance(model, decoder.DecodeModel) else decoder.to_decode_layout(model)
    tokens_BN, count_B = _generate(
      cfg, decoding.weights, prompt_BP, p - lengths, limit_B, allowed_V, np.int32(eos_id),
      jax.random.key(seed), sampling, cache_len=bucket(p + int(limit_B.max())),
      greedy=temperature == 0,
    )  # fmt: skip
  tokens_BN, count_B = np.asarray(tokens_BN), np.asarray(count_B)
  return [tokens_BN[row, : count_B[row]].tolist() for row in range(len(prompts))]


def cache_size() -> int:
  """Compiled variants of the generation loop so far (one per rows bucket, prompt and cache
  bucket, and mode)."""
  return _generate._cache_size()
