"""Text augmentation: determinism, rates, strengths, sources and the one-line spec errors."""

import collections
import math
import os
import subprocess
import sys

import ml_collections
import pytest

from sslm_jax.data.augment import sources as augment_sources
from sslm_jax.data.augment import transforms as augment_lib

WORDS = [f"w{i}" for i in range(50)]
TEXT = " ".join(WORDS)


def _thesaurus(tmp_path, lines):
  path = tmp_path / "thesaurus.tsv"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _identity_thesaurus(tmp_path):
  """Every w{i} has the single synonym s{i}: a replaced word is recognisable by position."""
  return _thesaurus(tmp_path, [f"w{i}\ts{i}" for i in range(len(WORDS))])


def _texts(n):
  return [" ".join(f"t{i}x{j}" for j in range(12)) for i in range(n)]


def test_same_inputs_same_outputs_whatever_the_call_order(tmp_path):
  specs = [
    {"name": "synonym", "p": 0.5, "alpha": 0.2, "thesaurus": _identity_thesaurus(tmp_path)},
    {"name": "swap", "p": 0.5, "alpha": 0.1},
    {"name": "delete", "p": 0.5, "alpha": 0.1},
  ]
  forward, backward = augment_lib.Augmenter(specs, seed=3), augment_lib.Augmenter(specs, seed=3)
  a = [forward(TEXT, i, 1) for i in range(40)]
  b = [backward(TEXT, i, 1) for i in reversed(range(40))][::-1]
  assert a == b
  assert len({tuple(texts) for texts, _ in a}) > 30  # examples differ from one another
  other_copy = [forward(TEXT, i, 2) for i in range(40)]
  other_seed = [augment_lib.Augmenter(specs, seed=4)(TEXT, i, 1) for i in range(40)]
  assert sum(x != y for x, y in zip(a, other_copy, strict=True)) > 20
  assert sum(x != y for x, y in zip(a, other_seed, strict=True)) > 20


def test_independent_of_python_hash_seed_and_imports_no_tensorflow():
  code = (
    "import sys; from sslm_jax.data.augment import transforms as a; "
    "assert 'tensorflow' not in sys.modules, 'augment imported tensorflow'; "
    "swap = a.Augmenter([{'name': 'swap', 'alpha': 0.3}], seed=7); "
    "print(swap(' '.join(map(str, range(30))), 5, 2))"
  )
  outs = []
  for hash_seed in ("1", "2"):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    outs.append(run.stdout)
  assert outs[0] == outs[1]


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_fraction_changed_matches_p(p):
  n = 2000
  augmenter = augment_lib.Augmenter([{"name": "swap", "p": p, "alpha": 0.1}], seed=0)
  changed = sum(bool(augmenter(text, i)[1]) for i, text in enumerate(_texts(n)))
  assert abs(changed / n - p) <= 4 * math.sqrt(p * (1 - p) / n)
  assert augmenter.stats.changed["swap"] == changed
  assert augmenter.stats.examples == augmenter.stats.outputs == n


def test_synonym_alpha_touches_that_fraction_of_words(tmp_path):
  path = _identity_thesaurus(tmp_path)
  for alpha, expected in [(0.2, 10), (0.0, 1), (0.5, 25)]:
    augmenter = augment_lib.Augmenter([{"name": "synonym", "alpha": alpha, "thesaurus": path}])
    for i in range(20):
      (out,), changed = augmenter(TEXT, i)
      replaced = [(a, b) for a, b in zip(WORDS, out.split(), strict=True) if a != b]
      assert len(replaced) == expected and changed == ["synonym"]
      assert all(b == "s" + a[1:] for a, b in replaced)


def test_synonym_keeps_punctuation_capitals_and_whitespace(tmp_path):
  path = _thesaurus(tmp_path, ["# a comment", "quick\tfast", "fox\tred_fox"])
  augmenter = augment_lib.Augmenter([{"name": "synonym", "alpha": 1.0, "thesaurus": path}])
  (out,), _ = augmenter("  (Quick, the\n\nFOX!) runs \n", 0)
  assert out == "  (Fast, the\n\nRED FOX!) runs \n"


