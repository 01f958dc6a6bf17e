"""Token classification: first-piece features, truncation, the loss mask, a learnt run, the mesh."""

import functools
import json
import logging

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from test_finetune import _FILLER, _mesh, _pretrained_workdir, _records
from test_main import _main

from sslm_jax import config as config_lib
from sslm_jax.data import labelled
from sslm_jax.finetune import loop as finetune
from sslm_jax.finetune import tagging, tasks
from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib
from sslm_jax.training import optimizer as optim
from sslm_jax.training import sharding
from sslm_jax.training import state as train_state
from sslm_jax.training import step as step_lib

_NAMES = {
  "PER": ("ada lovelace", "alan turing", "grace brewster hopper"),
  "LOC": ("new york", "rio de janeiro", "addis ababa"),
}
_RARE = ("zzqx", "quixotic", "xylophonic")  # not in the texts: several pieces each


def _sentence(rng) -> tuple[str, list[str]]:
  """10 filler words with one or two names (B-/I- tags) put between them."""
  words, tags = [], []
  filler = list(rng.choice(_FILLER, size=10))
  names = [
    str(rng.choice(_NAMES[kind])).split() + [kind]
    for kind in rng.choice(sorted(_NAMES), size=rng.integers(1, 3))
  ]
  at = sorted(rng.choice(11, size=len(names), replace=False))
  for i in range(11):
    for name, where in zip(names, at, strict=True):
      if where == i:
        *parts, kind = name
        words += parts
        tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(parts) - 1)
    if i < 10:
      words.append(str(filler[i]))
      tags.append("O")
  return " ".join(words), tags


@pytest.fixture(scope="module")
def tag_dir(tmp_path_factory):
  """train.jsonl / eval.jsonl of the name-tagging task, and a tokenizer trained on their texts."""
  root = tmp_path_factory.mktemp("tagging")
  rng = np.random.default_rng(0)
  for name, n in (("train", 1024), ("eval", 128)):
    rows = [dict(zip(("text", "label"), _sentence(rng), strict=True)) for _ in range(n)]
    (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  tokenizer_lib.train([_sentence(rng)[0] for _ in range(300)], 320, str(root / "tokenizer.model"))
  return root


def _tok(tag_dir):
  return tokenizer_files.load(str(tag_dir / "tokenizer.model"))


def _examples(texts_and_tags):
  return [
    labelled.Example(t, None, tuple(y), f"test row {i}") for i, (t, y) in enumerate(texts_and_tags)
  ]


@pytest.mark.parametrize("causal", [False, True])
def test_only_the_first_piece_of_each_word_is_labelled(tag_dir, causal):
  tok = _tok(tag_dir)
  text = "ada lovelace {} {} river {} new york".format(*_RARE)
  tags = ["B-PER", "I-PER", "O", "O", "O", "O", "B-LOC", "I-LOC"]
  examples = _examples([(text, tags)])
  vocab = labelled.LabelVocab.from_examples(examples, "tagging")
  f = tagging.featurize(examples, tok, vocab, 48, causal)
  n = f["lengths"][0]
  ids = f["inputs"][0, :n].tolist()
  assert ids[0] == (tok.bos_id if causal else tok.cls_id)
  assert ids[-1] == (tok.eos_id if causal else tok.sep_id)
  assert ids[1:-1] == tok.encode(text)  # word by word is exactly the running text's pieces
  multi = [w for w in text.split() if len(tok.encode(w)) > 1]
  assert len(multi) >= 3, multi  # the test needs words of several pieces
  scored = np.flatnonzero(f["label_weights"][0]).tolist()
  assert len(scored) == len(tags)
  # Each word's pieces start with SentencePiece's visible space and no other piece has one.
  starts = [p for p in range(1, n - 1) if tok.id_to_piece(ids[p]).startswith("\u2581")]
  assert scored == starts
  assert [vocab.labels[i] for i in f["labels"][0, scored]] == tags
  assert f["label_weights"][0, n:].sum() == 0 and f["label_weights"].sum() == len(tags)


def test_truncation_drops_whole_words_and_logs_once(tag_dir, caplog):
  tok = _tok(tag_dir)
  long_text = " ".join(["quixotic", "river"] * 10)
  examples = _examples([(long_text, ["O", "B-LOC"] * 10), ("river stone", ["B-LOC", "O"])])
  vocab = labelled.LabelVocab.from_examples(examples, "tagging")
  seq_len = 16
  sizes = [len(tok.encode(w)) for w in long_text.split()]
  fits = int(np.sum(np.cumsum(sizes) <= seq_len - 2))  # whole words within the 14 free positions
  assert 0 < fits < 20 and sum(sizes[:fits]) < seq_len - 2  # a partial word would fit: not kept
  with caplog.at_level(logging.WARNING):
    f = tagging.featurize(examples, tok, vocab, seq_len, causal=False)
  assert f["label_weights"][0].sum() == fits and f["label_weights"][1].sum() == 2
  n = f["lengths"][0]
  assert n == sum(sizes[:fits]) + 2 and f["inputs"][0, n - 1] == tok.sep_id
  assert tok.decode(f["inputs"][0, :n]) == " ".join(long_text.split()[:fits])
  warnings = [r.getMessage() for r in caplog.records if "do not fit" in r.getMessage()]
  assert len(warnings) == 1 and f"{20 - fits} of 22 words (in 1 of 2 examples" in warnings[0]


def _batch(tag_dir, objective, n=4):
  config = tiny_config(objective)
  config.data.vocab_size = 320
  examples = labelled.read_examples(str(tag_dir / "eval.jsonl"), "tagging")[:n]
  vocab = labelled.LabelVocab.from_examples(examples, "tagging")
  f = tagging.featurize(examples, _tok(tag_dir), vocab, 32, objective == "causal_lm")
  data = tasks.TaskData(f, f, batch_size=n, seed=0)
  return config, vocab, data.eval_batches()[0]


@pytest.mark.parametrize("objective", ["masked_lm", "causal_lm"])
def test_loss_ignores_positions_that_are_not_first_pieces(tag_dir, objective):
  config, vocab, batch = _batch(tag_dir, objective)
  model = tagging.build(config_lib.model_config(config), len(vocab), 0)
  params = nnx.state(model, nnx.Param)
  graphdef = nnx.graphdef(model)

  def loss(p, b):
    sums = tagging.task_sums(nnx.merge(graphdef, p), b)
    return sums["loss_sum"], sums["count"]

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))

  def loss_and_grads(b):
    (value, count), grads = grad_fn(params, b)
    return float(value), float(count), jax.tree.leaves(grads)

  base, count, grads = loss_and_grads(batch)
  assert count == batch["label_weights"].sum() > 0
  ignored = batch["label_weights"] == 0
  relabelled = np.where(ignored, (batch["labels"] + 1) % len(vocab), batch["labels"])
  same, _, same_grads = loss_and_grads(dict(batch, labels=relabelled.astype(np.int32)))
  assert same == base and all(np.array_equal(a, b) for a, b in zip(grads, same_grads, strict=True))
  scored = np.where(ignored, batch["labels"], (batch["labels"] + 1) % len(vocab))
  assert loss_and_grads(dict(batch, labels=scored.astype(np.int32)))[0] != pytest.approx(base)


