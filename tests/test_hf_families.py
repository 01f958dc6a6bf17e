"""Hugging Face bridge for the rotary families: model.family='llama' as LlamaForCausalLM and
model.family='modernbert' as ModernBertForMaskedLM, both ways.

Parity runs against transformers itself (torch, float32) on tiny random models, one document per
row (segment ids all 1, positions 0..T-1) as Hugging Face models see their input. Weights are
redrawn (std 0.1, norm gains 1 +- 0.2) so that a swapped or misplaced matrix moves the logits far
past the tolerance (checked below), while float32 rounding stays near 2e-6: transformers in
float64 is as far from either side as they are from each other. The Llama has grouped-query
attention (2 key/value heads for 4 query heads) and an untied output embedding; a second, tied
one has multi-query attention. The ModernBERT has 3 layers, global attention in layers 0 and 2
and a window of 8 (keys at most 4 positions away) in layer 1 of a 32-token sequence, and
different global and local rotary bases. The vocabulary (300) is padded to 384 on our side.
"""

import json
import os
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
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib
from sslm_jax.training import loop as train
from sslm_jax.training import losses as objectives
from sslm_jax.training import sharding

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, WIDTH, HEADS, MLP, POSITIONS = 300, 64, 4, 96, 32
TOLERANCE = 1e-5  # max abs logit difference, float32 both sides
SCALE = 0.1  # weight std (norm gains: 1 + 0.2 * noise)
# The models under test: (family, kv heads, tied output embedding).
CASES = {
  "llama_gqa_untied": ("llama", 2, False),
  "llama_mqa_tied": ("llama", 1, True),
  "modernbert": ("modernbert", HEADS, True),
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LLAMA_THETA, GLOBAL_THETA, LOCAL_THETA, WINDOW, EPSILON = 5000.0, 1000.0, 50.0, 8, 1e-6


@pytest.fixture(params=sorted(CASES))
def case(request):
  return request.param


def _config(case: str):
  family, kv_heads, tied = CASES[case]
  c = tiny_config("causal_lm" if family == "llama" else "masked_lm")
  c.data.vocab_size, c.data.seq_len = VOCAB, POSITIONS
  c.model.family, c.model.emb_dim, c.model.num_heads, c.model.mlp_dim = family, WIDTH, HEADS, MLP
  c.model.norm_epsilon = EPSILON
  if family == "llama":
    c.model.num_layers, c.model.num_kv_heads, c.model.tie_embeddings = 2, kv_heads, tied
    c.model.rope_base = LLAMA_THETA
  else:
    c.model.num_layers, c.model.global_every, c.model.sliding_window = 3, 2, WINDOW
    c.model.rope_base, c.model.rope_local_base = GLOBAL_THETA, LOCAL_THETA
  config_lib.validate(c)
  return c


def _hf_model(case: str, seed: int = 0):
  """A tiny random LlamaForCausalLM / ModernBertForMaskedLM with weights at a revealing scale."""
  family, kv_heads, tied = CASES[case]
  torch.manual_seed(seed)
  shape = dict(
    vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_attention_heads=HEADS,
    max_position_embeddings=POSITIONS, pad_token_id=tokenizer_lib.PAD_ID,
  )  # fmt: skip
  if family == "llama":
    cfg = transformers.LlamaConfig(
      **shape, num_hidden_layers=2, num_key_value_heads=kv_heads, rms_norm_eps=EPSILON,
      rope_parameters={"rope_type": "default", "rope_theta": LLAMA_THETA},
      tie_word_embeddings=tied, bos_token_id=tokenizer_lib.BOS_ID,
      eos_token_id=tokenizer_lib.EOS_ID,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
  else:
    cls, sep = tokenizer_lib.CLS_ID, tokenizer_lib.SEP_ID
    cfg = transformers.ModernBertConfig(
      **shape, num_hidden_layers=3, global_attn_every_n_layers=2, local_attention=WINDOW,
      global_rope_theta=GLOBAL_THETA, local_rope_theta=LOCAL_THETA, norm_eps=EPSILON,
      bos_token_id=cls, cls_token_id=cls, eos_token_id=sep, sep_token_id=sep,
    )  # fmt: skip
    model = transformers.ModernBertForMaskedLM(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():  # tied weights are listed once
      gain = name.endswith("norm.weight") or name.endswith("layernorm.weight")
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if gain else SCALE * torch.randn_like(p))
  return model.eval()


def _saved_hf(tmp_path, case: str) -> tuple[str, object]:
  model = _hf_model(case)
  directory = str(tmp_path / f"hf_{case}")
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
    gain = jax.tree_util.keystr(path).endswith("['scale']")  # norm gains around 1
    return ((1.0 if gain else 0.0) + rng.normal(0.0, SCALE, np.shape(leaf))).astype(np.float32)

  return jax.tree_util.tree_map_with_path(redraw, params)


def _tokens(seed: int = 0):
  return np.random.default_rng(seed).integers(0, VOCAB, (2, POSITIONS)).astype(np.int32)


@nnx.jit
def _causal_logits(model, tokens, positions, segments):
  return model(tokens, positions, segments)


@nnx.jit
def _masked_logits(model, tokens, positions, segments, every_position):
  return model(tokens, positions, segments, every_position)


def _our_logits(model, tokens):
  """Our logits at every position of one document per row: [B, T, padded V]."""
  b, t = tokens.shape
  positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  segments = np.ones((b, t), np.int32)
  if model.cfg.causal:
    return np.asarray(_causal_logits(model, tokens, positions, segments))
  return np.asarray(_masked_logits(model, tokens, positions, segments, positions))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _max_diff(ours, theirs) -> float:
  assert ours.shape[:-1] == theirs.shape[:-1] and theirs.shape[-1] == VOCAB
  assert np.abs(theirs).max() > 1.0  # logits of a useful size
  assert np.all(ours[..., VOCAB:] == layers.PADDING_LOGIT)  # padding rows never predicted
  return float(np.abs(ours[..., :VOCAB] - theirs).max())


def test_import_from_hugging_face_matches_its_logits(tmp_path, case):
  directory, hf_model = _saved_hf(tmp_path, case)
  config = _config(case)
  params = hf.load_params(directory, config)
  assert params["token_embed"]["embedding"].shape == (384, WIDTH)
  tokens = _tokens()
  theirs = _hf_logits(hf_model, tokens)
  diff = _max_diff(_our_logits(_our_model(config, params), tokens), theirs)
  print(f"\nimport {case}: max abs logit diff {diff:.2e}")
  assert diff < TOLERANCE
  # The same comparison fails loudly on a model that is wrong in one place: the MLP's two
  # input halves swapped (llama: gate_proj/up_proj; modernbert: Wi's halves) ...
  mlp = params["stack"]["blocks"]["mlp"]
  swapped = {**params, "stack": {"blocks": {**params["stack"]["blocks"]}}}
  swapped["stack"]["blocks"]["mlp"] = {**mlp, "gate": mlp["up"], "up": mlp["gate"]}
  wrong = _our_logits(_our_model(config, swapped), tokens)
  assert np.abs(wrong[..., :VOCAB] - theirs).max() > 100 * TOLERANCE
  if CASES[case][0] == "modernbert":  # ... or attending past the window of layer 1
    unwindowed = _config(case)
    unwindowed.model.sliding_window = 0
    wrong = _our_logits(_our_model(unwindowed, params), tokens)
    assert np.abs(wrong[..., :VOCAB] - theirs).max() > 100 * TOLERANCE


def test_export_loads_in_transformers_with_the_same_logits(tmp_path, case):
  config = _config(case)
  params = _randomized_params(config)
  directory = str(tmp_path / "export")
  hf.save(directory, params, config_lib.model_config(config))
  family = CASES[case][0]
  auto = (
    transformers.AutoModelForCausalLM if family == "llama" else transformers.AutoModelForMaskedLM
  )
  hf_model = auto.from_pretrained(directory, local_files_only=True).eval()
  expected = {"llama": "LlamaForCausalLM", "modernbert": "ModernBertForMaskedLM"}[family]
  assert type(hf_model).__name__ == expected
  if family == "modernbert":  # transformers reads our layers and rotary bases as we meant them
    assert hf_model.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    assert hf_model.config.sliding_window == WINDOW // 2
    assert hf_model.config.rope_parameters["sliding_attention"]["rope_theta"] == LOCAL_THETA
  else:
    assert hf_model.config.num_key_value_heads == CASES[case][1]
    assert hf_model.config.tie_word_embeddings == CASES[case][2]
  tokens = _tokens(seed=1)
  diff = _max_diff(_our_logits(_our_model(config, params), tokens), _hf_logits(hf_model, tokens))
  print(f"\nexport {case}: max abs logit diff {diff:.2e}")
  assert diff < TOLERANCE


def test_export_writes_transformers_tensor_names_and_round_trips(case):
  config = _config(case)
  cfg = config_lib.model_config(config)
  params = _randomized_params(config)
  tensors = hf.to_hf(params, cfg)
  # Exactly the tensors (names and shapes) transformers saves for the same model.
  with torch.no_grad():
    saved = _hf_model(case).state_dict()
  tied = {"decoder.weight"} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
  expected = {k: tuple(v.shape) for k, v in saved.items() if k not in tied}
  assert {k: v.shape for k, v in tensors.items()} == expected
  back = hf.from_hf(tensors, cfg)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  padded = ("token_embed", "lm_head", "mlm_head']['decoder_bias")
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(back), jax.tree.leaves(params), strict=True
  ):
    name = jax.tree_util.keystr(path)
    if any(p in name for p in padded):
      assert np.all(a[VOCAB:] == 0), name
      a, b = a[:VOCAB], b[:VOCAB]
    if name.endswith("['attention_norm']['scale']") and cfg.family == "modernbert":
      assert np.all(a[0] == 1.0)  # HF's first layer has none; ours is skipped there
      a, b = a[1:], b[1:]
    np.testing.assert_array_equal(a, b, err_msg=name)


def test_config_json_round_trip(case):
  config = _config(case)
  cfg = config_lib.model_config(config)
  written = hf_config.hf_config(cfg)
  assert written["vocab_size"] == VOCAB
  restored = config_lib.defaults()
  for name, value in hf_config.config_fields(written).items():
    section, _, key = name.rpartition(".")
    (restored[section] if section else restored)[key] = value
  restored.model.vocab_multiple, restored.data.seq_len = config.model.vocab_multiple, POSITIONS
  config_lib.validate(restored)
  assert config_lib.model_config(restored) == cfg
  assert hf_config.mismatches(written, config, "x") == []
  # transformers 4's keys (rope_theta; global_rope_theta, local_rope_theta and
  # global_attn_every_n_layers) read as transformers 5's.
  legacy = {k: v for k, v in written.items() if k not in ("rope_parameters", "layer_types")}
  assert hf_config.config_fields(legacy) == hf_config.config_fields(written)
  assert hf_config.mismatches(legacy, config, "x") == []
  cls = transformers.LlamaConfig if cfg.family == "llama" else transformers.ModernBertConfig
  theirs = cls.from_dict(written)
  assert theirs.to_dict()["rope_parameters"] == written["rope_parameters"]


def _hf_loss(hf_model, batch) -> float:
  logits = _hf_logits(hf_model, batch["inputs"]).astype(np.float64)
  if hf_model.config.model_type == "llama":
    targets, weights = batch["targets"], batch["weights"]
  else:
    logits = np.take_along_axis(logits, batch["masked_positions"][..., None], axis=1)
    targets, weights = batch["masked_targets"], batch["masked_weights"]
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  return float((nll * weights).sum() / weights.sum())


@pytest.mark.parametrize("start", ["llama_gqa_untied", "modernbert"])
def test_init_from_hf_starts_training_from_the_imported_weights(tmp_path, start):
  directory, hf_model = _saved_hf(tmp_path, start)
  config = _config(start)
  config.init_from_hf = directory
  config_lib.validate(config)
  hf_config.check_init_from_hf(config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  state, spec, _, ckpt = train.init_or_restore(
    config, mesh, str(tmp_path / "run"), checkpoint.fingerprint(config)
  )
  ckpt.close()
  assert int(state.step) == 0
  batch = synthetic_batch(config)  # one document per row
  sums = objectives.metric_sums(spec.merge(state.params), batch)
  ours, theirs = float(sums["loss_sum"] / sums["count"]), _hf_loss(hf_model, batch)
  print(f"\ninit_from_hf {start}: step-0 loss {ours:.6f}, Hugging Face {theirs:.6f}")
  assert abs(ours - theirs) < 1e-5
  assert abs(ours - np.log(VOCAB)) > 0.1  # not what a random init would give


def _written(case: str) -> tuple[dict, object]:
  """The config.json we export for `case`, and the config it came from."""
  config = _config(case)
  return hf_config.hf_config(config_lib.model_config(config)), config


@pytest.mark.parametrize(
  "case, change, named",
  [
    ("llama_gqa_untied", {"attention_bias": True}, "attention_bias=True in D: sslm_jax's llama"),
    ("llama_gqa_untied", {"mlp_bias": True}, "mlp_bias=True in D: sslm_jax's llama has no such"),
    ("llama_gqa_untied", {"hidden_act": "gelu"}, "hidden_act='gelu' in D: sslm_jax's llama uses"),
    ("llama_gqa_untied", {"head_dim": 32}, "head_dim=32 in D: sslm_jax's heads split the width"),
    (
      "llama_gqa_untied",
      {"rope_parameters": {"rope_type": "llama3", "rope_theta": LLAMA_THETA, "factor": 8.0}},
      "rope_parameters.rope_type='llama3' in D: sslm_jax has the default rotary positions only",
    ),
    (  # transformers 4's spelling
      "llama_gqa_untied",
      {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}},
      "rope_parameters.rope_type='linear' in D",
    ),
    ("modernbert", {"norm_bias": True}, "norm_bias=True in D: sslm_jax's modernbert has no such"),
    ("modernbert", {"attention_bias": True}, "attention_bias=True in D"),
    ("modernbert", {"mlp_bias": True}, "mlp_bias=True in D"),
    ("modernbert", {"classifier_bias": True}, "classifier_bias=True in D"),
    ("modernbert", {"decoder_bias": False}, "decoder_bias=False in D: sslm_jax's modernbert"),
    ("modernbert", {"tie_word_embeddings": False}, "tie_word_embeddings=False in D"),
    (
      "modernbert",
      {"hidden_activation": "silu", "classifier_activation": "silu"},
      "hidden_activation='silu' in D: sslm_jax has gelu, gelu_new, gelu_pytorch_tanh only",
    ),
    (
      "modernbert",
      {"classifier_activation": "gelu_new"},
      "classifier_activation='gelu_new' in D: sslm_jax's MLM head uses the MLP's activation",
    ),
    (
      "modernbert",
      {"layer_types": ["sliding_attention", "full_attention", "full_attention"]},
      "in D: sslm_jax attends globally in the layers i with i % model.global_every == 0",
    ),
    (
      "modernbert",
      {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2.0}}},
      "rope_parameters.full_attention.rope_type='yarn' in D",
    ),
  ],
)
def test_options_our_model_cannot_reproduce_are_refused_by_name(case, change, named):
  written, config = _written(case)
  problems = hf_config.mismatches({**written, **change}, config, "D")
  assert len(problems) == 1 and named in problems[0], problems


