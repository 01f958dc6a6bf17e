"""data.augment wired into training: the spec string, the pretraining cache, fine-tuning examples,
contextual substitution with a BERT workdir, and the show command (python -m sslm_jax.augment)."""

import json
import random

import numpy as np
import pytest
from conftest import tiny_config
from test_api import fabricated_workdir, run_python

from sslm_jax import config as config_lib
from sslm_jax.config import augment_spec
from sslm_jax.config.augment_spec import AugmentError
from sslm_jax.data import labelled
from sslm_jax.data.augment import apply as augment_data

SYLLABLES = "ka lo mi ne ru sa to vi be da fo gu".split()


def _words(rng: random.Random, n: int) -> str:
  return " ".join("".join(rng.choices(SYLLABLES, k=rng.randint(1, 3))) for _ in range(n))


# ----------------------------------------------------------------------------- the spec string


def test_parse_reads_names_numbers_and_paths():
  specs = augment_spec.parse(
    " synonym:p=0.5,alpha=.2,thesaurus=/d/syn.tsv ; swap ;split_sentences:max_words=64;"
  )
  assert specs == [
    {"name": "synonym", "p": 0.5, "alpha": 0.2, "thesaurus": "/d/syn.tsv"},
    {"name": "swap"},
    {"name": "split_sentences", "max_words": 64},
  ]
  assert augment_spec.parse("") == []
  callable_spec = augment_spec.parse("paraphrase:callable=pkg.mod:fn")
  assert callable_spec == [{"name": "paraphrase", "callable": "pkg.mod:fn"}]
  again = augment_spec.parse(augment_spec.canonical(specs))
  assert again == specs


@pytest.mark.parametrize(
  "text, message",
  [
    ("synonim:p=0.5", r"'synonim' is unknown; use one of synonym, .*contextual"),
    ("swap:p=1.5", r"augment swap: p=1\.5 is outside \[0, 1\]"),
    ("swap:alpha=lots", r"augment swap: alpha='lots' is outside"),
    ("swap:p", r"data.augment swap: 'p' is not field=value"),
    ("swap:beta=1", r"swap: unknown field\(s\) \['beta'\]; allowed: name, p, alpha"),
    ("swap:p=0.1,p=0.2", r"swap: p is given twice"),
    ("swap;delete;swap", r"lists swap twice"),
    ("split_sentences:max_words=0", r"max_words=0 must be an integer >= 1"),
    ("contextual:workdir=w,top_k=2.5", r"top_k=2\.5 must be an integer >= 1"),
  ],
)
def test_bad_specs_fail_in_one_line_naming_the_field(text, message):
  with pytest.raises(AugmentError, match=message) as e:
    augment_spec.parse(text)
  assert "\n" not in str(e.value) and str(e.value).startswith("data.augment")


def test_config_validation_and_task_checks():
  c = config_lib.defaults()
  config_lib.validate(c)  # off by default
  c.data.augment = "swap:p=2"
  with pytest.raises(config_lib.ConfigError, match="augment swap: p=2"):
    config_lib.validate(c)
  c.data.augment, c.data.augment_copies = "swap", 0
  with pytest.raises(config_lib.ConfigError, match="augment_copies=0 must be an integer >= 1"):
    config_lib.validate(c)
  c.data.augment_copies, c.finetune.task = 1, "tagging"
  with pytest.raises(AugmentError, match="tagging.*per-word labels.*augment=''"):
    augment_spec.specs(c)
  c.finetune.task, c.data.augment = "pair_classification", "split_sentences"
  with pytest.raises(AugmentError, match="split_sentences cuts a text.*text_pair"):
    augment_spec.specs(c)


# ----------------------------------------------------------------------------- pretraining


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
  rng = random.Random(0)
  path = tmp_path_factory.mktemp("aug_corpus") / "c.txt"
  path.write_text("".join(_words(rng, rng.randint(8, 40)) + ".\n\n" for _ in range(300)))
  return str(path)


def _pretrain_config(text_files, augment=""):
  c = config_lib.defaults()
  c.batch_size, c.data.source, c.data.text_files = 4, "text", text_files
  c.data.seq_len, c.data.vocab_size, c.data.eval_fraction = 32, 300, 0.2
  c.data.augment, c.data.augment_copies = augment, 2
  return c


