"""How likely a trained model finds texts: log-probability per token, nats, bits per byte.

  python -m sslm_jax.score --workdir=runs/gpt_tiny "import os" --files=a.txt,b.txt

GPT: log p(token | the text before it); texts longer than the model's positions are read in
overlapping windows. BERT: the pseudo-log-likelihood (each token masked in turn); a text must fit
the model's positions. Each file is one text. --json prints one object per text.
"""

from __future__ import annotations

import json

from absl import flags
from etils import epath

from sslm_jax import commands
from sslm_jax.errors import UsageError
from sslm_jax.inference import language_model as api

flags.DEFINE_string("workdir", None, "Workdir of a training run (GPT or BERT).")
flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the newest).")
flags.DEFINE_list("files", [], "UTF-8 files to score, each as one text (comma-separated).")
flags.DEFINE_bool("tokens", False, "Also print each token with its log-probability.")
flags.DEFINE_bool("json", False, "One JSON object per line instead of text for people.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def _read(path: str) -> str:
  p = epath.Path(path)
  if not p.exists():
    raise UsageError(f"--files names {path}, which does not exist; fix the path.")
  return p.read_bytes().decode("utf-8", errors="replace")


def main(argv):
  sources = [("text", t) for t in argv[1:]] + [("file", f) for f in FLAGS.files]
  if not sources:
    raise UsageError(
      'give texts or files: python -m sslm_jax.score --workdir=W "some text" --files=a.txt'
    )
  texts = [text if kind == "text" else _read(text) for kind, text in sources]
  lm = api.load(FLAGS.workdir, FLAGS.step)  # a pretraining workdir; a fine-tuning one is refused
  pseudo = lm.config.objective == "masked_lm"
  for (kind, name), score in zip(sources, lm.score(texts), strict=True):
    if FLAGS.json:
      record = {
        kind: name,
        "num_tokens": len(score.token_ids),
        "total_nats": score.total_nats,
        "num_bytes": score.num_bytes,
        "bits_per_byte": score.bits_per_byte,
        "pseudo_log_likelihood": pseudo,
        "tokens": score.tokens,
        "log_probs": score.log_probs,
      }
      print(json.dumps(record, ensure_ascii=False))
      continue
    shown = name if kind == "file" else repr(name if len(name) <= 60 else name[:57] + "...")
    print(
      f"{shown}: {len(score.token_ids)} tokens, {score.total_nats:.3f} nats, "
      f"{score.bits_per_byte:.4f} bits/byte" + (" (pseudo-log-likelihood)" if pseudo else "")
    )
    if FLAGS.tokens:
      for token, log_prob in zip(score.tokens, score.log_probs, strict=True):
        print(f"  {log_prob:9.4f}  {token!r}")


if __name__ == "__main__":
  commands.run_command(main)
