"""A restore into another model's tree stops in one line, and a fine-tuning run started from
init_from_hf resumes from its own workdir alone (test_finetune_workdir.py: from init_from)."""

import json
import shutil

import pytest
from test_finetune import _mesh, _records, task_dir  # noqa: F401
from test_finetune_workdir import _pre
from test_hf_pretrain import HEADS, LAYERS, MLP, SEQ_LEN, WIDTH, hf_dir  # noqa: F401

import sslm_jax
from sslm_jax import config as config_lib
from sslm_jax.errors import UsageError
from sslm_jax.finetune import loop as finetune


@pytest.mark.parametrize(
  "section, field, value",
  [("model", "num_layers", 3), ("model", "emb_dim", 32), (None, "objective", "causal_lm")],
)
def test_load_with_an_edited_config_names_the_paths(task_dir, tmp_path, section, field, value):  # noqa: F811
  pre = tmp_path / "pre"
  _pre(task_dir, pre)
  written = json.loads((pre / "config.json").read_text())
  edited = written[section] if section else written
  assert edited[field] != value
  edited[field] = value
  (pre / "config.json").write_text(json.dumps(written))
  with pytest.raises(UsageError, match="holds the parameters of another model") as e:
    sslm_jax.load(str(pre))
  message = str(e.value)
  assert "\n" not in message and "config.json" in message
  assert ("missing " in message) or ("other shapes " in message)


def hf_config(objective, vocab_size):
  """A fine-tuning config of the tiny Hugging Face model's shapes."""
  c = config_lib.defaults()
  c.objective, c.data.seq_len, c.data.vocab_size = objective, SEQ_LEN, vocab_size
  c.model.num_layers, c.model.num_heads, c.model.emb_dim = LAYERS, HEADS, WIDTH
  c.model.mlp_dim, c.model.gelu = MLP, "erf"
  c.batch_size, c.eval_steps, c.sample_at_end, c.mesh.data = 8, 1, False, 1
  return c


@pytest.mark.parametrize("hf_dir", ["masked_lm"], indirect=True)
def test_a_resumed_run_needs_not_its_init_from_hf_directory(hf_dir, tmp_path):  # noqa: F811
  objective, _, directory, vocab_size = hf_dir
  copy = tmp_path / "hf"
  shutil.copytree(directory, copy)
  rows = [
    {"text": f"w{i} " * (1 + i % 9), "label": "long" if i % 9 > 4 else "short"} for i in range(48)
  ]
  for name, part in (("train", rows[:32]), ("eval", rows[32:])):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))

  def config(steps):
    c = hf_config(objective, vocab_size)
    c.finetune.task, c.init_from_hf = "classification", str(copy)
    c.finetune.train_files = str(tmp_path / "train.jsonl")
    c.finetune.eval_files = str(tmp_path / "eval.jsonl")
    c.num_train_steps = steps
    c.eval_every_steps = c.checkpoint_every_steps = c.log_every_steps = 1
    config_lib.validate(c)
    return c

  run = tmp_path / "run"
  finetune.run(config(1), str(run), _mesh(config(1)))
  shutil.rmtree(copy)
  finetune.run(config(2), str(run), _mesh(config(2)))
  assert [r["step"] for r in _records(run)][-1] == 2
