"""Fine-tuning: heads, the built-in task, init_from, freezing and exact resume, run in-process."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.data import labelled
from sslm_jax.finetune import heads, tasks
from sslm_jax.finetune import loop as finetune
from sslm_jax.models import transformer as model_lib
from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib
from sslm_jax.training import loop as train
from sslm_jax.training import optimizer as optim
from sslm_jax.training import sharding
from sslm_jax.training import state as train_state

_FILLER = (
  "river stone cloud paper window garden yellow quiet simple orange table morning letter "
  "silver market bridge candle forest winter summer planet pencil rocket basket"
).split()
_KEYS = ("violet", "amber")  # an example is "yes" when it holds one of these words


def _texts(rng, n: int) -> list[tuple[str, str]]:
  out = []
  for i in range(n):
    words = list(rng.choice(_FILLER, size=10))
    label = "yes" if i % 2 else "no"
    if label == "yes":
      words[rng.integers(len(words))] = str(rng.choice(_KEYS))
    out.append((" ".join(words), label))
  return out


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  """train.jsonl / eval.jsonl of the key-word task, and a tokenizer trained on their texts."""
  root = tmp_path_factory.mktemp("task")
  rng = np.random.default_rng(0)
  for name, n in (("train", 2048), ("eval", 128)):
    lines = [json.dumps({"text": t, "label": y}) for t, y in _texts(rng, n)]
    (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
  texts = [t for t, _ in _texts(rng, 300)]
  tokenizer_lib.train(texts, 300, str(root / "tokenizer.model"))
  return root


def _config(task_dir, objective="masked_lm", steps=6):
  c = tiny_config(objective)
  c.finetune.task = "classification"
  c.finetune.train_files = str(task_dir / "train.jsonl")
  c.finetune.eval_files = str(task_dir / "eval.jsonl")
  c.data.tokenizer_path = str(task_dir / "tokenizer.model")
  c.data.vocab_size = 300
  c.num_train_steps = steps
  c.batch_size = 32
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 3
  c.sample_at_end = False
  c.opt.learning_rate = 1e-3
  c.opt.warmup_steps = 2
  c.opt.weight_decay = 0.01
  return c


def _mesh(config):
  return sharding.make_mesh(config.mesh, devices=jax.devices()[:1])


def _records(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def _saved_params(config, workdir) -> dict:
  """The newest checkpoint's parameters, as a pure dict of numpy arrays."""
  prepared = finetune.prepare_finetuning(config, str(workdir))
  state, _, _, ckpt = train.init_or_restore(
    config, _mesh(config), str(workdir), prepared.fingerprint, objective=prepared.objective
  )
  ckpt.close()
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))


