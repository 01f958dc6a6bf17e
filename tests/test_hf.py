"""Hugging Face bridge: our GPT/BERT weights as GPT2LMHeadModel / BertForMaskedLM and back.

Parity runs against transformers itself (torch, float32) on tiny random models whose weights are
redrawn at a scale where attention is far from uniform, so a transposed kernel, heads split the
wrong way or a misplaced bias shows up as a large logit difference. The vocabulary (300) is not a
multiple of model.vocab_multiple (128), so the padding to 384 is exercised both ways.
"""

import json
import logging
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import synthetic_batch, tiny_config
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.checkpoints import hf, hf_config
from sslm_jax.models import layers
from sslm_jax.models import transformer as model_lib
from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib
from sslm_jax.training import loop as train
from sslm_jax.training import losses as objectives
from sslm_jax.training import sharding

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, WIDTH, LAYERS, HEADS, MLP, POSITIONS = 300, 64, 2, 4, 128, 32
TOLERANCE = 1e-5  # max abs logit difference, float32 both sides
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(objective: str):
  c = tiny_config(objective)
  c.data.vocab_size, c.data.seq_len = VOCAB, POSITIONS
  c.model.num_layers, c.model.num_heads, c.model.emb_dim = LAYERS, HEADS, WIDTH
  c.model.mlp_dim = MLP
  return c


def _hf_model(objective: str, seed: int = 0):
  """A tiny random GPT2LMHeadModel / BertForMaskedLM with weights at a revealing scale."""
  torch.manual_seed(seed)
  if objective == "causal_lm":
    cfg = transformers.GPT2Config(
      vocab_size=VOCAB, n_positions=POSITIONS, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
      n_inner=MLP, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2,
      eos_token_id=3,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg)
  else:
    cfg = transformers.BertConfig(
      vocab_size=VOCAB, max_position_embeddings=POSITIONS, hidden_size=WIDTH,
      num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=MLP,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = transformers.BertForMaskedLM(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():  # tied weights are listed once
      norm_scale = name.endswith("weight") and ("ln_" in name or "LayerNorm" in name)
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if norm_scale else 0.15 * torch.randn_like(p))
  return model.eval()


def _saved_hf(tmp_path, objective: str) -> tuple[str, object]:
  model = _hf_model(objective)
  directory = str(tmp_path / f"hf_{objective}")
  model.save_pretrained(directory)
  return directory, model


def _our_model(config, params: dict):
  model = model_lib.build(config_lib.model_config(config), seed=0)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, params))
  nnx.update(model, state)
  return model


def _randomized_params(config, seed: int = 1) -> dict:
  model = model_lib.build(config_lib.model_config(config), seed=0)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rng = np.random.default_rng(seed)

  def redraw(path, leaf):
    scale_leaf = jax.tree_util.keystr(path).endswith("['scale']")  # LayerNorm gains around 1
    value = (1.0 if scale_leaf else 0.0) + rng.normal(0.0, 0.15, np.shape(leaf))
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(redraw, params)


def _inputs(objective: str, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (2, POSITIONS)).astype(np.int32)
  token_types = (np.arange(POSITIONS) >= rng.integers(1, POSITIONS, (2, 1))).astype(np.int32)
  masked = np.sort(rng.permuted(np.tile(np.arange(POSITIONS), (2, 1)), axis=1)[:, :6], axis=1)
  return tokens, token_types, masked.astype(np.int32)


@nnx.jit
def _gpt_logits(model, tokens, positions, segments):
  return model(tokens, positions, segments)


@nnx.jit
def _bert_logits(model, tokens, positions, segments, masked, token_types):
  return model(tokens, positions, segments, masked, token_types_BT=token_types)


def _our_logits(model, objective: str, tokens, token_types, masked):
  b, t = tokens.shape
  positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  segments = np.ones((b, t), np.int32)
  if objective == "causal_lm":
    return np.asarray(_gpt_logits(model, tokens, positions, segments))
  return np.asarray(_bert_logits(model, tokens, positions, segments, masked, token_types))


def _hf_logits(model, objective: str, tokens, token_types, masked):
  ids = torch.tensor(tokens, dtype=torch.long)
  with torch.no_grad():
    if objective == "causal_lm":
      return model(input_ids=ids).logits.numpy()
    types = torch.tensor(token_types, dtype=torch.long)
    logits = model(input_ids=ids, token_type_ids=types, attention_mask=torch.ones_like(ids)).logits
  return np.take_along_axis(logits.numpy(), masked[..., None], axis=1)


