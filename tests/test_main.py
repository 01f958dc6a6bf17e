"""The command line end to end: tiny runs on the built-in corpus, resume, and bad input."""

import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
SMALL = [
  "--config.num_train_steps=4",
  "--config.batch_size=8",
  "--config.log_every_steps=1",
  "--config.eval_every_steps=2",
  "--config.eval_steps=1",
  "--config.checkpoint_every_steps=2",
  "--config.data.seq_len=32",
  "--config.data.vocab_size=512",
  "--config.data.tokenizer_sample_bytes=300000",
  "--config.model.num_layers=1",
  "--config.model.emb_dim=32",
  "--config.model.mlp_dim=64",
  "--config.mesh.data=1",
  "--config.opt.warmup_steps=2",
]


def _main(*args, timeout=300, cwd=ROOT, own_cache=False):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  if own_cache:  # the workdir's own compilation cache, not the test session's shared one
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return subprocess.run(
    [sys.executable, "-m", "sslm_jax.main", *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _snapshot(workdir):
  return {
    os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
    for d, _, files in os.walk(workdir)
    for f in files
  }


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("gpt"))
  result = _main("--config=configs/gpt_tiny.py", f"--workdir={workdir}", *SMALL)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny"])
def test_tiny_run_writes_everything_and_resumes(tmp_path, name):
  # A relative --workdir, as in the README, resolved against the current directory.
  config = f"--config={os.path.abspath(os.path.join(ROOT, 'configs', name + '.py'))}"
  first = _main(config, "--workdir=run", *SMALL, cwd=tmp_path, own_cache=True)
  assert first.returncode == 0, first.stderr[-3000:]
  workdir = os.path.join(tmp_path, "run")
  for item in ("config.json", "tokenizer.model", "metrics.jsonl", "checkpoints", "tensorboard"):
    assert os.path.exists(os.path.join(workdir, item)), item
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
  # The persistent compilation cache, so that a rerun loads the compiled train step.
  assert glob.glob(os.path.join(workdir, "xla_cache", "jit_train_step-*"))
  records = _records(workdir)
  assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
  final = records[-1]
  if name == "gpt_tiny":
    assert final["eval_bits_per_byte"] > 0 and "continuation:" in first.stdout
  else:
    assert 0 <= final["eval_mlm_accuracy"] <= 1 and "top-5:" in first.stdout

  again = _main(
    config, "--workdir=run", *SMALL, "--config.num_train_steps=6", cwd=tmp_path, own_cache=True
  )
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resuming from the checkpoint at step 4" in again.stderr
  assert [r["step"] for r in _records(workdir)] == [0, 1, 2, 3, 4, 5, 6]


def test_misspelt_field_names_the_closest(tmp_path):
  result = _main("--config=configs/gpt_tiny.py", f"--workdir={tmp_path}", "--config.data.seq_lne=4")
  assert result.returncode == 2
  assert "data.seq_lne" in result.stderr and "--config.data.seq_len" in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.listdir(tmp_path)


def test_missing_config_file(tmp_path):
  result = _main("--config=configs/nope.py", f"--workdir={tmp_path}")
  assert result.returncode == 2 and "configs/nope.py" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
  "flags, words",
  [
    (["--config.batch_size=0"], "batch_size"),
    (["--config.data.source=text", "--config.data.text_files=/nonexistent/*.txt"], "nonexistent"),
    (["--config.data.tokenizer_path=/nonexistent/tok.model"], "does not exist"),
  ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, flags, words):
  result = _main("--config=configs/gpt_tiny.py", f"--workdir={tmp_path}", *SMALL, *flags)
  assert result.returncode == 2, result.stderr[-2000:]
  assert words in result.stderr.splitlines()[-1]
  assert "Traceback" not in result.stderr


def test_jax_compilation_cache_dir_serves_as_the_default_cache(gpt_run):
  # gpt_run ran with the test session's JAX_COMPILATION_CACHE_DIR (tests/conftest.py) and no
  # --compilation_cache_dir: the compiled train step went there, not to WORKDIR/xla_cache.
  workdir, _ = gpt_run
  shared = os.environ["JAX_COMPILATION_CACHE_DIR"]
  assert not os.path.exists(os.path.join(workdir, "xla_cache"))
  assert glob.glob(os.path.join(shared, "jit_train_step-*"))


def test_workdir_of_another_objective_is_refused_untouched(gpt_run):
  workdir, _ = gpt_run
  before = _snapshot(workdir)
  result = _main("--config=configs/bert_tiny.py", f"--workdir={workdir}", *SMALL)
  assert result.returncode == 2
  assert "objective: checkpoint has 'causal_lm', config asks for 'masked_lm'" in result.stderr
  assert _snapshot(workdir) == before


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  result = _main("--config=configs/gpt_tiny.py", f"--workdir={blocker}/run", *SMALL)
  assert result.returncode == 2
  assert "is not writable" in result.stderr and "Traceback" not in result.stderr
  assert blocker.read_text() == "not a directory"


def test_start_up_keeps_warnings_and_drops_backend_probing_info():
  """JAX's INFO line about a missing libtpu and Orbax's INFO chatter never reach the log."""
  script = (
    "import sslm_jax.main as m\n"
    "from absl import app, logging\n"
    "def run(argv):\n"
    "  logging.set_verbosity(logging.INFO)\n"
    "  m._quiet_library_info()\n"
    "  logging.info(\"Unable to initialize backend 'tpu': ... libtpu.so\")\n"
    "  logging.info('an ordinary info line')\n"
    "  logging.warning('Unable to initialize backend, as a warning')\n"
    "app.run(run, argv=['x', '--config=configs/gpt_tiny.py', '--workdir=unused'])\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  assert "libtpu.so" not in result.stderr
  assert "an ordinary info line" in result.stderr
  assert "as a warning" in result.stderr
