"""Labelled fine-tuning files: formats, file patterns, the label vocabulary and one-line errors.

gs:// is not tested (no network here); it goes through the same etils.epath calls as local paths.
"""

import json
import random
import subprocess
import sys

import pytest

from sslm_jax.data import labelled
from sslm_jax.data.labelled import Example, LabelledDataError, LabelVocab, read_examples


def _write(tmp_path, name, content, mode="w"):
  path = tmp_path / name
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    path.write_text(content, encoding="utf-8", newline="")
  return str(path)


def _jsonl(*records):
  return "".join(json.dumps(r) + "\n" for r in records)


def _error(patterns, task):
  with pytest.raises(LabelledDataError) as info:
    read_examples(patterns, task)
  message = str(info.value)
  assert "\n" not in message, message
  return message


# -- formats -----------------------------------------------------------------------------------


def test_jsonl_classification_converts_labels_to_strings_and_keeps_optional_pairs(tmp_path):
  path = _write(
    tmp_path,
    "train.jsonl",
    _jsonl({"text": "good", "label": 1}, {"text": "bad", "label": "neg", "extra": 3})
    + "\n"  # a blank line is skipped but still counted
    + _jsonl({"text": "a", "text_pair": "b", "label": 2.5}, {"text": "t", "label": True}),
  )
  examples = read_examples(path, "classification")
  assert examples == [
    Example("good", None, "1"),
    Example("bad", None, "neg"),
    Example("a", "b", "2.5"),
    Example("t", None, "true"),
  ]
  assert [e.where for e in examples] == [f"{path} row {n}" for n in (1, 2, 4, 5)]


def test_csv_quoting_multiline_fields_bom_and_editor_row_numbers(tmp_path):
  content = '\ufefftext,label\r\n"hello, world",pos\r\n"two\nlines",neg\r\n\r\nlast,pos\r\n'
  path = _write(tmp_path, "train.csv", content)
  examples = read_examples(path, "classification")
  assert [(e.text, e.label) for e in examples] == [
    ("hello, world", "pos"),
    ("two\nlines", "neg"),
    ("last", "pos"),
  ]
  # Header is row 1; the two-line field starts on row 3; the blank line is row 5.
  assert [e.where.rsplit(" ", 1)[1] for e in examples] == ["2", "3", "6"]


def test_tsv_pairs_are_read_without_quoting_like_glue(tmp_path):
  content = 'text\ttext_pair\tlabel\n"A" said\the "left\tentailment\n'
  path = _write(tmp_path, "dev.tsv", content)
  assert read_examples(path, "pair_classification") == [
    Example('"A" said', 'he "left', "entailment")
  ]


def test_regression_labels_are_floats_in_every_format(tmp_path):
  a = _write(tmp_path, "a.jsonl", _jsonl({"text": "x", "text_pair": "y", "label": 3}))
  b = _write(tmp_path, "b.csv", "label,text\n 4.25 ,z\n-1e-3,w\n")
  c = _write(tmp_path, "c.tsv", "text\tlabel\tid\nv\t0.5\t7\n")
  examples = read_examples(f"{a},{b},{c}", "regression")
  assert [e.label for e in examples] == [3.0, 4.25, -0.001, 0.5]
  assert all(isinstance(e.label, float) for e in examples)
  assert examples[0].text_pair == "y" and examples[1].text_pair is None


def test_tagging_labels_are_one_per_word(tmp_path):
  a = _write(tmp_path, "a.jsonl", _jsonl({"text": "Ada  Lovelace wrote", "label": ["B", "I", 0]}))
  b = _write(tmp_path, "b.tsv", "text\tlabel\nin London\tO B-LOC\n")
  examples = read_examples(f"{a},{b}", "tagging")
  assert [e.label for e in examples] == [("B", "I", "0"), ("O", "B-LOC")]
  assert examples[0].text == "Ada  Lovelace wrote"  # kept as written; words are text.split()


# -- file patterns -----------------------------------------------------------------------------


def test_globs_and_comma_lists_read_files_once_in_sorted_path_order(tmp_path):
  for name in ("b/2.jsonl", "a/1.jsonl", "a/3.jsonl", "c/skip.jsonl"):
    _write(tmp_path, name, _jsonl({"text": name, "label": "x"}))
  patterns = f"{tmp_path}/a/3.jsonl , {tmp_path}/[ab]/*.jsonl,,{tmp_path}/a/*.jsonl"
  texts = [e.text for e in read_examples(patterns, "classification")]
  assert texts == ["a/1.jsonl", "a/3.jsonl", "b/2.jsonl"]


