"""One run per workdir: a lease file with a heartbeat, on local disks, NFS and object stores alike.

The holder writes `<workdir>/lease.json` (a random token, its host, pid and start time) and
rewrites it every timeout/4 seconds. Another run refuses a workdir whose lease is fresh. A lease
is stale, and taken over, once its heartbeat is older than the timeout its holder declared, or at
once when its holder ran on this host and that pid is gone (a crash never blocks its own rerun).

Object stores have no locks and no atomic create, so two runs that start together both write
their lease, wait `settle_s` and read it back: only the last writer finds its own token. The
heartbeat reads back too, so a run that stalled past its timeout and lost the lease stops.
Clocks of the hosts are assumed to agree to well within the timeout.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from absl import logging
from etils import epath

from sslm_jax.errors import SslmError

LEASE_NAME = "lease.json"


class WorkdirError(SslmError, ValueError):
  """A workdir that cannot be written; the message names the reason and the fix."""


def check_writable(workdir: str) -> None:
  """Create the workdir if needed and prove a file can be written there (local or remote)."""
  probe = epath.Path(workdir) / ".sslm_jax_write_probe"
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except Exception as e:  # OSError locally; on gs:// tf.errors.OpError or the storage client's own
    reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
    raise WorkdirError(
      f"workdir {workdir} is not writable ({reason}); choose a --workdir you can write."
    ) from e


class LeaseHeld(SslmError, RuntimeError):
  """Another live run holds the workdir; the message names it."""


def _read(path: epath.Path) -> dict | None:
  """The lease record at `path`, or None where there is none or it cannot be parsed."""
  try:
    record = json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    logging.warning("Ignoring an unreadable lease %s: %s", path, e)
    return None
  return record if isinstance(record, dict) and "token" in record else None


def _write(path: epath.Path, record: dict) -> None:
  text = json.dumps(record)
  if "://" in os.fspath(path):
    path.write_text(text)  # an object store replaces an object whole
    return
  temporary = path.with_name(f"{path.name}.{record['token']}.tmp")
  temporary.write_text(text)
  temporary.replace(path)  # readers never see a half-written file


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def is_stale(record: dict, now: float | None = None) -> bool:
  """True when the holder is gone: its heartbeat is too old, or its local pid has exited."""
  now = time.time() if now is None else now
  if now - record["heartbeat"] > record["timeout"]:
    return True
  if record["host"] == socket.gethostname():
    # Our own pid in a lease we have not taken yet is a previous run in a reused pid namespace.
    return record["pid"] == os.getpid() or not _pid_alive(record["pid"])
  return False


def describe(record: dict, path: epath.Path, now: float | None = None) -> str:
  now = time.time() if now is None else now
  since = datetime.datetime.fromtimestamp(record["since"], datetime.UTC)
  beat = max(0, round(now - record["heartbeat"]))
  expires = max(0, round(record["heartbeat"] + record["timeout"] - now))
  return (
    f"workdir {path.parent} is in use by another run (host {record['host']}, pid {record['pid']}, "
    f"since {since:%Y-%m-%d %H:%M:%S} UTC, last heartbeat {beat} s ago). Wait for it to finish "
    f"or stop it; if it is gone, its lease expires in {expires} s, or delete {path}."
  )


class Lease:
  """A lease this process holds; a daemon thread keeps it fresh until `release()`."""

  def __init__(self, path: epath.Path, record: dict, on_lost: Callable[[str], None]):
    self.path, self.record, self._on_lost = path, record, on_lost
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="sslm_jax-lease", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.record["timeout"] / 4):
      try:
        current = _read(self.path)
        if current is not None and current["token"] != self.record["token"]:
          self._on_lost(
            f"lost the lease on {self.path.parent}: this run stalled past its timeout and "
            f"another took over (host {current['host']}, pid {current['pid']}). Stopping so as "
            "not to write over it."
          )
          return
        self.record["heartbeat"] = time.time()
        _write(self.path, self.record)
      except Exception as e:  # a storage hiccup; the next beat retries
        logging.warning("Could not renew the lease %s: %s", self.path, e)

  def release(self) -> None:
    """Stop the heartbeat and delete the lease if it is still ours."""
    self._stop.set()
    self._thread.join()
    try:
      current = _read(self.path)
      if current is not None and current["token"] == self.record["token"]:
        self.path.unlink()
    except OSError as e:
      logging.warning("Could not remove the lease %s: %s", self.path, e)


def acquire(
  workdir: str,
  timeout: float,
  on_lost: Callable[[str], None],
  settle_s: float = 1.0,
) -> Lease:
  """Take the workdir's lease, or raise LeaseHeld naming the live run that holds it.

  `on_lost(message)` is called from the heartbeat thread if another run takes the lease over.
  Raises OSError if the workdir cannot be written.
  """
  if timeout <= 0:
    raise ValueError(f"lease timeout must be positive, got {timeout}")
  path = epath.Path(workdir) / LEASE_NAME
  path.parent.mkdir(parents=True, exist_ok=True)
  held = _read(path)
  if held is not None and not is_stale(held):
    raise LeaseHeld(describe(held, path))
  if held is not None:
    logging.warning("Taking over the stale lease of host %s, pid %s.", held["host"], held["pid"])
  now = time.time()
  record = {
    "token": uuid.uuid4().hex,
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "since": now,
    "heartbeat": now,
    "timeout": timeout,
  }
  _write(path, record)
  time.sleep(settle_s)  # a run that read the old lease before we wrote has written by now
  held = _read(path)
  if held is not None and held["token"] != record["token"]:
    raise LeaseHeld(describe(held, path))
  return Lease(path, record, on_lost)
