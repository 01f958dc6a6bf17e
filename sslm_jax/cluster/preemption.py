"""Stop cleanly when asked: SIGTERM or SIGINT, or a TPU preemption notice on multi-host runs.

The loop checks `should_stop(step)` at each step boundary; when it says yes, the run saves a
checkpoint of that step and exits 0. A second SIGINT (or, with one process, SIGTERM) exits at once.

With several processes every process must stop at the same step, or the ones that stop wait in
the checkpoint's barrier while the others wait in the next step's collectives. JAX's preemption
sync manager agrees on that step: its notifier owns SIGTERM (Cloud TPU maintenance events arrive
that way), tells every process through the coordination service, and `reached_preemption_sync_point`
then says yes on all of them at one step. It costs a local flag check per step, not a host sync.
It listens to SIGTERM only, so a SIGINT (Ctrl-C) here is handed to it as a SIGTERM to this process.
"""

from __future__ import annotations

import os
import signal

import jax
from absl import logging
from jax.experimental import multihost_utils

from sslm_jax.cluster import join as cluster


class Preemption:
  def __init__(self):
    self._multihost = jax.process_count() > 1
    self.requested_by: str | None = None
    self._previous: dict = {}
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
      "%s received: saving a checkpoint at the next step boundary%s, then exiting. "
      "Send it again to exit at once.",
      self.requested_by,
      " all processes agree on" if self._multihost else "",
    )
    if self._multihost:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier, which tells the other processes

  def should_stop(self, step: int) -> bool:
    cluster.note_step(step)
    if not self._multihost:
      return self.requested_by is not None
    if multihost_utils.reached_preemption_sync_point(step):
      self.requested_by = self.requested_by or "a stop request on another process"
      return True
    return False

  def close(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
