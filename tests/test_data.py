"""Input pipeline: packing, masking, data order, the three sources, and error messages."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from sslm_jax import config as config_lib
from sslm_jax.data import batches, cache, corpus, masking, packing, pipeline, preparation, units
from sslm_jax.data.pipeline import DataError
from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib

BOS, EOS, CLS, SEP, MASK = (
  tokenizer_lib.BOS_ID,
  tokenizer_lib.EOS_ID,
  tokenizer_lib.CLS_ID,
  tokenizer_lib.SEP_ID,
  tokenizer_lib.MASK_ID,
)
VOCAB = 320


def words(rng: random.Random, n: int) -> str:
  syllables = "ka lo mi ne ru sa to vi be da fo gu".split()
  return " ".join("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(n))


def write_corpus(root, seed: int = 0) -> str:
  """A .txt file of paragraphs, a .jsonl file, and a .txt file with one invalid UTF-8 paragraph."""
  rng = random.Random(seed)
  (root / "a.txt").write_text("".join(words(rng, rng.randint(5, 60)) + "\n\n" for _ in range(250)))
  records = [json.dumps({"text": words(rng, 40), "id": i}) for i in range(120)]
  (root / "b.jsonl").write_text("\n".join(records) + "\n")
  (root / "bad.txt").write_bytes(b"kalo \xff\xfe mine sato\n\n" + words(rng, 30).encode() + b"\n")
  return f"{root}/*.txt,{root}/*.jsonl"


def make_config(text_files: str, objective: str = "causal_lm", **data):
  c = config_lib.defaults()
  c.objective = objective
  c.batch_size = 4
  c.eval_steps = 2
  c.data.source = "text"
  c.data.text_files = text_files
  c.data.seq_len = 32
  c.data.vocab_size = VOCAB
  c.data.eval_fraction = 0.2
  for key, value in data.items():
    c.data[key] = value
  return c


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module", params=["causal_lm", "masked_lm"])
def prepared(request, text_files, tmp_path_factory):
  c = make_config(text_files, request.param)
  workdir = str(tmp_path_factory.mktemp("work"))
  preparation.build_cache(c, workdir)
  return c, workdir


# ----------------------------------------------------------------------------- packing


def test_frame_and_pack_carry_across_tokenize_batches(monkeypatch):
  assert packing.frame([[7, 8], [], [9]], BOS, EOS).tolist() == [2, 7, 8, 3, 2, 3, 2, 9, 3]

  class FakeTokenizer:
    vocab_size = 100

    def encode_batch(self, texts):
      return [[int(w) for w in t.split()] for t in texts]

  monkeypatch.setattr(packing, "_TOKENIZE_DOCS", 2)  # several calls, so the carry matters
  texts = ["10 11 12", "13", "14 15 16 17", "18 19", "20"]
  packed = packing.pack(iter(texts), FakeTokenizer(), start_id=BOS, end_id=EOS, row_len=4, what="t")
  stream = packing.frame([[int(w) for w in t.split()] for t in texts], BOS, EOS)
  assert packed.num_docs == 5 and packed.num_tokens == len(stream) == 21
  assert packed.rows.dtype == np.uint16
  np.testing.assert_array_equal(packed.rows, stream[:20].reshape(5, 4))


def test_causal_features_on_hand_made_rows():
  rows = np.array(
    [
      [9, 10, EOS, BOS, 11, 12, 13, EOS, BOS, 14],  # starts mid-document
      [BOS, 15, 16, 17, 18, EOS, BOS, 19, EOS, BOS],
    ]
  )
  f = batches.causal_features(rows)
  np.testing.assert_array_equal(f["inputs"], rows[:, :-1])
  np.testing.assert_array_equal(f["targets"], rows[:, 1:])
  np.testing.assert_array_equal(f["inputs"][:, 1:], f["targets"][:, :-1])
  assert f["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 2, 3], [1, 1, 1, 1, 1, 1, 2, 2, 2]]
  assert f["positions"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2]]
  # Zero exactly where the target is the next document's BOS (after an EOS input).
  assert f["weights"].tolist() == [[1, 1, 0, 1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 0, 1, 1, 0]]
  assert {k: v.dtype.name for k, v in f.items()} == {
    "inputs": "int32",
    "targets": "int32",
    "segment_ids": "int32",
    "positions": "int32",
    "weights": "float32",
  }


def test_masked_features_segments_on_hand_made_rows(text_files):
  c = make_config(text_files, "masked_lm")
  rows = np.array([[20, 21, SEP, CLS, 22, 23, SEP, CLS], [CLS, 24, 25, 26, 27, 28, 29, SEP]])
  f = batches.masked_features(rows, np.array([0, 1]), c, seed=0)
  assert f["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 2, 2, 3], [1, 1, 1, 1, 1, 1, 1, 1]]
  assert f["positions"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6, 7]]
  p = config_lib.num_predictions(c)
  assert f["masked_positions"].shape == (2, p) and f["masked_weights"].dtype == np.float32


# ----------------------------------------------------------------------------- masking


def mask(rows, ids, seed=0, vocab=30000, p=0.15, preds=20):
  return masking.mask_tokens(
    rows, ids, seed=seed, mlm_probability=p, num_predictions=preds, vocab_size=vocab
  )


def test_masking_statistics():
  rng = np.random.default_rng(0)
  rows = rng.integers(7, 30000, size=(3000, 128))
  rows[rng.random(rows.shape) < 0.1] = SEP  # specials sprinkled in, never to be chosen
  out = mask(rows, np.arange(3000))
  w = out["masked_weights"].astype(bool)
  n_candidates = (rows >= 7).sum(axis=1)
  np.testing.assert_array_equal(w.sum(axis=1), np.minimum(20, np.rint(n_candidates * 0.15)))
  assert abs(w.sum() / n_candidates.sum() - 0.15) < 0.005

  rows_i = np.arange(3000)[:, None]
  pos, tgt = out["masked_positions"], out["masked_targets"]
  np.testing.assert_array_equal(tgt[w], rows[rows_i, pos][w])
  assert (tgt[w] >= 7).all(), "a special token was chosen"
  padded = np.where(w, pos, 10**6 + np.arange(pos.shape[1]))  # unused slots sort last
  assert (np.diff(padded, axis=1) > 0).all(), "positions not ascending and unique"
  assert (pos[~w] == 0).all() and (tgt[~w] == 0).all()

  new = out["inputs"][rows_i, pos][w]
  is_mask, kept = new == MASK, new == tgt[w]
  is_random = ~is_mask & ~kept
  for fraction, expected in ((is_mask, 0.8), (is_random, 0.1), (kept, 0.1)):
    assert abs(fraction.mean() - expected) < 0.02
  assert ((new[is_random] >= 7) & (new[is_random] < 30000)).all()
  unchosen = np.ones(rows.shape, bool)
  unchosen[np.nonzero(w)[0], pos[w]] = False
  np.testing.assert_array_equal(out["inputs"][unchosen], rows[unchosen])


def test_masking_is_a_function_of_seed_example_and_position():
  rng = np.random.default_rng(1)
  rows = rng.integers(7, 500, size=(16, 64))
  ids = np.arange(100, 116)
  a, b = mask(rows, ids, vocab=500), mask(rows, ids, vocab=500)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  part = mask(rows[5:9], ids[5:9], vocab=500)  # other batch composition, same examples
  for key in a:
    np.testing.assert_array_equal(part[key], a[key][5:9])
  other_seed = mask(rows, ids, seed=1, vocab=500)
  assert not np.array_equal(other_seed["masked_positions"], a["masked_positions"])
  other_ids = mask(rows, ids + 1, vocab=500)
  assert not np.array_equal(other_ids["masked_positions"], a["masked_positions"])


def test_masking_rows_without_candidates():
  rows = np.array([[CLS, SEP, 0, 0], [CLS, 50, 51, SEP]])
  out = mask(rows, np.array([0, 1]), vocab=100, preds=2)
  assert out["masked_weights"].tolist() == [[0, 0], [1, 0]]
  np.testing.assert_array_equal(out["inputs"][0], rows[0])


# ----------------------------------------------------------------------------- order


def global_batch(c, workdir, step, process_count):
  parts = [
    pipeline.build(c, workdir, p, process_count).batch_for_step(step) for p in range(process_count)
  ]
  return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def test_global_batch_is_independent_of_process_count(prepared):
  c, workdir = prepared
  steps_per_epoch = pipeline.build(c, workdir).num_train_rows // c.batch_size
  for step in (0, 3, steps_per_epoch, steps_per_epoch + 1):  # includes an epoch boundary
    one = global_batch(c, workdir, step, 1)
    for count in (2, 4):
      other = global_batch(c, workdir, step, count)
      for key in one:
        np.testing.assert_array_equal(other[key], one[key], err_msg=f"{key} step {step}")
  first, next_epoch = global_batch(c, workdir, 0, 1), global_batch(c, workdir, steps_per_epoch, 1)
  assert not np.array_equal(first["inputs"], next_epoch["inputs"])


def test_resume_yields_what_the_uninterrupted_iterator_yields(prepared):
  c, workdir = prepared
  data = pipeline.build(c, workdir)
  steps_per_epoch = data.num_train_rows // c.batch_size
  it = data.train_batches(0)
  uninterrupted = [next(it) for _ in range(steps_per_epoch + 3)]
  for k in (1, steps_per_epoch + 1):
    resumed = next(pipeline.build(c, workdir).train_batches(start_step=k))
    for key in resumed:
      np.testing.assert_array_equal(resumed[key], uninterrupted[k][key])
  assert not np.array_equal(uninterrupted[0]["inputs"], uninterrupted[1]["inputs"])
  # One epoch visits every row once (a permutation, not sampling with replacement).
  epoch = np.concatenate([b["inputs"][:, :8] for b in uninterrupted[:steps_per_epoch]])
  assert len({r.tobytes() for r in epoch}) > 0.99 * len(epoch)


# ----------------------------------------------------------------------------- 'text' source


def test_text_source_end_to_end(prepared):
  c, workdir = prepared
  meta = json.load(open(f"{workdir}/data/meta.json"))
  assert meta["undecodable"] == {"files": 1, "docs": 1}
  assert meta["request"]["objective"] == c.objective
  paragraphs = 250 + 2 + 120  # a.txt, bad.txt, b.jsonl
  assert meta["train"]["docs"] + meta["eval"]["docs"] == paragraphs
  assert 0.1 * paragraphs < meta["eval"]["docs"] < 0.3 * paragraphs

  data = pipeline.build(c, workdir)
  assert data.num_train_rows == meta["train"]["rows"] and data.tokenizer.vocab_size == VOCAB
  batch = next(data.train_batches(0))
  b, t = c.batch_size, c.data.seq_len
  assert batch["inputs"].shape == (b, t) and batch["inputs"].dtype == np.int32
  assert batch["inputs"].max() < VOCAB and (batch["segment_ids"] >= 1).all()

  first, second = list(data.eval_batches()), list(data.eval_batches())
  assert len(first) == min(c.eval_steps, data.num_eval_rows // b) == 2
  fresh = list(pipeline.build(c, workdir).eval_batches())
  for x, y, z in zip(first, second, fresh, strict=True):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
      np.testing.assert_array_equal(x[key], z[key])
  if c.objective == "causal_lm":
    tb = first[0]["target_bytes"]
    raw = data.tokenizer.token_bytes()[first[0]["targets"]]
    # A document's first piece carries the space SentencePiece adds; it is not in the text.
    first_piece = (first[0]["inputs"] == tokenizer_lib.BOS_ID) & (raw > 0)
    expected = (raw - first_piece) * first[0]["weights"]
    assert tb.dtype == np.int32 and tb.sum() > 0
    np.testing.assert_array_equal(tb, expected)
  else:
    assert "target_bytes" not in first[0]
    assert first[0]["masked_weights"].sum() > 0

  samples = data.sample_texts(3)
  assert len(samples) == 3 and all(0 < len(s) <= 200 and s.strip() == s for s in samples)


def test_split_is_deterministic_and_independent_of_data_location(tmp_path):
  keys = [f"file.txt#{i}" for i in range(2000)]
  split = [corpus.is_eval(k, 0.2) for k in keys]
  assert split == [corpus.is_eval(k, 0.2) for k in keys]
  assert 0.15 < np.mean(split) < 0.25
  assert not any(corpus.is_eval(k, 0.0) for k in keys)
  for name in ("here", "elsewhere"):  # the same files in two places
    (tmp_path / name).mkdir()
    preparation.build_cache(make_config(write_corpus(tmp_path / name)), str(tmp_path / name / "w"))
  here, elsewhere = (tmp_path / d / "w" for d in ("here", "elsewhere"))
  assert (here / "tokenizer.model").read_bytes() == (elsewhere / "tokenizer.model").read_bytes()
  for split in ("train", "eval"):
    rows = [np.asarray(cache.split_rows(str(w), split)) for w in (here, elsewhere)]
    assert len(rows[0]) and np.array_equal(*rows), split


def test_prepare_reuses_cache_and_rebuilds_on_change(text_files, tmp_path):
  c, workdir = make_config(text_files), str(tmp_path)
  preparation.build_cache(c, workdir)
  rows = tmp_path / "data" / "train-00000-0000.bin"
  stamp = rows.stat().st_mtime_ns
  preparation.build_cache(c, workdir)
  assert rows.stat().st_mtime_ns == stamp
  c.data.seq_len = 16
  with pytest.raises(DataError, match="another config.*build_cache"):
    pipeline.build(c, workdir)
  preparation.build_cache(c, workdir)
  assert cache.split_rows(workdir, "train").shape[1] == 17
  assert pipeline.build(c, workdir).batch_for_step(0)["inputs"].shape == (4, 16)


def test_eval_text_files_are_the_eval_split(tmp_path):
  rng = random.Random(3)
  (tmp_path / "train.txt").write_text("".join(words(rng, 30) + "\n\n" for _ in range(200)))
  (tmp_path / "heldout.txt").write_text("".join(words(rng, 30) + "\n\n" for _ in range(40)))
  c = make_config(str(tmp_path / "train.txt"), eval_text_files=str(tmp_path / "heldout.txt"))
  preparation.build_cache(c, str(tmp_path / "w"))
  meta = json.load(open(tmp_path / "w" / "data" / "meta.json"))
  assert (meta["train"]["docs"], meta["eval"]["docs"]) == (200, 40)


# ----------------------------------------------------------------------------- other sources


def test_builtin_listing_and_split():
  files = corpus.builtin_files()
  keys = [k for k, _ in files]
  assert keys == sorted(keys) and len(keys) > 300
  assert {"os.py", "json/__init__.py", "collections/__init__.py"} <= set(keys)
  skipped = ("test", "tests", "site-packages", "dist-packages", "idle_test")
  assert not any(set(k.split("/")[:-1]) & set(skipped) for k in keys)
  c = config_lib.defaults()
  stats = corpus.DecodeStats()
  train = list(units.split_documents(c, "train", stats))
  ev = list(units.split_documents(c, "eval", stats))
  assert 0.02 * len(files) < len(ev) < 0.1 * len(files)
  assert len(train) + len(ev) == sum(1 for _, p in files if p.read_text("utf-8").strip())
  assert ev == list(units.split_documents(c, "eval", corpus.DecodeStats()))
  assert corpus.describe(c) == corpus.describe(c) and corpus.describe(c)["num_files"] == len(files)


def test_tfds_source_with_mock_data(tmp_path):
  c = make_config("", vocab_size=280)
  c.data.source, c.data.tfds_name = "tfds", "lm1b"
  with tfds.testing.mock_data(num_examples=300, policy=tfds.testing.MockPolicy.USE_CODE):
    preparation.build_cache(c, str(tmp_path))
    data = pipeline.build(c, str(tmp_path))
  meta = json.load(open(tmp_path / "data" / "meta.json"))
  assert meta["train"]["docs"] == meta["eval"]["docs"] == 300
  assert meta["request"]["source"]["tfds_name"] == "lm1b"
  batch = next(data.train_batches(0))
  assert batch["inputs"].shape == (4, 32) and batch["inputs"].max() < 280
  assert len(list(data.eval_batches())) == 2


def test_tfds_missing_feature(tmp_path):
  c = make_config("", vocab_size=280)
  c.data.source, c.data.tfds_name, c.data.tfds_text_key = "tfds", "lm1b", "body"
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    with pytest.raises(DataError, match="no feature 'body'.*tfds_text_key"):
      preparation.build_cache(c, str(tmp_path))


# ----------------------------------------------------------------------------- errors


def test_pattern_matching_nothing(tmp_path):
  c = make_config(f"{tmp_path}/*.txt,{tmp_path}/missing/*.jsonl")
  (tmp_path / "ok.txt").write_text("kalo mine\n")
  with pytest.raises(DataError, match=r"missing/\*\.jsonl.*matches no files.*data.text_files"):
    preparation.build_cache(c, str(tmp_path / "w"))


def test_empty_corpus(tmp_path):
  (tmp_path / "empty.txt").write_text("\n\n   \n\n")
  c = make_config(str(tmp_path / "empty.txt"))
  with pytest.raises(DataError, match=r"empty.txt.*no text; one batch needs .*=4\*33=132 tokens"):
    preparation.build_cache(c, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "data" / "meta.json").exists()


def test_corpus_too_small_for_one_batch_leaves_no_meta(text_files, tmp_path):
  c, workdir = make_config(text_files), str(tmp_path)
  preparation.build_cache(c, workdir)
  assert (tmp_path / "data" / "meta.json").exists()
  c.data.seq_len = 16
  c.batch_size = 4096
  with pytest.raises(DataError, match=r"has \d+ tokens.*one batch needs.*--config.batch_size"):
    preparation.build_cache(c, workdir)
  assert not (tmp_path / "data" / "meta.json").exists()
  with pytest.raises(DataError, match="no data cache.*run preparation.build_cache"):
    pipeline.build(c, workdir)


def test_eval_split_too_small(text_files, tmp_path):
  c = make_config(text_files, eval_fraction=0.0)
  with pytest.raises(DataError, match="eval split too small.*eval_fraction"):
    preparation.build_cache(c, str(tmp_path))


def test_build_errors(prepared, tmp_path):
  c, workdir = prepared
  with pytest.raises(DataError, match="not divisible by the 3 processes.*batch_size"):
    pipeline.build(c, workdir, 0, 3)
  with pytest.raises(DataError, match="tokenizer.model does not exist.*build_cache"):
    pipeline.build(c, str(tmp_path))


def test_tokenizer_path_errors(text_files, tmp_path):
  c = make_config(text_files, tokenizer_path=str(tmp_path / "nope.model"))
  with pytest.raises(tokenizer_lib.TokenizerError, match="does not exist.*data.tokenizer_path"):
    preparation.build_cache(c, str(tmp_path / "w"))
  (tmp_path / "bad.model").write_bytes(b"\x08\x01garbage" * 50)
  c.data.tokenizer_path = str(tmp_path / "bad.model")
  with pytest.raises(tokenizer_lib.TokenizerError, match="bad.model"):
    preparation.build_cache(c, str(tmp_path / "w"))


def test_given_tokenizer_is_used_and_checked(prepared, text_files, tmp_path):
  _, workdir = prepared
  c = make_config(text_files, tokenizer_path=f"{workdir}/tokenizer.model")
  preparation.build_cache(c, str(tmp_path))
  copy = tmp_path / "tokenizer.model"  # the workdir keeps the file it trained with
  assert copy.read_bytes() == open(f"{workdir}/tokenizer.model", "rb").read()
  assert pipeline.build(c, str(tmp_path)).tokenizer.path == str(copy)
  c.data.vocab_size = 512
  with pytest.raises(DataError, match="has 320 pieces.*--config.data.vocab_size=320"):
    preparation.build_cache(c, str(tmp_path))


def test_vocab_too_large_for_corpus(tmp_path):
  (tmp_path / "tiny.txt").write_text("kalo mine sato vi\n\nbe da fo gu\n")
  c = make_config(str(tmp_path / "tiny.txt"), vocab_size=4096, eval_fraction=0.0)
  with pytest.raises(tokenizer_lib.TokenizerError, match=r"4096.*at most \d+.*vocab_size="):
    preparation.build_cache(c, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "tokenizer.model").exists()


def test_core_modules_do_not_import_tensorflow():
  code = (
    "import sys, sslm_jax.tokenizer.sentencepiece, sslm_jax.data, sslm_jax.data.masking\n"
    "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


def test_an_enormous_line_is_read_in_bounded_pieces(tmp_path, monkeypatch):
  monkeypatch.setattr(corpus, "MAX_DOC_BYTES", 1000)
  line = "é" * 7000  # 14,000 bytes, no newline: read in pieces, never split inside a character
  path = tmp_path / "one_line.txt"
  path.write_bytes(("short paragraph\n\n" + line).encode())
  docs = list(corpus._paragraphs(str(path), "one_line.txt"))
  assert docs[0][1] == "short paragraph"
  pieces = [text for _, text, _ in docs[1:]]
  assert len(pieces) >= 14 and all(len(p.encode()) <= 1000 for p in pieces)
  assert "".join(pieces) == line
  assert not any(bad for _, _, bad in docs)


# ----------------------------------------------------------------------------- tokenizer.json


def test_masking_with_scattered_special_ids():
  """BERT's special ids (0, 100-103) are never chosen and never drawn as random replacements."""
  specials = {0, 100, 101, 102, 103}
  rng = np.random.default_rng(2)
  rows = rng.integers(0, 200, size=(400, 64))
  out = masking.mask_tokens(
    rows,
    np.arange(400),
    seed=0,
    mlm_probability=0.3,
    num_predictions=30,
    vocab_size=200,
    mask_id=103,
    special_ids=specials,
  )
  w = out["masked_weights"].astype(bool)
  assert not np.isin(out["masked_targets"][w], list(specials)).any()
  new = out["inputs"][np.arange(400)[:, None], out["masked_positions"]][w]
  random_ids = new[(new != 103) & (new != out["masked_targets"][w])]
  assert not np.isin(random_ids, list(specials)).any()
  assert (random_ids < 100).any() and (random_ids > 103).any()


