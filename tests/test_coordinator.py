"""Losing process 0, which hosts JAX's coordination service, is reported like losing any other.

Two small processes join through cluster.join on 127.0.0.1 (no training, no devices used), so
each case takes seconds.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

from sslm_jax.cluster import coordinator

pytestmark = pytest.mark.slow  # several Python processes, each importing JAX

ROOT = os.path.join(os.path.dirname(__file__), "..")
HEARTBEAT_S = 4

# Joins, says so, then waits; leaves cleanly (exit 0) once the file named by argv[3] exists.
MEMBER = f"""
import os, sys, time
from sslm_jax.cluster import join as cluster
port, process_id, done = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cluster.join(f"127.0.0.1:{{port}}", 2, process_id, initialization_timeout=60,
             heartbeat_timeout={HEARTBEAT_S})
print("joined", flush=True)
while not os.path.exists(done):
  time.sleep(0.1)
cluster.leave()
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(tmp_path):
  port, done = _free_port(), tmp_path / "done"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", MEMBER, str(port), str(i), str(done)],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  for proc in procs:
    assert proc.stdout.readline() == "joined\n", proc.communicate()[1][-3000:]
  return procs, port, done


def test_losing_process_0_ends_the_others_with_the_resume_message(tmp_path):
  procs, port, _ = _start(tmp_path)
  try:
    procs[0].kill()
    killed = time.monotonic()
    _, err = procs[1].communicate(timeout=60)
    elapsed = time.monotonic() - killed
  finally:
    for proc in procs:
      proc.kill()
  last = err.strip().splitlines()[-1]
  print(f"process 0 killed -> process 1 exited {procs[1].returncode} after {elapsed:.1f} s")
  assert procs[1].returncode == 2, err[-3000:]
  assert last == (
    "sslm_jax: error: process(es) [0] of 2 stopped answering before training started (killed, "
    "crashed or its host lost); process 1 stops too. Rerun the same command to start again "
    "from step 0 (no checkpoint was saved yet)."
  ), err[-3000:]
  assert elapsed < HEARTBEAT_S + 15
  # The service outlived process 0 only for its grace period: the port is free for a rerun.
  deadline = time.monotonic() + HEARTBEAT_S + 20
  while coordinator.port_is_listened_on(port) and time.monotonic() < deadline:
    time.sleep(0.5)
  assert not coordinator.port_is_listened_on(port)


def test_a_clean_finish_stops_the_service_at_once(tmp_path):
  procs, port, done = _start(tmp_path)
  done.touch()
  try:
    results = [proc.communicate(timeout=60) for proc in procs]
  finally:
    for proc in procs:
      proc.kill()
  assert [proc.returncode for proc in procs] == [0, 0], results[0][1][-2000:]
  assert not coordinator.port_is_listened_on(port)  # no grace period after a clean finish
