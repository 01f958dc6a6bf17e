"""sslm_jax.load and the LanguageModel methods, on tiny workdirs trained once per session.

The GPT workdir is trained on 8 simulated devices with a (data, fsdp, tensor) = (2, 2, 2) mesh, so
loading it anywhere else reassembles sharded parameters. The BERT workdir memorises one sentence.
test_commands.py uses the same workdirs through `trained_workdir`.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sslm_jax.errors import UsageError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SENTENCE = "Machine learning is an application of artificial intelligence."
_WORDS = (
  "the a of to and in is it that for on with as by this be are from at or an was not but can "
  "data model token layer train loss step value batch text word line file run sample mask "
  "python jax flax array shape device mesh shard param grad rate vocab piece machine learning "
  "application artificial intelligence"
).split()

# Overrides shared by both tiny runs: small enough for 2 CPU cores, no XLA cache in the workdir.
_SMALL = [
  "--config.data.source=text",
  "--config.data.seq_len=32",
  "--config.eval_steps=1",
  "--config.log_every_steps=1",
  "--config.model.num_layers=2",
  "--config.model.num_heads=4",
  "--config.model.emb_dim=32",
  "--config.model.mlp_dim=64",
  "--config.sample_at_end=False",
  "--compilation_cache_dir=none",
]
RUNS = {
  # 4 steps on 8 devices, checkpoints at 2 and 4: enough to tell the two steps apart.
  "gpt": (
    8,
    [
      "--config=configs/gpt_tiny.py",
      "--config.data.vocab_size=320",
      "--config.num_train_steps=4",
      "--config.batch_size=8",
      "--config.eval_every_steps=4",
      "--config.checkpoint_every_steps=2",
      "--config.opt.warmup_steps=2",
      "--config.mesh.data=2",
      "--config.mesh.fsdp=2",
      "--config.mesh.tensor=2",
    ],
  ),
  # Long enough to memorise the sentence (train loss near 0).
  "bert": (
    1,
    [
      "--config=configs/bert_tiny.py",
      "--config.data.vocab_size=350",
      "--config.num_train_steps=300",
      "--config.batch_size=16",
      "--config.eval_every_steps=300",
      "--config.checkpoint_every_steps=300",
      "--config.opt.warmup_steps=20",
      "--config.opt.learning_rate=2e-3",
      "--config.data.eval_fraction=0.2",
      "--config.mesh.data=1",
    ],
  ),
}


def run_python(args, devices: int = 1, timeout: int = 600, cwd: str = ROOT, platforms="cpu"):
  """`python ARGS` in a fresh process with `devices` CPU devices (JAX_PLATFORMS=`platforms`;
  None leaves JAX to choose)."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  if platforms:
    env["JAX_PLATFORMS"] = platforms
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return subprocess.run(
    [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )


def _corpus(kind: str, path: str) -> None:
  """Paragraphs of random words; for BERT, the sentence to memorise twice as often as the rest
  (the other paragraphs give the tokenizer enough text to make whole words into pieces)."""
  rng = np.random.default_rng(0)
  words = [" ".join(rng.choice(_WORDS, size=rng.integers(6, 20))) + "." for _ in range(400)]
  paragraphs = words if kind == "gpt" else [SENTENCE] * 300 + words[:150]
  text = "\n\n".join(paragraphs)
  with open(path, "w") as f:
    f.write(text + "\n")


_TRAINED = {}


def trained_workdir(tmp_path_factory, kind: str) -> str:
  """The session's tiny trained workdir of `kind` ('gpt' or 'bert'), trained on first use."""
  if kind not in _TRAINED:
    root = tmp_path_factory.mktemp(f"trained_{kind}")
    corpus, workdir = str(root / "corpus.txt"), str(root / "workdir")
    _corpus(kind, corpus)
    devices, flags = RUNS[kind]
    result = run_python(
      [
        "-m",
        "sslm_jax.main",
        *flags,  # --config=... first
        f"--workdir={workdir}",
        f"--config.data.text_files={corpus}",
        *_SMALL,
      ],
      devices=devices,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _TRAINED[kind] = workdir
  return _TRAINED[kind]


_FABRICATED = {}


def fabricated_workdir(tmp_path_factory, kind: str) -> str:
  """A workdir of an untrained tiny model in seconds: config.json, a tokenizer, and checkpoints
  at steps 3 and 6 saved by the trainer's own Checkpointer from a (2, 2, 2) mesh of 8 devices."""
  if kind not in _FABRICATED:
    from conftest import tiny_config

    from sslm_jax import config as config_lib
    from sslm_jax.checkpoints import checkpointer as checkpoint
    from sslm_jax.tokenizer import sentencepiece as tok
    from sslm_jax.training import optimizer as optim
    from sslm_jax.training import sharding
    from sslm_jax.training import state as train_state

    root = tmp_path_factory.mktemp(f"fabricated_{kind}")
    _corpus(kind, str(root / "corpus.txt"))
    paragraphs = (root / "corpus.txt").read_text().split("\n\n")
    tokenizer = tok.train(paragraphs, 320, str(root / "tokenizer.model"))
    c = tiny_config("causal_lm" if kind == "gpt" else "masked_lm")
    c.data.vocab_size = tokenizer.vocab_size
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    (root / "config.json").write_text(json.dumps(c.to_dict(), indent=2))
    mesh = sharding.make_mesh(c.mesh)
    tx = optim.make(c.opt, c.num_train_steps)
    rules = sharding.rules_from_config(c.mesh.rules)
    state, _ = train_state.create(config_lib.model_config(c), c.seed, tx, mesh, rules)
    ckpt = checkpoint.Checkpointer(str(root / "checkpoints"), keep=10)
    for step in (3, 6):
      meta = {"fingerprint": {"tokenizer_sha256": tokenizer.sha256}, "step": step}
      ckpt.save(step, state, meta)
    ckpt.wait()
    ckpt.close()
    _FABRICATED[kind] = str(root)
  return _FABRICATED[kind]


@pytest.fixture(scope="session")
def gpt_workdir(tmp_path_factory):
  return fabricated_workdir(tmp_path_factory, "gpt")


@pytest.fixture(scope="session")
def bert_workdir(tmp_path_factory):
  return fabricated_workdir(tmp_path_factory, "bert")


@pytest.fixture(scope="session")
def trained_gpt_workdir(tmp_path_factory):
  return trained_workdir(tmp_path_factory, "gpt")


@pytest.fixture(scope="session")
def trained_bert_workdir(tmp_path_factory):
  return trained_workdir(tmp_path_factory, "bert")


@pytest.fixture(scope="session")
def gpt(gpt_workdir):
  import sslm_jax

  return sslm_jax.load(gpt_workdir)


@pytest.fixture(scope="session")
def bert(bert_workdir):
  import sslm_jax

  return sslm_jax.load(bert_workdir)


# Restores the state the way a resumed training run does (full TrainState on the run's mesh) and
# writes the logits of fixed ids. Run with 8 devices.
_SHARDED_LOGITS = textwrap.dedent(
  """
  import json, sys
  import jax, ml_collections, numpy as np
  from flax import nnx
  from sslm_jax import config as config_lib
  from sslm_jax.checkpoints import checkpointer as checkpoint
  from sslm_jax.training import optimizer as optim
  from sslm_jax.training import sharding
  from sslm_jax.training import state as train_state

  workdir, out = sys.argv[1:]
  config = ml_collections.ConfigDict(json.load(open(f"{workdir}/config.json")))
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.mesh.rules)
  tx = optim.make(config.opt, config.num_train_steps)
  spec = train_state.state_spec(config_lib.model_config(config), config.seed, tx, mesh, rules)
  ckpt = checkpoint.Checkpointer(f"{workdir}/checkpoints", keep=100)
  state = ckpt.restore(ckpt.latest_step(), spec.abstract)
  ckpt.close()
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
  ids = np.random.default_rng(0).integers(7, 300, (4, 16)).astype(np.int32)
  positions = np.tile(np.arange(16, dtype=np.int32), (4, 1))
  with sharding.activate(mesh, rules):
    logits = nnx.jit(lambda m, i, p, s: m(i, p, s))(spec.merge(state.params), ids, positions,
                                                    np.ones_like(ids))
  np.savez(out, ids=ids, positions=positions, logits=np.asarray(logits))
  """
)

_LOAD_ON_ONE_DEVICE = textwrap.dedent(
  """
  import json, sys
  import numpy as np
  import jax
  from flax import nnx
  import sslm_jax

  workdir, reference = sys.argv[1:]
  lm = sslm_jax.load(workdir)
  ref = np.load(reference)
  ids, positions = ref["ids"], ref["positions"]
  logits = np.asarray(lm.model(ids, positions, np.ones_like(ids)))
  earlier = sslm_jax.load(workdir, step=2)
  logits_2 = np.asarray(earlier.model(ids, positions, np.ones_like(ids)))
  shardings = {type(x.sharding).__name__ for x in jax.tree.leaves(nnx.state(lm.model))}
  print(json.dumps({
    "devices": jax.device_count(),
    "step": lm.step,
    "tensorflow": "tensorflow" in sys.modules,
    "shardings": sorted(shardings),
    "diff": float(np.abs(logits - ref["logits"]).max()),
    "diff_other_step": float(np.abs(logits_2 - ref["logits"]).max()),
  }))
  """
)


@pytest.mark.slow
def test_load_on_one_device_matches_params_trained_on_8(trained_gpt_workdir, tmp_path):
  reference = str(tmp_path / "reference.npz")
  made = run_python(["-c", _SHARDED_LOGITS, trained_gpt_workdir, reference], devices=8)
  assert made.returncode == 0, made.stderr[-3000:]
  loaded = run_python(["-c", _LOAD_ON_ONE_DEVICE, trained_gpt_workdir, reference], devices=1)
  assert loaded.returncode == 0, loaded.stderr[-3000:]
  report = json.loads(loaded.stdout.strip().splitlines()[-1])
  assert report["devices"] == 1 and report["step"] == 4
  assert report["tensorflow"] is False  # the core rule: loading a model needs no TensorFlow
  assert report["shardings"] == ["SingleDeviceSharding"]
  assert report["diff"] < 1e-5, report
  # The comparison can fail: the checkpoint at step 2 gives other logits.
  assert report["diff_other_step"] > 1e-3, report


def test_load_leaves_tensorflow_out_and_libtpu_quiet(gpt_workdir):
  """No JAX_PLATFORMS, as a user's script has it: where libtpu is installed (the test extra
  brings it) but the host has no TPU chips, JAX is kept from starting it, so none of libtpu's
  start-up lines reach stderr (the commands do the same)."""
  import importlib.util

  from jax._src import hardware_utils

  script = (
    "import sys, jax, sslm_jax; lm = sslm_jax.load(sys.argv[1]); lm.score('the model'); "
    "print(lm.step, 'tensorflow' in sys.modules, jax.default_backend())"
  )
  result = run_python(["-c", script, gpt_workdir], platforms=None)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split()[:2] == ["6", "False"]
  if (
    importlib.util.find_spec("libtpu")
    and not hardware_utils.num_available_tpu_chips_and_device_id()[0]
  ):
    for noise in ("TPU_WORKER_HOSTNAMES", "libtpu", "InitGoogle", "accelerator type"):
      assert noise not in result.stderr, result.stderr


def test_logits_are_the_models_on_the_encoded_text(gpt, bert):
  text = "the model can train on data"
  (logits_TV,) = gpt.logits([text])
  ids = gpt.encode(text)
  assert ids[0] == 2 and logits_TV.shape == (len(ids), gpt.tokenizer.vocab_size)
  ids_1T = np.asarray([ids], np.int32)
  direct = np.asarray(gpt.model(ids_1T, np.arange(len(ids))[None], np.ones_like(ids_1T)))[0]
  np.testing.assert_allclose(logits_TV, direct[:, : gpt.tokenizer.vocab_size], atol=1e-4)

  (mlm_TV,) = bert.logits(SENTENCE)
  assert mlm_TV.shape == (len(bert.encode(SENTENCE)), bert.tokenizer.vocab_size)


def test_gpt_score_totals_and_bits_per_byte(gpt):
  text = "the model can train on data. a batch of text"
  (score,) = gpt.score([text])
  assert len(score.log_probs) == len(score.token_ids) == len(gpt.tokenizer.encode(text))
  assert score.total_nats == pytest.approx(-sum(score.log_probs), rel=1e-6)
  assert score.num_bytes == len(text.encode())
  assert score.bits_per_byte == pytest.approx(score.total_nats / math.log(2) / score.num_bytes)
  # Each log-prob is the model's for the next token after BOS and the tokens before it.
  ids = gpt.encode(text)
  ids_1T = np.asarray([ids[:-1]], np.int32)
  logits_TV = np.asarray(gpt.model(ids_1T, np.arange(len(ids) - 1)[None], np.ones_like(ids_1T)))[0]
  logits_TV = logits_TV - logits_TV.max(-1, keepdims=True)
  log_probs_TV = logits_TV - np.log(np.exp(logits_TV).sum(-1, keepdims=True))
  expected = log_probs_TV[np.arange(len(ids) - 1), ids[1:]]
  np.testing.assert_allclose(score.log_probs, expected, atol=1e-4)


def test_gpt_score_reads_long_texts_in_windows(gpt):
  positions = gpt.model_cfg.max_len
  text = " ".join(["the data model can train on a batch of text."] * 20)
  ids = gpt.tokenizer.encode(text)
  assert len(ids) > 2 * positions  # three windows or more
  (score,) = gpt.score(text)
  assert len(score.log_probs) == len(ids)  # every token scored once
  (head,) = gpt.score(gpt.tokenizer.decode(ids[:positions]))
  if head.token_ids == ids[:positions]:  # the first window is the text's own beginning
    np.testing.assert_allclose(score.log_probs[:positions], head.log_probs, atol=1e-4)
  with pytest.raises(ValueError, match="positions"):
    gpt.logits(text)


def test_bert_pseudo_log_likelihood_is_the_masked_forward(bert):
  text = "Machine learning is an application."
  (score,) = bert.score(text)
  framed = bert.encode(text)
  assert framed[0] == 5 and framed[-1] == 6 and len(score.log_probs) == len(framed) - 2
  # One direct forward over every row: row i masks token i; the last n rows mask nothing.
  n = len(framed) - 2
  rows_BT = np.tile(np.asarray(framed, np.int32), (2 * n, 1))
  rows_BT[np.arange(n), np.arange(1, n + 1)] = 4  # MASK_ID
  masked_B1 = np.concatenate([np.arange(1, n + 1)] * 2)[:, None].astype(np.int32)
  positions_BT = np.broadcast_to(np.arange(len(framed), dtype=np.int32), rows_BT.shape)
  logits_BV = np.asarray(bert.model(rows_BT, positions_BT, np.ones_like(rows_BT), masked_B1))[:, 0]
  logits_BV = logits_BV - logits_BV.max(-1, keepdims=True)
  log_probs_BV = logits_BV - np.log(np.exp(logits_BV).sum(-1, keepdims=True))
  targets_B = np.asarray(framed)[masked_B1[:, 0]]
  picked_B = log_probs_BV[np.arange(2 * n), targets_B]
  expected, unmasked = picked_B[:n], picked_B[n:]
  np.testing.assert_allclose(score.log_probs, expected, atol=1e-4)
  assert score.total_nats == pytest.approx(-sum(expected), rel=1e-5)
  # Masking matters: the unmasked forward (the token in plain sight) scores differently.
  assert np.abs(unmasked - expected).max() > 1e-3


@pytest.mark.slow
def test_fill_mask_recovers_the_memorised_word(trained_bert_workdir, bert):
  import sslm_jax

  trained = sslm_jax.load(trained_bert_workdir)
  masked = SENTENCE.replace(" application", " [MASK]")
  # The [MASK] stands for the word's one piece, space included; its neighbours are as trained.
  (piece,) = trained.tokenizer.encode(" application")[-1:]
  assert trained.encode(masked) == [4 if i == piece else i for i in trained.encode(SENTENCE)]
  (guesses,) = trained.fill_mask(masked, top_k=3)
  assert len(guesses) == 3 and guesses[0][0] == " application", guesses
  assert guesses[0][1] > 0.3 and all(0 <= p <= 1 for _, p in guesses)
  # An untrained model (the fabricated workdir) does not.
  assert bert.fill_mask(masked)[0][0][0] != " application"


@pytest.mark.parametrize("text", [SENTENCE, "   the data model", " the data of a batch"])
def test_a_mask_stands_for_one_piece_with_its_space(bert, text):
  """Each word piece masked in turn, the first one and those after leading spaces included,
  reads as the training data did with that piece masked."""
  ids = bert.encode(text)  # [CLS] ... [SEP]
  pieces = [bert.token_text(i) for i in ids]
  assert "".join(pieces[1:-1]) == " " + text  # the pieces spell the text after the dummy prefix
  words = [i for i in range(1, len(ids) - 1) if pieces[i].startswith(" ") and len(pieces[i]) > 1]
  assert len(words) >= 2
  for i in words:
    # The piece's text, its space included, replaced by " [MASK]"; less the dummy prefix.
    masked = ("".join(pieces[1:i]) + " [MASK]" + "".join(pieces[i + 1 : -1]))[1:]
    assert bert.encode(masked) == ids[:i] + [4] + ids[i + 1 :], (masked, pieces)


def test_fill_mask_answers_every_mask_with_ordinary_tokens(bert):
  two = "the model [MASK] a batch of [MASK]."
  first, second = bert.fill_mask(two, top_k=bert.tokenizer.vocab_size)
  assert len(first) == len(second) == bert.tokenizer.vocab_size - 7  # no special or padding id
  specials = {bert.token_text(i) for i in range(7)}
  assert not specials & {t for t, _ in first + second}
  assert sum(p for _, p in first) == pytest.approx(1.0, abs=1e-4)
  assert [p for _, p in first] == sorted((p for _, p in first), reverse=True)
  assert first != second  # each mask has its own distribution


def test_methods_refuse_the_other_objective_and_bad_input(gpt, bert):

  with pytest.raises(UsageError, match="cannot generate"):
    bert.generate("Machine")
  with pytest.raises(UsageError, match="cannot fill"):
    gpt.fill_mask("the [MASK] model")
  with pytest.raises(UsageError, match="no \\[MASK\\]"):
    bert.fill_mask(SENTENCE)
  with pytest.raises(UsageError, match="positions"):
    bert.score(" ".join([SENTENCE] * 10))
  with pytest.raises(UsageError, match="empty"):
    gpt.score("")
  with pytest.raises(UsageError, match="pooling"):
    gpt.embed("text", pooling="cls")


def test_embed_shapes_and_pooling(gpt, bert):
  texts = ["the model", "a batch of text on the device"]
  for lm, default in ((gpt, "last"), (bert, "mean")):
    vectors = lm.embed(texts)
    assert vectors.shape == (2, lm.model_cfg.emb_dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, lm.embed(texts, pooling=default), atol=1e-6)
    assert np.abs(vectors[0] - vectors[1]).max() > 1e-4
  # Padding a batch changes nothing: each text alone gives the same vector.
  np.testing.assert_allclose(bert.embed(texts)[0], bert.embed(texts[:1])[0], atol=1e-5)
  cls = bert.embed(texts, pooling="cls")
  assert np.abs(cls - bert.embed(texts)).max() > 1e-4
  for lm in (gpt, bert):  # no texts, no vectors: an empty batch, not a NumPy error
    empty = lm.embed([])
    assert empty.shape == (0, lm.model_cfg.emb_dim) and empty.dtype == np.float32
    assert lm.logits([]) == []


def test_a_step_given_as_text_is_the_step(gpt_workdir, gpt):
  import sslm_jax.inference.language_model as api

  assert api.load(gpt_workdir, step=str(gpt.step)).step == gpt.step
  with pytest.raises(UsageError, match="no checkpoint at step 99999"):
    api.load(gpt_workdir, step="99999")


def test_generate_continues_each_prompt(gpt):
  samples = gpt.generate(["the model", "data"], max_new_tokens=5, num_samples=2, seed=1)
  assert [len(s) for s in samples] == [2, 2]
  assert all(isinstance(t, str) for s in samples for t in s)
  prepared = gpt._decoding
  assert samples == gpt.generate(["the model", "data"], max_new_tokens=5, num_samples=2, seed=1)
  assert gpt._decoding is prepared  # the weights are put in decoding layout once, not per call
  greedy = gpt.generate("the model", max_new_tokens=5, temperature=0, num_samples=2)
  assert greedy[0][0] == greedy[0][1]
  too_long = " ".join(["data"] * (gpt.model_cfg.max_len + 5))
  with pytest.raises(ValueError, match="positions"):
    gpt.generate(too_long)


def test_a_hugging_face_directory_is_named_as_one(tmp_path):
  import sslm_jax.inference.language_model as api

  config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2}
  (tmp_path / "config.json").write_text(json.dumps(config))
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(UsageError) as raised:
    api.load(str(tmp_path))
  message = str(raised.value)
  assert "is a Hugging Face model directory" in message and "'gpt2'" in message
  assert f"--config.init_from_hf={tmp_path}" in message and "no checkpoints" not in message