def test_masking_random_ids_keep_the_sentencepiece_formula():
  """With our ids 0-6 the random replacements are 7 + floor(u * (vocab - 7)), as they were
  before special ids became a set: masked batches of existing runs do not change."""
  rows = np.random.default_rng(3).integers(7, 300, size=(64, 32))
  out = mask(rows, np.arange(64), vocab=300, p=0.5)
  u = masking.uniforms(0, np.arange(64), out["masked_positions"], masking._STREAM_REPLACE)
  expected = 7 + (u * 293).astype(np.int64)
  new = out["inputs"][np.arange(64)[:, None], out["masked_positions"]]
  w = out["masked_weights"].astype(bool)
  is_random = w & (new != MASK) & (new != out["masked_targets"])
  assert is_random.sum() > 50
  np.testing.assert_array_equal(new[is_random], expected[is_random])


def _hf_config(text_files, tmp_path, objective, style):
  from test_hf_tokenizer import bert_style_json, gpt2_style_json

  rng = random.Random(5)
  texts = [words(rng, 40) for _ in range(200)]
  make = gpt2_style_json if style == "gpt2" else bert_style_json
  path = make(tmp_path / f"{style}.json", texts)
  tok = tokenizer_files.load(path)
  return make_config(text_files, objective, tokenizer_path=path, vocab_size=tok.vocab_size), tok


