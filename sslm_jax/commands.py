"""How the commands over a trained model (generate, fill_mask, score, predict) and the data
commands (prepare, augment) run: absl flags, and one line naming the problem and the fix for a
bad flag, workdir or input (any errors.SslmError)."""

from __future__ import annotations

import sys

from sslm_jax.cluster import join as cluster
from sslm_jax.errors import SslmError


def run_command(main) -> None:
  """absl's app.run for a command: a bad flag, or any errors.SslmError (a bad workdir or input),
  ends the command with one line naming the problem and the fix, and exit status 2."""
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
    except SslmError as e:
      fail(str(e))

  app.run(guarded, flags_parser=parse)