def test_synonym_keeps_the_case_pattern_of_the_word_it_replaces(tmp_path):
  path = _thesaurus(tmp_path, ["king\tmonarch"])
  augmenter = augment_lib.Augmenter([{"name": "synonym", "alpha": 1.0, "thesaurus": path}])
  (out,), _ = augmenter("KING King king I", 0)
  assert out == "MONARCH Monarch monarch I"


def test_insert_adds_synonyms_of_words_in_the_text(tmp_path):
  path = _identity_thesaurus(tmp_path)
  augmenter = augment_lib.Augmenter([{"name": "insert", "alpha": 0.1, "thesaurus": path}])
  outs = [augmenter(TEXT, i)[0][0].split() for i in range(50)]
  for out in outs:
    added = collections.Counter(out) - collections.Counter(WORDS)
    assert len(out) == 55 and sum(added.values()) == 5
    assert all(w.startswith("s") for w in added)
    assert [w for w in out if w.startswith("w")] == WORDS  # the original words keep their order
  assert len({next(i for i, w in enumerate(out) if w.startswith("s")) for out in outs}) > 5
  (unchanged,), changed = augmenter("no synonyms here", 0)
  assert unchanged == "no synonyms here" and changed == []


def test_swap_preserves_the_multiset_of_words():
  augmenter = augment_lib.Augmenter([{"name": "swap", "alpha": 0.2}])
  for i in range(50):
    (out,), _ = augmenter(TEXT, i)
    assert sorted(out.split()) == sorted(WORDS)
    moved = sum(a != b for a, b in zip(WORDS, out.split(), strict=True))
    assert 2 <= moved <= 20  # 10 swaps move at most 20 words
  (single,), changed = augmenter("alone", 0)
  assert single == "alone" and changed == []


def test_delete_rate_and_never_empty():
  augmenter = augment_lib.Augmenter([{"name": "delete", "alpha": 0.2}])
  kept = [len(augmenter(TEXT, i)[0][0].split()) for i in range(400)]
  assert abs(1 - sum(kept) / (400 * len(WORDS)) - 0.2) < 0.02
  everything = augment_lib.Augmenter([{"name": "delete", "alpha": 1.0}])
  for i in range(200):
    text = " ".join(WORDS[: 1 + i % 4])
    (out,), _ = everything(text, i)
    assert len(out.split()) == 1  # alpha=1 deletes all but one
    assert set(out.split()) <= set(text.split())
  (out,), _ = everything("a b c\n", 0)
  assert out.endswith("\n")


def test_split_sentences_covers_every_sentence_in_order():
  sentences = [" ".join(f"s{i}w{j}" for j in range(3 + i % 7)) + "." for i in range(40)]
  sentences.append(" ".join(f"long{j}" for j in range(45)))  # one sentence over max_words
  text = " ".join(sentences[:20]) + "\n" + " ".join(sentences[20:])
  augmenter = augment_lib.Augmenter([{"name": "split_sentences", "max_words": 20}])
  firsts = set()
  for copy in range(5):
    pieces, changed = augmenter(text, 0, copy)
    assert changed == ["split_sentences"] and len(pieces) > 5
    assert " ".join(pieces).split() == text.split()
    assert all(1 <= len(p.split()) <= 20 for p in pieces)
    assert all(p.endswith(".") for p in pieces[:-4])  # cut at sentence ends until the long one
    for piece, after in zip(pieces[1:], pieces[2:], strict=False):  # greedy after the first
      next_sentence = after.split(".")[0].split()
      assert len(piece.split()) + len(next_sentence) > 20, (piece, after)
    firsts.add(pieces[0])
  assert len(firsts) > 1  # copies cut differently
  short = "One sentence. Two sentences."
  assert augmenter(short, 0) == ([short], [])