def _config(tag_dir, objective="masked_lm", steps=4):
  c = tiny_config(objective)
  c.finetune.task = "tagging"
  c.finetune.train_files = str(tag_dir / "train.jsonl")
  c.finetune.eval_files = str(tag_dir / "eval.jsonl")
  c.data.tokenizer_path = str(tag_dir / "tokenizer.model")
  c.data.vocab_size = 320
  c.num_train_steps = steps
  c.batch_size = 32
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = steps
  c.sample_at_end = False
  c.opt.learning_rate = 1e-3
  c.opt.warmup_steps = 2
  return c


@pytest.mark.slow  # ~30 s: the one check that the head, features and loss learn together
def test_tagging_learns_names_far_beyond_the_all_o_baseline(tag_dir, tmp_path):
  # BERT from random init. Most words are several pieces and first pieces such as "a" start
  # several names, so the model must read the pieces after them.
  config = _config(tag_dir, steps=100)
  config.eval_every_steps = 50
  config.opt.learning_rate = 3e-3
  finetune.run(config, str(tmp_path), _mesh(config))
  records = [r for r in _records(tmp_path) if "eval_entity_f1" in r]
  eval_rows = labelled.read_examples(str(tag_dir / "eval.jsonl"), "tagging")
  tags = [t for e in eval_rows for t in e.label]
  all_o = tags.count("O") / len(tags)  # the majority tag's word accuracy; its entity F1 is 0
  first, final = records[0], records[-1]
  assert first["step"] == 0 and first["eval_entity_f1"] < 0.2
  assert final["step"] == 100 and final["eval_entity_f1"] > 0.6
  assert final["eval_accuracy"] > all_o + 0.5 * (1 - all_o)
  assert {"eval_entity_precision", "eval_entity_recall", "eval_loss"} <= set(final)
  saved = json.loads((tmp_path / "labels.json").read_text())
  assert saved == {"task": "tagging", "labels": ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]}


def _grads_on(mesh, spec, params, batch, key):
  """(gradients of the summed loss, metric sums), jitted with the train step's shardings."""
  rules = sharding.DEFAULT_RULES
  batch_sharding = sharding.batch_sharding(mesh, rules)
  grads_fn = functools.partial(step_lib._summed_grads, spec=spec, sums_fn=tagging.task_sums)
  fn = jax.jit(
    lambda p, b, k: grads_fn(p, b, key=k),
    in_shardings=(spec.shardings.params, batch_sharding, None),
    out_shardings=(spec.shardings.params, None),
  )
  with sharding.activate(mesh, rules):
    params = jax.device_put(params, spec.shardings.params)
    grads, sums = fn(params, sharding.global_batch(batch, batch_sharding), key)
  return grads, {k: float(v) for k, v in sums.items()}