def test_gpt2_style_tokenizer_json_packs_one_separator_per_document(text_files, tmp_path):
  c, tok = _hf_config(text_files, tmp_path, "causal_lm", "gpt2")
  end = tok.eos_id
  workdir = str(tmp_path / "w")
  preparation.build_cache(c, workdir)
  data = pipeline.build(c, workdir)
  docs = list(units.split_documents(c, "train", corpus.DecodeStats()))
  meta = json.loads((tmp_path / "w" / "data" / "meta.json").read_text())
  assert meta["train"]["tokens"] == sum(len(ids) + 1 for ids in tok.encode_batch(docs))
  rows = np.asarray(data.train_rows).astype(np.int64)
  assert not ((rows[:, :-1] == end) & (rows[:, 1:] == end)).any()
  # Documents read back whole between two separators in each unit's stream of rows (a unit's
  # last document is cut where its rows end).
  whole = []
  for record in sorted((tmp_path / "w" / "data" / "units").glob("*.json")):
    shards = json.loads(record.read_text())["splits"]["train"]["shards"]
    parts = [np.fromfile(tmp_path / "w" / "data" / name, meta["dtype"]) for name, _ in shards]
    stream = np.concatenate([np.empty(0, meta["dtype"]), *parts]).astype(np.int64)
    cuts = np.flatnonzero(stream == end)
    whole += [tok.decode(stream[a + 1 : b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
  assert len(whole) > 10 and set(whole) <= set(docs)
  batch = data.batch_for_step(0)
  assert (batch["weights"] == 1).all(), "the separator target ends a document and is learned"
  starts = batch["inputs"] == end
  assert (batch["positions"][starts] == 0).all()
  ev = next(data.eval_batches())
  np.testing.assert_array_equal(ev["target_bytes"], tok.token_bytes()[ev["targets"]])


def test_bert_style_tokenizer_json_masks_with_its_own_ids(text_files, tmp_path):
  c, tok = _hf_config(text_files, tmp_path, "masked_lm", "bert")
  workdir = str(tmp_path / "w")
  preparation.build_cache(c, workdir)
  data = pipeline.build(c, workdir)
  rows = np.asarray(data.train_rows).astype(np.int64)
  assert (rows == tok.cls_id).any() and (rows == tok.sep_id).any()
  assert not np.isin(rows, [0, 1, 2, 3, 4, 5, 6]).all(axis=1).any()
  specials = sorted(tok.special_ids)
  for step in range(5):
    batch = data.batch_for_step(step)
    assert (batch["positions"][batch["inputs"] == tok.cls_id] == 0).all()
    w = batch["masked_weights"].astype(bool)
    assert not np.isin(batch["masked_targets"][w], specials).any()
    new = batch["inputs"][np.arange(len(w))[:, None], batch["masked_positions"]][w]
    assert (new == tok.mask_id).mean() > 0.5
    assert not np.isin(new[new != tok.mask_id], specials).any()


def test_tokenizer_json_without_the_objectives_special_tokens(text_files, tmp_path):
  c, _ = _hf_config(text_files, tmp_path, "causal_lm", "bert")
  with pytest.raises(DataError, match=r"no special token for \['bos_id', 'eos_id'\]"):
    preparation.build_cache(c, str(tmp_path / "w"))
  c, _ = _hf_config(text_files, tmp_path, "masked_lm", "gpt2")
  with pytest.raises(DataError, match=r"\['cls_id', 'sep_id', 'mask_id'\].*masked_lm"):
    preparation.build_cache(c, str(tmp_path / "w"))