def test_thesaurus_file_lookups(tmp_path):
  path = _thesaurus(
    tmp_path, ["# header", "", "Big\tlarge, huge,big", "big\tgreat", "ice_cream\tgelato"]
  )
  table = augment_sources.load_thesaurus(path)
  assert table["big"] == ("large", "huge", "great")
  assert table["ice cream"] == ("gelato",)
  bad = _thesaurus(tmp_path, ["big: large, huge"])
  with pytest.raises(augment_lib.AugmentError, match=r"thesaurus.tsv:1: .*no tab") as e:
    augment_sources.load_thesaurus(bad)
  assert "\n" not in str(e.value)


def _fake_wordnet(directory):
  """wndb data files in the format Linux distributions ship, license header included."""
  directory.mkdir()
  header = "  1 This software and database is being provided to you, the LICENSEE, by\n"
  header += "  2 Princeton University under the following license.\n"
  many = " ".join(f"lemma{i} 0" for i in range(16))
  (directory / "data.noun").write_text(
    header
    + "02958343 06 n 05 car 0 auto 0 automobile 0 machine 6 motorcar 0 001 @ 03791235 n 0000"
    + " | a motor vehicle with four wheels\n"
    + "02961779 06 n 02 car 0 railcar 0 000 | a wheeled vehicle adapted to the rails\n"
    + "03791235 06 n 02 motor_vehicle 0 automotive_vehicle 0 000 | a self-propelled vehicle\n"
    + f"09999999 03 n 10 {many} 000 | sixteen lemmas: w_cnt is hexadecimal\n"
  )
  (directory / "data.adj").write_text(
    header
    + "01380267 00 s 02 galore(ip) 0 in_abundance 0 000 | in abundance\n"
    + "00001740 00 a 02 able(a) 0 capable(p) 0 000 | having the necessary means\n"
  )


def test_fake_wordnet_lookups(tmp_path):
  _fake_wordnet(tmp_path / "dict")
  table = augment_sources.load_wordnet(tmp_path / "dict")
  assert table["car"] == ("auto", "automobile", "machine", "motorcar", "railcar")
  assert table["auto"][0] == "car"
  assert "motor vehicle" not in table and "automotive vehicle" not in table  # never keys
  assert "lemma15" in table["lemma0"]
  assert table["galore"] == ("in abundance",)
  assert table["able"] == ("capable",) and table["capable"] == ("able",)
  augmenter = augment_lib.Augmenter([{"name": "synonym", "wordnet": str(tmp_path / "dict")}])
  outs = {augmenter("The Car stopped.", i)[0][0] for i in range(40)}
  assert outs == {f"The {s.capitalize()} stopped." for s in table["car"]}
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "data.verb").write_text("not a synset\n")
  with pytest.raises(augment_lib.AugmentError, match=r"data.verb:1: not a WordNet synset line"):
    augment_sources.load_wordnet(tmp_path / "broken")


def test_paraphrase_file(tmp_path):
  path = tmp_path / "para.tsv"
  path.write_text(
    "# original<TAB>paraphrase\nthe cat  sat\ta cat was sitting\nthe cat sat\tthe feline sat\n"
  )
  augmenter = augment_lib.Augmenter([{"name": "paraphrase", "paraphrases": str(path)}])
  outs = {augmenter(" the cat\nsat ", 0, copy)[0][0] for copy in range(30)}
  assert outs == {"a cat was sitting", "the feline sat"}
  assert augmenter("a dog sat", 0) == (["a dog sat"], [])


PARAPHRASER = """
def shout(texts, seed):
  return [f"{t.upper()} #{seed}" for t in texts]

def wrong_count(texts, seed):
  return texts + ["extra"]

not_callable = 3
"""


