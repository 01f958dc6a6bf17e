"""tokenizer.json: our export encodes and decodes as SentencePiece does (in Hugging Face tokenizers
and transformers), and GPT-2 / BERT style tokenizer.json files load as HFTokenizer."""

import hashlib
import io
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from sslm_jax.data import corpus
from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import hf_json as hf_tokenizer
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib

VOCAB = 1024
SAMPLE_BYTES = 400_000
NUM_PARAGRAPHS = 400
# Inserted into held-out paragraphs: characters outside the vocabulary (byte fallback), odd
# whitespace, and text that spells a byte piece.
ODD = [
  "😀",
  "👩‍👩‍👧",
  "日本語",
  "Ωμέγα",
  "é",
  "\u3000",
  "\u00a0",
  "\u200b",
  "\t",
  "\r\n",
  "   ",
  "<0x41>",
]


def _builtin_split() -> tuple[list[str], list[str]]:
  train, held_out = [], []
  for key, path in corpus.builtin_files():
    text = path.read_text("utf-8", errors="replace")
    (held_out if corpus.is_eval(key, 0.05) else train).append(text)
  return train, held_out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A tokenizer trained on the builtin train split, and held-out paragraphs, a quarter of them
  with odd characters inserted."""
  train, held_out = _builtin_split()
  sample = corpus.tokenizer_sample(iter(train), SAMPLE_BYTES)
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  tok = tokenizer_lib.train(sample, VOCAB, str(path))
  rng = random.Random(0)
  paragraphs = [p for doc in held_out for p in doc.split("\n\n") if p.strip()]
  rng.shuffle(paragraphs)
  texts = []
  for i, p in enumerate(paragraphs[:NUM_PARAGRAPHS]):
    for _ in range(rng.randint(1, 4) if i % 4 == 0 else 0):
      k = rng.randint(0, len(p))
      p = p[:k] + rng.choice(ODD) + p[k:]
    texts.append(p)
  return tok, texts


@pytest.fixture(scope="module")
def exported(data, tmp_path_factory):
  out = tmp_path_factory.mktemp("hf_causal")
  hf_tokenizer.save(data[0], out, objective="causal_lm", max_len=128)
  return out


# Each would fail with a piece of the construction missing: the dummy-prefix space, the space
# stripped on decode, byte fallback, the visible space, the unreachable byte pieces.
EDGE_TEXTS = [
  "def f(x):\n    return x\n",
  "  two leading spaces",
  "trailing spaces   ",
  " ",
  "\n\n\t\n",
  "emoji 😀 and 👩‍👩‍👧 and 日本語",
  "😀 first, and nothing:",
  "",
  "a literal <0x41> and <0xFF>",
  "\u3000ideographic\u00a0nbsp\u200bzero width",
]


@pytest.mark.parametrize("text", EDGE_TEXTS)
def test_tokenizer_json_matches_sentencepiece_on_edge_texts(data, exported, text):
  tok = data[0]
  hf = tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json"))
  ids = tok.encode(text)
  assert hf.encode(text, add_special_tokens=False).ids == ids
  assert hf.decode(ids) == text


def _agreement(encode, decode, tok, texts):
  ours = tok.encode_batch(texts)
  theirs = encode(texts)
  same_ids = sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(texts)
  exact_ours = sum(decode(ids) == t for ids, t in zip(ours, texts, strict=True)) / len(texts)
  exact_theirs = sum(decode(ids) == t for ids, t in zip(theirs, texts, strict=True)) / len(texts)
  return same_ids, exact_ours, exact_theirs


def test_tokenizers_agrees_on_held_out_paragraphs(data, exported):
  """Ids may differ only where segmentations tie (float32 vs float64 sums); text never does."""
  tok, texts = data
  assert sum(any(ord(ch) > 127 for ch in t) for t in texts) >= NUM_PARAGRAPHS // 5
  hf = tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json"))
  same_ids, exact_ours, exact_theirs = _agreement(
    lambda ts: [e.ids for e in hf.encode_batch(ts, add_special_tokens=False)],
    hf.decode,
    tok,
    texts,
  )
  assert same_ids >= 0.99
  assert exact_ours == exact_theirs == 1.0


def test_transformers_agrees_on_held_out_paragraphs(data, exported):
  transformers = pytest.importorskip("transformers")
  tok, texts = data
  auto = transformers.AutoTokenizer.from_pretrained(str(exported))
  same_ids, exact_ours, exact_theirs = _agreement(
    lambda ts: auto(ts, add_special_tokens=False)["input_ids"],
    lambda ids: auto.decode(ids, skip_special_tokens=True),
    tok,
    texts,
  )
  assert same_ids >= 0.99
  assert exact_ours == exact_theirs == 1.0
  # Specials are skipped on decode, as tokenizer.decode skips them.
  ids = tok.encode("x = 1")
  noisy = [tokenizer_lib.BOS_ID, *ids, tokenizer_lib.EOS_ID, tokenizer_lib.PAD_ID]
  assert auto.decode(noisy, skip_special_tokens=True) == tok.decode(noisy) == "x = 1"


def test_causal_lm_config_and_files(data, exported):
  transformers = pytest.importorskip("transformers")
  tok = data[0]
  assert sorted(p.name for p in exported.iterdir()) == [
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
  ]
  model_bytes = (exported / "tokenizer.model").read_bytes()
  assert hashlib.sha256(model_bytes).hexdigest() == tok.sha256
  config = json.loads((exported / "tokenizer_config.json").read_text())
  assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
  assert config["model_max_length"] == 128
  assert sorted(config["added_tokens_decoder"]) == [str(i) for i in range(7)]
  assert all(v["special"] for v in config["added_tokens_decoder"].values())
  assert json.loads((exported / "special_tokens_map.json").read_text()) == {
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
  }
  auto = transformers.AutoTokenizer.from_pretrained(str(exported))
  got = (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id, auto.unk_token_id)
  assert got == (tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID, tokenizer_lib.PAD_ID, 1)
  assert auto.mask_token is None and auto.model_max_length == 128
  assert set(auto.all_special_ids) >= {0, 1, 2, 3}
  # With special tokens the prompt starts as training documents did: <s> text.
  ids = tok.encode("import os")
  assert auto("import os")["input_ids"] == [tokenizer_lib.BOS_ID, *ids]


def test_masked_lm_config_and_template(data, tmp_path):
  transformers = pytest.importorskip("transformers")
  tok = data[0]
  hf_tokenizer.save(tok, tmp_path, objective="masked_lm")
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert "model_max_length" not in config and "bos_token" not in config
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  got = (auto.cls_token_id, auto.sep_token_id, auto.mask_token_id, auto.pad_token_id)
  assert got == (tokenizer_lib.CLS_ID, tokenizer_lib.SEP_ID, tokenizer_lib.MASK_ID, 0)
  ids = tok.encode("x = 1")
  assert auto("x = 1")["input_ids"] == [tokenizer_lib.CLS_ID, *ids, tokenizer_lib.SEP_ID]
  # Hugging Face convention (fill-mask pipelines): a literal [MASK] is the mask id...
  masked = auto("x = [MASK]", add_special_tokens=False)["input_ids"]
  assert masked[-1] == tokenizer_lib.MASK_ID
  # ...and split_special_tokens=True encodes it as text, exactly as SentencePiece does.
  as_text = transformers.AutoTokenizer.from_pretrained(str(tmp_path), split_special_tokens=True)
  for text in ["x = [MASK]", "<s>[CLS] a </s>[SEP]<pad><unk>"]:
    assert as_text(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_rejects_models_it_cannot_mirror(data, tmp_path):
  """A model with our special ids but NFKC normalization would encode differently."""
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(_builtin_split()[0][:20]),
    model_writer=writer,
    vocab_size=400,
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    control_symbols=list(tokenizer_lib.CONTROL_SYMBOLS),
    byte_fallback=True,
    minloglevel=2,
  )
  path = tmp_path / "nfkc.model"
  path.write_bytes(writer.getvalue())
  with pytest.raises(tokenizer_lib.TokenizerError, match="identity normalization"):
    hf_tokenizer.save(tokenizer_files.load(str(path)), tmp_path, objective="causal_lm")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["nfkc.model"]


def test_bad_arguments(data, tmp_path):
  with pytest.raises(ValueError, match="objective"):
    hf_tokenizer.save(data[0], tmp_path, objective="seq2seq")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    hf_tokenizer.save(data[0], tmp_path / "missing", objective="causal_lm")


def test_module_imports_without_tensorflow():
  code = "import sys, sslm_jax.tokenizer.hf_json; assert 'tensorflow' not in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- HFTokenizer

BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}


def gpt2_style_json(path, texts, vocab_size: int = 400) -> str:
  """A byte-level BPE tokenizer.json with <|endoftext|> as its last id, as GPT-2's."""
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
  )
  hf.train_from_iterator(texts, trainer)
  hf.add_special_tokens(["<|endoftext|>"])
  hf.save(str(path))
  return str(path)