def _max_diff(ours, theirs) -> float:
  assert ours.shape[:-1] == theirs.shape[:-1] and theirs.shape[-1] == VOCAB
  assert np.abs(theirs).max() > 1.0  # logits of a useful size
  assert np.all(ours[..., VOCAB:] == layers.PADDING_LOGIT)  # padding rows never predicted
  return float(np.abs(ours[..., :VOCAB] - theirs).max())


def test_import_from_hugging_face_matches_its_logits(tmp_path, objective):
  directory, hf_model = _saved_hf(tmp_path, objective)
  config = _config(objective)
  params = hf.load_params(directory, config)
  assert params["token_embed"]["embedding"].shape == (384, WIDTH)
  inputs = _inputs(objective)
  ours = _our_logits(_our_model(config, params), objective, *inputs)
  theirs = _hf_logits(hf_model, objective, *inputs)
  diff = _max_diff(ours, theirs)
  print(f"\nimport {objective}: max abs logit diff {diff:.2e}")
  assert diff < TOLERANCE
  # The same check on a model that is wrong by one block's swapped q and k fails loudly.
  blocks = params["stack"]["blocks"]["attention"]
  blocks["query"], blocks["key"] = blocks["key"], blocks["query"]
  wrong = _our_logits(_our_model(config, params), objective, *inputs)
  assert np.abs(wrong[..., :VOCAB] - theirs).max() > 100 * TOLERANCE


def test_export_loads_in_transformers_with_the_same_logits(tmp_path, objective):
  config = _config(objective)
  params = _randomized_params(config)
  directory = str(tmp_path / "export")
  hf.save(directory, params, config_lib.model_config(config))
  auto = (
    transformers.AutoModelForCausalLM
    if objective == "causal_lm"
    else transformers.AutoModelForMaskedLM
  )
  hf_model = auto.from_pretrained(directory, local_files_only=True).eval()
  expected = "GPT2LMHeadModel" if objective == "causal_lm" else "BertForMaskedLM"
  assert type(hf_model).__name__ == expected
  inputs = _inputs(objective, seed=1)
  ours = _our_logits(_our_model(config, params), objective, *inputs)
  diff = _max_diff(ours, _hf_logits(hf_model, objective, *inputs))
  print(f"\nexport {objective}: max abs logit diff {diff:.2e}")
  assert diff < TOLERANCE


def test_export_writes_no_padding_rows_and_round_trips(objective):
  config = _config(objective)
  cfg = config_lib.model_config(config)
  params = _randomized_params(config)
  tensors = hf.to_hf(params, cfg)
  vocab_rows = ("transformer.wte.weight", "bert.embeddings.word_embeddings.weight")
  rows = {k: v.shape[0] for k, v in tensors.items() if k in (*vocab_rows, "cls.predictions.bias")}
  assert rows and set(rows.values()) == {VOCAB}
  assert not any(k.startswith(("lm_head", "cls.predictions.decoder")) for k in tensors)
  back = hf.from_hf(tensors, cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  embedding = back["token_embed"]["embedding"]
  assert np.all(embedding[VOCAB:] == 0)
  np.testing.assert_array_equal(embedding[:VOCAB], params["token_embed"]["embedding"][:VOCAB])
  padded = ["['token_embed']['embedding']", "['mlm_head']['decoder_bias']"]
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(back), jax.tree.leaves(params), strict=True
  ):
    if jax.tree_util.keystr(path) not in padded:
      np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_config_json_round_trip(objective):
  config = _config(objective)
  cfg = config_lib.model_config(config)
  hf_json = hf_config.hf_config(cfg)
  assert hf_json["vocab_size"] == VOCAB  # the real vocabulary, not the padded 384
  restored = config_lib.defaults()
  for name, value in hf_config.config_fields(hf_json).items():
    section, _, key = name.rpartition(".")
    (restored[section] if section else restored)[key] = value
  restored.model.vocab_multiple = config.model.vocab_multiple
  assert config_lib.model_config(restored) == cfg
  # The tanh form is written as gelu_new for either architecture, and read back.
  config.model.gelu = "tanh" if objective == "masked_lm" else "erf"
  flipped = hf_config.hf_config(config_lib.model_config(config))
  assert hf_config.config_fields(flipped)["model.gelu"] == config.model.gelu
  assert hf_config.mismatches(flipped, config, "x") == []


