"""load(workdir).tag and predict on a tagging workdir agree with the run's own evals.

One tiny tagging run (BERT from random init, test_tagging.py's name-tagging data, data.seq_len 32
so that some eval words do not fit) is shared by the module.
"""

import json

import pytest
from test_api import run_python
from test_finetune import _mesh, _records
from test_tagging import _config, tag_dir  # noqa: F401 (a fixture)

import sslm_jax
from sslm_jax.data import labelled
from sslm_jax.errors import UsageError
from sslm_jax.finetune import loop as finetune
from sslm_jax.finetune import tagging, task_model
from sslm_jax.tokenizer import files as tokenizer_files

STEPS, EVERY = 16, 8


@pytest.fixture(scope="module")
def tag_run(tag_dir, tmp_path_factory):  # noqa: F811
  workdir = tmp_path_factory.mktemp("tag_run") / "run"
  config = _config(tag_dir, steps=STEPS)
  config.eval_every_steps = config.checkpoint_every_steps = EVERY
  config.opt.learning_rate = 3e-3
  finetune.run(config, str(workdir), _mesh(config))
  return config, workdir


def _evals(workdir) -> dict[int, dict]:
  return {r["step"]: r for r in _records(workdir) if "eval_entity_f1" in r}


def _eval_examples(tag_dir):  # noqa: F811
  return labelled.read_examples(str(tag_dir / "eval.jsonl"), "tagging")


def test_tag_agrees_with_the_evals_of_the_run(tag_run, tag_dir):  # noqa: F811
  config, workdir = tag_run
  examples, evals = _eval_examples(tag_dir), _evals(workdir)
  best_step = json.loads((workdir / "best.json").read_text())["step"]
  for step, expected_step in [(EVERY, EVERY), (None, best_step)]:
    model = sslm_jax.load(str(workdir), step)
    assert model.step == expected_step
    tagged = model.tag([e.text for e in examples], probabilities=True)
    found, expected = model.metrics(examples, tagged), evals[expected_step]
    for name in ("eval_accuracy", "eval_entity_f1", "eval_entity_precision", "eval_entity_recall"):
      assert found[name] == expected[name], name
    assert found["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)
  assert (
    0.3 < found["eval_accuracy"] < 1.0 and found["eval_entity_f1"] > 0
  )  # not all right or all O
  # One (word, label) per word, in order; words past data.seq_len (a suffix) get None, and
  # exactly as many words get a label as the eval scores.
  assert all([w for w, _, _ in t] == e.text.split() for t, e in zip(tagged, examples, strict=True))
  labels = [[label for _, label, _ in t] for t in tagged]
  cut_at = [x.index(None) if None in x else len(x) for x in labels]
  assert all(
    set(x[n:]) <= {None} and None not in x[:n] for x, n in zip(labels, cut_at, strict=True)
  )
  assert any(None in x for x in labels)
  tok = tokenizer_files.load(config.data.tokenizer_path)
  features = tagging.featurize(examples, tok, model.vocab, 32, causal=False)
  assert sum(x is not None for row in labels for x in row) == features["label_weights"].sum()
  words = tagged[0]
  assert all(p is None or sum(p.values()) == pytest.approx(1.0) for _, _, p in words)
  assert all(p is None or max(p, key=p.get) == label for _, label, p in words)
  assert model.tag(examples[0].text) == [[(w, label) for w, label, _ in words]]


def test_classify_and_tag_name_each_other(tag_run):
  config, workdir = tag_run
  model = sslm_jax.load(str(workdir))
  with pytest.raises(UsageError, match=r"^classify takes .*this is a tagging model: use tag\.$"):
    model.classify(["ada lovelace"])
  config = config.copy_and_resolve_references()
  config.finetune.task = "classification"
  classifier = task_model.TaskModel(config, None, None, None, 0, "checkpoint")
  with pytest.raises(UsageError, match=r"^tag takes .*classification model: use classify\.$"):
    classifier.tag(["ada lovelace"])


@pytest.mark.slow
def test_predict_writes_labels_per_word_and_the_eval_metrics(tag_run, tag_dir, tmp_path):  # noqa: F811
  _, workdir = tag_run
  evals = _evals(workdir)
  unlabelled = tmp_path / "texts.jsonl"
  unlabelled.write_text('{"text": "ada lovelace sat by the river"}\n')
  out = tmp_path / "predictions.jsonl"
  inputs = f"--input={tag_dir / 'eval.jsonl'},{unlabelled}"
  args = ["-m", "sslm_jax.predict", f"--workdir={workdir}", inputs, f"--output={out}", "--json"]
  result = run_python(args)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  best_step = json.loads((workdir / "best.json").read_text())["step"]
  assert summary["step"] == best_step and summary["rows_with_gold"] == 128
  for name, value in evals[best_step].items():
    if name.startswith("eval_") and name != "eval_loss":
      assert summary[name] == value, name
  assert summary["eval_loss"] == pytest.approx(evals[best_step]["eval_loss"], rel=1e-5)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  examples = _eval_examples(tag_dir)
  assert len(rows) == summary["rows"] == 129
  for row, e in zip(rows, examples, strict=False):
    assert row["text"] == e.text and row["gold"] == list(e.label)
    assert len(row["labels"]) == len(e.text.split())
  assert "gold" not in rows[-1] and len(rows[-1]["labels"]) == 6
