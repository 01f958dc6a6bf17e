"""The resume guarantee: what a step sees is recorded, compared before anything is written, and
ordered by a permutation of our own; unfinished saves are found on every filesystem."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from test_data import make_config, write_corpus
from test_main import SMALL, _main, _snapshot

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.data import batches, permute, pipeline, preparation
from sslm_jax.data import cache as cache_lib

# ----------------------------------------------------------------------------- the data order


def reference_permutation(n: int, purpose: str, seed: int, epoch: int) -> list[int]:
  """The data order written out in plain Python integers, apart from the implementation."""
  text = f"sslm_jax/data order/{purpose}/{seed}/{epoch}".encode()
  digest = hashlib.sha512(text).digest()
  keys = [int.from_bytes(digest[8 * r : 8 * r + 8], "little") for r in range(6)]
  half = 1
  while 4**half < n:
    half += 1
  mask, m64 = (1 << half) - 1, (1 << 64) - 1

  def scramble(r, key):
    y = r ^ key
    y = ((y ^ (y >> 30)) * 0xBF58476D1CE4E5B9) & m64
    y = ((y ^ (y >> 27)) * 0x94D049BB133111EB) & m64
    return (y ^ (y >> 31)) & mask

  def encrypt(x):
    left, right = x >> half, x & mask
    for key in keys:
      left, right = right, left ^ scramble(right, key)
    return (left << half) | right

  out = []
  for i in range(n):
    x = encrypt(i)
    while x >= n:
      x = encrypt(x)
    out.append(x)
  return out


SIZES = [1, 2, 3, 4, 5, 7, 16, 17, 1000, 1009, 2**12, 2**12 + 1, 2**13 - 1]


@pytest.mark.parametrize("n", SIZES)
def test_the_order_is_a_bijection_that_matches_the_plain_python_definition(n):
  for seed, epoch in ((0, 0), (1234, 5)):
    perm = permute.KeyedPermutation(n, "train", seed, epoch)
    rows = perm[np.arange(n)]
    assert sorted(rows.tolist()) == list(range(n))
    assert rows.tolist() == reference_permutation(n, "train", seed, epoch)
    np.testing.assert_array_equal(perm[1 : n - 1], rows[1 : n - 1])  # slices, as eval uses


def test_the_order_differs_across_seeds_epochs_and_purposes_and_looks_shuffled():
  n = 1000
  base = permute.KeyedPermutation(n, "train", 0, 0)[np.arange(n)]
  for other in [("train", 1, 0), ("train", 0, 1), ("eval", 0, 0)]:
    assert (permute.KeyedPermutation(n, *other)[np.arange(n)] != base).mean() > 0.95
  assert abs(np.corrcoef(np.arange(n), base)[0, 1]) < 0.1
  assert 0.3 < np.mean(np.diff(base) > 0) < 0.7
  with pytest.raises(IndexError):
    permute.KeyedPermutation(n, "train", 0, 0)[np.array([n])]


@pytest.fixture(scope="module")
def prepared_text(tmp_path_factory):
  c = make_config(write_corpus(tmp_path_factory.mktemp("corpus")))
  workdir = str(tmp_path_factory.mktemp("work"))
  preparation.build_cache(c, workdir)
  return c, workdir


def test_train_and_eval_batches_follow_the_defined_order(prepared_text):
  c, workdir = prepared_text
  data = pipeline.build(c, workdir)
  n, b = data.num_train_rows, c.batch_size
  for step in (0, 3, n // b + 1):  # the last one is in the second epoch
    g = step * b + np.arange(b)
    epoch_b, offset_b = divmod(g, n)
    orders = {e: reference_permutation(n, "train", c.seed, int(e)) for e in set(epoch_b)}
    expected = [orders[e][o] for e, o in zip(epoch_b, offset_b, strict=True)]
    np.testing.assert_array_equal(
      data.batch_for_step(step)["inputs"], data.train_rows[expected][:, :-1]
    )
  order = reference_permutation(data.num_eval_rows, "eval", batches.EVAL_SEED, 0)
  first = next(data.eval_batches())
  np.testing.assert_array_equal(first["inputs"], data.eval_rows[order[:b]][:, :-1])


# ----------------------------------------------------------------------------- refusals

TEXT_FLAGS = [
  "--config=configs/gpt_tiny.py",
  *SMALL,
  "--config.num_train_steps=2",
  "--config.sample_at_end=False",
  "--config.data.source=text",
  "--config.data.vocab_size=320",
  "--config.data.eval_fraction=0.2",
]


def _train(corpus_dir, workdir, *extra):
  files = f"{corpus_dir}/*.txt,{corpus_dir}/*.jsonl"
  return _main(*TEXT_FLAGS, f"--config.data.text_files={files}", f"--workdir={workdir}", *extra)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  """A finished 2-step run on a text corpus; tests that change it work on copies."""
  corpus_dir = tmp_path_factory.mktemp("run_corpus")
  write_corpus(corpus_dir)
  workdir = tmp_path_factory.mktemp("run") / "w"
  result = _train(corpus_dir, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return corpus_dir, workdir


def _loaded(workdir) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))


def _check(config, workdir, allowed=frozenset()):
  """What main.run checks before prepare(), called directly."""
  fp = checkpoint.fingerprint(config, cache_lib.resume_record(config, str(workdir)))
  _, saved = checkpoint.saved_fingerprint(f"{workdir}/checkpoints")
  cache = cache_lib.cache_requests(config, str(workdir))
  return checkpoint.check_fingerprint(saved, fp, str(workdir), allowed, cache)


CHANGES = {
  "batch_size": 16,
  "data.eval_fraction": 0.3,
  "data.text_key": "body",
  "data.tfds_train_split": "train[:50%]",
  "data.tfds_eval_split": "validation",
  "data.tfds_data_dir": "/elsewhere",
}


def test_the_unchanged_config_resumes_and_records_the_data(text_run):
  corpus_dir, workdir = text_run
  assert _check(_loaded(workdir), workdir) == []
  _, saved = checkpoint.saved_fingerprint(f"{workdir}/checkpoints")
  assert saved["data_order"] == permute.ORDER_VERSION and saved["batch_size"] == 8
  names = [name for name, _ in saved["data_listing"]["files"]]
  assert names == ["a.txt", "b.jsonl", "bad.txt"]


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_each_field_that_changes_the_batches_is_refused_by_name(text_run, field):
  _, workdir = text_run
  config = _loaded(workdir)
  *parents, leaf = field.split(".")
  (config[parents[0]] if parents else config)[leaf] = CHANGES[field]
  with pytest.raises(checkpoint.CheckpointMismatch, match=f"{field}: checkpoint has"):
    _check(config, workdir)
  _check(config, workdir, allowed={field})


def test_changed_fields_are_refused_before_the_workdir_changes(text_run):
  corpus_dir, workdir = text_run
  before = _snapshot(workdir)
  flags = [f"--config.{k}={v}" for k, v in CHANGES.items()]
  result = _train(corpus_dir, workdir, *flags)
  assert result.returncode == 2, result.stderr[-3000:]
  message = result.stderr[result.stderr.index("sslm_jax: error:") :]
  for field in CHANGES:
    assert f"{field}: checkpoint has" in message, field
  assert "--allow_config_change=" in message and "Traceback" not in result.stderr
  assert _snapshot(workdir) == before


@pytest.mark.slow
def test_a_file_added_to_the_glob_is_refused_until_allowed(text_run, tmp_path):
  corpus_src, _ = text_run
  corpus_dir, workdir = tmp_path / "corpus", tmp_path / "w"
  shutil.copytree(corpus_src, corpus_dir)
  assert _train(corpus_dir, workdir).returncode == 0
  (corpus_dir / "c.txt").write_text("ka lo mi ne ru sa to vi\n\n" * 200)
  before = _snapshot(workdir)
  refused = _train(corpus_dir, workdir, "--config.num_train_steps=4")
  assert refused.returncode == 2, refused.stderr[-3000:]
  last = refused.stderr[refused.stderr.index("sslm_jax: error:") :]
  assert "data_listing" in last and "files added: c.txt" in last
  assert "--allow_config_change=data_listing" in last
  assert _snapshot(workdir) == before
  allowed = _train(
    corpus_dir, workdir, "--config.num_train_steps=4", "--allow_config_change=data_listing"
  )
  assert allowed.returncode == 0, allowed.stderr[-3000:]
  assert "Resuming from the checkpoint at step 2" in allowed.stderr


def test_resized_and_removed_files_are_named(text_run, tmp_path):
  corpus_src, workdir_src = text_run
  _, saved = checkpoint.saved_fingerprint(f"{workdir_src}/checkpoints")
  current = dict(saved)
  files = dict(saved["data_listing"]["files"])
  files["a.txt"] += 10
  del files["bad.txt"]
  current["data_listing"] = {"source": "text", "files": sorted([k, v] for k, v in files.items())}
  with pytest.raises(checkpoint.CheckpointMismatch) as refused:
    checkpoint.check_fingerprint(saved, current, "w")
  size = dict(saved["data_listing"]["files"])["a.txt"]
  assert f"files resized: a.txt ({size} -> {size + 10} bytes)" in str(refused.value)
  assert "files removed: bad.txt" in str(refused.value)


def test_a_missing_tokenizer_is_refused_before_a_new_one_is_trained(text_run, tmp_path):
  corpus_dir, workdir_src = text_run
  workdir = tmp_path / "w"
  shutil.copytree(workdir_src, workdir)
  os.remove(workdir / "tokenizer.model")
  before = _snapshot(workdir)
  result = _train(corpus_dir, workdir, "--config.num_train_steps=4")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "tokenizer_sha256: checkpoint has" in result.stderr
  assert "none yet (prepare would train a new one)" in result.stderr
  assert _snapshot(workdir) == before and not (workdir / "tokenizer.model").exists()


def test_a_cache_rebuild_nothing_recorded_explains_is_refused(text_run, tmp_path):
  _, workdir_src = text_run
  workdir = tmp_path / "w"
  shutil.copytree(workdir_src, workdir)
  meta_path = workdir / "data" / "meta.json"
  meta = json.loads(meta_path.read_text())
  meta["request"]["version"] = 0  # as if written by an sslm_jax that packed rows differently
  meta_path.write_text(json.dumps(meta))
  config = _loaded(workdir)
  with pytest.raises(
    checkpoint.CheckpointMismatch, match=f"data_cache: .*version: 0 -> {cache_lib.CACHE_VERSION}"
  ):
    _check(config, workdir)
  _check(config, workdir, allowed={"data_cache"})
  shutil.rmtree(workdir / "data")  # no cache: it is rebuilt from the same, compared inputs
  _check(config, workdir)


def test_a_checkpoint_from_before_the_order_was_ours_is_refused_until_allowed(text_run):
  _, workdir = text_run
  config = _loaded(workdir)
  current = checkpoint.fingerprint(config, cache_lib.resume_record(config, str(workdir)))
  old = {k: v for k, v in current.items() if k not in ("data_order", "data_listing", "batch_size")}
  with pytest.raises(checkpoint.CheckpointMismatch, match="data_order: checkpoint has 1"):
    checkpoint.check_fingerprint(old, current, "w")
  unrecorded = checkpoint.check_fingerprint(old, current, "w", allowed={"data_order"})
  assert unrecorded == ["batch_size", "data_listing"]
  # What such a checkpoint does not record, its data cache still does.
  cache = ({"source": {"eval_fraction": 0.2}}, {"source": {"eval_fraction": 0.3}})
  with pytest.raises(checkpoint.CheckpointMismatch, match="data_cache: .*eval_fraction"):
    checkpoint.check_fingerprint(old, current, "w", allowed={"data_order"}, cache=cache)


# ----------------------------------------------------------------------------- unfinished saves


@pytest.fixture
def like_gcs(monkeypatch):
  """Local directories handled as Orbax handles gs:// (a commit file marks a finished save)."""
  from orbax.checkpoint._src.path import gcs_utils

  monkeypatch.setattr(gcs_utils, "is_gcs_path", lambda path: True)
  monkeypatch.setattr(checkpoint, "_on_gcs", lambda path: True)


