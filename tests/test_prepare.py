"""Streaming, parallel, resumable preparation (data/preparation.py) and sharded reads.

The cache must not depend on how it was prepared: 1, 2 or 4 worker processes, one host or
several, in one go or killed and rerun. Memory must not grow with the corpus.
"""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from test_data import make_config, words

from sslm_jax.data import cache, pipeline, preparation, shards
from sslm_jax.data.corpus import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYLLABLES = np.array("ka lo mi ne ru sa to vi be da fo gu".split())


def _corpus(root, files: int, paragraphs: int, seed: int = 0) -> str:
  """`files` .txt files of `paragraphs` paragraphs each; returns the glob."""
  import random

  rng = random.Random(seed)
  root.mkdir(parents=True, exist_ok=True)
  for i in range(files):
    text = "".join(words(rng, rng.randint(5, 60)) + "\n\n" for _ in range(paragraphs))
    (root / f"part-{i:02d}.txt").write_text(text)
  return str(root / "*.txt")


def _cache_files(workdir) -> dict[str, bytes]:
  """meta.json and every shard, by name (the unit records hold the same, plus digests)."""
  data = os.path.join(workdir, "data")
  names = [n for n in os.listdir(data) if n.endswith(".bin") or n == "meta.json"]
  return {n: open(os.path.join(data, n), "rb").read() for n in sorted(names)}


@pytest.fixture(scope="module")
def corpus_glob(tmp_path_factory):
  return _corpus(tmp_path_factory.mktemp("corpus"), files=6, paragraphs=120)


def _config(corpus_glob):
  c = make_config(corpus_glob)
  c.data.shard_rows = 50  # several shards per unit
  return c


