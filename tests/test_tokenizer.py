"""SentencePiece training and loading: special ids, round trips, byte counts, errors."""

import hashlib
import io
import random

import numpy as np
import pytest
import sentencepiece as spm

from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib

VOCAB = 320


def corpus_texts(n: int = 400, seed: int = 0) -> list[str]:
  """Pseudo-words over a small alphabet: enough distinct pieces for a few hundred ids."""
  rng = random.Random(seed)
  syllables = "ka lo mi ne ru sa to vi be da fo gu".split()
  words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(300)]
  texts = []
  for _ in range(n):
    lines = [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(rng.randint(1, 4))]
    texts.append("\n".join(lines) + ("\n" if rng.random() < 0.5 else ""))
  return texts


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
  return tokenizer_lib.train(corpus_texts(), VOCAB, str(path))


def test_special_ids(tok):
  pieces = [tok.id_to_piece(i) for i in range(tokenizer_lib.NUM_SPECIAL)]
  assert pieces == ["<pad>", "<unk>", "<s>", "</s>", "[MASK]", "[CLS]", "[SEP]"]
  assert tok.vocab_size == VOCAB
  # A literal "[CLS]" in a document is plain text, never a special id.
  ids = tok.encode("kalo [MASK] mine [CLS] [SEP]</s><s><pad>")
  assert min(ids) >= tokenizer_lib.NUM_SPECIAL


def test_round_trip_including_unseen_characters(tok):
  text = "kalo mine\n    sato vi  be\n\nnever seen: é ☃ 7 {}"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert all(0 <= i < tok.vocab_size for i in ids)
  batch = tok.encode_batch([text, "kalo"])
  assert batch == [ids, tok.encode("kalo")]


def test_decode_skips_special_and_out_of_vocab_ids(tok):
  ids = tok.encode("kalo mine")
  noisy = [tokenizer_lib.BOS_ID, *ids, tokenizer_lib.MASK_ID, tok.vocab_size + 5]
  assert tok.decode(noisy) == "kalo mine"


@pytest.mark.parametrize(
  "text", ["kalo mine sato", "  two leading spaces", "line one\nline two\n", "bytes: é ☃ ✓"]
)
def test_token_bytes_sum_to_text_bytes_plus_dummy_prefix(tok, text):
  """Assert sum == UTF-8 length + 1: SentencePiece adds one '▁' in front of every text."""
  counts = tok.token_bytes()
  assert counts.dtype == np.int32 and counts.shape == (tok.vocab_size,)
  assert counts[: tokenizer_lib.NUM_SPECIAL].tolist() == [0] * tokenizer_lib.NUM_SPECIAL
  ids = tok.encode(text)
  assert int(counts[ids].sum()) == len(text.encode("utf-8")) + 1


def test_training_is_deterministic_and_sha_matches_file(tmp_path, tok):
  again = tokenizer_lib.train(corpus_texts(), VOCAB, str(tmp_path / "again.model"))
  assert again.sha256 == tok.sha256
  assert again.sha256 == hashlib.sha256((tmp_path / "again.model").read_bytes()).hexdigest()
  assert tokenizer_files.load(str(tmp_path / "again.model")).sha256 == tok.sha256
  other = tokenizer_lib.train(corpus_texts(seed=1), VOCAB, str(tmp_path / "other.model"))
  assert other.sha256 != tok.sha256
  # The atomic write leaves only the final files behind.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["again.model", "other.model"]


def test_load_missing_file(tmp_path):
  with pytest.raises(tokenizer_lib.TokenizerError, match="does not exist.*data.tokenizer_path"):
    tokenizer_files.load(str(tmp_path / "nope.model"))


def test_load_corrupt_file(tmp_path):
  path = tmp_path / "corrupt.model"
  path.write_bytes(b"this is not a protobuf \x00\xff" * 10)
  with pytest.raises(tokenizer_lib.TokenizerError, match="corrupt.model.*not a valid"):
    tokenizer_files.load(str(path))


def test_load_rejects_other_special_layout(tmp_path):
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(corpus_texts()), model_writer=writer, vocab_size=200, minloglevel=2
  )
  path = tmp_path / "plain.model"
  path.write_bytes(writer.getvalue())
  with pytest.raises(tokenizer_lib.TokenizerError, match=r"special ids.*\[MASK\]"):
    tokenizer_files.load(str(path))


def test_vocab_too_large_names_sizes_and_fix(tmp_path):
  with pytest.raises(tokenizer_lib.TokenizerError) as e:
    tokenizer_lib.train(corpus_texts(20), 5000, str(tmp_path / "t.model"))
  msg = str(e.value)
  assert "data.vocab_size=5000" in msg and "--config.data.vocab_size=" in msg
  supported = int(msg.split("--config.data.vocab_size=")[1].split()[0])
  assert 263 < supported < 5000
  assert not list(tmp_path.iterdir())


def test_vocab_too_small_names_minimum(tmp_path):
  with pytest.raises(tokenizer_lib.TokenizerError, match=r"too small.*--config.data.vocab_size="):
    tokenizer_lib.train(corpus_texts(20), 100, str(tmp_path / "t.model"))


def test_target_bytes_count_exactly_the_text(tok):
  """Hand count: the targets of packed documents stand for exactly the documents' UTF-8 bytes.

  No byte for EOS and none for the space SentencePiece adds in front of each document.
  """
  docs = ["kalo mine", "  two leading spaces\nand a newline", "ünïcödé ☃ kalo", "x"]
  expected = sum(len(d.encode("utf-8")) for d in docs)  # 9 + 34 + 20 (4 two-byte, one 3) + 1
  assert expected == 64
  stream = []
  for ids in tok.encode_batch(docs):
    stream += [tokenizer_lib.BOS_ID, *ids, tokenizer_lib.EOS_ID]
  row = np.asarray([stream])
  inputs, targets = row[:, :-1], row[:, 1:]
  counted = tok.target_bytes(inputs, targets, tokenizer_lib.BOS_ID)
  assert int(counted.sum()) == expected
  assert (counted[targets == tokenizer_lib.EOS_ID] == 0).all()
  # Without the correction each document would add one phantom byte.
  assert int(tok.token_bytes()[targets].sum()) == expected + len(docs)


def test_special_ids_as_attributes(tok):
  """The pipeline reads special ids from the tokenizer; ours are the module constants."""
  got = (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.cls_id, tok.sep_id)
  assert (
    got
    == tuple(range(7))
    == (
      tokenizer_lib.PAD_ID,
      tokenizer_lib.UNK_ID,
      tokenizer_lib.BOS_ID,
      tokenizer_lib.EOS_ID,
      tokenizer_lib.MASK_ID,
      tokenizer_lib.CLS_ID,
      tokenizer_lib.SEP_ID,
    )
  )
  assert tok.special_ids == set(range(tokenizer_lib.NUM_SPECIAL))
  assert [tok.id_to_piece(i) for i in sorted(tok.special_ids)][4:] == ["[MASK]", "[CLS]", "[SEP]"]
