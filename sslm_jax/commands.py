"""How the commands over inference/language_model.py (generate, fill_mask, score) run: absl flags, and one line
naming the problem and the fix for a bad flag, workdir or input."""

from __future__ import annotations

import sys

from sslm_jax.checkpoints.restore import UsageError
from sslm_jax.cluster import join as cluster
from sslm_jax.tokenizer import sentencepiece as tok


def run_command(main, errors: tuple[type[Exception], ...] = ()) -> None:
  """absl's app.run for the commands over inference/language_model.py: a bad flag, workdir or input ends the
  command with one line naming the problem and the fix, and exit status 2. `errors`: more
  exception types that end the command the same way."""
  from absl import app, flags, logging

  def fail(message: str):
    sys.stdout.flush()
    print(f"sslm_jax: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(f"{e}")

  def guarded(argv):
    logging.set_verbosity(logging.WARNING)  # Orbax logs ~15 INFO lines per restore
    cluster.skip_tpu_without_chips()
    try:
      main(argv)
    except (UsageError, tok.TokenizerError, *errors) as e:
      fail(str(e))

  app.run(guarded, flags_parser=parse)