def test_pretraining_cache_augments_the_train_split_only(corpus_file, tmp_path):
  from sslm_jax.data import cache, pipeline, preparation

  spec = "swap:p=0.8,alpha=0.2;delete:p=0.5"
  runs = {"plain": "", "aug": spec, "again": spec}
  for name, augment in runs.items():
    preparation.build_cache(_pretrain_config(corpus_file, augment), str(tmp_path / name))
  rows = {
    name: {s: np.asarray(cache.split_rows(str(tmp_path / name), s)) for s in ("train", "eval")}
    for name in runs
  }
  tok = {name: (tmp_path / name / "tokenizer.model").read_bytes() for name in runs}
  assert tok["plain"] == tok["aug"]  # the tokenizer is trained on the original text
  assert np.array_equal(rows["plain"]["eval"], rows["aug"]["eval"])
  assert len(rows["aug"]["train"]) > 2 * len(rows["plain"]["train"])  # originals + 2 copies
  for split in ("train", "eval"):
    assert np.array_equal(rows["aug"][split], rows["again"][split])
  record = json.loads((tmp_path / "aug" / "augment.json").read_text())
  meta = json.loads((tmp_path / "aug" / "data" / "meta.json").read_text())
  assert meta["augment"] == record and meta["request"]["augment"]["augment_copies"] == 2
  assert record["examples"] == meta["train"]["docs"] - record["texts_added"]
  assert record["copies_added"] + record["copies_unchanged"] == 2 * record["examples"]
  assert 0 < record["changed"]["delete"] < record["changed"]["swap"] <= record["copies_added"]
  assert not (tmp_path / "plain" / "augment.json").exists()
  plain_meta = json.loads((tmp_path / "plain" / "data" / "meta.json").read_text())
  assert "augment" not in plain_meta and "augment" not in plain_meta["request"]
  # Another spec is another cache: build() refuses the old one, prepare() rebuilds it.
  other = _pretrain_config(corpus_file, "swap:p=0.8,alpha=0.3;delete:p=0.5")
  with pytest.raises(pipeline.DataError, match="built for another config"):
    pipeline.build(other, str(tmp_path / "aug"))
  preparation.build_cache(other, str(tmp_path / "aug"))
  rebuilt = np.asarray(cache.split_rows(str(tmp_path / "aug"), "train"))
  assert rebuilt.shape != rows["again"]["train"].shape or not np.array_equal(
    rebuilt, rows["again"]["train"]
  )


# ----------------------------------------------------------------------------- fine-tuning


def _examples(n: int, pairs: bool = False) -> list:
  rng = random.Random(1)
  return [
    labelled.Example(
      _words(rng, 12), _words(rng, 8) if pairs else None, f"L{i % 3}", where=f"f.jsonl row {i}"
    )
    for i in range(n)
  ]