def test_tagging_gradients_on_an_eight_device_mesh_match_one_device(tag_dir):
  config, vocab, batch = _batch(tag_dir, "causal_lm", n=8)
  config.model.dropout_rate = 0.1
  model_cfg = config_lib.model_config(config)
  build = functools.partial(tagging.build, model_cfg, len(vocab))
  tx, rules = optim.make(config.opt, config.num_train_steps), sharding.DEFAULT_RULES
  one = _mesh(config)
  state, one_spec = train_state.create(model_cfg, 0, tx, one, rules, build=build)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh = sharding.make_mesh(config.mesh)
  assert mesh.devices.size == 8
  spec = train_state.state_spec(model_cfg, 0, tx, mesh, rules, build)
  assert tuple(spec.shardings.params["head"]["output"]["kernel"].spec) == ("fsdp", None)
  key = jax.random.key(3)
  grads, sums = _grads_on(one, one_spec, state.params, batch, key)
  sharded_grads, sharded_sums = _grads_on(mesh, spec, state.params, batch, key)
  assert sharded_sums["count"] == sums["count"] == batch["label_weights"].sum()
  assert sharded_sums["loss_sum"] == pytest.approx(sums["loss_sum"], rel=1e-5)
  for a, b in zip(jax.tree.leaves(sharded_grads), jax.tree.leaves(grads), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  head_grad = np.asarray(grads["head"]["output"]["kernel"])
  assert np.abs(head_grad).max() > 1e-3  # the head is trained, not a constant


def test_config_accepts_tagging_with_files_only(tag_dir):
  config = _config(tag_dir)
  config_lib.validate(config)
  config.finetune.train_files = config.finetune.eval_files = ""
  with pytest.raises(config_lib.ConfigError, match=r"give finetune.train_files .*'tagging'"):
    config_lib.validate(config)
  config.finetune.tfds_name = "glue/sst2"  # TFDS data has no per-word labels
  with pytest.raises(config_lib.ConfigError, match="give tagging data as finetune.train_files"):
    config_lib.validate(config)


def test_labels_outside_bio_are_one_word_entities():
  assert [tagging.as_bio(x) for x in ("O", "B-PER", "I-LOC", "NOUN", "B-")] == [
    "O", "B-PER", "I-LOC", "B-NOUN", "B-B-",
  ]  # fmt: skip
  outputs = [
    {
      "predictions": np.array([[0, 1, 1, 2]]),
      "labels": np.array([[0, 1, 2, 2]]),
      "weights": np.array([[0.0, 1.0, 1.0, 1.0]]),
      "loss": np.zeros((1, 4)),
    }
  ]
  record = tagging.summarize(outputs, ("PAD", "NOUN", "VERB"))
  # Words: NOUN VERB VERB vs NOUN NOUN VERB: 2 of 3 words right, and entities (one per word)
  # NOUN@1, VERB@2, VERB@3 vs NOUN@1, NOUN@2, VERB@3: 2 of 3 found.
  assert record["eval_accuracy"] == pytest.approx(2 / 3)
  assert record["eval_entity_f1"] == pytest.approx(2 / 3)


@pytest.mark.slow  # a subprocess: the README's command, from a pretrained workdir
def test_the_readme_command_tags_from_a_workdir(tag_dir, tmp_path):
  pre, run = tmp_path / "pre", tmp_path / "run"
  _pretrained_workdir(pre, _config(tag_dir))
  flags = [
    "--config=configs/finetune_bert_tiny.py",
    f"--workdir={run}",
    f"--config.finetune.init_from={pre}",
    "--config.finetune.task=tagging",
    f"--config.finetune.train_files={tag_dir / 'train.jsonl'}",
    f"--config.finetune.eval_files={tag_dir / 'eval.jsonl'}",
    "--config.num_train_steps=4",
    "--config.batch_size=8",
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.opt.warmup_steps=1",
    "--config.data.seq_len=32",
    "--config.data.vocab_size=320",
    "--config.model.emb_dim=64",
    "--config.model.mlp_dim=128",
    "--config.mesh.data=1",
  ]
  first = _main(*flags)
  assert first.returncode == 0, first.stderr[-2000:]
  assert first.stderr.count("do not fit in data.seq_len=32") == 2  # train and eval, once each
  records = _records(run)
  assert [r["step"] for r in records if "eval_entity_f1" in r] == [0, 2, 4]
  assert {"eval_accuracy", "eval_entity_precision", "eval_entity_recall"} <= set(records[-1])
  assert json.loads((run / "labels.json").read_text())["task"] == "tagging"