def test_a_config_that_differs_is_told_each_fix(tmp_path):
  directory, _ = _saved_hf(tmp_path, "llama_gqa_untied")
  config = tiny_config("causal_lm")  # family auto: gpt2
  config.data.vocab_size = VOCAB
  with pytest.raises(hf_config.HFError) as error:
    hf.load_params(directory, config)
  message, where = str(error.value), f"{directory}/config.json"
  for fix in (
    f"model_type='llama' in {where} but model.family='gpt2' in the config; pass "
    "--config.model.family=llama",
    "--config.model.num_kv_heads=2",
    "--config.model.tie_embeddings=False",
    f"--config.model.rope_base={LLAMA_THETA}",
    f"--config.model.norm_epsilon={EPSILON}",
    f"--config.model.mlp_dim={MLP}",
  ):
    assert fix in message
  qk_norm = _config("llama_gqa_untied")
  qk_norm.model.qk_norm = True
  with pytest.raises(hf_config.HFError, match="pass --config.model.qk_norm=False"):
    hf.load_params(directory, qk_norm)
  with pytest.raises(hf_config.HFError, match="pass --config.objective=causal_lm"):
    hf.load_params(directory, _config("modernbert"))

  written, config = _written("modernbert")
  config.model.global_every = 3  # layers 1 and 2 windowed, where Hugging Face's 2 is global
  (problem,) = hf_config.mismatches(written, config, "D")
  assert problem.endswith("pass --config.model.global_every=2 --config.model.sliding_window=8")
  config.model.global_every, config.model.sliding_window = 2, 16
  assert hf_config.mismatches(written, config, "D") == [
    "local_attention=8 in D but model.sliding_window=16 in the config; pass "
    "--config.model.sliding_window=8"
  ]
  config.model.sliding_window, config.model.rope_local_base = WINDOW, 10000.0
  (problem,) = hf_config.mismatches(written, config, "D")
  assert "rope_parameters.sliding_attention.rope_theta=50.0 in D" in problem
  assert problem.endswith("pass --config.model.rope_local_base=50.0")