def _state():
  return {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}


def test_an_unfinished_gcs_save_is_reported_and_the_hint_uses_gcloud(tmp_path, like_gcs, caplog):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  for step in (2, 4):
    ckpt.save(step, _state(), {"step": step})
  ckpt.wait()
  ckpt.close()
  assert (tmp_path / "4" / "commit_success.txt").exists()  # the gs:// layout, not a rename
  shutil.copytree(tmp_path / "4", tmp_path / "6")
  os.remove(tmp_path / "6" / "commit_success.txt")  # killed before the commit file was written
  with caplog.at_level("WARNING"):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  assert "unfinished checkpoint save(s) ['6']" in caplog.text
  assert ckpt.latest_step() == 4
  for item in (tmp_path / "4" / "state").iterdir():
    if item.is_dir():
      shutil.rmtree(item)
  with pytest.raises(checkpoint.CheckpointError) as broken:
    ckpt.restore(4, _state())
  ckpt.close()
  assert f"gcloud storage mv {tmp_path / '4'} {tmp_path / '4'}.broken" in str(broken.value)
  assert "resume from step 2" in str(broken.value)


def test_local_unfinished_saves_and_hint(tmp_path, caplog):
  (tmp_path / "8.orbax-checkpoint-tmp").mkdir()
  with caplog.at_level("WARNING"):
    ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  ckpt.close()
  assert "unfinished checkpoint save(s) ['8.orbax-checkpoint-tmp']" in caplog.text
  assert checkpoint.move_command("/a/4", "/a/4.broken") == "mv /a/4 /a/4.broken"
  assert checkpoint.move_command("gs://b/c/4", "gs://b/c/4.broken").startswith("gcloud storage mv")


