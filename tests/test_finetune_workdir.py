"""A fine-tuned workdir: self-contained, never mixed with a pretraining one, and every refusal
made before anything in it is written (a corrected rerun then simply works)."""

import json
import shutil

import ml_collections
import pytest
from test_api import run_python
from test_finetune import _config, _files, _mesh, _pretrained_workdir, _records, task_dir  # noqa: F401

import sslm_jax
from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.checkpoints import saved_tree
from sslm_jax.data import labelled
from sslm_jax.errors import UsageError
from sslm_jax.finetune import loop as finetune
from sslm_jax.tokenizer import files as tokenizer_files


def _pre(task_dir, root):  # noqa: F811
  """A pretraining workdir that keeps its own tokenizer.model, as pretraining runs do."""
  _pretrained_workdir(root, _config(task_dir))
  shutil.copy(task_dir / "tokenizer.model", root / "tokenizer.model")
  written = json.loads((root / "config.json").read_text())
  written["data"]["tokenizer_path"] = ""
  (root / "config.json").write_text(json.dumps(written))


def _finetune_config(task_dir, init_from: str, steps=3):  # noqa: F811
  config = _config(task_dir, steps=steps)
  config.data.tokenizer_path = ""  # init_from's
  config.finetune.init_from = init_from
  return config


def test_a_fine_tuned_workdir_needs_nothing_outside_it(task_dir, tmp_path, monkeypatch):  # noqa: F811
  monkeypatch.chdir(tmp_path)
  _pre(task_dir, tmp_path / "pre")
  config = _finetune_config(task_dir, "pre")  # relative, as typed
  finetune.run(config, "run", _mesh(config))
  run = tmp_path / "run"
  written = json.loads((run / "config.json").read_text())
  assert written["finetune"]["init_from"] == str(tmp_path / "pre")
  assert tokenizer_files.workdir_file(str(run)) == str(run / "tokenizer.model")
  assert (run / "tokenizer.model").read_bytes() == (task_dir / "tokenizer.model").read_bytes()
  shutil.rmtree(tmp_path / "pre")  # the pretraining workdir is gone
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  model = sslm_jax.load(str(run))
  assert model.classify(["violet river stone"])[0].label in ("no", "yes")
  # Preempted and moved to a machine without the pretraining workdir: the run resumes from its
  # own checkpoint and tokenizer copy, through the same config check as main.
  longer = _finetune_config(task_dir, str(tmp_path / "pre"), steps=6)
  config_lib.validate(longer)
  finetune.run(longer, str(run), _mesh(longer))
  assert [r["step"] for r in _records(run)][-1] == 6


@pytest.mark.slow
def test_predict_from_another_directory_after_the_pretraining_workdir_moved(task_dir, tmp_path):  # noqa: F811
  _pre(task_dir, tmp_path / "pre")
  config = _finetune_config(task_dir, str(tmp_path / "pre"))
  finetune.run(config, str(tmp_path / "run"), _mesh(config))
  (tmp_path / "pre").rename(tmp_path / "moved")
  out = tmp_path / "predictions.jsonl"
  args = ["-m", "sslm_jax.predict", f"--workdir={tmp_path / 'run'}", f"--output={out}"]
  result = run_python([*args, f"--input={task_dir / 'eval.jsonl'}"], cwd="/")
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(out.read_text().splitlines()) == 128


def test_fine_tuning_in_a_pretraining_workdir_is_refused_before_writing(task_dir, tmp_path):  # noqa: F811
  pre = tmp_path / "pre"
  _pre(task_dir, pre)
  before = _files(pre)
  config = _finetune_config(task_dir, "")
  config.data.tokenizer_path = str(task_dir / "tokenizer.model")
  with pytest.raises(
    checkpoint.CheckpointMismatch, match="is the workdir of a pretraining run"
  ) as e:
    finetune.run(config, str(pre), _mesh(config))
  assert "allow_config_change" not in str(e.value) and "\n" not in str(e.value)
  assert _files(pre) == before
  # The reverse: pretraining in a fine-tuned workdir.
  config = _finetune_config(task_dir, str(pre))
  finetune.run(config, str(tmp_path / "run"), _mesh(config))
  before = _files(tmp_path / "run")
  pretraining = ml_collections.ConfigDict(config.to_dict())
  pretraining.finetune.task = ""
  with pytest.raises(checkpoint.CheckpointMismatch, match="is the workdir of a fine-tuning run"):
    checkpoint.check_resumable(str(tmp_path / "run"), checkpoint.fingerprint(pretraining))
  assert _files(tmp_path / "run") == before


def test_init_from_a_fine_tuned_workdir_is_refused_before_writing(task_dir, tmp_path):  # noqa: F811
  _pre(task_dir, tmp_path / "pre")
  config = _finetune_config(task_dir, str(tmp_path / "pre"))
  finetune.run(config, str(tmp_path / "run"), _mesh(config))
  again = _finetune_config(task_dir, str(tmp_path / "run"))
  with pytest.raises(config_lib.ConfigError, match="is a fine-tuning run") as e:
    finetune.prepare_finetuning(again, str(tmp_path / "second"))
  assert "\n" not in str(e.value) and not (tmp_path / "second").exists()


