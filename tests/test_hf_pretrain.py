"""Continued pretraining from Hugging Face files through the real command: a tokenizer.json
(GPT-2 byte-level BPE / BERT WordPiece) drives the data pipeline, and a GPT2LMHeadModel /
BertForMaskedLM directory gives the initial weights (--config.init_from_hf).

The step-0 eval loss the run writes must be Hugging Face's own loss on the same eval batch. The
batch is rebuilt from the run's data cache and fed to transformers one document at a time (rows
pack several), at the positions our model saw. The weights are drawn at a scale far from a
random init's, so a loss near ln(vocab) means the weights were not loaded.

Everything torch does runs in a fresh interpreter (this file run as a script): triton, which
transformers' model modules import, segfaults when TensorFlow was imported first, as the data
pipeline here (and other test modules collected before this one) do.
"""

import importlib.util
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
  not all(importlib.util.find_spec(m) for m in ("torch", "transformers")),
  reason="needs torch and transformers (the test extra)",
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN, WIDTH, LAYERS, HEADS, MLP = 32, 32, 2, 2, 64
CONFIG_FILE = {"causal_lm": "configs/gpt_tiny.py", "masked_lm": "configs/bert_tiny.py"}
LAYERS_KEY = {"causal_lm": "n_layer", "masked_lm": "num_hidden_layers"}


# ----------------------------------------------------------------------------- torch side