def test_mismatches_are_named_with_their_fix(tmp_path, objective):
  directory, _ = _saved_hf(tmp_path, objective)
  config = _config(objective)
  config.model.num_layers, config.model.emb_dim, config.data.vocab_size = 4, 128, 512
  with pytest.raises(hf_config.HFError) as error:
    hf.load_params(directory, config)
  message = str(error.value)
  layers_key = "n_layer" if objective == "causal_lm" else "num_hidden_layers"
  assert f"{layers_key}=2 in {directory}/config.json but model.num_layers=4" in message
  assert "pass --config.model.num_layers=2" in message
  assert "--config.model.emb_dim=64" in message and "--config.data.vocab_size=300" in message
  config.init_from_hf = directory
  with pytest.raises(hf_config.HFError, match="num_layers"):  # a run checks it before any write
    hf_config.check_init_from_hf(config)

  other = "masked_lm" if objective == "causal_lm" else "causal_lm"
  with pytest.raises(hf_config.HFError, match=f"pass --config.objective={objective}"):
    hf.load_params(directory, _config(other))
  wrong_gelu = _config(objective)
  wrong_gelu.model.gelu = "erf" if objective == "causal_lm" else "tanh"
  with pytest.raises(hf_config.HFError, match="--config.model.gelu="):
    hf.load_params(directory, wrong_gelu)


