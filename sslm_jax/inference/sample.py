"""End-of-run samples: GPT continues a prompt, BERT fills a [MASK].

Special ids come from the tokenizer object (ours or a Hugging Face tokenizer.json), never from
SentencePiece's fixed ids.
"""

from __future__ import annotations

import jax
import numpy as np

from sslm_jax.inference import decode, decoder
from sslm_jax.tokenizer import sentencepiece as tok


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
  decoding = decoder.to_decode_layout(model) if model.cfg.causal else None  # once for all prompts
  for text in texts:
    ids = tokenizer.encode(text)
    if len(ids) < 4:
      continue
    if model.cfg.causal:
      prompt, room = fit_prompt(
        [tokenizer.bos_id] + ids[: min(len(ids) // 2, 24)], model.cfg.max_len, max_new_tokens=32
      )
      (new,) = decode.generate(
        decoding, [prompt], max_new_tokens=room, temperature=0.8, top_k=40,
        eos_id=tokenizer.eos_id, banned_ids=decode.banned_ids(tokenizer),
      )  # fmt: skip
      new = new[:-1] if new and new[-1] == tokenizer.eos_id else new
      # Decode together so the first new piece keeps its leading space.
      shown = tokenizer.decode(prompt)
      continuation = tokenizer.decode(prompt + new)[len(shown) :]
      lines.append(f"prompt: {shown!r}\n  continuation: {continuation!r}")
      continue
    ids = [tokenizer.cls_id] + ids[: model.cfg.max_len - 2] + [tokenizer.sep_id]
    position = len(ids) // 2
    original, ids[position] = ids[position], tokenizer.mask_id
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