def bert_style_json(path, texts, vocab_size: int = 400) -> str:
  """A lowercasing WordPiece tokenizer.json with BERT's special ids (0 and 100-103)."""
  trained = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
  trained.normalizer = normalizers.BertNormalizer(lowercase=True)
  trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trainer = trainers.WordPieceTrainer(
    vocab_size=vocab_size - len(BERT_SPECIALS), special_tokens=[], show_progress=False
  )
  trained.train_from_iterator(texts, trainer)
  pieces = iter(sorted(trained.get_vocab(), key=trained.get_vocab().get))
  by_id = {i: s for s, i in BERT_SPECIALS.items()}
  vocab = {by_id[i] if i in by_id else next(pieces): i for i in range(vocab_size)}
  hf = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  hf.normalizer, hf.pre_tokenizer = trained.normalizer, trained.pre_tokenizer
  hf.decoder = decoders.WordPiece()
  hf.add_special_tokens(list(BERT_SPECIALS))
  hf.save(str(path))
  return str(path)


@pytest.fixture(scope="module")
def gpt2(data, tmp_path_factory):
  path = gpt2_style_json(tmp_path_factory.mktemp("gpt2") / "tokenizer.json", data[1])
  return tokenizer_files.load(path)


@pytest.fixture(scope="module")
def bert(data, tmp_path_factory):
  path = bert_style_json(tmp_path_factory.mktemp("bert") / "tokenizer.json", data[1])
  return tokenizer_files.load(path)