def test_a_position_table_of_another_length_is_cut_or_extended(tmp_path, objective, caplog):
  directory, _ = _saved_hf(tmp_path, objective)
  table = hf.load_params(directory, _config(objective))["position_embed"]["embedding"]
  assert table.shape[0] == POSITIONS
  shorter = _config(objective)
  shorter.data.seq_len = POSITIONS // 2  # uses the first rows of the position table
  cut = hf.load_params(directory, shorter)["position_embed"]["embedding"]
  np.testing.assert_array_equal(cut, table[: POSITIONS // 2])
  longer = _config(objective)
  longer.model.max_positions = 2 * POSITIONS + 3  # a longer table, e.g. for longer fine-tuning
  assert hf_config.mismatches(hf_config.read_config(directory), longer, directory) == []
  with caplog.at_level(logging.WARNING):
    grown = hf.load_params(directory, longer)["position_embed"]["embedding"]
  assert grown.shape[0] == 2 * POSITIONS + 3
  np.testing.assert_array_equal(grown[:POSITIONS], table)
  np.testing.assert_array_equal(grown[POSITIONS : 2 * POSITIONS], table)  # copies of the rows
  np.testing.assert_array_equal(grown[2 * POSITIONS :], table[:3])
  assert f"extending it to {2 * POSITIONS + 3}" in caplog.text


def test_unreadable_directories_say_why(tmp_path):
  directory, _ = _saved_hf(tmp_path, "causal_lm")
  config = _config("causal_lm")
  os.rename(f"{directory}/model.safetensors", f"{directory}/pytorch_model.bin")
  with pytest.raises(hf_config.HFError, match="pytorch_model.bin.*does not read"):
    hf.load_params(directory, config)
  with pytest.raises(
    hf_config.HFError, match="nowhere does not exist; pass a Hugging Face model dir"
  ):
    hf.load_params(str(tmp_path / "nowhere"), config)
  os.remove(f"{directory}/config.json")
  with pytest.raises(hf_config.HFError, match="config.json does not exist"):
    hf.load_params(directory, config)
  tensors = hf.to_hf(_randomized_params(config), config_lib.model_config(config))
  del tensors["transformer.h.1.mlp.c_fc.bias"]
  tensors["transformer.h.0.ln_1.weight"] = np.ones(WIDTH + 1, np.float32)
  with pytest.raises(hf_config.HFError) as error:
    hf.from_hf(tensors, config_lib.model_config(config))
  assert "transformer.h.1.mlp.c_fc.bias is missing" in str(error.value)
  assert "transformer.h.0.ln_1.weight has shape [65]" in str(error.value)


def test_sharded_safetensors_directory(tmp_path):
  from safetensors.numpy import save_file

  directory, _ = _saved_hf(tmp_path, "masked_lm")
  config = _config("masked_lm")
  whole = hf.load_params(directory, config)
  tensors = hf.read_tensors(directory)
  os.remove(f"{directory}/model.safetensors")
  names = sorted(tensors)
  shards = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
  for shard, shard_names in shards.items():
    save_file({n: tensors[n] for n in shard_names}, f"{directory}/{shard}", {"format": "pt"})
  weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
  with open(f"{directory}/model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  sharded = hf.load_params(directory, config)
  jax.tree.map(np.testing.assert_array_equal, sharded, whole)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _hf_loss(hf_model, objective, batch) -> float:
  """Hugging Face's model on our batch: the mean loss over the predicted tokens."""
  if objective == "causal_lm":
    logits = _hf_logits(hf_model, objective, batch["inputs"], None, None)
    targets, weights = batch["targets"], batch["weights"]
  else:
    types = np.zeros_like(batch["inputs"])
    logits = _hf_logits(hf_model, objective, batch["inputs"], types, batch["masked_positions"])
    targets, weights = batch["masked_targets"], batch["masked_weights"]
  nll = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), targets[..., None], -1)
  return float((nll[..., 0] * weights).sum() / weights.sum())


def test_init_from_hf_starts_training_from_the_imported_weights(tmp_path, objective):
  directory, hf_model = _saved_hf(tmp_path, objective)
  config = _config(objective)
  config.init_from_hf = directory
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  workdir = str(tmp_path / "run")
  state, spec, _, ckpt = train.init_or_restore(
    config, mesh, workdir, checkpoint.fingerprint(config)
  )
  assert int(state.step) == 0
  batch = synthetic_batch(config)
  sums = objectives.metric_sums(spec.merge(state.params), batch)
  ours = float(sums["loss_sum"] / sums["count"])
  theirs = _hf_loss(hf_model, objective, batch)
  print(f"\ninit_from_hf {objective}: step-0 loss {ours:.6f}, Hugging Face {theirs:.6f}")
  assert abs(ours - theirs) < 1e-5
  assert abs(ours - np.log(VOCAB)) > 0.1  # not what a random init would give
  # Once the workdir has a checkpoint, resuming restores it and ignores init_from_hf.
  random_params = _randomized_params(config, seed=5)
  state = state.replace(
    params=jax.device_put(_as_state(spec, random_params), spec.shardings.params)
  )
  ckpt.save(1, state, {"fingerprint": checkpoint.fingerprint(config), "step": 1})
  ckpt.wait()
  ckpt.close()
  resumed, spec, _, ckpt = train.init_or_restore(
    config, mesh, workdir, checkpoint.fingerprint(config)
  )
  ckpt.close()
  restored = nnx.to_pure_dict(resumed.params)
  jax.tree.map(np.testing.assert_array_equal, restored, random_params)


def _as_state(spec, pure: dict):
  params = jax.tree.map(lambda a: a, spec.abstract.params)
  nnx.replace_by_pure_dict(params, pure)
  return params


def _corpus(n: int = 300) -> list[str]:
  rng = random.Random(0)
  syllables = "ka lo mi ne ru sa to vi be da fo gu".split()
  words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(300)]
  return [" ".join(rng.choices(words, k=rng.randint(5, 30))) for _ in range(n)]


