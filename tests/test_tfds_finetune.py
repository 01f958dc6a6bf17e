"""Fine-tuning on a TFDS dataset built here, offline: class names, pairs, the -1 labels of test
splits, a dataset that cannot be prepared, and a short run."""

import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from test_finetune import _config, _records, _texts

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.data import corpus, labelled
from sslm_jax.finetune import loop as finetune
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib
from sslm_jax.training import sharding

_NAMES = ["negative", "positive"]
_SIZES = {"train": 64, "validation": 16, "test": 8}


def _rows(split: str):
  """(text, "yes"/"no") of a split; the same on every call."""
  return _texts(np.random.default_rng(list(_SIZES).index(split)), _SIZES[split])


class SslmTinySentiment(tfds.core.GeneratorBasedBuilder):
  """GLUE-like single sentences: the test split hides its labels as -1."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = {
      "sentence": tfds.features.Text(),
      "label": tfds.features.ClassLabel(names=_NAMES),
      "idx": np.int32,
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in _SIZES}

  def _generate_examples(self, split):
    for i, (text, y) in enumerate(_rows(split)):
      label = -1 if split == "test" else int(y == "yes")
      yield i, {"sentence": text, "label": label, "idx": i}


class SslmTinySimilarity(tfds.core.GeneratorBasedBuilder):
  """GLUE-like sentence pairs with a number to regress (stsb); -1 in the test split."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = {
      "sentence1": tfds.features.Text(),
      "sentence2": tfds.features.Text(),
      "label": np.float32,
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in _SIZES}

  def _generate_examples(self, split):
    for i, (text, _) in enumerate(_rows(split)):
      label = -1.0 if split == "test" else i / 4
      yield i, {"sentence1": text, "sentence2": text.split()[0], "label": label}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """Both datasets prepared in root/tfds, and a tokenizer for their texts."""
  root = tmp_path_factory.mktemp("tfds_tasks")
  for name in ("sslm_tiny_sentiment", "sslm_tiny_similarity"):
    tfds.builder(name, data_dir=str(root / "tfds")).download_and_prepare()
  texts = [t for t, _ in _texts(np.random.default_rng(5), 300)]
  tokenizer_lib.train(texts, 300, str(root / "tokenizer.model"))
  return root


def _tfds_config(root, name="sslm_tiny_sentiment", task="classification", steps=6):
  c = _config(root, steps=steps)
  c.finetune.train_files = c.finetune.eval_files = ""
  c.finetune.task, c.finetune.tfds_name = task, name
  c.data.tfds_data_dir = str(root / "tfds")
  config_lib.validate(c)
  return c


def test_examples_carry_class_names_pairs_and_numbers(root):
  train, evals = finetune.task_examples(_tfds_config(root))
  # TFDS orders a split by a hash of the example keys: compare contents, not order.
  expected = sorted((t, _NAMES[y == "yes"]) for t, y in _rows("train"))
  assert sorted((e.text, e.label) for e in train) == expected
  assert len(evals) == _SIZES["validation"]
  assert {e.text_pair for e in train + evals} == {None}
  assert "sslm_tiny_sentiment[train] example 3" in train[3].where

  train, evals = finetune.task_examples(_tfds_config(root, "sslm_tiny_similarity", "regression"))
  assert sorted(e.label for e in evals) == [i / 4 for i in range(_SIZES["validation"])]
  assert all(e.text_pair == e.text.split()[0] for e in train)  # sentence1/sentence2 found


def test_pairs_need_a_second_text_and_keys_must_exist(root):
  with pytest.raises(labelled.LabelledDataError, match="tfds_text_pair_key") as error:
    finetune.task_examples(_tfds_config(root, task="pair_classification"))
  assert "\n" not in str(error.value)
  c = _tfds_config(root)
  c.finetune.tfds_text_key = "review"
  with pytest.raises(labelled.LabelledDataError, match=r"no feature 'review'.*'sentence'"):
    finetune.task_examples(c)


@pytest.mark.parametrize(
  "name,task", [("sslm_tiny_sentiment", "classification"), ("sslm_tiny_similarity", "regression")]
)
def test_hidden_test_labels_are_refused_in_one_line(root, name, task):
  c = _tfds_config(root, name, task)
  c.finetune.tfds_eval_split = "test"
  with pytest.raises(labelled.LabelledDataError) as error:
    finetune.task_examples(c)
  message = str(error.value)
  assert "\n" not in message and "-1" in message and "'test'" in message
  assert "--config.finetune.tfds_eval_split" in message and "validation" in message


def test_a_dataset_not_prepared_here_is_one_clear_line(root, tmp_path):
  c = _tfds_config(root)
  c.data.tfds_data_dir = str(tmp_path / "empty")
  with pytest.raises(corpus.DataError) as error:
    finetune.task_examples(c)
  message = str(error.value)
  assert "\n" not in message and "is not prepared in" in message
  assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").rglob("*.tfrecord*"))
  assert "tfds build sslm_tiny_sentiment --data_dir=DIR" in message
  assert "--config.data.tfds_data_dir=DIR" in message and str(tmp_path / "empty") in message


def test_tfds_name_and_train_files_exclude_each_other(root):
  c = _tfds_config(root)
  c.finetune.train_files = c.finetune.eval_files = "train.jsonl"
  with pytest.raises(config_lib.ConfigError, match="set only one"):
    config_lib.validate(c)
  # Without a dataset the tfds fields stay out of the fingerprint: older workdirs still resume.
  assert not [k for k in finetune._finetune_record(_config(root)) if k.startswith("tfds")]


def test_a_short_run_on_a_tfds_dataset_and_its_resume_guard(root, tmp_path):
  c = _tfds_config(root, steps=3)
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 3
  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  finetune.run(c, str(tmp_path), mesh)
  final = _records(tmp_path)[-1]
  assert final["step"] == 3 and 0.0 <= final["eval_accuracy"] <= 1.0 and "eval_loss" in final
  assert json.loads((tmp_path / "labels.json").read_text())["labels"] == _NAMES
  record = finetune.prepare_finetuning(c, str(tmp_path)).fingerprint["finetune"]
  assert record["tfds_dataset"] == "sslm_tiny_sentiment/1.0.0"
  c.finetune.tfds_train_split = "validation"  # other examples: resuming is refused
  with pytest.raises(checkpoint.CheckpointMismatch, match="finetune"):
    finetune.run(c, str(tmp_path), mesh)