def test_finetune_copies_keep_labels_and_pairs_change_independently(tmp_path):
  c = tiny_config("masked_lm")
  c.data.augment, c.data.augment_copies = "swap:p=1,alpha=0.2", 2
  singles = _examples(10)
  out = augment_data.finetune_examples(c, singles, str(tmp_path))
  assert len(out) == 30 and out[0] == singles[0]
  originals = [e for e in out if "augmented" not in e.where]
  assert originals == singles
  for e in out:
    source = singles[int(e.where.split("row ")[1].split()[0])]
    assert e.label == source.label
    assert sorted(e.text.split()) == sorted(source.text.split())  # swapped, same words
  assert sum(e.text != singles[i // 3].text for i, e in enumerate(out)) == 20
  record = json.loads((tmp_path / "augment.json").read_text())
  assert record["examples"] == 10 and record["copies_added"] == 20
  assert record["changed"] == {"swap": 20}
  pairs = _examples(10, pairs=True)
  out = augment_data.finetune_examples(c, pairs, None)
  copies = [e for e in out if "augmented" in e.where]
  assert all(
    e.text != p.text and e.text_pair != p.text_pair for e, p in zip(copies[::2], pairs, strict=True)
  )
  swaps = [(e.text.split(), e.text_pair.split()) for e in copies]
  assert len({tuple(a) for a, _ in swaps}) == len(swaps)  # not one permutation for all
  c.data.augment = "split_sentences:max_words=4"
  pieces = augment_data.finetune_examples(c, singles[:1], None)
  assert len(pieces) > 3 and {e.label for e in pieces} == {singles[0].label}
  tagged = [labelled.Example("a b", None, ("X", "Y"), where="t.jsonl row 2")]
  with pytest.raises(AugmentError, match="t.jsonl row 2: per-word"):
    augment_data.finetune_examples(c, tagged, None)


def test_finetune_prepare_augments_train_features_only(tmp_path):
  from sslm_jax.finetune import loop as finetune
  from sslm_jax.tokenizer import sentencepiece as tokenizer_lib

  rng = random.Random(2)
  for split, n in (("train", 24), ("eval", 8)):
    rows = [json.dumps({"text": _words(rng, 10), "label": str(i % 2)}) for i in range(n)]
    (tmp_path / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
  texts = [_words(rng, 20) for _ in range(200)]
  tokenizer_lib.train(texts, 300, str(tmp_path / "tok.model"))
  c = tiny_config("masked_lm")
  c.finetune.task = "classification"
  c.finetune.train_files, c.finetune.eval_files = (
    str(tmp_path / f"{s}.jsonl") for s in ("train", "eval")
  )
  c.data.tokenizer_path, c.data.vocab_size = str(tmp_path / "tok.model"), 300
  plain = finetune.prepare_finetuning(c, str(tmp_path / "plain")).data
  c.data.augment = "delete:p=1,alpha=0.3"
  aug = finetune.prepare_finetuning(c, str(tmp_path / "aug")).data
  for k in plain.eval:
    assert np.array_equal(plain.eval[k], aug.eval[k])
  assert len(aug.train["labels"]) == 2 * len(plain.train["labels"])
  assert np.array_equal(aug.train["labels"][::2], plain.train["labels"])
  assert np.array_equal(aug.train["labels"][1::2], plain.train["labels"])
  assert (tmp_path / "aug" / "augment.json").exists()
  assert not (tmp_path / "plain" / "augment.json").exists()


# ----------------------------------------------------------------------------- contextual


@pytest.mark.slow  # builds the session's tiny BERT workdir (~20 s) unless test_api already did
def test_contextual_substitution_with_a_bert_workdir(tmp_path_factory, tmp_path):
  from sslm_jax.data.augment import transforms as augment_lib

  workdir = fabricated_workdir(tmp_path_factory, "bert")  # the session's untrained tiny BERT
  rng = random.Random(3)
  vocab = "the data model token layer train loss step value batch text word".split()
  text = " ".join(rng.choice(vocab) for _ in range(60)) + "."
  spec = {"name": "contextual", "workdir": workdir, "alpha": 0.2, "top_k": 40}
  first, second = augment_lib.Augmenter([spec], seed=1), augment_lib.Augmenter([spec], seed=1)
  outs = [first(text, i, 0)[0][0] for i in range(3)]
  assert outs == [second(text, i, 0)[0][0] for i in range(3)]  # deterministic
  assert len(set(outs)) == 3  # another example index, other words
  for out in outs:
    before, after = text.split(), out.split()
    assert len(after) == len(before)  # words replaced in place
    changed = sum(a != b for a, b in zip(before, after, strict=True))
    assert 0.5 * 0.2 * 60 <= changed <= 0.2 * 60
  gpt = tmp_path / "gpt"
  gpt.mkdir()
  (gpt / "config.json").write_text(json.dumps({"objective": "causal_lm"}))
  with pytest.raises(AugmentError, match="holds a GPT .* give the workdir of a BERT"):
    augment_lib.Augmenter([{"name": "contextual", "workdir": str(gpt)}])
  with pytest.raises(AugmentError, match="workdir='nowhere' is not a directory"):
    augment_lib.Augmenter([{"name": "contextual", "workdir": "nowhere"}])


def test_contextual_refuses_a_fine_tuned_workdir_in_one_line(tmp_path):
  """A fine-tuned BERT keeps objective masked_lm; its task head cannot fill a [MASK]."""
  from sslm_jax.data.augment import transforms as augment_lib

  (tmp_path / "config.json").write_text(
    json.dumps({"objective": "masked_lm", "finetune": {"task": "classification"}})
  )
  with pytest.raises(AugmentError, match="holds a fine-tuned classification model") as e:
    augment_lib.Augmenter([{"name": "contextual", "workdir": str(tmp_path)}])
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- show command


@pytest.mark.slow
def test_show_command_prints_copies_labels_and_statistics(corpus_file, tmp_path):
  show = ["-m", "sslm_jax.augment", "--config=configs/gpt_tiny.py", "--num_examples=2"]
  data = ["--config.data.source=text", f"--config.data.text_files={corpus_file}"]
  result = run_python([*show, *data, "--config.data.augment=swap:p=1,alpha=0.3", "--json"])
  assert result.returncode == 0, result.stderr[-2000:]
  lines = [json.loads(line) for line in result.stdout.splitlines()]
  assert [x["index"] for x in lines[:2]] == [0, 1]
  assert all(c["changed_by"] == ["swap"] for x in lines[:2] for c in x["copies"])
  stats = lines[2]["statistics"]
  assert stats["examples"] == 2 and stats["changed"] == {"swap": 2}
  rows = [json.dumps({"text": "one two three four five six", "label": "yes"})]
  (tmp_path / "t.jsonl").write_text("\n".join(rows) + "\n")
  task = [
    "--config=configs/gpt_tiny.py",
    "--config.finetune.task=classification",
    f"--config.finetune.train_files={tmp_path / 't.jsonl'}",
    f"--config.finetune.eval_files={tmp_path / 't.jsonl'}",
    "--config.data.augment=delete:alpha=0.5",
    "--config.data.augment_copies=2",
  ]
  result = run_python(["-m", "sslm_jax.augment", *task])
  assert result.returncode == 0, result.stderr[-2000:]
  assert "label='yes'" in result.stdout and '"copies_added": 2' in result.stdout
  assert result.stdout.count("(changed by delete)") == 2
  bad = run_python([*show, *data, "--config.data.augment=swap:p=3"])
  assert bad.returncode == 2 and bad.stdout == ""
  assert bad.stderr.strip().splitlines()[-1].startswith("sslm_jax: error: data.augment swap: p=3")
  assert list(tmp_path.iterdir()) == [tmp_path / "t.jsonl"]  # nothing written
