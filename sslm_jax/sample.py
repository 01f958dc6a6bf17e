"""End-of-run samples: GPT continues a prompt, BERT fills a [MASK]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sslm_jax import tokenizer as tok


def fit_prompt(prompt_ids: list[int], max_len: int, max_new_tokens: int) -> tuple[list[int], int]:
  """(the prompt the model sees, how many tokens it may add) within `max_len` positions.

  A prompt that fits is kept whole and the sample is shortened if needed. A longer one keeps its
  first token (BOS) and its newest tokens, leaving room for min(max_new_tokens, max_len // 2).
  """
  if len(prompt_ids) + max_new_tokens <= max_len:
    return list(prompt_ids), max_new_tokens
  room = max(1, min(max_new_tokens, max_len // 2))
  if len(prompt_ids) + room <= max_len:
    return list(prompt_ids), max_len - len(prompt_ids)
  tail = max_len - room - 1
  return prompt_ids[:1] + (prompt_ids[len(prompt_ids) - tail :] if tail > 0 else []), room


def generate(
  model,
  prompt_ids: list[int],
  *,
  vocab_size: int,
  max_new_tokens: int,
  temperature=0.8,
  top_k=40,
  seed=0,
):
  """Top-k sampling over the real vocabulary (never a padding row) after a prompt that fits.

  Each new token re-runs the fixed-size window (short samples need no cache). The prompt must
  fit with room for one token (see fit_prompt).
  """
  max_new_tokens = min(max_new_tokens, model.cfg.max_len - len(prompt_ids))
  if max_new_tokens < 1:
    raise ValueError(f"a prompt of {len(prompt_ids)} tokens leaves no room in {model.cfg.max_len}.")
  window = len(prompt_ids) + max_new_tokens
  ids_1W = np.zeros((1, window), np.int32)
  ids_1W[0, : len(prompt_ids)] = prompt_ids
  positions_1W = np.arange(window, dtype=np.int32)[None]
  segments_1W = np.ones((1, window), np.int32)
  top_k = min(top_k, vocab_size)

  graphdef, params = nnx.split(model)

  @jax.jit
  def next_token(params, ids_1W, index, key):
    logits_V = nnx.merge(graphdef, params)(ids_1W, positions_1W, segments_1W)[0, index - 1]
    top_logits_K, top_ids_K = jax.lax.top_k(logits_V[:vocab_size], top_k)
    choice = jax.random.categorical(key, top_logits_K / temperature)
    return top_ids_K[choice]

  key = jax.random.key(seed)
  n = len(prompt_ids)
  for i in range(max_new_tokens):
    token = int(next_token(params, jnp.asarray(ids_1W), n, jax.random.fold_in(key, i)))
    if token == tok.EOS_ID:
      break
    ids_1W[0, n] = token
    n += 1
  return ids_1W[0, len(prompt_ids) : n].tolist()


def fill_mask(
  model, ids: list[int], position: int, *, vocab_size: int, k: int = 5
) -> list[tuple[int, float]]:
  """Top-k (id, probability) for the [MASK] at `position` of `ids`, over the real vocabulary."""
  ids_1T = np.asarray([ids], np.int32)
  positions_1T = np.arange(len(ids), dtype=np.int32)[None]
  logits_11V = model(ids_1T, positions_1T, np.ones_like(ids_1T), np.asarray([[position]], np.int32))
  probs_V = jax.nn.softmax(logits_11V[0, 0, :vocab_size])
  top_p, top_ids = jax.lax.top_k(probs_V, min(k, vocab_size))
  return [(int(i), float(p)) for i, p in zip(top_ids, top_p, strict=True)]


def show(model, tokenizer: tok.Tokenizer, texts: list[str]) -> list[str]:
  """Human-readable sample lines for held-out `texts`."""
  lines = []
  for text in texts:
    ids = tokenizer.encode(text)
    if len(ids) < 4:
      continue
    if model.cfg.causal:
      prompt, room = fit_prompt(
        [tok.BOS_ID] + ids[: min(len(ids) // 2, 24)], model.cfg.max_len, max_new_tokens=32
      )
      new = generate(model, prompt, vocab_size=tokenizer.vocab_size, max_new_tokens=room)
      # Decode together so the first new piece keeps its leading space.
      shown = tokenizer.decode(prompt)
      continuation = tokenizer.decode(prompt + new)[len(shown) :]
      lines.append(f"prompt: {shown!r}\n  continuation: {continuation!r}")
      continue
    ids = [tok.CLS_ID] + ids[: model.cfg.max_len - 2] + [tok.SEP_ID]
    position = len(ids) // 2
    original, ids[position] = ids[position], tok.MASK_ID
    shown = (
      tokenizer.decode(ids[1:position]) + " [MASK] " + tokenizer.decode(ids[position + 1 : -1])
    )
    guesses = ", ".join(
      f"{tokenizer.id_to_piece(i)!r} ({p:.2f})"
      for i, p in fill_mask(model, ids, position, vocab_size=tokenizer.vocab_size)
    )
    lines.append(
      f"masked: {shown!r}\n  original: {tokenizer.id_to_piece(original)!r}\n  top-5: {guesses}"
    )
  return lines