def _fresh_params(config, num_outputs=2, seed=None) -> dict:
  model = heads.build(
    config_lib.model_config(config), num_outputs, config.seed if seed is None else seed
  )
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _paths(tree) -> dict:
  return {
    jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def _equal(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


@pytest.mark.parametrize("objective", ["masked_lm", "causal_lm"])
def test_head_shapes_paths_and_shardings(objective):
  c = tiny_config(objective)
  cfg = config_lib.model_config(c)
  params = nnx.state(heads.build(cfg, 3, 0), nnx.Param)
  pretrained = nnx.state(model_lib.build(cfg, 0), nnx.Param)
  pure = nnx.to_pure_dict(params)
  assert _paths(pure["encoder"]) == _paths(nnx.to_pure_dict(pretrained))
  assert _equal(pure["encoder"], nnx.to_pure_dict(pretrained))  # same init as pretraining
  d = c.model.emb_dim
  expected = {"['output']['kernel']": (d, 3), "['output']['bias']": (3,)}
  if objective == "masked_lm":
    expected.update({"['pooler']['kernel']": (d, d), "['pooler']['bias']": (d,)})
  assert _paths(pure["head"]) == expected
  specs = nnx.to_pure_dict(sharding.param_specs(params, sharding.DEFAULT_RULES))
  assert tuple(specs["head"]["output"]["kernel"]) == ("fsdp", None)
  optim.decay_mask(params)  # every head parameter has a weight-decay rule


@pytest.mark.parametrize("objective", ["masked_lm", "causal_lm"])
def test_head_reads_cls_or_last_real_token_and_ignores_padding(objective):
  c = tiny_config(objective)
  model = heads.build(config_lib.model_config(c), 2, 0)
  t = c.data.seq_len
  lengths = np.array([5, 9])
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (2, t))
  segments = (positions < lengths[:, None]).astype(np.int32)
  rng = np.random.default_rng(0)
  inputs = rng.integers(7, 200, size=(2, t)).astype(np.int32)
  batch = {"inputs": inputs, "positions": positions, "segment_ids": segments}
  batch["token_types"] = np.zeros_like(inputs)
  out = model(batch)
  other = dict(batch, inputs=np.where(segments > 0, inputs, rng.integers(7, 200, size=(2, t))))
  np.testing.assert_allclose(model(other), out, atol=1e-6)
  changed = inputs.copy()
  changed[:, 3] = 100  # a real token: every output sees it
  assert not np.allclose(model(dict(batch, inputs=changed.astype(np.int32))), out, atol=1e-6)


def test_builtin_task_is_balanced_fixed_and_split_by_file():
  train_examples = tasks.builtin_examples("train", 40)
  eval_examples = tasks.builtin_examples("eval", 10)
  assert [e.label for e in train_examples].count("def") == 40 == len(train_examples) // 2
  assert train_examples == tasks.builtin_examples("train", 40)
  train_files = {e.where for e in train_examples}
  assert not train_files & {e.where for e in eval_examples}
  for e in train_examples:
    defines = any(
      line.lstrip().startswith(("def ", "class ", "async def ")) for line in e.text.splitlines()
    )
    assert defines == (e.label == "def")


def test_features_and_train_order(task_dir):
  tok = tokenizer_files.load(str(task_dir / "tokenizer.model"))
  examples = [
    labelled.Example("amber river", "stone", "yes"),
    labelled.Example("x " * 50, None, "no"),
  ]
  vocab = labelled.LabelVocab.from_examples(examples, "classification")
  bert = tasks.featurize(examples, tok, vocab, 16, causal=False)
  row = bert["inputs"][0][: bert["lengths"][0]].tolist()
  assert row[0] == tok.cls_id and row.count(tok.sep_id) == 2 and row[-1] == tok.sep_id
  assert bert["token_types"][0][: bert["lengths"][0]].tolist()[-2:] == [1, 1]
  assert bert["lengths"][1] == 16 and bert["inputs"][1][-1] == tok.sep_id  # truncated
  gpt = tasks.featurize(examples, tok, vocab, 16, causal=True)
  assert gpt["inputs"][0][0] == tok.bos_id and gpt["inputs"][1][-1] == tok.eos_id
  assert bert["labels"].tolist() == [1, 0]  # "no" < "yes"
  data = tasks.TaskData(bert, bert, batch_size=3, seed=0)
  seen = np.concatenate([data.batch_for_step(s)["labels"] for s in range(4)])
  assert sorted(seen[:2].tolist()) == [0, 1]  # each epoch is a permutation
  again = tasks.TaskData(bert, bert, batch_size=3, seed=0)
  assert all(
    np.array_equal(a, b)
    for a, b in zip(data.batch_for_step(3).values(), again.batch_for_step(3).values(), strict=True)
  )


def test_epochs_set_the_steps_and_the_warmup_fraction_the_warmup():
  config = config_lib.defaults()
  config.batch_size, config.num_train_steps = 32, 300
  finetune._steps_from_epochs(config, 1000)  # num_epochs 0: num_train_steps stays
  assert config.num_train_steps == 300
  config.finetune.num_epochs = 3
  finetune._steps_from_epochs(config, 1000)
  assert config.num_train_steps == 94  # ceil(3 * 1000 / 32)
  config.opt.warmup_fraction, config.opt.learning_rate = 0.1, 1e-3
  assert optim.warmup_steps(config.opt, config.num_train_steps) == 9
  lr = optim.schedule(config.opt, config.num_train_steps)
  assert float(lr(8)) < 1e-3 and float(lr(9)) == pytest.approx(1e-3)
  config.opt.warmup_fraction = 0.0  # 0: warmup_steps
  assert optim.warmup_steps(config.opt, 94) == config.opt.warmup_steps
  for field, value, words in [
    ("opt.warmup_fraction", 1.5, "must lie in [0, 1)"),
    ("finetune.num_epochs", -1.0, "must be a number >= 0"),
  ]:
    bad = config_lib.defaults()
    bad.finetune.task = "classification"
    section, key = field.split(".")
    bad[section][key] = value
    with pytest.raises(config_lib.ConfigError, match=re.escape(words)):
      config_lib.validate(bad)


def test_fine_tuning_beats_the_majority_class(task_dir, tmp_path):
  # GPT: its last-token head learns this from random init within 100 steps; BERT's [CLS] head
  # from random init stays at chance for longer (see the notes in configs/finetune_bert_tiny.py).
  config = _config(task_dir, objective="causal_lm", steps=100)
  config.eval_every_steps = config.checkpoint_every_steps = config.log_every_steps = 100
  finetune.run(config, str(tmp_path), _mesh(config))
  records = _records(tmp_path)
  assert records[0]["step"] == 0 and records[0]["eval_accuracy"] == pytest.approx(0.5, abs=0.1)
  final = records[-1]
  assert final["step"] == 100 and final["eval_accuracy"] > 0.75 and final["eval_mcc"] > 0.5
  assert {"eval_macro_f1", "eval_loss"} <= set(final)
  assert json.loads((tmp_path / "labels.json").read_text())["labels"] == ["no", "yes"]


def _pretrained_workdir(root, config, seeds=(7, 8)):
  """A workdir as pretraining leaves it: config.json, and checkpoints at steps 3 and 6 whose
  parameters come from different seeds."""
  pre = ml_collections.ConfigDict(config.to_dict())
  pre.finetune.task, pre.finetune.train_files, pre.finetune.eval_files = "", "", ""
  root.mkdir()
  (root / "config.json").write_text(json.dumps(pre.to_dict()))
  tx = optim.make(pre.opt, pre.num_train_steps)
  mesh, rules = _mesh(pre), sharding.DEFAULT_RULES
  ckpt = checkpoint.Checkpointer(str(root / "checkpoints"), keep=10)
  saved = {}
  for step, seed in zip((3, 6), seeds, strict=True):
    state, _ = train_state.create(config_lib.model_config(pre), seed, tx, mesh, rules)
    ckpt.save(step, state, {"fingerprint": {}, "step": step})
    saved[step] = jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))
  ckpt.wait()
  ckpt.close()
  return saved


