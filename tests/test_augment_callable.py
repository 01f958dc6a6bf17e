"""A user's paraphrase function: its errors as one line naming it and the example, and batches."""

import pytest
from conftest import tiny_config

from sslm_jax.config import augment_spec
from sslm_jax.config.augment_spec import AugmentError
from sslm_jax.data import labelled
from sslm_jax.data.augment import apply as augment_data
from sslm_jax.data.augment import transforms as augment_lib

PARAPHRASER = """
CALLS = []

def per_example(texts, seed):
  return [f"{t} #{seed}" for t in texts]

def batched(texts, seeds):
  CALLS.append(len(texts))
  return [f"{t} #{seed}" for t, seed in zip(texts, seeds)]

def fails(texts, seed):
  if "bad" in texts[0]:
    raise ValueError("cannot paraphrase this\\nsecond line of detail")
  return texts

def fails_batched(texts, seeds):
  return [t for text in texts for t in fails([text], 0)]
"""


@pytest.fixture
def paraphraser(tmp_path, monkeypatch):
  (tmp_path / "sslm_test_paraphraser.py").write_text(PARAPHRASER)
  monkeypatch.syspath_prepend(str(tmp_path))
  import sslm_test_paraphraser

  sslm_test_paraphraser.CALLS.clear()
  return sslm_test_paraphraser


def _examples(n: int, bad: int | None = None) -> list:
  text = lambda i: f"text {i}" + (" bad" if i == bad else "")  # noqa: E731
  return [labelled.Example(text(i), None, "x", f"f.jsonl row {i + 1}") for i in range(n)]


def _texts(c, examples) -> list[str]:
  return [e.text for e in augment_data.finetune_examples(c, examples, None)]


def test_a_batched_callable_gets_many_examples_per_call_and_the_same_outputs(paraphraser):
  c = tiny_config("masked_lm")
  c.data.augment, c.data.augment_copies = "paraphrase:callable=sslm_test_paraphraser:per_example", 2
  one_by_one = _texts(c, _examples(10))
  c.data.augment = "paraphrase:callable=sslm_test_paraphraser:batched,batch=8"
  assert _texts(c, _examples(10)) == one_by_one  # each text keeps its copy's seed
  assert paraphraser.CALLS == [8, 8, 4]  # 20 copies, 8 at a time
  c.data.augment = "paraphrase:callable=sslm_test_paraphraser:batched,batch=3"
  assert _texts(c, _examples(10)) == one_by_one
  with pytest.raises(AugmentError, match="batch=0 must be an integer >= 1"):
    augment_spec.parse("paraphrase:callable=sslm_test_paraphraser:batched,batch=0")


@pytest.mark.parametrize("fn", ["fails", "fails_batched,batch=4", "fails_batched,batch=8"])
def test_a_raising_callable_is_one_line_naming_it_and_the_example(paraphraser, fn):
  c = tiny_config("masked_lm")
  c.data.augment = f"paraphrase:callable=sslm_test_paraphraser:{fn}"
  with pytest.raises(AugmentError) as raised:
    augment_data.finetune_examples(c, _examples(6, bad=4), None)
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(
    "f.jsonl row 5: augment: paraphrase callable sslm_test_paraphraser:fails"
  )
  assert "raised ValueError: cannot paraphrase this on example 4 copy 0" in message
  assert "'text 4 bad'" in message
  augmenter = augment_lib.Augmenter(
    [{"name": "paraphrase", "callable": "sslm_test_paraphraser:fails"}]
  )
  with pytest.raises(AugmentError, match="on example 7 copy 2, text 'a bad one'"):
    augmenter("a bad one", 7, 2)
