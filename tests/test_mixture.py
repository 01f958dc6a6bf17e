"""Data mixtures: several sources with weights, each with its own cache, one tokenizer."""

import collections
import json

import numpy as np
import pytest
from conftest import synthetic_batch, tiny_config
from test_data import make_config
from test_prepare import _corpus

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.config import mixture as mixture_config
from sslm_jax.data import cache, mixture, pipeline, preparation


def test_schedule_keeps_exact_proportions_and_walks_each_source_in_order():
  schedule = mixture.Schedule([0.7, 0.3])
  assert schedule.counts == [7, 3] and schedule.period == 10
  source, index = schedule.locate(np.arange(10_000))
  assert np.bincount(source).tolist() == [7000, 3000]
  for s in (0, 1):  # each source's examples are its stream's 0, 1, 2, ... in order
    np.testing.assert_array_equal(index[source == s], np.arange((source == s).sum()))
  # Spread evenly: any 10 consecutive examples hold exactly 7 of the first source.
  windows = np.lib.stride_tricks.sliding_window_view(source == 0, 10).sum(axis=1)
  assert set(windows.tolist()) == {7}
  three = mixture.Schedule([1, 2, 5])
  assert three.counts == [1, 2, 5]
  assert np.bincount(three.locate(np.arange(800))[0]).tolist() == [100, 200, 500]
  # A pure function of the example index: any slice agrees with the whole.
  s_part, i_part = schedule.locate(np.arange(1234, 1300))
  np.testing.assert_array_equal(s_part, source[1234:1300])
  np.testing.assert_array_equal(i_part, index[1234:1300])


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
  root = tmp_path_factory.mktemp("mix")
  return _corpus(root / "a", files=2, paragraphs=150), _corpus(root / "b", 2, 150, seed=5)


def _mixture(two_corpora, weights=(0.75, 0.25)):
  c = make_config(two_corpora[0])
  c.data.mixture.web = mixture_config.source(weights[0], text_files=two_corpora[0])
  c.data.mixture.books = mixture_config.source(weights[1], text_files=two_corpora[1])
  config_lib.validate(c)
  return c


def test_a_mixture_serves_its_sources_in_proportion(two_corpora, tmp_path):
  c = _mixture(two_corpora)
  workdir = str(tmp_path)
  preparation.build_cache(c, workdir)
  data = pipeline.build(c, workdir)
  assert data.names == ["books", "web"]  # sorted: the order everywhere
  for name in data.names:
    meta = cache.read_meta(mixture_config.source_workdir(workdir, name))
    assert meta["train"]["rows"] > 3 * c.batch_size
  assert not (tmp_path / "data").exists()  # no cache of data.source itself
  # The shared tokenizer was trained on both sources.
  tok = data.tokenizer
  assert all(d.tokenizer.sha256 == tok.sha256 for d in data.sources)
  # Every row comes from the source the schedule names, at its stream position.
  schedule = mixture.Schedule([0.25, 0.75])
  counts = collections.Counter()
  for step in range(40):
    batch = data.batch_for_step(step)
    g = step * c.batch_size + np.arange(c.batch_size)
    source, index = schedule.locate(g)
    for s in range(2):
      here = source == s
      if here.any():
        want = data.sources[s].train_rows_for(index[here])
        np.testing.assert_array_equal(batch["inputs"][here], want[:, :-1].astype(np.int32))
      counts[data.names[s]] += int(here.sum())
  assert counts == {"web": 120, "books": 40}
  # Each source walks its own order: the stream position maps to distinct rows within an epoch.
  web = data.sources[1]
  n = web.num_train_rows
  rows = np.asarray(web.train_rows_for(np.arange(n)))
  assert len({r.tobytes() for r in rows}) == len(np.unique(rows, axis=0))
  # Two processes, each serving half of every batch, see the same global batches.
  halves = [pipeline.build(c, workdir, p, 2) for p in range(2)]
  for step in (0, 9):
    joined = np.concatenate([h.batch_for_step(step)["inputs"] for h in halves])
    np.testing.assert_array_equal(joined, data.batch_for_step(step)["inputs"])
  # Eval: each source's own fixed batches, by name.
  evals = data.eval_batches()
  assert sorted(evals) == ["books", "web"] and all(len(v) == c.eval_steps for v in evals.values())
  np.testing.assert_array_equal(evals["web"][0]["inputs"], next(web.eval_batches())["inputs"])


def test_eval_reports_each_source_and_all_together():
  import jax

  from sslm_jax.training import loop as train
  from sslm_jax.training import optimizer as optim
  from sslm_jax.training import sharding
  from sslm_jax.training import state as train_state

  config = tiny_config("causal_lm")
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  tx = optim.make(config.opt, 10)
  model_cfg = config_lib.model_config(config)
  state, spec = train_state.create(model_cfg, 0, tx, mesh, sharding.DEFAULT_RULES)
  trainer = train.Trainer(config, mesh, spec, tx)  # eval only: the train step is not compiled
  a = [synthetic_batch(config, seed=i) for i in range(2)]
  b = [synthetic_batch(config, seed=10 + i) for i in range(3)]
  record = trainer.evaluate(state.params, {"a": a, "b": b})
  whole = trainer.evaluate(state.params, a + b)
  for key, value in whole.items():
    assert record[key] == pytest.approx(value)
    assert record[f"{key}/a"] == pytest.approx(trainer.evaluate(state.params, a)[key])
    assert record[f"{key}/b"] == pytest.approx(trainer.evaluate(state.params, b)[key])
  assert record["eval_loss/a"] != record["eval_loss/b"]


def test_the_checkpoint_records_every_source(two_corpora, tmp_path):
  c = _mixture(two_corpora)
  workdir = str(tmp_path)
  preparation.build_cache(c, workdir)
  fp = checkpoint.fingerprint(c, cache.resume_record(c, workdir))
  assert sorted(fp["data_listing"]) == ["books", "web"]
  assert fp["data.mixture"]["web"]["weight"] == 0.75
  json.dumps(fp)  # written into checkpoint metadata
  reweighted = _mixture(two_corpora, (0.5, 0.5))
  current = checkpoint.fingerprint(reweighted, cache.resume_record(reweighted, workdir))
  with pytest.raises(checkpoint.CheckpointMismatch, match="data.mixture"):
    checkpoint.check_fingerprint(fp, current, "w")
  checkpoint.check_fingerprint(fp, current, "w", allowed={"data.mixture"})  # as the README says
  assert cache.cache_requests(c, workdir)[0] == cache.cache_requests(c, workdir)[1]


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda m: setattr(m.web, "weight", 0), "weight=0.0 must be a positive number"),
    (lambda m: m.web.update({"source": "web"}), "data.mixture.web.source='web'"),
    (lambda m: m.web.update({"text_files": ""}), "has no text_files"),
  ],
)
def test_bad_mixtures_are_refused(two_corpora, change, message):
  c = _mixture(two_corpora)
  change(c.data.mixture)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)
  with pytest.raises(ValueError, match="unknown"):
    mixture_config.source(1.0, text_file="x")
