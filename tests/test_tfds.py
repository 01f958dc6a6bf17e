"""The real TFDS loading path: a dataset built here, offline, and one that cannot be prepared."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import tiny_config
from test_tokenizer import corpus_texts

from sslm_jax.data import cache, corpus, pipeline, preparation, units
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib


class SslmTinyText(tfds.core.GeneratorBasedBuilder):
  """Generated text with a train and a test split; nothing is downloaded."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
    return tfds.core.DatasetInfo(builder=self, features=features)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0, 300), "test": self._generate_examples(1, 60)}

  def _generate_examples(self, seed, n):
    for i, text in enumerate(corpus_texts(n, seed=seed)):
      yield i, {"text": text}


class SslmUnreachableText(SslmTinyText):
  """A dataset whose download fails, as it does without network access."""

  def _split_generators(self, dl_manager):
    raise ConnectionError("Failed to resolve 'data.example' (no network)")


def _config(name, data_dir):
  c = tiny_config()
  c.data.source, c.data.tfds_name, c.data.tfds_data_dir = "tfds", name, str(data_dir)
  c.data.vocab_size, c.data.tokenizer_sample_bytes = 320, 300_000
  return c


def test_a_dataset_prepared_here_feeds_training(tmp_path):
  data_dir = tmp_path / "tfds"
  tfds.builder("sslm_tiny_text", data_dir=str(data_dir)).download_and_prepare()
  c = _config("sslm_tiny_text", data_dir)
  preparation.build_cache(c, str(tmp_path / "run"))
  data = pipeline.build(c, str(tmp_path / "run"))
  batch = data.batch_for_step(0)
  assert batch["inputs"].shape == (c.batch_size, c.data.seq_len)
  # The rows hold the dataset's own text: decoded pieces are words of its generator.
  words = set(" ".join(corpus_texts(300, seed=0)).split())
  decoded = data.tokenizer.decode(batch["inputs"][0]).split()
  assert len(decoded) > 3 and sum(w in words for w in decoded[1:-1]) >= len(decoded) - 3
  assert (batch["inputs"] == tokenizer_lib.BOS_ID).any()
  assert np.isfinite(batch["weights"]).all()


def test_a_dataset_that_cannot_be_prepared_is_one_clear_line(tmp_path):
  c = _config("sslm_unreachable_text", tmp_path / "empty")
  with pytest.raises(corpus.DataError) as error:
    list(units.split_documents(c, "train", corpus.DecodeStats()))
  message = str(error.value)
  assert "\n" not in message
  assert "sslm_unreachable_text" in message and str(tmp_path / "empty") in message
  assert "ConnectionError" in message and "tfds build sslm_unreachable_text" in message
  assert "--config.data.tfds_data_dir" in message


def test_an_unknown_split_names_the_splits_there_are(tmp_path):
  data_dir = tmp_path / "tfds"
  tfds.builder("sslm_tiny_text", data_dir=str(data_dir)).download_and_prepare()
  c = _config("sslm_tiny_text", data_dir)
  c.data.tfds_eval_split = "validation"
  with pytest.raises(corpus.DataError, match=r"no split 'validation'.*\['test', 'train'\]"):
    list(units.split_documents(c, "eval", corpus.DecodeStats()))


def test_a_split_cut_into_units_prepares_the_same_rows_on_worker_processes(tmp_path, monkeypatch):
  data_dir = tmp_path / "tfds"
  tfds.builder("sslm_tiny_text", data_dir=str(data_dir)).download_and_prepare()
  c = _config("sslm_tiny_text", data_dir)
  whole = list(units.split_documents(c, "train", corpus.DecodeStats()))
  monkeypatch.setattr(units, "TFDS_DOCS_PER_UNIT", 100)  # 300 train documents: 3 units
  parts = units.units(c)
  assert [u.splits for u in parts] == [("train",)] * 3 + [("eval",)]
  assert list(units.split_documents(c, "train", corpus.DecodeStats())) == whole
  preparation.build_cache(c, str(tmp_path / "here"))
  meta = cache.read_meta(str(tmp_path / "here"))
  assert meta["train"]["docs"] == len(whole) == 300
  assert len(meta["train"]["shards"]) == 3  # one per unit
  # Worker processes are handed the units themselves, slices and all, as this process planned.
  preparation.build_cache(c, str(tmp_path / "pool"), num_workers=2)
  for split in ("train", "eval"):
    np.testing.assert_array_equal(
      np.asarray(cache.split_rows(str(tmp_path / "pool"), split)),
      np.asarray(cache.split_rows(str(tmp_path / "here"), split)),
    )
