"""End-of-run samples: the prompt the model sees is the one shown, and padding ids never appear."""

import numpy as np
import pytest
from conftest import tiny_config
from test_tokenizer import VOCAB, corpus_texts

from sslm_jax import config as config_lib
from sslm_jax.inference import decode, sample
from sslm_jax.models import transformer as model_lib
from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib

BOS = tokenizer_lib.BOS_ID


def _generate(model, prompt, max_new_tokens):
  """Sampled as sample.show samples."""
  (new,) = decode.generate(
    model, [prompt], max_new_tokens=max_new_tokens, temperature=0.8, top_k=40,
    eos_id=tokenizer_lib.EOS_ID, banned_ids=decode.banned_ids(tokenizer_lib.Tokenizer),
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


def test_samples_use_the_special_ids_of_a_hugging_face_tokenizer(tmp_path, monkeypatch):
  """GPT-2's <|endoftext|> opens the prompt and ends a sample (ids 2 and 3 are '"' and '#' in its
  vocabulary, ordinary text that must stay sampleable); BERT's [CLS]/[SEP]/[MASK] frame the
  fill-mask sample."""
  from test_hf_tokenizer import bert_style_json, gpt2_style_json

  texts = [" ".join(corpus_texts(2, seed=s)).replace("\n", " ") for s in range(4)]
  gpt2 = tokenizer_files.load(gpt2_style_json(tmp_path / "gpt2.json", texts, vocab_size=300))
  end = gpt2.eos_id
  assert end == gpt2.bos_id and end not in (2, 3)
  calls = []

  def fake_generate(decoding, prompts, **kwargs):
    calls.append((prompts[0], kwargs))
    return [[50, 60, end]]

  monkeypatch.setattr(sample.decode, "generate", fake_generate)
  config = tiny_config("causal_lm")
  config.data.seq_len, config.data.vocab_size = 32, gpt2.vocab_size
  gpt = model_lib.build(config_lib.model_config(config), seed=0)
  (line,) = sample.show(gpt, gpt2, [texts[0]])
  ((prompt, kwargs),) = calls
  assert prompt[0] == end and kwargs["eos_id"] == end
  assert kwargs["banned_ids"] == sorted(gpt2.special_ids - {end}) and 2 not in kwargs["banned_ids"]
  assert line.startswith("prompt: " + repr(gpt2.decode(prompt[1:])))
  assert line.endswith(
    f"continuation: {gpt2.decode(prompt + [50, 60])[len(gpt2.decode(prompt)) :]!r}"
  )

  bert_tok = tokenizer_files.load(bert_style_json(tmp_path / "bert.json", texts, vocab_size=200))
  seen = []
  monkeypatch.setattr(
    sample, "fill_mask", lambda model, ids, position, **kw: seen.append((ids, position)) or []
  )
  config = tiny_config("masked_lm")
  config.data.seq_len, config.data.vocab_size = 32, bert_tok.vocab_size
  bert = model_lib.build(config_lib.model_config(config), seed=0)
  (line,) = sample.show(bert, bert_tok, [texts[1]])
  ((ids, position),) = seen
  assert (ids[0], ids[-1], ids[position]) == (bert_tok.cls_id, bert_tok.sep_id, bert_tok.mask_id)
  assert "!" not in line and '"' not in line.split("original")[0]
