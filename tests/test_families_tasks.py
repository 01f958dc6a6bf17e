"""The using paths of the rotary families: sslm_jax.load's generate, score and embed (llama) and
fill_mask, score and embed (modernbert), the commands over them, and fine-tuning from their
pretraining workdirs.

The fast tests read untrained workdirs made in seconds (test_finetune's _pretrained_workdir) and
check each result against the model's own logits. The slow ones fine-tune from those workdirs,
and pretrain each family in-process for 60 steps on one repeated sentence, enough to memorise it,
to check that generation, mask filling, scoring, the commands and tagging all see it.
"""

import json

import numpy as np
import pytest
from conftest import tiny_config
from test_api import run_python
from test_finetune import _equal, _mesh, _pretrained_workdir, _records, _saved_params_at_start

import sslm_jax
from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.errors import UsageError
from sslm_jax.finetune import loop as finetune
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib
from sslm_jax.training import hooks as hooks_lib
from sslm_jax.training import loop as train

SENTENCE = "machine learning is an application of artificial intelligence"
_FILLER = "river stone cloud paper window garden yellow quiet simple orange table morning".split()
_KEYS = ("violet", "amber")  # a text is "yes", and these words are KEY, where they occur
FAMILIES = {"llama": "causal_lm", "modernbert": "masked_lm"}


