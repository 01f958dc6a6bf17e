"""Preemption and hard kills: a resumed run logs exactly what an uninterrupted one does."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from test_main import ROOT, SMALL

FLAGS = ["--config=configs/gpt_tiny.py", *SMALL, "--config.sample_at_end=False"]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _cmd(workdir, steps):
  return [
    sys.executable,
    "-m",
    "sslm_jax.main",
    *FLAGS,
    f"--workdir={workdir}",
    f"--config.num_train_steps={steps}",
  ]


def _run(workdir, steps):
  result = subprocess.run(
    _cmd(workdir, steps), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _start(workdir, steps):
  """A background run whose stderr goes to a file (a pipe nobody reads fills up and blocks it)."""
  log = open(f"{workdir}.stderr.{time.monotonic_ns()}.log", "w+")  # beside the workdir
  proc = subprocess.Popen(
    _cmd(workdir, steps), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=log, text=True
  )
  proc.stderr_text = lambda: (log.flush(), log.seek(0), log.read())[-1]
  return proc


def _records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _wait_for_step(workdir, step, proc, timeout=240):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(r["step"] >= step for r in _records(workdir)):
      return
    assert proc.poll() is None, proc.stderr_text()[-3000:]
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached")


def _exact(records):
  keys = ("step", "train_loss", "grad_norm", "learning_rate", "eval_loss")
  return [{k: r.get(k) for k in keys} for r in records]


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits_0(tmp_path):
  proc = _start(tmp_path, steps=100_000)
  _wait_for_step(tmp_path, 3, proc)
  sent = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  rc = proc.wait(timeout=60)
  elapsed = time.monotonic() - sent
  stderr = proc.stderr_text()
  assert rc == 0, stderr[-3000:]
  print(f"SIGTERM to exit: {elapsed:.2f} s")
  stopped = _records(tmp_path)[-1]["step"]
  assert f"Stopped at step {stopped}" in stderr
  newest = max(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert newest == stopped
  again = _run(tmp_path, steps=stopped + 2)
  assert f"Resuming from the checkpoint at step {stopped}" in again.stderr
  assert [r["step"] for r in _records(tmp_path)][-2:] == [stopped + 1, stopped + 2]


@pytest.mark.slow
def test_sigkill_at_any_moment_then_rerun_matches_uninterrupted_bit_for_bit(tmp_path):
  steps = 30
  _run(tmp_path / "straight", steps)
  reference = _exact(_records(tmp_path / "straight"))
  workdir = tmp_path / "killed"
  during_save = 0
  # Checkpoints every 2 steps, saved asynchronously: some kills land in the middle of a save.
  for kill_after_step in (2, 8, 15, 24):
    proc = _start(workdir, steps)
    _wait_for_step(workdir, kill_after_step, proc)
    proc.kill()
    proc.wait(timeout=30)
    assert _records(workdir)[-1]["step"] < steps, "the run finished before it was killed"
    during_save += any("tmp" in d for d in os.listdir(workdir / "checkpoints"))
  print(f"4 kills, {during_save} of them during a save")
  _run(workdir, steps)
  assert _exact(_records(workdir)) == reference


def test_first_signal_requests_a_stop_and_a_second_exits_at_once(monkeypatch):
  from sslm_jax.cluster import preemption

  exits = []
  monkeypatch.setattr(preemption.os, "_exit", exits.append)
  stopper = preemption.Preemption()
  try:
    assert not stopper.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # Python runs the handler between bytecodes of the main thread
    assert stopper.should_stop(2) and stopper.requested_by == "SIGTERM" and not exits
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)
    assert exits == [128 + signal.SIGINT]
  finally:
    stopper.close()
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.fixture
def small_disk(tmp_path):
  """A 64 MiB tmpfs, unmounted afterwards. Mounting needs root (CI runs as root); elsewhere the
  test is skipped with the reason rather than failing on the mount."""
  mount = tmp_path / "disk"
  mount.mkdir()
  mounted = subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True
  )
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(small_disk):
  workdir = small_disk / "run"
  _run(workdir, steps=2)
  filler = small_disk / "filler"
  free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
  with open(filler, "wb") as f:  # leave room for metrics lines, not for a checkpoint
    f.write(b"\0" * (free - 64 * 1024))
  # Without the compilation cache, whose entry would take the room left for the metrics lines.
  no_cache = [*_cmd(workdir, 4), "--compilation_cache_dir=none"]
  full = subprocess.run(no_cache, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert full.returncode == 2, full.stderr[-3000:]
  last_line = full.stderr.strip().splitlines()[-1]  # Orbax logs its own trace before it
  assert (
    last_line.startswith("sslm_jax: error: saving a checkpoint")
    and "(step 2) is intact" in last_line
  )
  filler.unlink()
  resumed = _run(workdir, steps=4)
  assert "Resuming from the checkpoint at step 2" in resumed.stderr
  assert _records(workdir)[-1]["step"] == 4
