"""A workdir keeps the tokenizer it trains with: data.tokenizer_path (or init_from_hf's
tokenizer.json) is copied in on first use and read from there by every reader, so a workdir still
loads after the file it came from has moved."""

import json
import os
import random
import shutil

import pytest
from test_hf_tokenizer import gpt2_style_json

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import restore
from sslm_jax.data import cache
from sslm_jax.errors import UsageError
from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib


def _texts(n: int = 60, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  syllables = "ka lo mi ne ru sa to vi be da fo gu".split()
  words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(100)]
  return [" ".join(rng.choices(words, k=12)) + "." for _ in range(n)]


@pytest.fixture()
def hf_dir(tmp_path):
  directory = tmp_path / "hf"
  directory.mkdir()
  gpt2_style_json(directory / "tokenizer.json", _texts(), vocab_size=300)
  return directory


def _config(vocab_size: int, **fields):
  c = config_lib.defaults()
  c.data.vocab_size = vocab_size
  for name, value in fields.items():
    section, _, key = name.rpartition("__")
    (c[section] if section else c)[key] = value
  return c


def test_the_tokenizer_is_copied_into_the_workdir_and_read_from_there(hf_dir, tmp_path):
  source = str(hf_dir / "tokenizer.json")
  vocab = tokenizer_files.load(source).vocab_size
  c = _config(vocab, data__tokenizer_path=source)
  workdir = tmp_path / "run"
  assert cache._existing_tokenizer(c, str(workdir)).path == source  # reads only
  assert not workdir.exists()
  tok = cache.tokenizer(c, str(workdir), may_train=True)
  assert tok.path == str(workdir / "tokenizer.json")
  assert (workdir / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
  assert sorted(os.listdir(workdir)) == ["tokenizer.json"]
  shutil.rmtree(hf_dir)  # the source is gone: the copy serves the run and its readers
  assert cache.tokenizer(c, str(workdir), may_train=False).sha256 == tok.sha256
  assert cache.tokenizer_file(c, str(workdir)) == str(workdir / "tokenizer.json")
  (workdir / "config.json").write_text(json.dumps(c.to_dict()))
  assert restore.tokenizer_file(str(workdir), c) == str(workdir / "tokenizer.json")


def test_a_workdir_holding_another_tokenizer_is_refused_before_writing(hf_dir, tmp_path):
  source = str(hf_dir / "tokenizer.json")
  vocab = tokenizer_files.load(source).vocab_size
  workdir = tmp_path / "run"
  cache.tokenizer(_config(vocab, data__tokenizer_path=source), str(workdir), may_train=True)
  other = gpt2_style_json(tmp_path / "other.json", _texts(seed=1), vocab_size=300)
  c = _config(tokenizer_files.load(other).vocab_size, data__tokenizer_path=other)
  before = (workdir / "tokenizer.json").read_bytes()
  with pytest.raises(tokenizer_lib.TokenizerError) as error:
    cache.resume_record(c, str(workdir))  # what a run reads before writing anything
  message = str(error.value)
  assert "already holds a different tokenizer" in message and "\n" not in message
  assert f"{workdir}/tokenizer.json" in message and other in message
  assert (workdir / "tokenizer.json").read_bytes() == before


def test_init_from_hf_pretraining_uses_the_directory_tokenizer(hf_dir, tmp_path):
  vocab = tokenizer_files.load(str(hf_dir / "tokenizer.json")).vocab_size
  c = _config(vocab, init_from_hf=str(hf_dir))
  workdir = tmp_path / "run"
  tok = cache.tokenizer(c, str(workdir), may_train=True)
  assert tok.path == str(workdir / "tokenizer.json")
  assert not (workdir / "tokenizer.model").exists()  # no SentencePiece model was trained
  os.remove(hf_dir / "tokenizer.json")
  fresh = tmp_path / "fresh"
  with pytest.raises(tokenizer_lib.TokenizerError) as error:
    cache.resume_record(c, str(fresh))
  message = str(error.value)
  assert f"init_from_hf={hf_dir} has no tokenizer.json" in message
  assert "--config.data.tokenizer_path=FILE" in message and "to train" not in message
  assert not fresh.exists()
  c.data.tokenizer_path = str(tmp_path / "missing.model")
  with pytest.raises(tokenizer_lib.TokenizerError, match="does not exist") as error:
    cache.resume_record(c, str(fresh))
  assert "to train" not in str(error.value) and "leave it empty" not in str(error.value)


def test_old_workdirs_read_the_tokenizer_their_config_names(hf_dir, tmp_path):
  """Written before runs kept a copy: the named file is read where it exists; otherwise one
  line says where to put it."""
  source = str(hf_dir / "tokenizer.json")
  c = _config(300, data__tokenizer_path=source)
  workdir = tmp_path / "old"
  workdir.mkdir()
  assert restore.tokenizer_file(str(workdir), c) == source
  shutil.rmtree(hf_dir)
  with pytest.raises(UsageError) as error:
    restore.tokenizer_file(str(workdir), c)
  message = str(error.value)
  assert f"data.tokenizer_path={source}" in message and f"{workdir}/tokenizer.json" in message