def test_export_refuses_what_llama_cannot_express(tmp_path):
  config = _config("llama_gqa_untied")
  config.model.qk_norm = True
  cfg = config_lib.model_config(config)
  with pytest.raises(hf_config.HFError) as error:
    hf.save(str(tmp_path / "out"), _randomized_params(config), cfg)
  assert "model.qk_norm=True: LlamaForCausalLM has no QK-norm" in str(error.value)
  assert not (tmp_path / "out").exists()


def test_a_base_model_without_its_head(case):
  """LlamaModel and ModernBertModel save no 'model.' prefix (and no MLM head): the weights load
  as the full model's, and a ModernBERT gets a new MLM head."""
  hf_model = _hf_model(case)
  cfg = config_lib.model_config(_config(case))
  full = hf.from_hf({k: v.numpy() for k, v in hf_model.state_dict().items()}, cfg)
  base = {k: v.numpy() for k, v in hf_model.model.state_dict().items()}
  if cfg.family == "llama" and not cfg.tie_embeddings:
    base["lm_head.weight"] = hf_model.lm_head.weight.detach().numpy()
  params = hf.from_hf(base, cfg)
  for key in ("token_embed", "stack", "final_norm"):
    jax.tree.map(np.testing.assert_array_equal, params[key], full[key])
  if cfg.family == "modernbert":
    assert np.all(params["mlm_head"]["norm"]["scale"] == 1)
    assert np.std(params["mlm_head"]["transform"]["kernel"]) > 0