def test_relative_glob_and_mixed_formats(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _write(tmp_path, "z.csv", "text,label\nfrom csv,1\n")
  _write(tmp_path, "y.jsonl", _jsonl({"text": "from jsonl", "label": 0}))
  assert labelled.matching_paths("*.*") == ["y.jsonl", "z.csv"]
  assert [e.text for e in read_examples("*", "classification")] == ["from jsonl", "from csv"]


# -- label vocabulary --------------------------------------------------------------------------


def test_vocab_is_sorted_deterministic_and_round_trips(tmp_path):
  examples = [Example(str(i), None, label) for i, label in enumerate("b a c a b".split())]
  vocab = LabelVocab.from_examples(examples, "classification")
  assert vocab.labels == ("a", "b", "c")
  shuffled = examples[:]
  random.Random(0).shuffle(shuffled)
  assert LabelVocab.from_examples(shuffled, "classification") == vocab
  path = str(tmp_path / labelled.VOCAB_FILE)
  vocab.save(path)
  assert LabelVocab.load(path) == vocab
  assert [vocab.encode(e) for e in examples] == [1, 0, 2, 0, 1]


def test_vocab_orders_integer_labels_numerically():
  examples = [Example("t", None, label) for label in ("10", "2", "0", "1")]
  assert LabelVocab.from_examples(examples, "classification").labels == ("0", "1", "2", "10")
  mixed = examples + [Example("t", None, "x")]
  assert LabelVocab.from_examples(mixed, "classification").labels == ("0", "1", "10", "2", "x")


def test_one_number_spelt_two_ways_is_refused_naming_the_spellings(tmp_path):
  path = tmp_path / "train.jsonl"
  rows = [{"text": "a", "label": 1}, {"text": "b", "label": 1.0}, {"text": "c", "label": "0"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  examples = read_examples(str(path), "classification")
  with pytest.raises(LabelledDataError, match="'1' and '1.0'") as raised:
    LabelVocab.from_examples(examples, "classification")
  assert "\n" not in str(raised.value) and "fix:" in str(raised.value)
  # Distinct numbers and words stay distinct classes.
  ok = [Example("t", None, label) for label in ("1", "2", "1.5", "x")]
  assert len(LabelVocab.from_examples(ok, "classification")) == 4


def test_tagging_vocab_takes_every_word_label(tmp_path):
  path = _write(tmp_path, "t.jsonl", _jsonl({"text": "a b c", "label": ["O", "B-X", "O"]}))
  examples = read_examples(path, "tagging")
  vocab = LabelVocab.from_examples(examples, "tagging")
  assert vocab.labels == ("B-X", "O")
  assert vocab.encode(examples[0]) == [1, 0, 1]


def test_vocab_refuses_regression_a_single_label_and_bad_files(tmp_path):
  with pytest.raises(LabelledDataError, match="regression labels are numbers"):
    LabelVocab.from_examples([Example("t", None, 1.0)], "regression")
  with pytest.raises(LabelledDataError, match=r"1 distinct label\(s\) \['a'\].*at least two"):
    LabelVocab.from_examples([Example("t", None, "a")] * 3, "classification")
  with pytest.raises(LabelledDataError, match="does not exist; fix: fine-tune"):
    LabelVocab.load(str(tmp_path / "missing.json"))
  bad = _write(tmp_path, "labels.json", '{"labels": ["a"]}')
  with pytest.raises(LabelledDataError, match="is not a label vocabulary.*delete it"):
    LabelVocab.load(bad)


def test_eval_label_not_seen_in_training(tmp_path):
  train = _write(tmp_path, "train.tsv", "text\tlabel\nx\tpos\ny\tneg\n")
  dev = _write(tmp_path, "dev.tsv", "text\tlabel\nx\tpos\ny\tneutral\n")
  vocab = LabelVocab.from_examples(read_examples(train, "classification"), "classification")
  with pytest.raises(LabelledDataError) as info:
    [vocab.encode(e) for e in read_examples(dev, "classification")]
  message = str(info.value)
  assert f"{dev} row 3:" in message and "'neutral'" in message and "['neg', 'pos']" in message
  assert "fix: add training examples" in message and "\n" not in message


def test_eval_tag_not_seen_in_training_names_the_word(tmp_path):
  vocab = LabelVocab("tagging", ("B", "O"))
  dev = _write(tmp_path, "dev.jsonl", _jsonl({"text": "a b", "label": ["O", "I"]}))
  with pytest.raises(LabelledDataError, match=rf"{dev} row 1 word 2: label 'I' is not among"):
    vocab.encode(read_examples(dev, "tagging")[0])


# -- bad input: one line naming the file, the row and the fix -----------------------------------

BAD_FILES = [
  # (file name, content, task, expected pieces after the path)
  ("x.txt", "text,label\n", "classification", ["unknown extension", "use .jsonl, .csv or .tsv"]),
  ("m.csv", "text,lable\na,b\n", "classification", ["row 1 (the header)", "no 'label' column"]),
  ("m.tsv", "label\ttext\n1\ta\n", "pair_classification", ["row 1", "no 'text_pair' column"]),
  (
    "m.jsonl",
    _jsonl({"text": "a", "label": 1}, {"txt": "b", "label": 1}),
    "classification",
    ["row 2 has no 'text' field", "fix: add it"],
  ),
  ("e.csv", "text,label\na,1\n  ,1\n", "classification", ["row 3: 'text' is empty", "fill it in"]),
  (
    "e.jsonl",
    _jsonl({"text": "a", "text_pair": "", "label": "x"}),
    "pair_classification",
    ["row 1: 'text_pair' is empty", "fix:"],
  ),
  (
    "n.jsonl",
    _jsonl({"text": 5, "label": "x"}),
    "classification",
    ["row 1: 'text' is not a string (got int)", "write it as a string"],
  ),
  (
    "j.jsonl",
    _jsonl({"text": "a", "label": 1}) + '{"text": "b", "label": 1\n',
    "classification",
    ["row 2 is not valid JSON", "one JSON object per line"],
  ),
  ("o.jsonl", '["a", 1]\n', "classification", ["row 1 is a JSON list, not an object"]),
  ("r.csv", "text,label\na,1.5\nb,nan\n", "regression", ["row 3", "'nan' is not a finite number"]),
  ("r.tsv", "text\tlabel\na\tlots\n", "regression", ["row 2", "'lots' is not a finite", "3.5"]),
  ("r.jsonl", _jsonl({"text": "a", "label": True}), "regression", ["row 1", "not a finite"]),
  ("c.jsonl", _jsonl({"text": "a", "label": None}), "classification", ["row 1: label None"]),
  ("c.csv", "text,label\na,\n", "classification", ["row 2: label ''", "give every row a label"]),
  ("t.tsv", "text\tlabel\na b c\tO O\n", "tagging", ["row 2: 2 labels for 3 words", "one label"]),
  (
    "t.jsonl",
    _jsonl({"text": "a b", "label": "O O"}),
    "tagging",
    ["row 1: tagging label is not a list (got str)", "JSON list"],
  ),
  (
    "p.jsonl",
    _jsonl({"text": "a", "text_pair": "b", "label": ["O"]}),
    "tagging",
    ["row 1: tagging takes one text per row", "remove text_pair"],
  ),
  ("f.tsv", "text\tlabel\na\tb\tc\n", "classification", ["row 2 has 3 fields", "remove tabs"]),
  ("f.csv", "text,label\n1,2\na,b,c\n", "classification", ["row 3 has 3 fields", "quote fields"]),
  ("q.csv", 'text,label\n"a"b,1\n', "classification", ["row 2 cannot be parsed as CSV"]),
  ("q2.csv", 'text,label\na,1\n"open,1\nb,2\n', "classification", ["row 3 cannot be parsed"]),
  ("u.csv", b"text,label\na,1\n\xff,2\n", "classification", ["row 3 is not valid UTF-8"]),
  ("h.csv", "text,label\n", "classification", ["has no examples", "fix: add labelled rows"]),
]


@pytest.mark.parametrize(
  "name, content, task, pieces", BAD_FILES, ids=[f"{b[0]}-{b[2]}" for b in BAD_FILES]
)
def test_bad_files_give_one_line_naming_file_row_and_fix(tmp_path, name, content, task, pieces):
  path = _write(tmp_path, name, content)
  message = _error(path, task)
  assert message.startswith(path), message
  for piece in pieces:
    assert piece in message, message
  assert "fix" in message, message


def test_pattern_matching_nothing_names_the_pattern_and_the_setting(tmp_path):
  _write(tmp_path, "a.jsonl", _jsonl({"text": "a", "label": 1}))
  missing = f"{tmp_path}/nothing-*.jsonl"
  message = _error(f"{tmp_path}/a.jsonl,{missing}", "classification")
  assert f"{missing!r} matches no files" in message
  assert "finetune.train_files / finetune.eval_files" in message
  assert "matches no files" in _error(str(tmp_path / "absent.csv"), "classification")
  assert "no labelled file patterns given" in _error(" , ", "classification")


def test_unknown_task():
  with pytest.raises(LabelledDataError, match=r"finetune.task='ner' is unknown; fix: use one of"):
    read_examples("unused", "ner")


def test_reading_labelled_files_does_not_import_tensorflow(tmp_path):
  path = _write(tmp_path, "a.jsonl", _jsonl({"text": "a", "label": 1}))
  code = (
    "import sys\n"
    "from sslm_jax.data import labelled\n"
    f"labelled.read_examples({path!r}, 'classification')\n"
    "sys.exit(int(any(m.split('.')[0] == 'tensorflow' for m in sys.modules)))\n"
  )
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
