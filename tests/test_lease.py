"""One run per workdir: the lease refuses a second live run and never blocks a dead one's rerun."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from test_main import ROOT
from test_multiprocess import FLAGS as MULTI_FLAGS
from test_multiprocess import _env as multi_env
from test_multiprocess import _free_port
from test_resilience import _cmd, _env, _records, _run, _start, _wait_for_step

from sslm_jax.cluster import lease

HOLDER = """
import sys
from sslm_jax.cluster import lease
held = lease.acquire(sys.argv[1], float(sys.argv[2]), print, settle_s=float(sys.argv[3]))
assert "tensorflow" not in sys.modules  # the lease is part of the TensorFlow-free core
print("held", flush=True)
sys.stdin.read()  # hold until the test closes our stdin
held.release()
"""


def _holder(workdir, timeout=60.0, settle_s=0.0):
  """A separate process that takes the lease and holds it until its stdin is closed."""
  proc = subprocess.Popen(
    [sys.executable, "-c", HOLDER, str(workdir), str(timeout), str(settle_s)],
    cwd=ROOT,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  return proc


def _lease_file(workdir):
  return os.path.join(workdir, lease.LEASE_NAME)


def _write_record(workdir, host, pid, age_s, timeout):
  now = time.time()
  record = dict(token=uuid.uuid4().hex, host=host, pid=pid, since=now - age_s - 60)
  record.update(heartbeat=now - age_s, timeout=timeout)
  with open(_lease_file(workdir), "w") as f:
    json.dump(record, f)
  return record


def _dead_pid():
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def _acquire(workdir, timeout=60.0, lost=None):
  return lease.acquire(str(workdir), timeout, (lost if lost is not None else []).append, 0.0)


def test_a_held_workdir_is_refused_naming_host_pid_and_since(tmp_path):
  holder = _holder(tmp_path)
  try:
    assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    with open(_lease_file(tmp_path), "rb") as f:
      before = f.read()
    with pytest.raises(lease.LeaseHeld) as refused:
      _acquire(tmp_path)
    message = str(refused.value)
    assert "\n" not in message
    assert f"host {socket.gethostname()}, pid {holder.pid}, since 20" in message
    assert " UTC, last heartbeat 0 s ago" in message and _lease_file(tmp_path) in message
    with open(_lease_file(tmp_path), "rb") as f:
      assert f.read() == before  # the refused run wrote nothing
  finally:
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
  assert not os.path.exists(_lease_file(tmp_path))  # released on close
  _acquire(tmp_path).release()


def test_a_local_holder_whose_pid_is_gone_is_stale_at_once(tmp_path):
  _write_record(tmp_path, socket.gethostname(), _dead_pid(), age_s=0, timeout=3600)
  taken = _acquire(tmp_path)
  try:
    with open(_lease_file(tmp_path)) as f:
      assert json.load(f)["pid"] == os.getpid()
  finally:
    taken.release()


def test_a_holder_on_another_host_is_stale_only_after_its_own_timeout(tmp_path):
  # Shared storage seen from two hosts: the pid means nothing here, only the heartbeat's age.
  _write_record(tmp_path, "other-host", pid=os.getpid(), age_s=20, timeout=30)
  with pytest.raises(lease.LeaseHeld, match="host other-host, .*lease expires in 10 s"):
    _acquire(tmp_path, timeout=5)  # our shorter timeout does not shorten the holder's
  _write_record(tmp_path, "other-host", pid=os.getpid(), age_s=31, timeout=30)
  _acquire(tmp_path).release()


def test_the_heartbeat_keeps_the_lease_fresh(tmp_path, monkeypatch):
  lost = []
  held = _acquire(tmp_path, timeout=0.4, lost=lost)
  try:
    time.sleep(1.5)  # several timeouts
    monkeypatch.setattr(lease.socket, "gethostname", lambda: "another-host")
    with open(_lease_file(tmp_path)) as f:
      record = json.load(f)
    assert time.time() - record["heartbeat"] < 0.4 and not lease.is_stale(record)
    with pytest.raises(lease.LeaseHeld):
      _acquire(tmp_path)
    assert not lost
  finally:
    held.release()
  assert not held._thread.is_alive() and not os.path.exists(_lease_file(tmp_path))


def test_a_run_whose_lease_was_taken_over_is_told_and_keeps_off_it(tmp_path):
  lost = []
  held = _acquire(tmp_path, timeout=0.4, lost=lost)
  other = _write_record(tmp_path, "other-host", pid=4321, age_s=0, timeout=60)
  deadline = time.monotonic() + 5
  while not lost and time.monotonic() < deadline:
    time.sleep(0.05)
  held.release()
  assert len(lost) == 1 and "another took over (host other-host, pid 4321)" in lost[0]
  with open(_lease_file(tmp_path)) as f:
    assert json.load(f)["token"] == other["token"]  # neither renewed nor deleted by the loser


def test_a_run_that_wrote_while_we_settled_wins(tmp_path):
  # Another run read the old (absent) lease before ours landed and wrote its own after it.
  racer = threading.Timer(0.2, _write_record, (tmp_path, "other-host", 99, 0, 60))
  racer.start()
  with pytest.raises(lease.LeaseHeld, match="host other-host, pid 99"):
    lease.acquire(str(tmp_path), 60, [].append, settle_s=1.0)
  racer.join()


def test_of_runs_started_together_exactly_one_holds(tmp_path):
  holders = [_holder(tmp_path, settle_s=1.0) for _ in range(3)]
  try:
    outcomes = [h.stdout.readline().strip() for h in holders]
  finally:
    for h in holders:
      h.stdin.close()
      h.wait(timeout=30)
  assert outcomes.count("held") == 1, [h.stderr.read()[-500:] for h in holders]


# End to end: the command line, a first run training, a second run on the same workdir.


def _last_line(stderr):
  return stderr.strip().splitlines()[-1]


def _untouched(workdir):
  """Files a refused run must leave alone (the first run writes them once, at its start)."""
  names = ["config.json", "tokenizer.model"]
  names += [os.path.join("data", n) for n in os.listdir(os.path.join(workdir, "data"))]
  return {n: os.stat(os.path.join(workdir, n)).st_mtime_ns for n in names}


@pytest.mark.slow
def test_a_second_run_on_a_live_workdir_exits_2_and_the_first_finishes(tmp_path):
  workdir = tmp_path / "run"
  first = _start(workdir, steps=100_000)
  try:
    _wait_for_step(workdir, 2, first)
    files, token = _untouched(workdir), json.load(open(_lease_file(workdir)))["token"]
    t0 = time.monotonic()
    second = subprocess.run(
      _cmd(workdir, 100_000), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120
    )
    elapsed = time.monotonic() - t0
    print(f"second run refused in {elapsed:.1f} s")
    assert second.returncode == 2, second.stderr[-3000:]
    assert _last_line(second.stderr).startswith(
      f"sslm_jax: error: workdir {workdir} is in use by another run "
      f"(host {socket.gethostname()}, pid {first.pid}, since 20"
    )
    assert "Traceback" not in second.stderr and "Compiled the train step" not in second.stderr
    assert elapsed < 60
    assert _untouched(workdir) == files
    assert json.load(open(_lease_file(workdir)))["token"] == token
    assert first.poll() is None, "the first run died"
  finally:
    first.send_signal(signal.SIGTERM)  # a preemption: checkpoint, release the lease, exit 0
    rc = first.wait(timeout=120)
  assert rc == 0, first.stderr_text()[-3000:]
  assert not os.path.exists(_lease_file(workdir))
  stopped = _records(workdir)[-1]["step"]
  assert not [d for d in os.listdir(workdir / "checkpoints") if "tmp" in d]
  resumed = _run(workdir, steps=stopped + 2)
  assert f"Resuming from the checkpoint at step {stopped}" in resumed.stderr
  steps = [r["step"] for r in _records(workdir)]
  assert steps == list(range(stopped + 3)), "two runs wrote one metrics file"


@pytest.mark.slow
def test_a_rerun_after_a_sigkilled_run_is_not_blocked(tmp_path):
  workdir = tmp_path / "run"
  killed = _start(workdir, steps=100_000)
  _wait_for_step(workdir, 2, killed)
  killed.kill()
  killed.wait(timeout=30)
  assert json.load(open(_lease_file(workdir)))["pid"] == killed.pid  # left behind
  t0 = time.monotonic()
  target = _records(workdir)[-1]["step"] + 2
  rerun = _run(workdir, steps=target)  # asserts exit 0
  assert f"Taking over the stale lease of host {socket.gethostname()}, pid {killed.pid}" in (
    rerun.stderr
  )
  assert _records(workdir)[-1]["step"] == target
  print(f"rerun after SIGKILL finished in {time.monotonic() - t0:.1f} s")
  assert not os.path.exists(_lease_file(workdir))


@pytest.mark.slow
def test_a_two_process_run_on_a_held_workdir_is_refused_on_both(tmp_path):
  holder = _holder(tmp_path)
  assert holder.stdout.readline().strip() == "held", holder.stderr.read()
  port = _free_port()
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "sslm_jax.main", *MULTI_FLAGS, f"--workdir={tmp_path}"]
      + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
      + ["--initialization_timeout=60"],
      cwd=ROOT,
      env=multi_env(1),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    results = [(p.communicate(timeout=150)[1], p.returncode) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    holder.stdin.close()
    holder.wait(timeout=30)
  for stderr, rc in results:
    assert rc == 2, stderr[-3000:]
    assert _last_line(stderr) == _last_line(results[0][0])
    assert f"is in use by another run (host {socket.gethostname()}, pid {holder.pid}" in stderr
  assert os.listdir(tmp_path) == []  # the holder released; the refused run wrote nothing