def _tiny_workdir(tmp_path, objective: str) -> tuple[str, dict]:
  """A workdir as a training run leaves it: config.json, tokenizer.model, checkpoints at 1 and 2."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  tokenizer_lib.train(_corpus(), VOCAB, str(workdir / "tokenizer.model"))
  config = _config(objective)
  (workdir / "config.json").write_text(json.dumps(config.to_dict()))
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  fingerprint = checkpoint.fingerprint(config)
  state, spec, _, ckpt = train.init_or_restore(config, mesh, str(workdir), fingerprint)
  ckpt.save(1, state, {"fingerprint": fingerprint, "step": 1})
  params = _randomized_params(config, seed=3)
  state = state.replace(params=jax.device_put(_as_state(spec, params), spec.shardings.params))
  ckpt.save(2, state, {"fingerprint": fingerprint, "step": 2})
  ckpt.wait()
  ckpt.close()
  return str(workdir), params


def _command(module: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
  """`python -m sslm_jax.<module> ARGS` on the CPU, from the repository root."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run(
    [sys.executable, "-m", f"sslm_jax.{module}", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def _export(*args) -> subprocess.CompletedProcess:
  return _command("export", *args)


@pytest.mark.slow
def test_export_command_end_to_end(tmp_path, objective):
  workdir, params = _tiny_workdir(tmp_path, objective)
  out = str(tmp_path / "exported")
  done = _export(f"--workdir={workdir}", f"--out={out}")
  assert done.returncode == 0, done.stderr[-2000:]
  assert "at step 2" in done.stdout
  names = set(os.listdir(out))
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
  auto = (
    transformers.AutoModelForCausalLM
    if objective == "causal_lm"
    else transformers.AutoModelForMaskedLM
  )
  hf_model = auto.from_pretrained(out, local_files_only=True).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  text = _corpus(1)[0]
  ids = np.asarray([hf_tokenizer(text, add_special_tokens=False)["input_ids"][:POSITIONS]])
  assert ids.min() >= tokenizer_lib.NUM_SPECIAL
  config = _config(objective)
  inputs = (ids.astype(np.int32), np.zeros_like(ids, np.int32), np.array([[0, 3]], np.int32))
  ours = _our_logits(_our_model(config, params), objective, *inputs)
  assert _max_diff(ours, _hf_logits(hf_model, objective, *inputs)) < TOLERANCE

  refused = _export(f"--workdir={workdir}", f"--out={out}")
  assert refused.returncode == 2 and "not empty; pass --overwrite" in refused.stderr
  assert refused.stderr.strip().count("\n") == 0
  again = _export(f"--workdir={workdir}", f"--out={out}", "--step=1", "--overwrite")
  assert again.returncode == 0 and "at step 1" in again.stdout
  unknown = _export(f"--workdir={workdir}", f"--out={tmp_path / 'o2'}", "--step=7")
  assert unknown.returncode == 2 and "no checkpoint at step 7" in unknown.stderr
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(json.dumps(_config(objective).to_dict()))
  none = _export(f"--workdir={empty}", f"--out={tmp_path / 'o3'}")
  assert none.returncode == 2 and "no checkpoints" in none.stderr


def test_export_names_the_special_ids_of_the_runs_tokenizer(tmp_path, objective):
  """A GPT-2 byte-level BPE run: ids 2 and 3 are '"' and '#', <|endoftext|> is its last id."""
  from test_hf_tokenizer import bert_style_json, gpt2_style_json

  make = gpt2_style_json if objective == "causal_lm" else bert_style_json
  tok = tokenizer_files.load(make(tmp_path / "tokenizer.json", _corpus(100), vocab_size=VOCAB))
  config = _config(objective)
  config.data.vocab_size = tok.vocab_size
  cfg = config_lib.model_config(config)
  hf.save(str(tmp_path / "out"), _randomized_params(config), cfg, tok)
  written = json.loads((tmp_path / "out" / "config.json").read_text())
  assert written["pad_token_id"] == tok.pad_id
  if objective == "causal_lm":
    end = tok.vocab_size - 1
    assert tok.id_to_piece(end) == "<|endoftext|>"
    wanted = {"bos_token_id": end, "eos_token_id": end, "pad_token_id": end}
    assert {k: written[k] for k in wanted} == wanted
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation == wanted
    loaded = transformers.GenerationConfig.from_pretrained(str(tmp_path / "out"))
    assert (loaded.eos_token_id, loaded.bos_token_id) == (end, end)
  else:
    assert written["pad_token_id"] == 0 and tok.id_to_piece(0) == "[PAD]"
    assert not (tmp_path / "out" / "generation_config.json").exists()


def test_a_padded_hugging_face_vocabulary_loads_with_the_tokenizers_size(tmp_path, objective):
  """Embedding rows past the tokenizer's ids (320 rows, 300 ids) are padding: the config takes
  the tokenizer's size, the extra rows are not read, and the logits match on the real ids."""
  rows = VOCAB + 20
  torch.manual_seed(0)
  model = _hf_model(objective)
  model.resize_token_embeddings(rows)
  with torch.no_grad():
    model.get_input_embeddings().weight[VOCAB:] = 0.15 * torch.randn(20, WIDTH)
  directory = str(tmp_path / "padded")
  model.save_pretrained(directory)
  config = _config(objective)
  config.init_from_hf = directory
  config_lib.validate(config)
  hf_config.check_init_from_hf(config)  # data.vocab_size=300 < 320 rows: accepted
  params = hf.load_params(directory, config)
  tokens, token_types, masked = _inputs(objective)
  ours = _our_logits(_our_model(config, params), objective, tokens, token_types, masked)
  theirs = _hf_logits(model.eval(), objective, tokens, token_types, masked)[..., :VOCAB]
  assert _max_diff(ours, theirs) < TOLERANCE
  # More ids than rows: one fix, the same one the tokenizer check gives.
  config.data.vocab_size = rows + 1
  with pytest.raises(hf_config.HFError) as error:
    hf_config.check_init_from_hf(config)
  assert f"vocab_size={rows} in {directory}/config.json" in str(error.value)
  assert f"--config.data.vocab_size={rows}" in str(error.value)


def test_a_bert_model_without_its_mlm_head_starts_a_new_head(tmp_path, caplog):
  """transformers' BertModel saves no cls.predictions.*: the encoder loads exactly, the head is
  initialised as ours is (with an INFO line)."""
  hf_model = _hf_model("masked_lm")
  directory = str(tmp_path / "bert_model")
  hf_model.bert.save_pretrained(directory)  # a BertModel, with its pooler
  config = _config("masked_lm")
  with caplog.at_level(logging.INFO):
    params = hf.load_params(directory, config)
  assert "has no MLM head" in caplog.text
  full = hf.from_hf(
    {k: v.numpy() for k, v in hf_model.state_dict().items()}, config_lib.model_config(config)
  )
  for key in ("token_embed", "stack", "embed_norm"):
    jax.tree.map(np.testing.assert_array_equal, params[key], full[key])
  head = params["mlm_head"]
  assert np.all(head["norm"]["scale"] == 1) and np.std(head["transform"]["kernel"]) > 0
  # Missing encoder tensors still fail, in a short line.
  tensors = {k: v.numpy() for k, v in hf_model.bert.state_dict().items() if ".layer.1." not in k}
  with pytest.raises(hf_config.HFError) as error:
    hf.from_hf(tensors, config_lib.model_config(config))
  assert "bert.encoder.layer.1." in str(error.value) and len(str(error.value)) < 600


def _main(workdir, hf_dir) -> subprocess.CompletedProcess:
  flags = [
    "--config=configs/gpt_tiny.py",
    f"--workdir={workdir}",
    f"--config.init_from_hf={hf_dir}",
    f"--config.data.vocab_size={VOCAB}",
    f"--config.data.seq_len={POSITIONS}",
    f"--config.model.num_layers={LAYERS}",
    f"--config.model.num_heads={HEADS}",
    f"--config.model.emb_dim={WIDTH}",
    f"--config.model.mlp_dim={MLP}",
    "--config.mesh.data=1",
  ]
  return _command("main", *flags, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})


