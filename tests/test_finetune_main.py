"""Fine-tuning through the command line: init_from a workdir, resume, and a refused encoder."""

import json

import pytest
from test_finetune import _config, _pretrained_workdir, task_dir  # noqa: F401 (a fixture)
from test_main import _main


def _flags(task_dir, pre, workdir):  # noqa: F811
  return [
    "--config=configs/finetune_bert_tiny.py",
    f"--workdir={workdir}",
    f"--config.finetune.init_from={pre}",
    f"--config.finetune.train_files={task_dir / 'train.jsonl'}",
    f"--config.finetune.eval_files={task_dir / 'eval.jsonl'}",
    "--config.num_train_steps=4",
    "--config.batch_size=8",
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.opt.warmup_steps=1",
    "--config.data.seq_len=32",
    "--config.data.vocab_size=300",
    "--config.model.emb_dim=64",
    "--config.model.mlp_dim=128",
    "--config.mesh.data=1",
  ]


@pytest.mark.slow
def test_fine_tune_from_a_workdir_end_to_end_and_resume(task_dir, tmp_path):  # noqa: F811
  pre = tmp_path / "pre"
  _pretrained_workdir(pre, _config(task_dir))
  run = tmp_path / "run"
  first = _main(*_flags(task_dir, pre, run))
  assert first.returncode == 0, first.stderr[-2000:]
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 2, 4]
  assert {"eval_macro_f1", "eval_mcc", "eval_loss"} <= set(records[-1])
  assert json.loads((run / "labels.json").read_text()) == {
    "task": "classification",
    "labels": ["no", "yes"],
  }
  again = _main(*_flags(task_dir, pre, run), "--config.num_train_steps=6")
  assert again.returncode == 0, again.stderr[-2000:]
  assert "Resuming from the checkpoint at step 4" in again.stderr


@pytest.mark.slow
def test_a_mismatched_encoder_is_refused_in_one_line(task_dir, tmp_path):  # noqa: F811
  pre = tmp_path / "pre"
  _pretrained_workdir(pre, _config(task_dir))
  result = _main(*_flags(task_dir, pre, tmp_path / "run"), "--config.model.emb_dim=32")
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("sslm_jax: error: finetune.init_from=") and "model.emb_dim=64" in last
  missing = _main(*_flags(task_dir, tmp_path / "nowhere", tmp_path / "run2"))
  assert missing.returncode == 2 and "is not a directory" in missing.stderr.splitlines()[-1]