def test_init_from_loads_the_encoder_exactly(task_dir, tmp_path):
  config = _config(task_dir)
  saved = _pretrained_workdir(tmp_path / "pre", config)
  config.finetune.init_from = str(tmp_path / "pre")
  loaded = _saved_params_at_start(config, tmp_path / "newest")
  assert _equal(loaded["encoder"], saved[6]) and not _equal(loaded["encoder"], saved[3])
  assert _equal(loaded["head"], _fresh_params(config)["head"])
  config.finetune.init_step = 3
  assert _equal(_saved_params_at_start(config, tmp_path / "step3")["encoder"], saved[3])
  # A longer position table than pretraining's (model.max_positions): the pretrained rows, then
  # copies of them; every other encoder parameter as saved.
  config.model.max_positions = 2 * config.data.seq_len
  longer = _saved_params_at_start(config, tmp_path / "longer")["encoder"]
  table = saved[3]["position_embed"]["embedding"]
  grown = longer.pop("position_embed")["embedding"]
  np.testing.assert_array_equal(grown, np.concatenate([table, table]))
  assert _equal(longer, {k: v for k, v in saved[3].items() if k != "position_embed"})


def _saved_params_at_start(config, workdir):
  workdir.mkdir()
  prepared = finetune.prepare_finetuning(config, str(workdir))
  state, _, _, ckpt = train.init_or_restore(
    config, _mesh(config), str(workdir), prepared.fingerprint, objective=prepared.objective
  )
  ckpt.close()
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state.params))


def test_init_from_with_another_encoder_shape_is_refused_in_one_line(task_dir, tmp_path):
  config = _config(task_dir)
  _pretrained_workdir(tmp_path / "pre", config)
  config.finetune.init_from = str(tmp_path / "pre")
  config.model.emb_dim = 32
  with pytest.raises(
    config_lib.ConfigError, match=r"model.emb_dim=64 .* has 32; set --config.model.emb_dim=64"
  ) as e:
    finetune.prepare_finetuning(config, str(tmp_path / "run"))
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("freeze", ["always", "steps"])
def test_freezing_leaves_the_encoder_bit_identical(task_dir, tmp_path, freeze):
  config = _config(task_dir, steps=3)
  config.model.dropout_rate = 0.1
  if freeze == "always":
    config.finetune.freeze_encoder = True
  else:
    config.finetune.freeze_encoder_steps = 3
  before = _saved_params_at_start(config, tmp_path / "fresh")  # the run's own (jitted) init
  finetune.run(config, str(tmp_path / "run"), _mesh(config))
  after = _saved_params(config, tmp_path / "run")
  assert _equal(after["encoder"], before["encoder"])
  assert not _equal(after["head"], before["head"])
  if freeze == "steps":  # unfrozen from step 4 on
    config.num_train_steps = 6
    finetune.run(config, str(tmp_path / "run"), _mesh(config))
    assert not _equal(_saved_params(config, tmp_path / "run")["encoder"], before["encoder"])