def test_an_unreadable_init_from_hf_is_refused_before_the_workdir_is_written(tmp_path):
  directory, _ = _saved_hf(tmp_path, "causal_lm")
  os.rename(f"{directory}/model.safetensors", f"{directory}/pytorch_model.bin")
  missing = _main(tmp_path / "run", tmp_path / "nowhere")
  assert missing.returncode == 2, missing.stderr[-2000:]
  assert missing.stderr.splitlines()[-1] == (
    f"sslm_jax: error: init_from_hf={tmp_path / 'nowhere'} does not exist; pass a Hugging Face "
    "model directory (config.json and model.safetensors)."
  )
  torch_only = _main(tmp_path / "run", directory)
  assert torch_only.returncode == 2, torch_only.stderr[-2000:]
  assert "pytorch_model.bin" in torch_only.stderr.splitlines()[-1]
  os.rename(f"{directory}/pytorch_model.bin", f"{directory}/model.safetensors")
  with open(f"{directory}/config.json") as f:
    other = json.load(f)
  other["n_layer"] = LAYERS + 1
  with open(f"{directory}/config.json", "w") as f:
    json.dump(other, f)
  mismatched = _main(tmp_path / "run", directory)
  assert mismatched.returncode == 2, mismatched.stderr[-2000:]
  assert mismatched.stderr.splitlines()[-1].startswith(
    f"sslm_jax: error: {directory} does not match the config: n_layer={LAYERS + 1} in "
  )
  assert not (tmp_path / "run").exists()
