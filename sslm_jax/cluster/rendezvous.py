"""A roll call before `jax.distributed.initialize`, so a missing process is named, not hung on.

JAX's own join aborts the process after its timeout without saying who is missing. With an
explicit coordinator, process 0 listens one port above the coordinator's, every other process
reports its id there, and process 0 answers with the ids that never arrived.
"""

from __future__ import annotations

import socket
import time

from sslm_jax.errors import SslmError


class JoinError(SslmError, RuntimeError):
  """Not every process arrived in time; the message names the missing ones."""


_FIX = (
  "Start every process with the same --coordinator_address and --num_processes and its own "
  "--process_id, or raise --initialization_timeout."
)


def _split(address: str) -> tuple[str, int]:
  host, port = address.rsplit(":", 1)
  return host, int(port) + 1


def _serve(port: int, num_processes: int, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  arrived, peers = {0}, []
  with socket.create_server(("", port), reuse_port=False) as server:
    while len(arrived) < num_processes and (left := deadline - time.monotonic()) > 0:
      server.settimeout(left)
      try:
        conn, _ = server.accept()
      except TimeoutError:
        break
      conn.settimeout(5)
      arrived.add(int(conn.recv(32).decode()))
      peers.append(conn)
    missing = sorted(set(range(num_processes)) - arrived)
    reply = ("missing " + ",".join(map(str, missing)) if missing else "ok").encode()
    for conn in peers:
      conn.sendall(reply)
      conn.close()
  if missing:
    raise JoinError(
      f"process(es) {missing} of {num_processes} did not arrive within {timeout} s. {_FIX}"
    )


def _report(host: str, port: int, process_id: int, timeout: float) -> None:
  deadline = time.monotonic() + timeout
  while True:
    try:
      conn = socket.create_connection((host, port), timeout=1)
      break
    except OSError:
      if time.monotonic() > deadline:
        raise JoinError(
          f"process {process_id}: the coordinator (process 0) at {host}:{port - 1} did not answer "
          f"within {timeout} s. {_FIX}"
        ) from None
      time.sleep(0.2)
  with conn:
    conn.sendall(str(process_id).encode())
    conn.settimeout(timeout + 10)
    reply = conn.recv(256).decode()
  if reply != "ok":
    ids = reply.removeprefix("missing ")
    raise JoinError(f"process(es) [{ids}] did not arrive within {timeout} s. {_FIX}")


def roll_call(coordinator_address: str, num_processes: int, process_id: int, timeout: float):
  """Return once all processes have reported; raise JoinError naming the absent ones."""
  host, port = _split(coordinator_address)
  if process_id == 0:
    _serve(port, num_processes, timeout)
  else:
    _report(host, port, process_id, timeout)