# ---- the commands: export, then a run that starts from the export ----------------------------


def _paragraphs(n: int = 150) -> list[str]:
  rng = np.random.default_rng(0)
  syllables = "ka lo mi ne ru sa to vi be da fo gu".split()
  words = ["".join(rng.choice(syllables, rng.integers(1, 5))) for _ in range(200)]
  return [" ".join(rng.choice(words, rng.integers(5, 30))) + "." for _ in range(n)]


def _workdir(tmp_path, config, name: str) -> tuple[str, dict]:
  """A workdir as a training run leaves it (config.json, tokenizer.model, a checkpoint at step 1)
  holding randomized parameters."""
  workdir = tmp_path / name
  workdir.mkdir()
  tokenizer_lib.train(_paragraphs(), VOCAB, str(workdir / "tokenizer.model"))
  (workdir / "config.json").write_text(json.dumps(config.to_dict()))
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  fingerprint = checkpoint.fingerprint(config)
  state, spec, _, ckpt = train.init_or_restore(config, mesh, str(workdir), fingerprint)
  params = _randomized_params(config)
  pure = jax.tree.map(lambda a: a, spec.abstract.params)
  nnx.replace_by_pure_dict(pure, params)
  state = state.replace(params=jax.device_put(pure, spec.shardings.params))
  ckpt.save(1, state, {"fingerprint": fingerprint, "step": 1})
  ckpt.wait()
  ckpt.close()
  return str(workdir), params