def test_a_restore_into_another_tree_names_the_paths(task_dir, tmp_path):  # noqa: F811
  # A workdir whose config.json says classification over a pretraining checkpoint (what
  # fine-tuning in a pretraining workdir used to leave): load names the mismatch in one line.
  pre = tmp_path / "pre"
  _pre(task_dir, pre)
  written = json.loads((pre / "config.json").read_text())
  written["finetune"]["task"] = "classification"
  (pre / "config.json").write_text(json.dumps(written))
  labelled.LabelVocab("classification", ("no", "yes")).save(str(pre / "labels.json"))
  with pytest.raises(UsageError, match="holds the parameters of another model") as e:
    sslm_jax.load(str(pre), 6)
  assert "missing encoder/" in str(e.value) and "unexpected " in str(e.value)
  assert "\n" not in str(e.value) and " and " in str(e.value)  # a few paths, then a count
  assert saved_tree.difference({"a": (2,)}, {"a": (2,)}) is None
  assert saved_tree.difference({"a": (2,)}, {"a": (3,)}) == "other shapes a [2] (expected [3])"


@pytest.mark.parametrize("bad", ["init_step", "no_checkpoints", "vocab", "missing"])
def test_a_bad_start_writes_nothing(task_dir, tmp_path, bad):  # noqa: F811
  _pre(task_dir, tmp_path / "pre")
  config = _finetune_config(task_dir, str(tmp_path / "pre"))
  if bad == "init_step":
    config.finetune.init_step, words = 4, "finetune.init_step: "
  elif bad == "no_checkpoints":
    shutil.rmtree(tmp_path / "pre" / "checkpoints")
    words = "has no checkpoints yet"
  elif bad == "missing":  # checked when a fresh start reads it, not by config.validate
    config.finetune.init_from, words = str(tmp_path / "nowhere"), "is not a directory"
  else:  # a tokenizer trained here, for a vocabulary it cannot fill
    config.finetune.init_from, config.data.vocab_size, words = "", 40, "data.vocab_size=40"
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=words) as e:
    finetune.prepare_finetuning(config, str(workdir))
  assert "\n" not in str(e.value)
  assert not workdir.exists()


def test_a_rerun_after_a_failed_start_works(task_dir, tmp_path):  # noqa: F811
  config = _config(task_dir, steps=3)
  workdir = tmp_path / "run"
  workdir.mkdir()
  labelled.LabelVocab("classification", ("neg", "pos")).save(
    str(workdir / "labels.json")
  )  # a failed start's
  finetune.run(config, str(workdir), _mesh(config))
  assert labelled.LabelVocab.load(str(workdir / "labels.json")).labels == ("no", "yes")
  assert _records(workdir)[-1]["step"] == 3


def test_a_changed_labelled_file_is_named(task_dir, tmp_path):  # noqa: F811
  for split in ("train", "eval"):
    shutil.copy(task_dir / f"{split}.jsonl", tmp_path / f"{split}.jsonl")
  config = _config(task_dir, steps=3)
  config.finetune.train_files = str(tmp_path / "train.jsonl")
  config.finetune.eval_files = str(tmp_path / "eval.jsonl")
  finetune.run(config, str(tmp_path / "run"), _mesh(config))
  lines = (tmp_path / "train.jsonl").read_text().splitlines()
  (tmp_path / "train.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # reordered
  with pytest.raises(checkpoint.CheckpointMismatch) as e:
    finetune.prepare_finetuning(config, str(tmp_path / "run"))
  assert f"train file {tmp_path / 'train.jsonl'} changed since the checkpoint" in str(e.value)
  assert "eval.jsonl" not in str(e.value)


def test_truncated_examples_are_counted(task_dir, tmp_path, caplog):  # noqa: F811
  rows = [{"text": "violet river", "label": "yes"}, {"text": "stone " * 40, "label": "no"}]
  (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
  (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:1] * 4))
  config = _config(task_dir, steps=3)
  config.finetune.train_files = str(tmp_path / "train.jsonl")
  config.finetune.eval_files = str(tmp_path / "eval.jsonl")
  finetune.run(config, str(tmp_path / "run"), _mesh(config))
  last = _records(tmp_path / "run")[-1]
  assert last["train_examples_truncated"] == 8 and last["eval_examples_truncated"] == 0
  assert caplog.text.count("8 of 16 training and 0 of 4 eval examples are longer") == 1


def test_a_checkpoint_that_recorded_a_relative_init_from_still_resumes(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  saved = {"finetune": {"task": "classification", "init_from": "runs/pre"}}
  current = {"finetune": {"task": "classification", "init_from": str(tmp_path / "runs/pre")}}
  assert checkpoint.check_fingerprint(saved, current, "run") == []
  other = {"finetune": {"task": "classification", "init_from": str(tmp_path / "other")}}
  with pytest.raises(checkpoint.CheckpointMismatch, match="finetune.init_from"):
    checkpoint.check_fingerprint(saved, other, "run")