# ----------------------------------------------------------------------------- determinism


def test_deterministic_sets_the_xla_flag_before_the_backend_starts(monkeypatch):
  from jax._src import xla_bridge

  c = config_lib.defaults()
  environ = {"XLA_FLAGS": "--xla_gpu_deterministic_ops=false --xla_dump_to=/tmp/x"}
  config_lib.request_determinism(c, environ)
  assert environ["XLA_FLAGS"].endswith("=false --xla_dump_to=/tmp/x")  # off: untouched
  c.deterministic = True
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
  config_lib.request_determinism(c, environ)
  assert environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_gpu_deterministic_ops=true"
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
  with pytest.raises(config_lib.ConfigError, match="before JAX starts"):
    config_lib.request_determinism(c, {})


def test_this_jaxlib_knows_the_flag_and_main_sets_it():
  """XLA aborts on an unknown flag in XLA_FLAGS, so a clean run proves the name is right."""
  code = (
    "import os, jax, jax.numpy as jnp;"
    "from sslm_jax import config as C;"
    "c = C.defaults(); c.deterministic = True; C.request_determinism(c);"
    "x = jnp.zeros(8).at[jnp.array([1, 1, 3])].add(1.0);"
    "print(os.environ['XLA_FLAGS'], float(x.sum()))"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["--xla_gpu_deterministic_ops=true", "3.0"]
  result = _main(
    "--config=configs/gpt_tiny.py",
    "--workdir=/nonexistent/x",
    "--plan",
    *SMALL,
    "--config.deterministic=True",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "--xla_gpu_deterministic_ops=true" in result.stderr
