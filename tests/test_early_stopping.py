"""Early stopping, the best checkpoint kept in WORKDIR/best, load(workdir).classify and predict.

One tiny fine-tuning run (GPT, the key-word task of test_finetune.py) is shared by the module.
"""

import json
import re
import shutil

import pytest
from conftest import tiny_config
from test_api import run_python
from test_finetune import _config, _mesh, _records, task_dir  # noqa: F401 (a fixture)

import sslm_jax
from sslm_jax import config as config_lib
from sslm_jax.checkpoints import restore
from sslm_jax.data import labelled
from sslm_jax.errors import UsageError
from sslm_jax.finetune import early_stopping
from sslm_jax.finetune import loop as finetune

EVERY, PATIENCE, STEPS = 4, 3, 60


def test_tracker_stops_after_patience_evals_without_strict_improvement():
  up = early_stopping.Tracker("eval_accuracy", patience=2)
  decisions = []
  for step, value in [(2, 0.5), (4, 0.7), (6, 0.7), (8, 0.6), (10, 0.9), (12, 0.8), (14, 0.8)]:
    improved = up.update(step, {"eval_accuracy": value})
    decisions.append((improved, up.should_stop))
  assert decisions == [
    (True, False),
    (True, False),
    (False, False),  # a tie is no improvement
    (False, True),
    (True, False),
    (False, False),
    (False, True),
  ]
  assert (up.best_step, up.best_value) == (10, 0.9)
  down = early_stopping.Tracker("eval_loss", patience=1)
  assert down.update(2, {"eval_loss": 0.7}) and down.update(4, {"eval_loss": 0.6})
  assert not down.update(6, {"eval_loss": 0.65}) and down.should_stop
  assert not down.update(8, {"eval_loss": float("nan")})  # never the best
  never = early_stopping.Tracker("eval_loss", patience=0)
  for step in range(1, 20):
    never.update(step, {"eval_loss": 1.0})
  assert not never.should_stop and never.best_step == 1
  again = early_stopping.Tracker.from_meta("eval_accuracy", 2, up.to_meta())
  assert again == up and again.should_stop
  assert early_stopping.Tracker.from_meta("eval_mcc", 2, up.to_meta()).best_step is None


def test_early_stopping_config_errors_name_the_valid_metrics(task_dir):  # noqa: F811
  config = _config(task_dir)
  config.finetune.early_stopping_metric = "eval_acc"
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert "'eval_acc'" in str(e.value) and "eval_macro_f1" in str(e.value)
  assert "\n" not in str(e.value)
  config.finetune.early_stopping_metric = "eval_loss"
  config.finetune.early_stopping_patience = -1
  with pytest.raises(config_lib.ConfigError, match="early_stopping_patience=-1 must be"):
    config_lib.validate(config)
  assert early_stopping.metric_for("regression", "") == "eval_pearson"


def _early_config(task_dir):  # noqa: F811
  config = _config(task_dir, objective="causal_lm", steps=STEPS)
  config.eval_every_steps = config.checkpoint_every_steps = config.log_every_steps = EVERY
  config.keep_checkpoints = 2
  config.finetune.early_stopping_patience = PATIENCE
  return config


@pytest.fixture(scope="module")
def stopped(task_dir, tmp_path_factory):  # noqa: F811
  """A run that early stopping ended, before num_train_steps."""
  workdir = tmp_path_factory.mktemp("early") / "run"
  config = _early_config(task_dir)
  finetune.run(config, str(workdir), _mesh(config))
  return config, workdir


def _evals(workdir, metric="eval_accuracy") -> list[tuple[int, float]]:
  return [(r["step"], r[metric]) for r in _records(workdir) if r["step"] > 0]


def test_early_stopping_keeps_the_best_eval_and_stops(stopped):
  _, workdir = stopped
  evals = _evals(workdir, "eval_macro_f1")  # classification's default metric
  best_step, best_value = max(evals, key=lambda e: e[1])  # the first of equal values
  stop_step = evals[-1][0]
  assert stop_step < STEPS and stop_step == best_step + PATIENCE * EVERY
  saved = json.loads((workdir / "best.json").read_text())
  assert saved == {"step": best_step, "metric": "eval_macro_f1", "value": best_value}
  # keep_checkpoints=2 rotated the best step's checkpoint away; its parameters stay in best/.
  checkpoints = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  assert checkpoints == [stop_step - EVERY, stop_step]
  assert [p.name for p in (workdir / "best").iterdir()] == [str(best_step)]


def test_a_rerun_trains_no_further(stopped, caplog):
  config, workdir = stopped
  before = (workdir / "metrics.jsonl").read_text()
  assert finetune.run(config, str(workdir), _mesh(config)) == {}
  assert (workdir / "metrics.jsonl").read_text() == before
  stop_step = _evals(workdir)[-1][0]
  assert f"already ended this run at step {stop_step}" in caplog.text


def test_a_resume_inside_the_patience_window_stops_at_the_same_step(stopped, tmp_path):
  config, workdir = stopped
  resumed = tmp_path / "resumed"
  shutil.copytree(workdir, resumed)
  stop_step = _evals(workdir)[-1][0]
  shutil.rmtree(resumed / "checkpoints" / str(stop_step))  # as if preempted before that save
  finetune.run(config, str(resumed), _mesh(config))
  assert _evals(resumed) == _evals(workdir)
  assert (resumed / "best.json").read_text() == (workdir / "best.json").read_text()


