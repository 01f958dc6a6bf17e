"""JAX's coordination service in a process of its own, so that losing process 0 is like losing
any other.

`jax.distributed.initialize` starts the coordination service inside process 0. If process 0
dies, the service dies with it and JAX's client aborts every other process natively at once
(LOG(FATAL) in C++), before join.py's watch can name the loss and the checkpoint to resume
from. Under `own_process()`, process 0 starts the service as a child process instead
(`python -m sslm_jax.cluster.coordinator`, which starts no JAX backend). The child ignores SIGINT
and SIGTERM (a Ctrl-C or a scheduler's signal reaches the whole process group; the trainers stop at
a step and still need it) and ends:
- at once when process 0 shuts JAX down after a clean finish (cluster.leave);
- otherwise (process 0 killed or failed) `heartbeat_timeout + 10` seconds after process 0 is
  gone, so that the survivors' watches see process 0 missing and exit with the usual message.

gRPC shares ports between servers (SO_REUSEPORT), so a rerun started while that grace period
runs waits for the port rather than sharing it with the old service.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import socket
import subprocess
import sys
import time

from absl import logging

_GRACE_S = 10  # beyond the heartbeat timeout, for the survivors' watches to notice and exit
_clean_finish = False


class _Service:
  """What `jax.distributed` keeps as its service: `shutdown()` is all it calls."""

  def __init__(self, child: subprocess.Popen):
    self.child = child

  def shutdown(self):
    with contextlib.suppress(BrokenPipeError):  # the child is gone already
      if _clean_finish:
        self.child.stdin.write(b"stop\n")
      self.child.stdin.close()  # without "stop": the grace period, as if process 0 were killed
    if _clean_finish:
      self.child.wait()


def finished_cleanly() -> None:
  """Every process reached the end: the service may stop when process 0 shuts JAX down."""
  global _clean_finish
  _clean_finish = True


def _port(bind_address: str) -> int:
  return int(bind_address.rsplit(":", 1)[1])


def port_is_listened_on(port: int) -> bool:
  """Whether a server listens on `port` here (connections in TIME_WAIT do not count)."""
  try:
    s = socket.socket(socket.AF_INET6)
  except OSError:  # no IPv6 on this host
    s = socket.socket(socket.AF_INET)
  with s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      return e.errno == errno.EADDRINUSE
  return False


def _wait_for_port(port: int, timeout_s: float) -> None:
  """Until nothing listens on `port` (a previous run's service in its grace period)."""
  deadline, told = time.monotonic() + timeout_s, False
  while port_is_listened_on(port) and time.monotonic() < deadline:
    if not told:
      logging.warning("Port %d is still held (a previous run's coordinator?); waiting.", port)
      told = True
    time.sleep(0.5)


_OPTIONS = ("heartbeat_timeout", "shutdown_timeout", "recoverable")


def _start(bind_address: str, num_processes: int, in_process, **options):
  """Stands in for jaxlib's get_distributed_runtime_service inside jax.distributed.initialize."""
  if set(options) != set(_OPTIONS):  # another JAX asks for more: keep its service in process 0
    logging.warning("Coordination service options %s: kept in process 0.", sorted(options))
    return in_process(bind_address, num_processes, **options)
  _wait_for_port(_port(bind_address), options["heartbeat_timeout"] + 2 * _GRACE_S)
  args = [bind_address, num_processes, *(int(options[k]) for k in _OPTIONS)]
  child = subprocess.Popen(
    [sys.executable, "-m", "sslm_jax.cluster.coordinator", *map(str, args)],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
  )
  started = child.stdout.readline() == b"serving\n"
  child.stdout.close()
  if not started:  # its own error is on stderr already
    raise RuntimeError(f"the coordination service did not start (exit {child.wait()}).")
  return _Service(child)


@contextlib.contextmanager
def own_process():
  """Within: jax.distributed.initialize starts process 0's service as a child process."""
  from jax._src import distributed as jax_distributed

  jaxlib = getattr(jax_distributed, "_jax", None)
  original = getattr(jaxlib, "get_distributed_runtime_service", None)
  if original is None:  # another JAX builds its service elsewhere: keep it in process 0
    logging.warning("This JAX starts its coordination service elsewhere: kept in process 0.")
    yield
    return
  jaxlib.get_distributed_runtime_service = functools.partial(_start, in_process=original)
  try:
    yield
  finally:
    jaxlib.get_distributed_runtime_service = original


def _serve(bind_address, num_processes, heartbeat_timeout, shutdown_timeout, recoverable):
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  from jax._src.lib import _jax

  service = _jax.get_distributed_runtime_service(
    bind_address,
    int(num_processes),
    heartbeat_timeout=int(heartbeat_timeout),
    shutdown_timeout=int(shutdown_timeout),
    recoverable=bool(int(recoverable)),
  )
  os.write(1, b"serving\n")
  if sys.stdin.buffer.readline() != b"stop\n":  # process 0 is gone without a clean finish
    time.sleep(int(heartbeat_timeout) + _GRACE_S)
  service.shutdown()


if __name__ == "__main__":
  _serve(*sys.argv[1:])
