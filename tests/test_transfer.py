"""Pretraining transfers: a pretrained encoder classifies words that fine-tuning never showed it.

A made-up language has two classes of words, A and B. In the pretraining corpus every A word
stands between context words of class A and every B word between context words of class B, so
a language model learns that all A words behave alike. The labelled task asks whether a sentence
of filler words holds an A word or a B word, with no context words. Fine-tuning sees half of
the words of each class; the eval holds only the other half. From random initialisation the
held-out words' embeddings are untrained noise, so the eval stays at chance however well the
training words are learnt; the pretrained encoder places them with their class.

Both fine-tuning runs have the same config, seed and tokenizer and differ only in
finetune.init_from: were it ignored, the two runs would be identical and the test would fail.
GPT, because its last-token head leaves chance within a few steps; BERT's [CLS] head needs many
more (see test_finetune.py). Measured with SEED 0 to 4, after 40 fine-tuning steps: eval accuracy
1.0 from the pretrained encoder every time, 0.43 to 0.58 from random initialisation.
"""

import json

import jax
import numpy as np
import pytest
from conftest import tiny_config
from test_main import _main

from sslm_jax.finetune import loop as finetune
from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib
from sslm_jax.training import sharding

SEED = 0
NUM_CLASS_WORDS = 16  # per class: 8 for fine-tuning, 8 held out for the eval
NUM_CONTEXT = 4  # context words per class, before and after its class words
NUM_FILLER = 24
NUM_WORDS = 2 * NUM_CLASS_WORDS + 4 * NUM_CONTEXT + NUM_FILLER
# The special ids, the 256 byte pieces, one piece per word and the space that starts a text:
# the most SentencePiece can make of this corpus, so no piece joins two words.
VOCAB = tokenizer_lib.NUM_SPECIAL + 256 + NUM_WORDS + 1
PRETRAIN_STEPS, FINETUNE_STEPS = 100, 40


def _language(rng) -> dict:
  """Every word is one CJK character and words are written without spaces, so each word is a
  piece of its own whatever the tokenizer learns, and no two words share a piece."""
  words = [chr(0x4E00 + i) for i in rng.choice(2000, size=NUM_WORDS, replace=False)]
  take = lambda n: [words.pop() for _ in range(n)]  # noqa: E731
  return {
    "A": take(NUM_CLASS_WORDS),
    "B": take(NUM_CLASS_WORDS),
    "before": {"A": take(NUM_CONTEXT), "B": take(NUM_CONTEXT)},
    "after": {"A": take(NUM_CONTEXT), "B": take(NUM_CONTEXT)},
    "filler": take(NUM_FILLER),
  }


def _sentence(rng, lang: dict, middle: list[str]) -> str:
  """3 to 6 filler words with `middle` somewhere among them."""
  words = list(rng.choice(lang["filler"], size=rng.integers(3, 7)))
  cut = rng.integers(len(words) + 1)
  return "".join(words[:cut] + middle + words[cut:])


def _corpus(rng, lang: dict, num_documents: int) -> str:
  """One sentence per document (paragraph), its class word between context words of its class."""
  docs = []
  for _ in range(num_documents):
    c = rng.choice(["A", "B"])
    middle = [rng.choice(lang["before"][c]), rng.choice(lang[c]), rng.choice(lang["after"][c])]
    docs.append(_sentence(rng, lang, middle))
  return "\n\n".join(docs) + "\n"


def _labelled(rng, lang: dict, half: int, n: int) -> list[dict]:
  """Balanced sentences holding one class word, from the first (0) or second (1) half of each
  class, and no context word."""
  k = NUM_CLASS_WORDS // 2
  return [
    {"text": _sentence(rng, lang, [rng.choice(lang[c][half * k : (half + 1) * k])]), "label": c}
    for c in ("A", "B") * (n // 2)
  ]


def _write_jsonl(path, rows: list[dict]) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _pretrain(workdir, corpus_file) -> None:
  result = _main(
    "--config=configs/gpt_tiny.py",
    f"--workdir={workdir}",
    "--config.data.source=text",
    f"--config.data.text_files={corpus_file}",
    f"--config.data.vocab_size={VOCAB}",
    "--config.data.seq_len=32",
    "--config.model.num_layers=2",
    "--config.model.emb_dim=64",
    "--config.model.mlp_dim=128",
    "--config.batch_size=32",
    f"--config.num_train_steps={PRETRAIN_STEPS}",
    f"--config.eval_every_steps={PRETRAIN_STEPS}",
    f"--config.checkpoint_every_steps={PRETRAIN_STEPS}",
    "--config.log_every_steps=50",
    "--config.eval_steps=1",
    "--config.opt.warmup_steps=20",
    "--config.sample_at_end=False",
    "--config.mesh.data=1",
  )
  assert result.returncode == 0, result.stderr[-3000:]


def _fine_tune(workdir, pretrained, train_file, eval_file, init: bool) -> dict:
  """The last metrics.jsonl record of a fine-tuning run from `pretrained`'s encoder (init) or
  from random initialisation with the same tokenizer."""
  c = tiny_config("causal_lm")  # the pretrained model's shape
  c.finetune.task = "classification"
  c.finetune.train_files, c.finetune.eval_files = train_file, eval_file
  if init:
    c.finetune.init_from = pretrained
  else:
    c.data.tokenizer_path = f"{pretrained}/tokenizer.model"
  c.data.vocab_size = VOCAB
  c.data.seq_len = 16
  c.batch_size = 32
  c.num_train_steps = FINETUNE_STEPS
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = FINETUNE_STEPS // 2
  c.sample_at_end = False
  c.opt.learning_rate = 1e-3
  c.opt.warmup_steps = 10
  c.opt.weight_decay = 0.01
  finetune.run(c, str(workdir), sharding.make_mesh(c.mesh, devices=jax.devices()[:1]))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return records[-1]


@pytest.mark.slow
def test_pretrained_encoder_classifies_words_fine_tuning_never_saw(tmp_path):
  rng = np.random.default_rng(SEED)
  lang = _language(rng)
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(_corpus(rng, lang, 8000))
  train_rows, eval_rows = _labelled(rng, lang, 0, 512), _labelled(rng, lang, 1, 256)
  train_file = _write_jsonl(tmp_path / "train.jsonl", train_rows)
  eval_file = _write_jsonl(tmp_path / "eval.jsonl", eval_rows)
  pretrained = tmp_path / "pretrained"
  _pretrain(pretrained, corpus)
  tok = tokenizer_files.load(str(pretrained / "tokenizer.model"))
  for row in train_rows + eval_rows:  # one piece per word, after the leading space
    assert [tok.id_to_piece(i) for i in tok.encode(row["text"])] == ["\u2581", *row["text"]]

  runs = {
    name: _fine_tune(tmp_path / name, str(pretrained), train_file, eval_file, init)
    for name, init in (("from_pretrained", True), ("from_random", False))
  }
  start, scratch = runs["from_pretrained"], runs["from_random"]
  assert start["step"] == scratch["step"] == FINETUNE_STEPS
  # From random init the training words are learnt, the held-out ones are not.
  assert scratch["train_loss"] < 0.3, scratch
  assert scratch["eval_accuracy"] < 0.7, scratch
  assert start["eval_accuracy"] > 0.9, start
  assert start["eval_accuracy"] - scratch["eval_accuracy"] > 0.25, (start, scratch)