def _command(module: str, *args) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(
    [sys.executable, "-m", f"sslm_jax.{module}", *args],
    cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip


def _hf_document_loss(hf_model, batch: dict) -> float:
  """Hugging Face's mean loss over the predicted tokens of a packed batch, one document at a
  time, at the positions the batch gives."""
  nll_sum = count = 0.0
  for b, segment_ids in enumerate(batch["segment_ids"]):
    for s in np.unique(segment_ids[segment_ids > 0]):
      at_T = np.flatnonzero(segment_ids == s)
      ids = torch.tensor(batch["inputs"][b, at_T][None], dtype=torch.long)
      positions = torch.tensor(batch["positions"][b, at_T][None], dtype=torch.long)
      with torch.no_grad():
        logp_TV = torch.log_softmax(
          hf_model(input_ids=ids, position_ids=positions).logits[0].double(), -1
        ).numpy()
      if hf_model.config.model_type == "llama":
        targets, weights, rows = batch["targets"][b, at_T], batch["weights"][b, at_T], at_T
      else:
        here = np.isin(batch["masked_positions"][b], at_T) & (batch["masked_weights"][b] > 0)
        targets, weights = batch["masked_targets"][b, here], batch["masked_weights"][b, here]
        rows = batch["masked_positions"][b, here]
      nll_sum += float((-logp_TV[rows - at_T[0], targets] * weights).sum())
      count += float(weights.sum())
  assert count > 0
  return nll_sum / count


@pytest.mark.slow
@pytest.mark.parametrize("start", ["llama_gqa_untied", "modernbert"])
def test_export_command_and_a_run_started_from_its_output(tmp_path, start):
  """`python -m sslm_jax.export` writes a directory transformers loads (model and tokenizer) with
  our logits; `python -m sslm_jax.main --config.init_from_hf=` that directory starts at its
  weights: the step-0 eval loss is Hugging Face's on the same documents."""
  import ml_collections

  from sslm_jax.data import pipeline

  config = _config(start)
  workdir, params = _workdir(tmp_path, config, "run")
  out = str(tmp_path / "export")
  done = _command("export", f"--workdir={workdir}", f"--out={out}")
  assert done.returncode == 0, done.stderr[-2000:]
  family = CASES[start][0]
  assert ("LlamaForCausalLM" if family == "llama" else "ModernBertForMaskedLM") in done.stdout
  auto = (
    transformers.AutoModelForCausalLM if family == "llama" else transformers.AutoModelForMaskedLM
  )
  hf_model = auto.from_pretrained(out, local_files_only=True).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
  ids = hf_tokenizer(_paragraphs(1)[0], add_special_tokens=False)["input_ids"][:POSITIONS]
  tokens = np.asarray([ids], np.int32)
  ours = _our_logits(_our_model(config, params), tokens)
  assert _max_diff(ours, _hf_logits(hf_model, tokens)) < TOLERANCE

  text_file = tmp_path / "corpus.txt"
  text_file.write_text("\n\n".join(_paragraphs()) + "\n")
  base = "configs/gpt_tiny.py" if family == "llama" else "configs/bert_tiny.py"
  family_flags = [
    f"--config.model.{key}={value}" for key, value in config.model.items() if key in (
      "family", "num_layers", "num_heads", "num_kv_heads", "emb_dim", "mlp_dim", "norm_epsilon",
      "tie_embeddings", "rope_base", "rope_local_base", "global_every", "sliding_window",
    )
  ]  # fmt: skip
  run = str(tmp_path / "from_export")
  started = _command(
    "main", f"--config={base}", f"--workdir={run}", f"--config.init_from_hf={out}",
    "--config.data.source=text", f"--config.data.text_files={text_file}",
    "--config.data.eval_fraction=0.1", f"--config.data.seq_len={POSITIONS}",
    f"--config.data.vocab_size={VOCAB}", "--config.num_train_steps=1", "--config.batch_size=4",
    "--config.eval_every_steps=1", "--config.eval_steps=1", "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=1", "--config.opt.warmup_steps=1", "--config.mesh.data=1",
    "--config.sample_at_end=False", *family_flags,
  )  # fmt: skip
  assert started.returncode == 0, started.stderr[-3000:]
  assert "Starting from the Hugging Face weights" in started.stderr
  with open(os.path.join(run, "metrics.jsonl")) as f:
    first = json.loads(f.readline())
  with open(os.path.join(run, "config.json")) as f:
    batch = next(pipeline.build(ml_collections.ConfigDict(json.load(f)), run).eval_batches())
  theirs = _hf_document_loss(hf_model, batch)
  print(f"\n{start}: step-0 eval loss {first['eval_loss']:.6f}, Hugging Face {theirs:.6f}")
  assert first["step"] == 0 and abs(first["eval_loss"] - theirs) <= 1e-5 * abs(theirs)

  if family != "llama":
    return
  config.model.qk_norm = True  # and a model LlamaForCausalLM cannot express is refused
  refused_workdir, _ = _workdir(tmp_path, config, "qk_norm")
  refused = _command("export", f"--workdir={refused_workdir}", f"--out={tmp_path / 'refused'}")
  assert refused.returncode == 2
  assert "model.qk_norm=True: LlamaForCausalLM has no QK-norm" in refused.stderr
  assert not (tmp_path / "refused").exists()
