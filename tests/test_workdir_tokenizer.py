"""A workdir keeps its own copy of the tokenizer it was trained with."""

import pytest

from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib


def test_adopt_copies_once_and_refuses_another_tokenizer(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  assert tokenizer_files.workdir_file(str(workdir)) is None
  source = tmp_path / "hf" / "tokenizer.json"
  source.parent.mkdir()
  source.write_text('{"a": 1}')
  copy = tokenizer_files.adopt(str(source), str(workdir))
  assert copy == str(workdir / "tokenizer.json")
  assert (workdir / "tokenizer.json").read_text() == '{"a": 1}'
  assert tokenizer_files.workdir_file(str(workdir)) == copy
  assert tokenizer_files.adopt(str(source), str(workdir)) == copy  # identical: nothing to do
  assert tokenizer_files.adopt(copy, str(workdir)) == copy  # the copy itself names the same file
  source.write_text('{"a": 2}')
  with pytest.raises(tokenizer_lib.TokenizerError, match="already holds a different tokenizer"):
    tokenizer_files.adopt(str(source), str(workdir))
  sp = tmp_path / "sp.model"
  sp.write_bytes(b"proto")
  with pytest.raises(tokenizer_lib.TokenizerError, match="different tokenizer"):
    tokenizer_files.adopt(str(sp), str(workdir))
  assert sorted(p.name for p in workdir.iterdir()) == ["tokenizer.json"]
  assert (workdir / "tokenizer.json").read_text() == '{"a": 1}'


def test_adopt_names_a_sentencepiece_copy_tokenizer_model(tmp_path):
  sp = tmp_path / "mine.model"
  sp.write_bytes(b"proto")
  copy = tokenizer_files.adopt(str(sp), str(tmp_path / "run"))
  assert copy == str(tmp_path / "run" / "tokenizer.model")
  assert tokenizer_files.workdir_file(str(tmp_path / "run")) == copy
