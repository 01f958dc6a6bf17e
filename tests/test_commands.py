"""python -m sslm_jax.generate / fill_mask / score, run as subprocesses on the session's workdirs.

Bad input ends a command with one line naming the problem and the fix, exit status 2, nothing on
stdout and nothing written to the workdir.
"""

import json
import os
import shutil

import pytest
from test_api import (
  SENTENCE,
  fabricated_workdir,
  run_python,
  trained_workdir,
)


@pytest.fixture(scope="session")
def gpt_workdir(tmp_path_factory):
  return fabricated_workdir(tmp_path_factory, "gpt")


@pytest.fixture(scope="session")
def bert_workdir(tmp_path_factory):
  return fabricated_workdir(tmp_path_factory, "bert")


def command(name: str, *args):
  return run_python(["-m", f"sslm_jax.{name}", *args], timeout=300)


def _snapshot(workdir):
  return {
    os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
    for d, _, files in os.walk(workdir)
    for f in files
  }


def _refused(result, *fragments):
  """Exit 2, nothing on stdout, and a last stderr line naming the problem."""
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  assert result.stdout == ""
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("sslm_jax: error: "), result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in last, last
  return last


def test_a_workdir_without_checkpoints_is_refused(gpt_workdir, tmp_path):
  workdir = tmp_path / "untrained"
  workdir.mkdir()
  shutil.copy(os.path.join(gpt_workdir, "config.json"), workdir)
  before = _snapshot(workdir)
  _refused(command("score", f"--workdir={workdir}", "text"), "has no checkpoints yet")
  assert _snapshot(workdir) == before  # no checkpoints/ directory made


def test_a_directory_that_is_no_workdir_is_refused(tmp_path):
  _refused(command("generate", f"--workdir={tmp_path}", "x"), "no config.json")


def test_an_unknown_step_lists_the_available_ones(gpt_workdir):
  before = _snapshot(gpt_workdir)
  last = _refused(command("score", f"--workdir={gpt_workdir}", "--step=5", "the model"))
  assert "no checkpoint at step 5" in last and "available steps: 3, 6" in last
  assert _snapshot(gpt_workdir) == before


def test_each_command_refuses_the_other_kind_of_model(gpt_workdir, bert_workdir):
  _refused(
    command("fill_mask", f"--workdir={gpt_workdir}", "the [MASK] model"),
    "GPT (causal_lm)",
    "cannot fill in a [MASK]",
    "sslm_jax.generate",
  )
  _refused(
    command("generate", f"--workdir={bert_workdir}", "the model"),
    "BERT (masked_lm)",
    "cannot generate text",
    "sslm_jax.fill_mask",
  )


def test_fill_mask_needs_a_mask(bert_workdir):
  _refused(command("fill_mask", f"--workdir={bert_workdir}", "the model"), "has no [MASK]")


def test_a_prompt_longer_than_the_positions_is_refused(gpt_workdir):
  long_prompt = " ".join(["data"] * 100)  # tiny_config has 32 positions
  last = _refused(command("generate", f"--workdir={gpt_workdir}", long_prompt), "32 positions")
  assert "shorten it" in last


def test_a_missing_required_flag_is_one_line(tmp_path):
  _refused(command("score", "text"), "--workdir")


def test_generate_json_parses(gpt_workdir):
  generated = command(
    "generate", f"--workdir={gpt_workdir}", "the model", "data", "--num_samples=2",
    "--max_new_tokens=4", "--json",
  )  # fmt: skip
  assert generated.returncode == 0, generated.stderr[-2000:]
  records = [json.loads(line) for line in generated.stdout.splitlines()]
  assert [(r["prompt"], r["sample"]) for r in records] == [
    ("the model", 0), ("the model", 1), ("data", 0), ("data", 1),
  ]  # fmt: skip
  assert all(isinstance(r["continuation"], str) for r in records)


def test_fill_mask_json_parses(bert_workdir):
  filled = command("fill_mask", f"--workdir={bert_workdir}", "the [MASK] of [MASK].", "--json")
  assert filled.returncode == 0, filled.stderr[-2000:]
  (record,) = [json.loads(line) for line in filled.stdout.splitlines()]
  assert len(record["masks"]) == 2 and all(len(m) == 5 for m in record["masks"])
  assert all(0 <= g["probability"] <= 1 for m in record["masks"] for g in m)
  assert "[MASK]" not in record["filled"]


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_score_json_parses(kind, tmp_path_factory, tmp_path):
  workdir = fabricated_workdir(tmp_path_factory, kind)
  corpus = tmp_path / "a.txt"
  corpus.write_text("the model can train on data.\n")
  scored = command(
    "score", f"--workdir={workdir}", "a batch of text", f"--files={corpus}", "--json"
  )
  assert scored.returncode == 0, scored.stderr[-2000:]
  first, second = [json.loads(line) for line in scored.stdout.splitlines()]
  assert first["text"] == "a batch of text" and second["file"] == str(corpus)
  assert first["num_bytes"] == len("a batch of text")
  assert first["total_nats"] == pytest.approx(-sum(first["log_probs"]), rel=1e-5)
  assert len(first["tokens"]) == len(first["log_probs"]) == first["num_tokens"]
  assert first["pseudo_log_likelihood"] == (kind == "bert")


@pytest.mark.slow
def test_commands_on_trained_workdirs(tmp_path_factory):
  bert = trained_workdir(tmp_path_factory, "bert")
  masked = SENTENCE.replace(" application", " [MASK]")
  result = command("fill_mask", f"--workdir={bert}", masked)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"filled: {SENTENCE}" in result.stdout, result.stdout

  gpt = trained_workdir(tmp_path_factory, "gpt")
  result = command("generate", f"--workdir={gpt}", "the model", "--max_new_tokens=8", "--seed=3")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith("=== prompt 'the model', sample 1 of 1\nthe model")
  result = command("score", f"--workdir={gpt}", "the model can train on data.", "--tokens")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "bits/byte" in result.stdout and "' model'" in result.stdout
