"""End-of-run samples: the prompt the model sees is the one shown, and padding ids never appear."""

import numpy as np
import pytest
from conftest import tiny_config
from test_tokenizer import VOCAB, corpus_texts

from sslm_jax import config as config_lib
from sslm_jax import decode, sample
from sslm_jax import model as model_lib
from sslm_jax import tokenizer as tokenizer_lib

BOS = tokenizer_lib.BOS_ID


def _generate(model, prompt, max_new_tokens):
  """Sampled as sample.show samples."""
  (new,) = decode.generate(
    model, [prompt], max_new_tokens=max_new_tokens, temperature=0.8, top_k=40,
    eos_id=tokenizer_lib.EOS_ID, banned_ids=sample.BANNED_IDS,
  )  # fmt: skip
  return new


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return tokenizer_lib.train(corpus_texts(), VOCAB, str(path))


def _model(objective: str, seq_len: int, vocab_multiple: int = 128):
  config = tiny_config(objective)
  config.data.seq_len, config.data.vocab_size = seq_len, VOCAB
  config.model.vocab_multiple = vocab_multiple  # 320 real ids padded to 384 rows
  return model_lib.build(config_lib.model_config(config), seed=0)


def _favour_padding_rows(model):
  """Make every padding id (>= VOCAB) the model's clear favourite at every position."""
  emb_VD = np.array(model.token_embed.embedding[...])
  if model.cfg.causal:
    # The final LayerNorm then outputs its bias b everywhere; padding rows align with b.
    model.final_norm.scale[...] = np.zeros_like(model.final_norm.scale[...])
    b_D = np.asarray(model.final_norm.bias[...]) + 1.0
    model.final_norm.bias[...] = b_D
    emb_VD[VOCAB:] = 100.0 * b_D / (b_D @ b_D)
    model.token_embed.embedding[...] = emb_VD
  else:
    bias_V = np.array(model.mlm_head.decoder_bias[...])
    bias_V[VOCAB:] = 100.0
    model.mlm_head.decoder_bias[...] = bias_V


@pytest.mark.parametrize(
  ("prompt_len", "max_len", "new", "kept_len", "room"),
  [
    (10, 64, 32, 10, 32),  # fits whole
    (20, 48, 32, 20, 28),  # prompt whole, sample shortened
    (40, 64, 32, 32, 32),  # BOS + newest 31 tokens, room for 32
    (25, 32, 32, 16, 16),  # seq_len <= prompt + 32: BOS + newest tokens, half the window
    (25, 16, 32, 8, 8),
    (3, 2, 32, 1, 1),
  ],
)
def test_fit_prompt_keeps_bos_and_the_newest_tokens(prompt_len, max_len, new, kept_len, room):
  prompt = [BOS] + list(range(100, 100 + prompt_len - 1))
  kept, got_room = sample.fit_prompt(prompt, max_len, new)
  assert (len(kept), got_room) == (kept_len, room)
  assert kept[0] == BOS and len(kept) + got_room <= max_len
  if kept_len > 1:
    assert kept[-(kept_len - 1) :] == prompt[-(kept_len - 1) :]


def test_generation_sees_the_whole_prompt_in_a_short_window(tok):
  """seq_len 32 <= prompt + 32: the prompt used to be dropped; now it is kept and shown."""
  model = _model("causal_lm", seq_len=32)
  text = " ".join(corpus_texts(3, seed=5)).replace("\n", " ")
  (line,) = sample.show(model, tok, [text])
  ids = tok.encode(text)
  prompt, room = sample.fit_prompt([BOS] + ids[: min(len(ids) // 2, 24)], 32, 32)
  assert prompt[0] == BOS and len(prompt) > 1 and room >= 1
  assert f"prompt: {tok.decode(prompt)!r}" in line
  new = _generate(model, prompt, room)
  assert len(prompt) + len(new) <= 32
  # The prompt conditions the sample: another prompt of the same length gives another sample.
  other = [BOS] + [(i * 7) % (VOCAB - 7) + 7 for i in prompt[1:]]
  assert _generate(model, other, room) != new


def test_samples_never_return_vocabulary_padding_ids(tok):
  gpt = _model("causal_lm", seq_len=32)
  _favour_padding_rows(gpt)
  new = _generate(gpt, [BOS, 10, 11, 12], 8)
  assert new and max(new) < VOCAB
  bert = _model("masked_lm", seq_len=32)
  _favour_padding_rows(bert)
  ids = [tokenizer_lib.CLS_ID, 10, tokenizer_lib.MASK_ID, 12, tokenizer_lib.SEP_ID]
  guesses = sample.fill_mask(bert, ids, 2, vocab_size=VOCAB)
  assert len(guesses) == 5 and all(i < VOCAB for i, _ in guesses)
  text = " ".join(corpus_texts(2, seed=3)).replace("\n", " ")
  (line,) = sample.show(bert, tok, [text])  # used to raise "piece id is out of range"
  assert "top-5:" in line
