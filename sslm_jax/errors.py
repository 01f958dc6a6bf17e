"""The one base class of the errors sslm_jax raises for input a user can fix.

Every error a user can fix (a flag, a config field, a file, a workdir, a cluster that did not
form) derives from `SslmError`, and its message names the problem and the fix. Every command
catches `SslmError` alone and ends with that one line and exit status 2; anything else is a bug
and keeps its traceback. The specific classes live beside the code that raises them (ConfigError
in config/, TokenizerError in tokenizer/, ...), so a caller can still catch one kind.
"""


class SslmError(Exception):
  """Input a user can fix; the message names the problem and the fix."""


class UsageError(SslmError, ValueError):
  """A command line, workdir or input that cannot work."""