def test_resume_continues_exactly(task_dir, tmp_path):
  config = _config(task_dir, steps=6)
  config.model.dropout_rate = 0.1
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  for workdir in (straight, resumed):
    finetune.run(config, str(workdir), _mesh(config))
  shutil.rmtree(resumed / "checkpoints" / "6")  # as if stopped after step 3's checkpoint
  finetune.run(config, str(resumed), _mesh(config))
  assert _equal(_saved_params(config, straight), _saved_params(config, resumed))
  last = [r for r in _records(resumed) if r["step"] == 6][-1]
  assert last["train_loss"] == [r for r in _records(straight) if r["step"] == 6][-1]["train_loss"]
  assert last["eval_accuracy"] == _records(straight)[-1]["eval_accuracy"]


def test_pooled_positions():
  x_BTD = jnp.arange(2 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 1)
  segments = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
  gpt = config_lib.model_config(tiny_config("causal_lm"))
  bert = config_lib.model_config(tiny_config("masked_lm"))
  assert heads.pooled(gpt, x_BTD, segments)[:, 0].tolist() == [1.0, 7.0]
  assert heads.pooled(bert, x_BTD, segments)[:, 0].tolist() == [0.0, 4.0]


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("finetune.task", "tagging_x", "finetune.task='tagging_x': use one of"),
    ("finetune.freeze_encoder_steps", -1, "finetune.freeze_encoder_steps=-1 must be"),
    ("finetune.eval_files", "", "finetune.train_files and finetune.eval_files go together"),
  ],
)
def test_finetune_config_errors_name_the_field(task_dir, field, value, message):
  config = _config(task_dir)
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(config)


def test_regression_with_text_pairs_reports_correlations(tmp_path, task_dir):
  rng = np.random.default_rng(1)
  for name, n in (("train", 64), ("eval", 32)):
    rows = []
    for (a, _), (b, _) in zip(_texts(rng, n), _texts(rng, n), strict=True):
      score = float(sum(w in _KEYS for w in (a + " " + b).split()))
      rows.append(json.dumps({"text": a, "text_pair": b, "label": score}))
    (tmp_path / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
  config = _config(task_dir, steps=3)
  config.finetune.task = "regression"
  config.finetune.train_files = str(tmp_path / "train.jsonl")
  config.finetune.eval_files = str(tmp_path / "eval.jsonl")
  finetune.run(config, str(tmp_path / "run"), _mesh(config))
  final = _records(tmp_path / "run")[-1]
  assert {"eval_pearson", "eval_spearman", "eval_loss"} <= set(final)
  assert not (tmp_path / "run" / "labels.json").exists()


def _files(workdir) -> dict:
  return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.rglob("*") if p.is_file()}


def test_another_runs_workdir_is_refused_before_anything_is_written(task_dir, tmp_path):
  config = _config(task_dir, steps=3)
  config.data.tokenizer_path = ""  # the run trains WORKDIR/tokenizer.model
  workdir = tmp_path / "run"
  finetune.run(config, str(workdir), _mesh(config))
  before = _files(workdir)
  assert {"tokenizer.model", "labels.json", "config.json", "best.json"} <= {p.name for p in before}
  for split in ("train", "eval"):  # the same examples with other label names
    text = (task_dir / f"{split}.jsonl").read_text()
    (tmp_path / f"{split}.jsonl").write_text(
      text.replace('"yes"', '"pos"').replace('"no"', '"neg"')
    )
  others = [  # (changes, what the refusal names: each difference and its fix)
    (
      {"finetune.num_labels": 2},
      ["finetune.num_labels: checkpoint has 0, config asks for 2", "--allow_config_change=all if"],
    ),
    (
      {"finetune.train_files": str(tmp_path / "train.jsonl"), "finetune.eval_files": None},
      [
        "finetune_labels: checkpoint has ['no', 'yes'], config asks for ['neg', 'pos']",
        "finetune.train_files: checkpoint has",
        "Use a new --workdir",
      ],
    ),
    ({"model.emb_dim": 32}, ["model.emb_dim: checkpoint has 64, config asks for 32"]),
  ]
  for changes, named in others:
    other = ml_collections.ConfigDict(config.to_dict())
    for field, value in changes.items():
      section, name = field.split(".")
      other[section][name] = str(tmp_path / "eval.jsonl") if name == "eval_files" else value
    with pytest.raises(checkpoint.CheckpointMismatch, match="holds a checkpoint of a different"):
      try:
        finetune.run(other, str(workdir), _mesh(other))
      except checkpoint.CheckpointMismatch as e:
        assert all(n in str(e) for n in named), str(e)
        raise
    assert _files(workdir) == before, changes
