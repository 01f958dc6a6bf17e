"""Stop cleanly when asked: SIGTERM or SIGINT, or a TPU preemption notice on multi-host runs.

The loop checks `should_stop(step)` at each step boundary; when it says yes, the run saves a
checkpoint of that step and exits 0. A second signal exits at once.
"""

from __future__ import annotations

import os
import signal

import jax
from absl import logging
from jax.experimental import multihost_utils


class Preemption:
  def __init__(self):
    self._multihost = jax.process_count() > 1
    self.requested_by: str | None = None
    self._previous: dict = {}
    # With several processes, JAX's preemption notifier owns SIGTERM (Cloud TPU maintenance
    # events arrive that way) and agrees on one step for every process.
    signals = (signal.SIGINT,) if self._multihost else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.requested_by is not None:
      logging.warning("Second %s: exiting now, without a checkpoint.", signal.Signals(signum).name)
      os._exit(128 + signum)
    self.requested_by = signal.Signals(signum).name
    logging.warning(
      "%s received: saving a checkpoint at the next step boundary, then exiting. "
      "Send it again to exit at once.",
      self.requested_by,
    )

  def should_stop(self, step: int) -> bool:
    if self._multihost and multihost_utils.reached_preemption_sync_point(step):
      self.requested_by = self.requested_by or "preemption notice"
    return self.requested_by is not None

  def close(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
