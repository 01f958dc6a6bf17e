"""Fine-tuning features are tokenized once into the workdir and memory-mapped at later starts."""

import json
import os

import numpy as np
from test_finetune import _config, task_dir  # noqa: F401 (task_dir is a fixture)

from sslm_jax.finetune import labelled_cache, tasks
from sslm_jax.finetune import loop as finetune


def test_a_second_start_maps_the_stored_features_instead_of_tokenizing(
  task_dir,  # noqa: F811
  tmp_path,
  monkeypatch,
):
  calls = []
  featurize = tasks.featurize

  def counted(examples, *args):
    calls.append(len(examples))
    return featurize(examples, *args)

  monkeypatch.setattr(tasks, "featurize", counted)
  config, workdir = _config(task_dir), tmp_path / "run"
  first = finetune.prepare_finetuning(config, str(workdir))
  assert calls == [2048, 128]
  entries = sorted(os.listdir(workdir / labelled_cache.DIR))
  assert len(entries) == 2
  second = finetune.prepare_finetuning(_config(task_dir), str(workdir))
  assert calls == [2048, 128]  # nothing tokenized again
  assert isinstance(second.data.train["inputs"], np.memmap)
  for split in ("train", "eval"):
    for name, array in getattr(first.data, split).items():
      np.testing.assert_array_equal(getattr(second.data, split)[name], array)
  np.testing.assert_array_equal(
    second.data.batch_for_step(3)["inputs"], first.data.batch_for_step(3)["inputs"]
  )
  assert second.fingerprint == first.fingerprint

  # An edited training file is a new key: tokenized again, and the old entry is removed.
  edited = tmp_path / "train.jsonl"
  rows = (task_dir / "train.jsonl").read_text().splitlines()
  row = json.loads(rows[5])
  rows[5] = json.dumps({**row, "text": row["text"] + " more"})
  edited.write_text("\n".join(rows) + "\n")
  config = _config(task_dir)
  config.finetune.train_files = str(edited)
  finetune.prepare_finetuning(config, str(tmp_path / "other"))
  assert calls == [2048, 128, 2048, 128]
  finetune.prepare_finetuning(config, str(workdir), allow_changes=frozenset({"all"}))
  assert calls == [2048, 128, 2048, 128, 2048]  # the eval features were kept
  now = sorted(os.listdir(workdir / labelled_cache.DIR))
  assert len(now) == 2 and len(set(now) & set(entries)) == 1


def test_the_key_follows_the_tokenizer_labels_and_length():
  class Tok:
    sha256 = "a"

  examples = [tasks.Example("one", None, "x"), tasks.Example("two", "pair", "y")]
  base = labelled_cache.key(examples, Tok, None, 16, False, tasks.featurize)
  other_tok = type("Tok", (), {"sha256": "b"})
  assert labelled_cache.key(examples, other_tok, None, 16, False, tasks.featurize) != base
  assert labelled_cache.key(examples, Tok, None, 32, False, tasks.featurize) != base
  assert labelled_cache.key(examples[:1], Tok, None, 16, False, tasks.featurize) != base
  assert labelled_cache.key(examples, Tok, None, 16, False, tasks.featurize) == base