def _save_hf_model(objective: str, vocab_size: int, end_id: int, directory: str) -> None:
  """A tiny random GPT2LMHeadModel / BertForMaskedLM with weights at a revealing scale."""
  import torch
  import transformers

  torch.manual_seed(0)
  if objective == "causal_lm":
    cfg = transformers.GPT2Config(
      vocab_size=vocab_size, n_positions=SEQ_LEN, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
      n_inner=MLP, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=end_id,
      eos_token_id=end_id,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg)
  else:
    cfg = transformers.BertConfig(
      vocab_size=vocab_size, max_position_embeddings=SEQ_LEN, hidden_size=WIDTH,
      num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=MLP,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = transformers.BertForMaskedLM(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():  # tied weights are listed once
      norm_scale = name.endswith("weight") and ("ln_" in name or "LayerNorm" in name)
      p.copy_(1.0 + 0.2 * torch.randn_like(p) if norm_scale else 0.15 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)


def _hf_loss(objective: str, directory: str, batch_file: str) -> float:
  """Hugging Face's mean loss over the predicted tokens, one packed document at a time, at the
  positions the batch gives (a row that opens mid-document restarts them at 0)."""
  import torch
  import transformers

  auto = transformers.AutoModelForCausalLM if objective == "causal_lm" else None
  auto = auto or transformers.AutoModelForMaskedLM
  model = auto.from_pretrained(directory, local_files_only=True).eval()
  batch = dict(np.load(batch_file))
  nll_sum = count = 0.0
  for b, segment_ids in enumerate(batch["segment_ids"]):
    for s in np.unique(segment_ids):
      at_T = np.flatnonzero(segment_ids == s)  # contiguous
      ids = torch.tensor(batch["inputs"][b, at_T][None], dtype=torch.long)
      positions = torch.tensor(batch["positions"][b, at_T][None], dtype=torch.long)
      with torch.no_grad():
        logits_TV = model(input_ids=ids, position_ids=positions).logits[0]
      logp_TV = torch.log_softmax(logits_TV.double(), -1).numpy()
      if objective == "causal_lm":
        targets, weights, rows = batch["targets"][b, at_T], batch["weights"][b, at_T], at_T
      else:
        here = np.isin(batch["masked_positions"][b], at_T) & (batch["masked_weights"][b] > 0)
        targets, weights = batch["masked_targets"][b, here], batch["masked_weights"][b, here]
        rows = batch["masked_positions"][b, here]
      nll_sum += float((-logp_TV[rows - at_T[0], targets] * weights).sum())
      count += float(weights.sum())
  assert count > 0
  return nll_sum / count


def _hf_generate(directory: str, prompts_file: str) -> list[str]:
  """Greedy continuations by transformers' generate, each prompt opened by the tokenizer's BOS
  as ours are, its special ids from the exported generation_config.json."""
  import torch
  import transformers

  model = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True)
  tok = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
  out = []
  for prompt in json.loads(open(prompts_file).read()):
    ids = [model.generation_config.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids
    with torch.no_grad():
      full = model.eval().generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=GENERATED, do_sample=False,
      )[0].tolist()  # fmt: skip
    shown = tok.decode(ids, skip_special_tokens=True)
    out.append(tok.decode(full, skip_special_tokens=True)[len(shown) :])
  return out


def _torch_side(*args: str) -> str:
  """Run this file as a script (see the module notes); its stdout."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
  done = subprocess.run(
    [sys.executable, os.path.abspath(__file__), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


# ----------------------------------------------------------------------------- tests


def _paragraphs(n: int = 200) -> list[str]:
  rng = random.Random(0)
  syllables = "ka lo mi ne ru sa to vi be da fo gu".split()
  words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(300)]
  return [" ".join(rng.choices(words, k=rng.randint(5, 30))) + "." for _ in range(n)]


@pytest.fixture(scope="module", params=["causal_lm", "masked_lm"])
def hf_dir(request, tmp_path_factory):
  """(objective, text file, HF directory with tokenizer.json and model.safetensors, vocab)."""
  from test_hf_tokenizer import bert_style_json, gpt2_style_json

  from sslm_jax.tokenizer import hf_json as hf_tokenizer

  objective = request.param
  root = tmp_path_factory.mktemp(objective)
  text_file = root / "corpus.txt"
  texts = _paragraphs()
  text_file.write_text("\n\n".join(texts) + "\n")
  directory = root / "hf"
  directory.mkdir()
  path = directory / "tokenizer.json"
  if objective == "causal_lm":
    tok = hf_tokenizer.load(gpt2_style_json(path, texts, vocab_size=400))
  else:  # WordPiece finds fewer pieces in these syllable words
    tok = hf_tokenizer.load(bert_style_json(path, texts, vocab_size=200))
  end_id = tok.eos_id if objective == "causal_lm" else tok.sep_id
  _torch_side("save", objective, str(tok.vocab_size), str(end_id), str(directory))
  return objective, str(text_file), str(directory), tok.vocab_size


def _flags(objective, text_file, directory, vocab_size, workdir) -> list[str]:
  return [
    f"--config={os.path.join(ROOT, CONFIG_FILE[objective])}",
    f"--workdir={workdir}",
    "--config.num_train_steps=2",
    "--config.batch_size=4",
    "--config.log_every_steps=1",
    "--config.eval_every_steps=2",
    "--config.eval_steps=1",
    "--config.checkpoint_every_steps=2",
    "--config.data.source=text",
    f"--config.data.text_files={text_file}",
    "--config.data.eval_fraction=0.1",
    f"--config.data.tokenizer_path={directory}/tokenizer.json",
    f"--config.data.seq_len={SEQ_LEN}",
    f"--config.data.vocab_size={vocab_size}",
    f"--config.model.num_layers={LAYERS}",
    f"--config.model.num_heads={HEADS}",
    f"--config.model.emb_dim={WIDTH}",
    f"--config.model.mlp_dim={MLP}",
    "--config.mesh.data=1",
    "--config.opt.warmup_steps=1",
    f"--config.init_from_hf={directory}",
  ]


def _main(*args, timeout=300, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  return subprocess.run(
    [sys.executable, "-m", "sslm_jax.main", *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _save_eval_batch(workdir: str, out: str) -> dict:
  """The run's first eval batch, rebuilt from its config.json and data cache, saved to `out`."""
  import ml_collections

  from sslm_jax.data import pipeline

  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  batch = next(pipeline.build(config, workdir).eval_batches())
  np.savez(out, **batch)
  return batch


@pytest.mark.slow
def test_pretraining_from_hf_files_starts_at_hf_loss(hf_dir, tmp_path):
  """Also: the GPT run names no tokenizer (init_from_hf's tokenizer.json is the one), and the
  BERT run names it by a relative path; both workdirs keep a copy (checked below)."""
  objective, text_file, directory, vocab_size = hf_dir
  workdir = str(tmp_path / "run")
  shutil.copytree(directory, tmp_path / "hf")  # a copy to delete after training
  flags = _flags(objective, text_file, "hf", vocab_size, workdir)
  if objective == "causal_lm":
    flags = [f for f in flags if not f.startswith("--config.data.tokenizer_path=")]
  result = _main(*flags, cwd=tmp_path)  # relative paths, as typed in tmp_path
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Starting from the Hugging Face weights" in result.stderr
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [0, 1, 2]
  ours = records[0]["eval_loss"]
  batch_file = str(tmp_path / "eval_batch.npz")
  batch = _save_eval_batch(workdir, batch_file)
  assert int(batch["segment_ids"].max()) > 1  # rows pack several documents
  theirs = float(_torch_side("loss", objective, directory, batch_file).split()[-1])
  print(f"\n{objective}: step-0 eval loss {ours:.6f}, Hugging Face {theirs:.6f}")
  assert abs(ours - theirs) <= 1e-4 * abs(theirs)
  assert abs(ours - np.log(vocab_size)) > 0.2  # a random init gives ln(vocab) within ~0.05
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  _check_self_contained(objective, workdir, tmp_path)


GENERATED = 6


def _check_self_contained(objective: str, workdir: str, tmp_path) -> None:
  """With the Hugging Face directory gone, from another working directory: the workdir loads,
  generates (GPT) or fills masks (BERT), and exports; transformers' greedy generate on the
  export continues each prompt as ours does, stopping at the tokenizer's own EOS."""
  shutil.rmtree(tmp_path / "hf")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  prompts = [" ".join(p.split()[:4]) for p in _paragraphs(3)]
  (tmp_path / "prompts.json").write_text(json.dumps(prompts))
  out = str(tmp_path / "export")
  code = (
    "import json, sys; import sslm_jax; from sslm_jax import export\n"
    "lm = sslm_jax.load(sys.argv[1]); prompts = json.load(open(sys.argv[3]))\n"
    "if lm.model_cfg.causal:\n"
    f"  got = [s for (s,) in lm.generate(prompts, max_new_tokens={GENERATED}, temperature=0)]\n"
    "else:\n"
    "  got = lm.fill_mask(prompts[0] + ' [MASK]')\n"
    "print(export.export(sys.argv[1], sys.argv[2])); print(json.dumps(got))\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  done = subprocess.run(
    [sys.executable, "-c", code, workdir, out, str(tmp_path / "prompts.json")],
    cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert done.returncode == 0, done.stderr[-3000:]
  ours = json.loads(done.stdout.splitlines()[-1])
  assert sorted(f for f in os.listdir(workdir) if f.startswith("tokenizer")) == ["tokenizer.json"]
  with open(os.path.join(out, "config.json")) as f:
    exported = json.load(f)
  tok = json.loads((pathlib.Path(workdir) / "tokenizer.json").read_text())
  specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
  if objective == "masked_lm":
    assert exported["pad_token_id"] == specials["[PAD]"] and len(ours) == 1
    return
  end = specials["<|endoftext|>"]
  assert (exported["bos_token_id"], exported["eos_token_id"]) == (end, end)
  theirs = json.loads(_torch_side("generate", objective, out, str(tmp_path / "prompts.json")))
  print(f"\nours {ours}\ntransformers {theirs}")
  assert ours == theirs and any(ours)


def test_shape_mismatch_exits_2_before_writing_checkpoints(hf_dir, tmp_path):
  objective, text_file, directory, vocab_size = hf_dir
  workdir = str(tmp_path / "run")
  flags = _flags(objective, text_file, directory, vocab_size, workdir)
  result = _main(*flags, f"--config.model.num_layers={LAYERS + 1}")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  # One line: the directory, then each mismatch with its fix.
  last = result.stderr.splitlines()[-1]
  assert last.startswith(f"sslm_jax: error: {directory} does not match the config: ")
  assert f"{LAYERS_KEY[objective]}={LAYERS} in {directory}/config.json" in last
  assert f"model.num_layers={LAYERS + 1}" in last
  assert f"pass --config.model.num_layers={LAYERS}" in last
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_fine_tuning_from_hf_files_starts_from_their_encoder_and_tokenizer(hf_dir, tmp_path):
  """init_from_hf in fine-tuning: the encoder is the imported weights exactly, the head is new,
  the tokenizer is the directory's tokenizer.json, and a few steps train."""
  import jax
  from flax import nnx

  from sslm_jax import config as config_lib
  from sslm_jax.checkpoints import hf
  from sslm_jax.finetune import loop as finetune
  from sslm_jax.tokenizer import files as tokenizer_files
  from sslm_jax.training import loop as train
  from sslm_jax.training import sharding

  objective, _, directory, vocab_size = hf_dir
  rows = [{"text": p, "label": "long" if len(p) > 80 else "short"} for p in _paragraphs(96)]
  for name, part in (("train", rows[:64]), ("eval", rows[64:])):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
  c = config_lib.defaults()
  c.objective, c.finetune.task, c.init_from_hf = objective, "classification", directory
  c.finetune.train_files, c.finetune.eval_files = (
    str(tmp_path / "train.jsonl"),
    str(tmp_path / "eval.jsonl"),
  )
  c.data.seq_len, c.data.vocab_size = SEQ_LEN, vocab_size
  c.model.num_layers, c.model.num_heads, c.model.emb_dim, c.model.mlp_dim = (
    LAYERS,
    HEADS,
    WIDTH,
    MLP,
  )
  c.model.gelu = "tanh" if objective == "causal_lm" else "erf"
  c.num_train_steps = c.eval_every_steps = c.checkpoint_every_steps = c.log_every_steps = 4
  c.batch_size, c.eval_steps, c.sample_at_end, c.mesh.data = 8, 1, False, 1
  config_lib.validate(c)
  workdir = tmp_path / "run"
  prepared = finetune.prepare_finetuning(c, str(workdir))
  expected = tokenizer_files.load(f"{directory}/tokenizer.json").sha256
  assert prepared.fingerprint["tokenizer_sha256"] == expected
  assert not (workdir / "tokenizer.model").exists()  # none was trained
  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  state, *_, ckpt = train.init_or_restore(
    c, mesh, str(workdir), prepared.fingerprint, objective=prepared.objective
  )
  ckpt.close()
  encoder = jax.tree.map(np.asarray, nnx.to_pure_dict(state.params)["encoder"])
  imported = hf.load_params(directory, c)
  assert jax.tree.structure(encoder) == jax.tree.structure(imported)
  for got, want in zip(jax.tree.leaves(encoder), jax.tree.leaves(imported), strict=True):
    np.testing.assert_array_equal(got, want)
  finetune.run(c, str(workdir), mesh)
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [0, 4] and np.isfinite(records[-1]["train_loss"])
  assert "eval_accuracy" in records[-1]


if __name__ == "__main__":  # the torch side, in an interpreter without TensorFlow
  mode, objective, *rest = sys.argv[1:]
  if mode == "save":
    _save_hf_model(objective, int(rest[0]), int(rest[1]), rest[2])
  elif mode == "generate":
    print(json.dumps(_hf_generate(*rest)))
  else:
    print(repr(_hf_loss(objective, *rest)))