def test_paraphrase_callable(tmp_path, monkeypatch):
  (tmp_path / "my_paraphraser.py").write_text(PARAPHRASER)
  monkeypatch.syspath_prepend(str(tmp_path))
  specs = [
    {"name": "split_sentences", "max_words": 2},
    {"name": "paraphrase", "callable": "my_paraphraser:shout"},
  ]
  augmenter = augment_lib.Augmenter(specs, seed=1)
  texts, changed = augmenter("one two. three", 4)
  assert changed == ["split_sentences", "paraphrase"]
  seeds = {t.split("#")[1] for t in texts}
  assert " ".join(t.split(" #")[0] for t in texts) == "ONE TWO. THREE" and len(texts) >= 2
  assert len(seeds) == 1  # one call for all the pieces of an example
  assert augmenter("one two. three", 4) == (texts, changed)
  assert augmenter("one two. three", 4, 1) != (texts, changed)
  wrong = augment_lib.Augmenter([{"name": "paraphrase", "callable": "my_paraphraser:wrong_count"}])
  with pytest.raises(augment_lib.AugmentError, match="must return a list of 1 texts"):
    wrong("x", 0)


def test_configdict_specs_and_stats(tmp_path):
  specs = [ml_collections.ConfigDict({"name": "delete", "p": 0.5, "alpha": 0.3})]
  augmenter = augment_lib.Augmenter(specs)
  for i in range(100):
    augmenter(TEXT, i)
  stats = augmenter.stats.as_dict()
  assert stats["augment_examples"] == 100 and 30 < stats["augment_changed_delete"] < 70
  assert augment_lib.Augmenter(None)(TEXT, 0) == ([TEXT], [])


def _bad_specs(tmp_path):
  empty_dir = tmp_path / "empty"
  empty_dir.mkdir()
  (tmp_path / "mod_ok.py").write_text("value = 1\n")
  missing = str(tmp_path / "missing.tsv")
  return [
    ({"name": "shuffle"}, "'shuffle' is unknown; use one of synonym, insert, swap, delete"),
    ({"name": "swap", "p": 1.5}, "swap: p=1.5 is outside [0, 1]"),
    ({"name": "swap", "alpha": -0.1}, "swap: alpha=-0.1 is outside [0, 1]"),
    ({"name": "swap", "p": "0.3"}, "swap: p='0.3' is outside [0, 1]"),
    ({"name": "swap", "alhpa": 0.1}, "swap: unknown field(s) ['alhpa']"),
    ({"p": 0.1}, "has no name"),
    ({"name": "synonym", "thesaurus": missing}, f"thesaurus file {missing} does not exist"),
    ({"name": "insert"}, "insert: set exactly one of thesaurus or wordnet"),
    ({"name": "synonym", "wordnet": str(empty_dir)}, "has none of data.noun, data.verb"),
    ({"name": "paraphrase", "paraphrases": missing}, f"paraphrases file {missing} does not exist"),
    ({"name": "paraphrase", "callable": "no_such_module_xyz:fn"}, "cannot be imported"),
    ({"name": "paraphrase", "callable": "mod_ok:missing"}, "cannot be imported"),
    ({"name": "paraphrase", "callable": "mod_ok:value"}, "is a int, not a function"),
    ({"name": "paraphrase", "callable": "mod_ok"}, "write it as 'package.module:function'"),
    ({"name": "split_sentences", "max_words": 0}, "max_words=0; use an int >= 1"),
  ]


def test_each_bad_spec_has_a_one_line_error(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(tmp_path))
  for spec, message in _bad_specs(tmp_path):
    with pytest.raises(augment_lib.AugmentError) as e:
      augment_lib.Augmenter([spec])
    assert message in str(e.value), (spec, str(e.value))
    assert "\n" not in str(e.value)
  with pytest.raises(augment_lib.AugmentError, match="swap is listed twice"):
    augment_lib.Augmenter([{"name": "swap"}, {"name": "swap"}])
  with pytest.raises(augment_lib.AugmentError, match="seed=-1"):
    augment_lib.Augmenter([], seed=-1)