def test_saving_a_hugging_face_tokenizer_over_an_export_leaves_no_sentencepiece_model(
  data, gpt2, tmp_path
):
  hf_tokenizer.save(data[0], tmp_path, objective="causal_lm")
  assert (tmp_path / "tokenizer.model").exists()
  hf_tokenizer.save(gpt2, tmp_path, objective="causal_lm")  # export --overwrite does this
  assert not (tmp_path / "tokenizer.model").exists()
  with open(gpt2.path, "rb") as f:
    assert (tmp_path / "tokenizer.json").read_bytes() == f.read()


def test_gpt2_style_tokenizer(gpt2):
  assert isinstance(gpt2, hf_tokenizer.HFTokenizer)
  end = gpt2.vocab_size - 1
  assert gpt2.id_to_piece(end) == "<|endoftext|>"
  assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id, gpt2.special_ids) == (end, end, end, {end})
  assert (gpt2.unk_id, gpt2.mask_id, gpt2.cls_id, gpt2.sep_id) == (None, None, None, None)
  with open(gpt2.path, "rb") as f:
    assert gpt2.sha256 == hashlib.sha256(f.read()).hexdigest()
  text = "def f(x):\n    return x  # é ☃ 😀\n"
  ids = gpt2.encode(text)
  assert gpt2.decode(ids) == text and gpt2.encode_batch([text, "x"]) == [ids, gpt2.encode("x")]
  assert gpt2.decode([end, *ids, end, gpt2.vocab_size + 3]) == text
  # Byte-level pieces count exactly; no prefix space to remove.
  assert int(gpt2.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
  assert gpt2.token_bytes()[end] == 0
  stream = np.asarray([[end, *ids, end, *ids]])
  counted = gpt2.target_bytes(stream[:, :-1], stream[:, 1:], end)
  assert int(counted.sum()) == 2 * len(text.encode("utf-8"))
  # Spelled out in a document, the separator is text: it cannot fake a document boundary.
  literal = gpt2.encode("one<|endoftext|>two")
  assert end not in literal and gpt2.decode(literal) == "one<|endoftext|>two"


def test_bert_style_tokenizer(bert):
  assert (bert.pad_id, bert.unk_id, bert.cls_id, bert.sep_id, bert.mask_id) == (
    0,
    100,
    101,
    102,
    103,
  )
  assert (bert.bos_id, bert.eos_id) == (None, None)
  assert bert.special_ids == set(BERT_SPECIALS.values())
  ids = bert.encode("Return the Value")
  assert bert.decode([101, *ids, 103, 102, 0]) == "return the value"
  assert 101 not in bert.encode("[CLS] x")
  # WordPiece keeps no spaces: each word's first piece counts the space before it, and a
  # document's first piece (after [CLS]) does not.
  text = "return the value"
  assert int(bert.token_bytes()[ids].sum()) == len(text) + 1
  row = np.asarray([[101, *ids, 102]])
  assert int(bert.target_bytes(row[:, :-1], row[:, 1:], 101).sum()) == len(text)


def test_our_export_loads_as_hf_tokenizer_with_our_ids(data, exported):
  tok = data[0]
  ours = tokenizer_files.load(str(exported / "tokenizer.json"))
  assert isinstance(ours, hf_tokenizer.HFTokenizer) and ours.vocab_size == tok.vocab_size
  names = ["pad_id", "unk_id", "bos_id", "eos_id", "mask_id", "cls_id", "sep_id", "special_ids"]
  assert [getattr(ours, n) for n in names] == [getattr(tok, n) for n in names]
  np.testing.assert_array_equal(ours.token_bytes(), tok.token_bytes())
  for text in EDGE_TEXTS:
    assert ours.encode(text) == tok.encode(text)
  row = np.asarray([[tokenizer_lib.BOS_ID, *tok.encode("x = 1"), tokenizer_lib.EOS_ID]])
  args = (row[:, :-1], row[:, 1:], tokenizer_lib.BOS_ID)
  np.testing.assert_array_equal(ours.target_bytes(*args), tok.target_bytes(*args))


def test_load_errors(tmp_path):
  with pytest.raises(tokenizer_lib.TokenizerError, match="does not exist"):
    tokenizer_files.load(str(tmp_path / "missing.json"))
  (tmp_path / "bad.json").write_text('{"model": 1}')
  with pytest.raises(tokenizer_lib.TokenizerError, match="bad.json.*not a valid"):
    tokenizer_files.load(str(tmp_path / "bad.json"))


def test_save_copies_a_loaded_tokenizer_json(data, gpt2, bert, tmp_path):
  """A run trained on a GPT-2 or BERT style tokenizer.json exports that file and its specials."""
  transformers = pytest.importorskip("transformers")
  texts = data[1][:50]
  for tok, objective in ((gpt2, "causal_lm"), (bert, "masked_lm")):
    out = tmp_path / objective
    out.mkdir()
    hf_tokenizer.save(tok, out, objective=objective, max_len=64)
    assert not (out / "tokenizer.model").exists()
    assert (out / "tokenizer.json").read_bytes() == open(tok.path, "rb").read()
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    assert auto(texts, add_special_tokens=False)["input_ids"] == tok.encode_batch(texts)
    assert set(auto.all_special_ids) == tok.special_ids
  assert (auto.cls_token_id, auto.sep_token_id, auto.mask_token_id) == (101, 102, 103)
  saved = json.loads((tmp_path / "causal_lm" / "special_tokens_map.json").read_text())
  end = gpt2.id_to_piece(gpt2.eos_id)
  assert saved == {"pad_token": end, "bos_token": end, "eos_token": end} and end == "<|endoftext|>"