def _task_rows(rng, n: int, tagging: bool) -> list[dict]:
  rows = []
  for i in range(n):
    words = [str(w) for w in rng.choice(_FILLER, size=8)]
    if i % 2:
      words[rng.integers(len(words))] = str(rng.choice(_KEYS))
    label = [("KEY" if w in _KEYS else "O") for w in words] if tagging else ["no", "yes"][i % 2]
    rows.append({"text": " ".join(words), "label": label})
  return rows


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Classification and tagging files of the key-word task, and a tokenizer of 300 pieces
  trained on their texts and on the sentence's words in shuffled orders (each of those words
  becomes one piece)."""
  root = tmp_path_factory.mktemp("family_tasks")
  rng = np.random.default_rng(0)
  for task in ("classification", "tagging"):
    for split, n in (("train", 512), ("eval", 64)):
      rows = _task_rows(rng, n, task == "tagging")
      (root / f"{task}_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  texts = [r["text"] for r in _task_rows(rng, 300, False)]
  texts += [" ".join(rng.permutation(SENTENCE.split())) for _ in range(300)]
  tok = tokenizer_lib.train(texts, 300, str(root / "tokenizer.model"))
  assert len(tok.encode(SENTENCE)) == len(SENTENCE.split())
  return root


def _config(data_dir, family: str):
  c = tiny_config(FAMILIES[family])
  c.model.family = family
  if family == "llama":
    c.model.num_kv_heads = 2
    c.model.qk_norm = True
    c.model.tie_embeddings = False
  else:
    c.model.global_every, c.model.sliding_window = 2, 8
  c.data.vocab_size = 300
  c.data.tokenizer_path = str(data_dir / "tokenizer.model")
  c.batch_size = 16
  c.num_train_steps = 60
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 60
  c.opt.learning_rate = 3e-3
  c.opt.warmup_steps = 5
  c.sample_at_end = False
  config_lib.validate(c)
  return c


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, data_dir):
  """family -> an untrained pretraining workdir of it, whose checkpoints at steps 3 and 6 hold
  different parameters."""
  root = tmp_path_factory.mktemp("untrained")
  for family in FAMILIES:
    _SAVED[family] = _pretrained_workdir(root / family, _config(data_dir, family))
  return {family: str(root / family) for family in FAMILIES}


_SAVED = {}  # family -> {step: the untrained workdir's parameters}


def _log_softmax(logits_xV):
  shifted = logits_xV - logits_xV.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_llama_generates_scores_and_embeds(untrained):
  lm = sslm_jax.load(untrained["llama"])
  assert "Llama (causal_lm)" in repr(lm)
  prompt = "machine learning is"
  (greedy,) = lm.generate(prompt, max_new_tokens=6, temperature=0)
  assert len(greedy) == 1 and isinstance(greedy[0], str)
  # The first greedy token is the likeliest ordinary token after the prompt.
  ids = lm.encode(prompt)
  last_V = lm.logits(prompt)[0][-1].copy()
  last_V[sorted(set(lm.tokenizer.special_ids) - {lm.tokenizer.eos_id})] = -np.inf
  first = lm.tokenizer.decode(ids + [int(np.argmax(last_V))])[len(lm.tokenizer.decode(ids)) :]
  assert greedy[0].startswith(first) and first
  # Scores are the log-softmax of the logits at each next token.
  (score,) = lm.score(SENTENCE)
  ids = lm.encode(SENTENCE)
  log_probs_TV = _log_softmax(lm.logits(SENTENCE)[0])
  want = [log_probs_TV[t, ids[t + 1]] for t in range(len(ids) - 1)]
  np.testing.assert_allclose(score.log_probs, want, atol=1e-4)
  assert score.token_ids == ids[1:] and score.bits_per_byte > 0
  vectors = lm.embed([SENTENCE, "river stone"])
  assert vectors.shape == (2, lm.model_cfg.emb_dim) and np.isfinite(vectors).all()
  assert not np.allclose(vectors[0], vectors[1])
  with pytest.raises(UsageError, match="Llama .causal_lm. model, which cannot fill in a"):
    lm.fill_mask("a [MASK]")


def test_modernbert_fills_masks_scores_and_embeds(untrained):
  lm = sslm_jax.load(untrained["modernbert"])
  assert "ModernBERT (masked_lm)" in repr(lm)
  masked = "machine learning is an [MASK] of artificial intelligence"
  (guesses,) = lm.fill_mask(masked, top_k=4)
  probs = [p for _, p in guesses]
  assert len(guesses) == 4 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
  ordinary = {lm.token_text(i) for i in range(lm.tokenizer.vocab_size)} - {
    lm.token_text(i) for i in lm.tokenizer.special_ids
  }
  assert {token for token, _ in guesses} <= ordinary
  # The pseudo-log-likelihood of a token is its log-probability with itself masked.
  (score,) = lm.score(SENTENCE)
  ids = lm.encode(SENTENCE)
  assert score.token_ids == ids[1:-1]
  at = 3  # [CLS] machine learning [is] ...
  log_probs_TV = _log_softmax(lm.logits(SENTENCE.replace(" is ", " [MASK] "))[0])
  assert score.log_probs[at - 1] == pytest.approx(log_probs_TV[at, ids[at]], abs=1e-4)
  mean, cls = lm.embed([SENTENCE, "river stone"]), lm.embed([SENTENCE], pooling="cls")
  assert mean.shape == (2, lm.model_cfg.emb_dim) and np.isfinite(mean).all()
  assert cls.shape == (1, lm.model_cfg.emb_dim) and not np.allclose(cls[0], mean[0])
  with pytest.raises(UsageError, match="ModernBERT .masked_lm. model, which cannot generate"):
    lm.generate("a")


def _finetune_config(data_dir, family: str, task: str, init_from: str, steps: int = 40):
  c = _config(data_dir, family)
  c.finetune.task = task
  c.finetune.train_files = str(data_dir / f"{task}_train.jsonl")
  c.finetune.eval_files = str(data_dir / f"{task}_eval.jsonl")
  c.finetune.init_from = init_from
  c.data.tokenizer_path = ""  # the pretraining run's
  c.num_train_steps = steps
  c.log_every_steps = 10
  c.eval_every_steps = c.checkpoint_every_steps = steps
  return c


@pytest.mark.slow  # a 40-step run per family (~25 s each on 2 cores)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_classification_fine_tuning_starts_from_the_workdir_and_learns(
  family, untrained, data_dir, tmp_path
):
  config = _finetune_config(data_dir, family, "classification", untrained[family])
  # The encoder starts as the newest checkpoint saved it (no position table to fit).
  start = _saved_params_at_start(config, tmp_path / "start")["encoder"]
  assert _equal(start, _SAVED[family][6]) and not _equal(start, _SAVED[family][3])
  finetune.run(config, str(tmp_path / "run"), _mesh(config))
  losses = [r["train_loss"] for r in _records(tmp_path / "run") if "train_loss" in r]
  assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
  assert _records(tmp_path / "run")[-1]["eval_accuracy"] > 0.65  # half the texts are "yes"
  model = sslm_jax.load(str(tmp_path / "run"))
  (prediction,) = model.classify("river violet cloud paper")
  assert prediction.label in ("no", "yes") and sum(prediction.probabilities.values()) == (
    pytest.approx(1.0)
  )


def test_fine_tuning_refuses_another_family_in_one_line(untrained, data_dir, tmp_path):
  config = _finetune_config(data_dir, "llama", "classification", untrained["llama"])
  config.model.family = "auto"  # gpt2, which the workdir's llama is not
  config.model.num_kv_heads, config.model.qk_norm, config.model.tie_embeddings = 0, False, True
  with pytest.raises(config_lib.ConfigError, match="model.family=llama but this config has gpt2"):
    finetune.prepare_finetuning(config, str(tmp_path))


# ---------------------------------------------------------------- trained workdirs (slow)


def _sentence_batch(config, tok, rng) -> dict:
  """Every row the sentence ([BOS] ... [EOS] or [CLS] ... [SEP]), padding after it; masked_lm
  rows each mask their own num_predictions positions of it."""
  b, t = config.batch_size, config.data.seq_len
  causal = config.objective == "causal_lm"
  ids = tok.encode(SENTENCE)
  row = [tok.bos_id, *ids, tok.eos_id] if causal else [tok.cls_id, *ids, tok.sep_id]
  n = len(row)
  tokens_BT = np.zeros((b, t + 1), np.int32)
  tokens_BT[:, :n] = row
  batch = {
    "inputs": tokens_BT[:, :t].copy(),
    "positions": np.arange(t, dtype=np.int32)[None].repeat(b, 0),
    "segment_ids": (np.arange(t) < n).astype(np.int32)[None].repeat(b, 0),
  }
  if causal:
    batch["targets"] = tokens_BT[:, 1:]
    batch["weights"] = (np.arange(t) < n - 1).astype(np.float32)[None].repeat(b, 0)
    return batch
  p = config_lib.num_predictions(config)
  masked_BP = np.sort(np.stack([rng.choice(np.arange(1, n - 1), p, False) for _ in range(b)]), 1)
  batch["masked_positions"] = masked_BP.astype(np.int32)
  batch["masked_targets"] = np.take_along_axis(batch["inputs"], masked_BP, axis=1)
  batch["masked_weights"] = np.ones((b, p), np.float32)
  np.put_along_axis(batch["inputs"], masked_BP, tok.mask_id, axis=1)
  return batch


_TRAINED = {}


def trained_workdir(tmp_path_factory, data_dir, family: str) -> str:
  """The family's workdir after 60 steps on the sentence (config.json, a checkpoint at step 60
  that records the tokenizer), trained on first use."""
  if family not in _TRAINED:
    workdir = tmp_path_factory.mktemp(f"trained_{family}")
    config = _config(data_dir, family)
    (workdir / "config.json").write_text(json.dumps(config.to_dict()))
    tok = tokenizer_lib.load(config.data.tokenizer_path)
    rng = np.random.default_rng(1)

    def batches(start):
      while True:
        yield _sentence_batch(config, tok, rng)

    hooks = hooks_lib.DataHooks(
      train_batches=batches, eval_batches=lambda: [_sentence_batch(config, tok, rng)]
    )
    fp = checkpoint.fingerprint(config, {"tokenizer_sha256": tok.sha256})
    train.train_and_evaluate(config, str(workdir), _mesh(config), hooks, fp)
    first, last = _records(workdir)[0], _records(workdir)[-1]
    assert last["eval_loss"] < 0.3 * first["eval_loss"], (first, last)  # memorised
    _TRAINED[family] = str(workdir)
  return _TRAINED[family]


def _shuffled(text: str) -> str:
  words = text.split()
  return " ".join(words[::2] + words[1::2])


@pytest.mark.slow  # pretrains both families (~25 s each on 2 cores)
def test_trained_models_continue_fill_and_prefer_their_sentence(tmp_path_factory, data_dir):
  words = SENTENCE.split()
  llama = sslm_jax.load(trained_workdir(tmp_path_factory, data_dir, "llama"))
  (greedy,) = llama.generate(" ".join(words[:3]), max_new_tokens=12, temperature=0)
  assert greedy[0].startswith(" " + " ".join(words[3:]))  # the memorised rest of the sentence
  bert = sslm_jax.load(trained_workdir(tmp_path_factory, data_dir, "modernbert"))
  (guesses,) = bert.fill_mask(" ".join(words[:4] + ["[MASK]"] + words[5:]), top_k=3)
  assert guesses[0][0] == " " + words[4] and guesses[0][1] > 0.2  # of ~290 ordinary tokens
  for lm in (llama, bert):
    known, shuffled = lm.score([SENTENCE, _shuffled(SENTENCE)])
    assert known.bits_per_byte < 0.5 * shuffled.bits_per_byte


def _command(name, *args):
  result = run_python(["-m", f"sslm_jax.{name}", *args], timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.slow  # subprocesses, on the trained workdirs
def test_the_commands_take_either_family(tmp_path_factory, data_dir):
  llama = trained_workdir(tmp_path_factory, data_dir, "llama")
  bert = trained_workdir(tmp_path_factory, data_dir, "modernbert")
  words = SENTENCE.split()
  (generated,) = _command(
    "generate", f"--workdir={llama}", " ".join(words[:3]), "--temperature=0",
    "--max_new_tokens=8", "--json",
  )  # fmt: skip
  assert generated["continuation"].startswith(" " + " ".join(words[3:5]))
  masked = " ".join(words[:4] + ["[MASK]"] + words[5:])
  (filled,) = _command("fill_mask", f"--workdir={bert}", masked, "--json")
  assert filled["filled"] == SENTENCE
  (scored,) = _command("score", f"--workdir={bert}", SENTENCE, "--json")
  assert scored["pseudo_log_likelihood"] and scored["bits_per_byte"] > 0
  refused = run_python(["-m", "sslm_jax.fill_mask", f"--workdir={llama}", "a [MASK]"])
  assert refused.returncode == 2 and "holds a Llama (causal_lm) model" in refused.stderr


@pytest.mark.slow  # a pretrained workdir and a 40-step run
def test_tagging_fine_tuning_from_a_trained_modernbert(tmp_path_factory, data_dir, tmp_path):
  init_from = trained_workdir(tmp_path_factory, data_dir, "modernbert")
  config = _finetune_config(data_dir, "modernbert", "tagging", init_from)
  config.opt.learning_rate = 1e-2
  finetune.run(config, str(tmp_path), _mesh(config))
  records = _records(tmp_path)
  losses = [r["train_loss"] for r in records if "train_loss" in r]
  assert losses[-1] < 0.5 * losses[0], losses
  model = sslm_jax.load(str(tmp_path))
  assert [label for _, label in model.tag("river violet cloud paper")[0]] == ["O", "KEY", "O", "O"]
