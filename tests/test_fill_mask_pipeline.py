"""transformers' fill-mask pipeline on a BERT export reads [MASK] in context as our fill_mask does.

The export of a tiny BERT workdir (random weights at a revealing scale, see test_hf.py) goes
through `transformers.pipeline("fill-mask")`; its guesses must be ours, token for token and
probability for probability, on texts with spaces and newlines next to the mask, masks at the
start and the end, two masks, and texts that start with spaces.
"""

import numpy as np
import pytest
from test_hf import _export, _tiny_workdir

from sslm_jax.inference import language_model as api
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib

transformers = pytest.importorskip("transformers")

SENTENCES = [
  "import [MASK]\nimport sys",
  "kalo [MASK] mine",
  "[MASK] kalo mine",
  "kalo mine [MASK]",
  "  kalo [MASK] mine",
  " [MASK] kalo",
  "  [MASK] kalo",
  "kalo\n[MASK]\nmine",
  "kalo([MASK])",
  "kalo  [MASK]  mine",
  "\tkalo [MASK]",
  "kalo [MASK] mine [MASK] ru",
]
TOP_K = 5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(our model, the pipeline over its export)."""
  tmp_path = tmp_path_factory.mktemp("fill_mask_pipeline")
  workdir, _ = _tiny_workdir(tmp_path, "masked_lm")
  out = str(tmp_path / "export")
  done = _export(f"--workdir={workdir}", f"--out={out}")  # the command: its flags stay its own
  assert done.returncode == 0, done.stderr[-2000:]
  return api.load(workdir), transformers.pipeline("fill-mask", model=out, tokenizer=out)


def test_the_exported_tokenizer_frames_masks_as_fill_mask_does(exported):
  lm, pipe = exported
  same = [pipe.tokenizer(s)["input_ids"] == lm.encode(s) for s in SENTENCES]
  assert all(same), [s for s, ok in zip(SENTENCES, same, strict=True) if not ok]
  # Without a [MASK] the export still encodes exactly as SentencePiece (leading spaces too).
  for text in ["  two leading spaces", " x", "a [MASK", "MASK]"]:
    assert pipe.tokenizer(text, add_special_tokens=False)["input_ids"] == lm.encode(text)[1:-1]


def test_pipeline_guesses_are_ours(exported):
  lm, pipe = exported
  ids_by_text = {lm.token_text(i): i for i in range(lm.tokenizer.vocab_size)}
  assert len(ids_by_text) == lm.tokenizer.vocab_size
  ordinary = np.ones(lm.tokenizer.vocab_size, bool)
  ordinary[sorted(lm.tokenizer.special_ids)] = False
  same_top, max_diff = 0, 0.0
  for text in SENTENCES:
    ours = lm.fill_mask(text, top_k=TOP_K)
    theirs = pipe(text, top_k=lm.tokenizer.vocab_size)  # the whole distribution
    theirs = [theirs] if isinstance(theirs[0], dict) else theirs
    assert len(theirs) == len(ours), text
    agree = True
    for our_guesses, their_guesses in zip(ours, theirs, strict=True):
      # The pipeline's softmax covers special ids too; ours never proposes them.
      probs_V = np.zeros(lm.tokenizer.vocab_size)
      for guess in their_guesses:
        probs_V[guess["token"]] = guess["score"]
      probs_V = np.where(ordinary, probs_V, 0.0) / probs_V[ordinary].sum()
      their_top = np.argsort(-probs_V, kind="stable")[:TOP_K]
      our_top = [ids_by_text[t] for t, _ in our_guesses]
      agree &= list(their_top) == our_top
      for (_, p), i in zip(our_guesses, our_top, strict=True):
        max_diff = max(max_diff, abs(p - probs_V[i]))
    same_top += agree
  print(f"\ntop-{TOP_K} ids equal in {same_top}/{len(SENTENCES)}, max |prob diff| {max_diff:.1e}")
  assert same_top == len(SENTENCES) and max_diff < 1e-4, (same_top, max_diff)
  assert tokenizer_lib.MASK_ID in lm.encode(SENTENCES[0])