def test_worker_and_host_counts_give_identical_caches(corpus_glob, tmp_path):
  c = _config(corpus_glob)
  preparation.build_cache(c, str(tmp_path / "w1"))
  reference = _cache_files(tmp_path / "w1")
  meta = json.loads(reference["meta.json"])
  assert len(meta["train"]["shards"]) > 6 and meta["train"]["rows"] > 300
  assert max(rows for _, rows in meta["train"]["shards"]) == 50
  for workers in (2, 4):
    workdir = tmp_path / f"w{workers}"
    preparation.build_cache(c, str(workdir), num_workers=workers)
    assert _cache_files(workdir) == reference, f"{workers} workers"
  # Two hosts, each preparing its share of the units (threads stand in for the processes).
  c.data.tokenizer_path = str(tmp_path / "w1" / "tokenizer.model")
  sync = threading.Barrier(2, timeout=60)
  errors = []

  def host(index):
    try:
      preparation.build_cache(
        c,
        str(tmp_path / "hosts"),
        process_index=index,
        process_count=2,
        barrier=lambda name: sync.wait(),
      )
    except Exception as e:  # noqa: BLE001 (reported below)
      errors.append(e)
      sync.abort()

  threads = [threading.Thread(target=host, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  assert not errors
  hosts = _cache_files(tmp_path / "hosts")
  assert {k: v for k, v in hosts.items() if k != "meta.json"} == {
    k: v for k, v in reference.items() if k != "meta.json"
  }
  # The same rows; only the request differs (it names the tokenizer file the hosts were given).
  host_meta = json.loads(hosts["meta.json"])
  assert {k: v for k, v in host_meta.items() if k != "request"} == {
    k: v for k, v in meta.items() if k != "request"
  }
  for step in (0, 7):
    np.testing.assert_array_equal(
      pipeline.build(c, str(tmp_path / "hosts")).batch_for_step(step)["inputs"],
      pipeline.build(_config(corpus_glob), str(tmp_path / "w1")).batch_for_step(step)["inputs"],
    )


def test_sharded_rows_index_like_an_array(corpus_glob, tmp_path):
  c = _config(corpus_glob)
  workdir = str(tmp_path)
  preparation.build_cache(c, workdir)
  rows = cache.split_rows(workdir, "train")
  meta = cache.read_meta(workdir)
  whole = np.concatenate(
    [np.fromfile(tmp_path / "data" / name, meta["dtype"]) for name, _ in meta["train"]["shards"]]
  ).reshape(-1, meta["row_len"])
  assert rows.shape == whole.shape and len(rows) == meta["train"]["rows"]
  np.testing.assert_array_equal(np.asarray(rows), whole)
  rng = np.random.default_rng(0)
  picks = rng.integers(0, len(whole), 40)
  picks[:3] = [5, 6, 5]  # a run and a repeat
  slow = cache.split_rows(workdir, "train", opener=lambda path: open(path, "rb"))
  for source in (rows, slow):
    np.testing.assert_array_equal(source[picks], whole[picks])
    np.testing.assert_array_equal(source[48:53], whole[48:53])  # across a shard boundary
    np.testing.assert_array_equal(source[-1], whole[-1])
    np.testing.assert_array_equal(source[10:20, :5], whole[10:20, :5])
  with pytest.raises(IndexError):
    rows[np.array([len(whole)])]


def test_a_slow_remote_style_filesystem_yields_the_same_batches(corpus_glob, tmp_path):
  c = _config(corpus_glob)
  workdir = str(tmp_path)
  preparation.build_cache(c, workdir)
  slow = shards.LatencyOpener(0.01)
  local = pipeline.build(c, workdir)
  remote = pipeline.build(c, workdir, opener=slow)
  assert remote.train_rows.ranged and not local.train_rows.ranged
  batches = remote.train_batches(3)
  for step in range(3, 13):
    got = next(batches)
    want = local.batch_for_step(step)
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"step {step} {key}")
  for got, want in zip(remote.eval_batches(), local.eval_batches(), strict=True):
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
  row_bytes = c.data.seq_len + 1  # uint16 rows of seq_len + 1 tokens: 2 bytes each
  assert slow.reads and max(slow.reads) <= 2 * row_bytes * c.batch_size  # rows, not shards


def _prepare_command(workdir, text_files, *extra, **kwargs):
  args = [
    sys.executable, "-m", "sslm_jax.prepare", "--config=configs/gpt_tiny.py",
    f"--workdir={workdir}", "--config.data.source=text", f"--config.data.text_files={text_files}",
    "--config.data.seq_len=32", "--config.data.vocab_size=512", "--config.batch_size=4",
    "--config.data.eval_fraction=0.2", "--config.data.tokenizer_sample_bytes=300000",
    "--config.data.shard_rows=2000", *extra,
  ]  # fmt: skip
  return subprocess.Popen(
    args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
  )


def _summary(proc, timeout=300) -> dict:
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_killed_prepare_resumes_to_identical_shards(tmp_path):
  text_files = _corpus(tmp_path / "corpus", files=8, paragraphs=3000)
  _summary(_prepare_command(tmp_path / "whole", text_files, "--num_workers=1"))
  proc = _prepare_command(tmp_path / "killed", text_files, "--num_workers=1")
  records = tmp_path / "killed" / "data" / "units"
  deadline = time.monotonic() + 240
  while not (records / "00001.json").exists() and proc.poll() is None:
    assert time.monotonic() < deadline, "the prepare never finished a unit"
    time.sleep(0.05)
  proc.kill()
  proc.communicate()
  assert not (tmp_path / "killed" / "data" / "meta.json").exists(), "killed too late"
  assert not (records / "00007.json").exists()
  rerun = _prepare_command(tmp_path / "killed", text_files, "--num_workers=1")
  out, err = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, err[-3000:]
  assert "were finished before" in err
  assert _cache_files(tmp_path / "killed") == _cache_files(tmp_path / "whole")
  leftovers = [n for n in os.listdir(tmp_path / "killed" / "data") if ".tmp-" in n]
  assert leftovers == [] or all(n.startswith(".") for n in leftovers)


@pytest.mark.slow
def test_two_processes_joined_on_loopback_prepare_the_same_cache(tmp_path):
  from test_multiprocess import _free_port

  text_files = _corpus(tmp_path / "corpus", files=4, paragraphs=400)
  _summary(_prepare_command(tmp_path / "one", text_files, "--num_workers=1"))
  address = f"127.0.0.1:{_free_port()}"
  procs = [
    _prepare_command(
      tmp_path / "two",
      text_files,
      "--num_workers=1",
      f"--coordinator_address={address}",
      "--num_processes=2",
      f"--process_id={i}",
      "--initialization_timeout=60",
    )  # fmt: skip
    for i in range(2)
  ]
  summaries = [_summary(p, timeout=180) for p in procs]
  assert [s["process"] for s in summaries] == [0, 1]
  assert all(s["processes"] == 2 for s in summaries)
  assert _cache_files(tmp_path / "two") == _cache_files(tmp_path / "one")
  assert (tmp_path / "one" / "tokenizer.model").read_bytes() == (
    tmp_path / "two" / "tokenizer.model"
  ).read_bytes()


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
  small = _corpus(tmp_path / "small", files=1, paragraphs=20_000)
  big = _corpus(tmp_path / "big", files=10, paragraphs=20_000, seed=1)
  first = _summary(_prepare_command(tmp_path / "w_small", small, "--num_workers=1"))
  tok = str(tmp_path / "w_small" / "tokenizer.model")
  second = _summary(
    _prepare_command(
      tmp_path / "w_big", big, "--num_workers=1", f"--config.data.tokenizer_path={tok}"
    )
  )
  assert second["train_tokens"] > 9 * first["train_tokens"]
  # Holding the big corpus's rows would take > 8 bytes per token on top of the small run.
  grown = second["peak_rss_mib"] - first["peak_rss_mib"]
  held = second["train_tokens"] * 8 / 2**20
  assert grown < min(100, held / 2), (first, second)


def test_bad_worker_and_shard_settings_are_refused(corpus_glob):
  from sslm_jax import config as config_lib

  for field, value in (
    ("prepare_workers", 0),
    ("shard_rows", -1),
    ("read_threads", 0),
    ("read_ahead_batches", 0),
  ):
    c = _config(corpus_glob)
    c.data[field] = value
    with pytest.raises(config_lib.ConfigError, match=f"data.{field}"):
      config_lib.validate(c)


def test_a_unit_no_process_prepared_is_named(corpus_glob, tmp_path):
  c = _config(corpus_glob)
  # Process 0 of 2 alone: the other process's units are missing when it joins the records.
  with pytest.raises(DataError, match="not prepared by any process"):
    preparation.build_cache(c, str(tmp_path), process_index=0, process_count=2)
  assert preparation.UNITS_DIR in os.listdir(tmp_path / "data")
  assert not (tmp_path / "data" / "meta.json").exists()
  assert shards.rows_per_shard(1025, np.uint16) == (64 << 20) // 2050


def test_units_are_shared_out_by_size():
  from sslm_jax.data import units

  sizes = [100, 5, 5, 5, 5, 60, 40, 1, 1, 30]
  work = [units.Unit(i, f"u{i}", units.SPLITS, size=n) for i, n in enumerate(sizes)]
  shares = units.assign(work, 3)
  assert sorted(u.index for share in shares for u in share) == list(range(len(sizes)))
  loads = [sum(u.size for u in share) for share in shares]
  assert max(loads) == 100 and min(loads) >= 46  # round robin by index: 111 / 71 / 70
  assert [u.size for u in shares[1]] == sorted((u.size for u in shares[1]), reverse=True)
  assert units.assign(work, 3) == shares and units.assign(work, 1) == [
    sorted(work, key=lambda u: -u.size)
  ]


def test_a_worker_process_error_is_the_preparations_error(corpus_glob, tmp_path):
  bad = tmp_path / "bad"
  bad.mkdir()
  for i in range(3):
    (bad / f"ok{i}.jsonl").write_text('{"text": "fine words here"}\n' * 50)
  (bad / "broken.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
  c = make_config(str(bad / "*.jsonl"))
  c.data.tokenizer_path = str(tmp_path / "tok.model")
  preparation.build_cache(_config(corpus_glob), str(tmp_path / "good"))
  os.replace(tmp_path / "good" / "tokenizer.model", c.data.tokenizer_path)
  with pytest.raises(DataError, match=r"broken.jsonl:2 is not a JSON object with a 'text' field"):
    preparation.build_cache(c, str(tmp_path / "w"), num_workers=2)
  assert not (tmp_path / "w" / "data" / "meta.json").exists()
