"""Fill in each [MASK] of a text with a trained masked_lm's (BERT's or ModernBERT's) likeliest
tokens.

  python -m sslm_jax.fill_mask --workdir=runs/bert_tiny "for i in [MASK](10):"

Several texts may follow one another. --json prints one object per text: {"text", "filled"
(each [MASK] replaced by the top guess), "masks": per [MASK] a list of {"token", "probability"}}.
"""

from __future__ import annotations

import json

from absl import flags

from sslm_jax import commands
from sslm_jax.checkpoints import restore
from sslm_jax.errors import UsageError
from sslm_jax.inference import language_model as api

flags.DEFINE_string("workdir", None, "Workdir of a masked_lm (BERT or ModernBERT) training run.")
flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
flags.DEFINE_integer("top_k", 5, "Guesses to show per [MASK].")
flags.DEFINE_bool("json", False, "One JSON object per line instead of text for people.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def filled(text: str, guesses: list[list[tuple[str, float]]]) -> str:
  """`text` with each [MASK] replaced by its top guess (whose leading space the text has)."""
  parts = text.split(api.MASK_TEXT)
  out = parts[0]
  for part, per_mask in zip(parts[1:], guesses, strict=True):
    token = per_mask[0][0]
    out += (token[1:] if token.startswith(" ") and (not out or out.endswith(" ")) else token) + part
  return out


def main(argv):
  texts = argv[1:]
  if not texts:
    raise UsageError(
      'give a text with [MASK]: python -m sslm_jax.fill_mask --workdir=W "Machine learning is '
      'an [MASK] of artificial intelligence."'
    )
  run = restore.read_workdir(FLAGS.workdir, FLAGS.step)
  if not run.fine_tuned and run.config.objective != "masked_lm":
    raise UsageError(
      f"{FLAGS.workdir} holds a {api.model_kind(run.config)} model, which cannot fill in a "
      "[MASK]; give fill_mask a masked_lm (BERT or ModernBERT) workdir, or use python -m "
      "sslm_jax.generate with this one."
    )
  for text in texts:  # every text checked before the model loads
    if api.MASK_TEXT not in text:
      raise UsageError(
        f"{text!r} has no [MASK]; write [MASK] where a token should be filled in, e.g. "
        "'Machine learning is an [MASK] of artificial intelligence.'"
      )
  lm = api.from_saved(run)  # refuses a fine-tuning workdir
  results = [lm.fill_mask(text, top_k=FLAGS.top_k) for text in texts]
  for text, guesses in zip(texts, results, strict=True):
    if FLAGS.json:
      masks = [[{"token": t, "probability": p} for t, p in per_mask] for per_mask in guesses]
      record = {"text": text, "filled": filled(text, guesses), "masks": masks}
      print(json.dumps(record, ensure_ascii=False))
      continue
    print(text)
    for i, per_mask in enumerate(guesses, start=1):
      print(f"  [MASK] {i}: " + ", ".join(f"{t!r} {p:.3f}" for t, p in per_mask))
    print(f"  filled: {filled(text, guesses)}")


if __name__ == "__main__":
  commands.run_command(main)
