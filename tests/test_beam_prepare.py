"""Preparation as an Apache Beam pipeline (data/beam_prepare.py) on the DirectRunner, in this
process: the same shards and meta.json as a local prepare, byte for byte, and the same reuse of
finished caches and units."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_data import VOCAB, make_config
from test_prepare import REPO, _cache_files, _corpus

from sslm_jax.data import beam_prepare, preparation
from sslm_jax.data.corpus import DataError

DIRECT = ("DirectRunner", ["--direct_num_workers=1", "--direct_running_mode=in_memory"])


@pytest.fixture(scope="module")
def corpus_glob(tmp_path_factory):
  return _corpus(tmp_path_factory.mktemp("corpus"), files=4, paragraphs=60)


def _config(corpus_glob, augment=""):
  return make_config(corpus_glob, shard_rows=20, augment=augment)  # several shards per unit


@pytest.fixture(scope="module")
def local(corpus_glob, tmp_path_factory):
  """A cache prepared by preparation.build_cache (no augmentation): (workdir, its files)."""
  workdir = tmp_path_factory.mktemp("local")
  preparation.build_cache(_config(corpus_glob), str(workdir))
  return workdir, _cache_files(workdir)


def test_direct_runner_writes_the_local_cache_and_reuses_it(corpus_glob, local, tmp_path):
  reference = local[1]
  meta = json.loads(reference["meta.json"])
  assert len(meta["train"]["shards"]) >= 8 and meta["train"]["rows"] > 100
  workdir = str(tmp_path)
  c = _config(corpus_glob)
  counts = beam_prepare.run(c, workdir, *DIRECT)  # trains its own tokenizer first
  want = {"cache_reused": False, "units": 4, "units_prepared": 4, "units_finished_before": 0}
  assert counts == want
  assert _cache_files(workdir) == reference
  tokenizer = (tmp_path / "tokenizer.model").read_bytes()
  assert tokenizer == (local[0] / "tokenizer.model").read_bytes()
  assert beam_prepare.run(c, workdir, *DIRECT) == {"cache_reused": True}
  # Killed before the manifest, after three of the four units: only the fourth is prepared.
  os.remove(tmp_path / "data" / "meta.json")
  os.remove(tmp_path / "data" / "units" / "00002.json")
  os.remove(tmp_path / "data" / "train-00002-0000.bin")
  counts = beam_prepare.run(c, workdir, *DIRECT)
  assert counts["units_prepared"] == 1 and counts["units_finished_before"] == 3
  assert _cache_files(workdir) == reference
  assert (tmp_path / "tokenizer.model").read_bytes() == tokenizer


def test_direct_runner_with_augmentation_writes_the_local_cache(corpus_glob, local, tmp_path):
  c = _config(corpus_glob, augment="swap:p=0.5,alpha=0.3;delete:p=0.3,alpha=0.2")
  for name in ("local", "beam"):
    (tmp_path / name).mkdir()  # the same tokenizer, not retrained
    shutil.copy(local[0] / "tokenizer.model", tmp_path / name / "tokenizer.model")
  preparation.build_cache(c, str(tmp_path / "local"))
  beam_prepare.run(c, str(tmp_path / "beam"), *DIRECT)
  want = _cache_files(tmp_path / "local")
  assert json.loads(want["meta.json"])["augment"]["copies_added"] > 0
  assert want != local[1]  # augmentation changed the rows
  assert _cache_files(tmp_path / "beam") == want
  report = "augment.json"
  assert (tmp_path / "beam" / report).read_bytes() == (tmp_path / "local" / report).read_bytes()


def test_the_command_passes_beam_options_after_a_lone_dash_dash(corpus_glob, local, tmp_path):
  shutil.copy(local[0] / "tokenizer.model", tmp_path / "tokenizer.model")
  args = [
    sys.executable, "-m", "sslm_jax.prepare", "--config=configs/gpt_tiny.py",
    f"--workdir={tmp_path}", "--config.data.source=text",
    f"--config.data.text_files={corpus_glob}", "--config.data.seq_len=32",
    f"--config.data.vocab_size={VOCAB}", "--config.batch_size=4", "--config.data.eval_fraction=0.2",
    "--config.data.shard_rows=20", "--runner=DirectRunner",
    "--", "--direct_num_workers=1", "--direct_running_mode=in_memory", "--no_such_option=7",
  ]  # fmt: skip
  env = {**os.environ, "PYTHONPATH": REPO}
  done = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["runner"] == "DirectRunner" and summary["units_prepared"] == 4
  assert _cache_files(tmp_path) == local[1]
  # What follows `--` reached Beam's PipelineOptions, which names what it does not know.
  assert "Discarding unparseable args" in done.stderr and "--no_such_option=7" in done.stderr


def test_an_option_beam_refuses_fails_before_any_work(corpus_glob, tmp_path):
  with pytest.raises(SystemExit):  # Beam's argparse: usage and the error on stderr
    beam_prepare.run(
      _config(corpus_glob), str(tmp_path), "DirectRunner", ["--direct_num_workers=x"]
    )
  assert os.listdir(tmp_path) == []


def test_runner_without_beam_names_the_install_in_one_line(corpus_glob, monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, "apache_beam", None)  # `import apache_beam` now fails
  with pytest.raises(DataError) as failure:
    beam_prepare.run(_config(corpus_glob), str(tmp_path), *DIRECT)
  message = str(failure.value)
  assert "pip install 'sslm_jax[beam]'" in message and "\n" not in message
  assert os.listdir(tmp_path) == []  # refused before any work