def test_classify_agrees_with_the_evals_of_the_run(stopped, task_dir):  # noqa: F811
  _, workdir = stopped
  rows = [json.loads(line) for line in (task_dir / "eval.jsonl").read_text().splitlines()]
  evals = dict(_evals(workdir))
  best_step = json.loads((workdir / "best.json").read_text())["step"]
  stop_step = max(evals)
  for step, expected_step in [(None, best_step), ("best", best_step), (stop_step, stop_step)]:
    model = sslm_jax.load(str(workdir), step)
    assert model.step == expected_step
    predictions = model.classify([r["text"] for r in rows])
    accuracy = sum(p.label == r["label"] for p, r in zip(predictions, rows, strict=True))
    assert accuracy / len(rows) == evals[expected_step]
    assert all(sum(p.probabilities.values()) == pytest.approx(1.0) for p in predictions)
  one = sslm_jax.load(str(workdir), best_step).classify("violet river stone")
  assert one[0].label in ("no", "yes") and set(one[0].probabilities) == {"no", "yes"}


@pytest.mark.slow
def test_predict_writes_a_row_per_input_and_the_eval_accuracy(stopped, task_dir, tmp_path):  # noqa: F811
  _, workdir = stopped
  evals = dict(_evals(workdir))
  out = tmp_path / "predictions.jsonl"
  args = ["-m", "sslm_jax.predict", f"--workdir={workdir}", f"--output={out}"]
  result = run_python([*args, f"--input={task_dir / 'eval.jsonl'}", "--json"])
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  best_step = json.loads((workdir / "best.json").read_text())["step"]
  assert summary["step"] == best_step and summary["eval_accuracy"] == evals[best_step]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  inputs = [json.loads(line) for line in (task_dir / "eval.jsonl").read_text().splitlines()]
  assert len(rows) == len(inputs) == summary["rows"] == 128
  assert [r["text"] for r in rows] == [r["text"] for r in inputs]
  assert {"label", "probabilities", "gold"} <= set(rows[0])
  # Without a label column: no gold, no metrics.
  unlabelled = tmp_path / "texts.csv"
  unlabelled.write_text("text\nviolet river stone\nquiet table\n")
  result = run_python([*args, f"--input={unlabelled}"])
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Wrote 2 predictions" in result.stdout and "eval_accuracy" not in result.stdout
  assert all("gold" not in json.loads(line) for line in out.read_text().splitlines())


@pytest.mark.slow
def test_predict_refuses_bad_input_in_one_line(stopped, task_dir, tmp_path):  # noqa: F811
  _, workdir = stopped
  pretraining = tmp_path / "pretraining"
  pretraining.mkdir()
  (pretraining / "config.json").write_text(json.dumps(tiny_config().to_dict()))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  unseen = tmp_path / "unseen.jsonl"  # a gold label the model was never trained on
  unseen.write_text(json.dumps({"text": "violet river stone", "label": "maybe"}) + "\n")
  good = f"--input={task_dir / 'eval.jsonl'}"
  cases = [
    ([f"--workdir={pretraining}", good], "is a pretraining run"),
    ([f"--workdir={workdir}", f"--input={tmp_path / 'none.jsonl'}"], "matches no files"),
    ([f"--workdir={workdir}", f"--input={empty}"], "has no examples"),
    ([f"--workdir={workdir}", good, "--step=5"], "no checkpoint at step 5; available steps"),
    ([f"--workdir={workdir}", f"--input={unseen}"], "maybe"),
  ]
  for args, fragment in cases:
    out = f"--output={tmp_path / 'out.jsonl'}"
    result = run_python(["-m", "sslm_jax.predict", *args, out])
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.match(r"sslm_jax: error: .*" + re.escape(fragment), last), last
    assert result.stdout == ""
  assert not (tmp_path / "out.jsonl").exists()
  assert restore.read_best(str(pretraining)) is None


def test_classify_gives_values_for_regression_pairs(task_dir, tmp_path):  # noqa: F811
  rows = []
  for i in range(64):
    a, b = f"violet river {i % 3}", "stone amber" if i % 2 else "quiet table"
    rows.append({"text": a, "text_pair": b, "label": float(i % 2 + i % 3)})
  lines = "\n".join(json.dumps(r) for r in rows) + "\n"
  (tmp_path / "data.jsonl").write_text(lines)
  config = _config(task_dir, steps=2)
  config.eval_every_steps = config.checkpoint_every_steps = 2
  config.finetune.task = "regression"
  config.finetune.train_files = config.finetune.eval_files = str(tmp_path / "data.jsonl")
  finetune.run(config, str(tmp_path / "run"), _mesh(config))
  assert json.loads((tmp_path / "run" / "best.json").read_text())["metric"] == "eval_pearson"
  model = sslm_jax.load(str(tmp_path / "run"))
  predictions = model.classify([r["text"] for r in rows], [r["text_pair"] for r in rows])
  assert all(p.label is None and isinstance(p.value, float) for p in predictions)
  examples = labelled.read_examples(str(tmp_path / "data.jsonl"), "regression")
  found = model.metrics(examples, predictions)
  final = _records(tmp_path / "run")[-1]
  assert found["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-4)
  assert found["eval_pearson"] == pytest.approx(final["eval_pearson"], abs=1e-4)


def test_load_errors_name_the_fix(stopped, tmp_path):
  _, workdir = stopped
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  for name in ("config.json", "labels.json"):
    shutil.copy(workdir / name, fresh / name)
  with pytest.raises(UsageError, match="has no checkpoints yet"):
    sslm_jax.load(str(fresh))
  with pytest.raises(UsageError, match="has no best checkpoint yet"):
    sslm_jax.load(str(fresh), "best")
  with pytest.raises(UsageError, match=r"available steps: .*'best' \(step"):
    sslm_jax.load(str(workdir), 7)
