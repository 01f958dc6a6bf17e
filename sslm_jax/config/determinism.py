"""config.deterministic: the XLA flag that makes GPU kernels repeat bit for bit, set in time."""

from __future__ import annotations

import os

import ml_collections
from absl import logging

from sslm_jax.config.checks import ConfigError

DETERMINISTIC_XLA_FLAG = "--xla_gpu_deterministic_ops=true"


def request_determinism(c: ml_collections.ConfigDict, environ=os.environ) -> None:
  """With c.deterministic, add DETERMINISTIC_XLA_FLAG to XLA_FLAGS (replacing any other value).

  On GPU the flag makes XLA use deterministic scatters (the embedding gradient), pick kernels
  without timing them, and ask cuDNN for its deterministic attention backward. XLA reads
  XLA_FLAGS once, when the backend starts, so this runs before anything touches a device.
  """
  if not c.deterministic:
    return
  from jax._src import xla_bridge  # no public way to ask whether the backend has started

  if xla_bridge.backends_are_initialized():
    raise ConfigError(
      "deterministic=True must be applied before JAX starts its backend; set it in the config "
      f"file or on the command line, or put {DETERMINISTIC_XLA_FLAG} in XLA_FLAGS yourself."
    )
  name = DETERMINISTIC_XLA_FLAG.split("=")[0]
  kept = [f for f in environ.get("XLA_FLAGS", "").split() if f.split("=")[0] != name]
  environ["XLA_FLAGS"] = " ".join([*kept, DETERMINISTIC_XLA_FLAG])
  logging.info("deterministic=True: XLA_FLAGS=%s", environ["XLA_FLAGS"])
