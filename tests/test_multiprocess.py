"""Several processes on one machine, joined on 127.0.0.1 through launch/local_multiprocess.sh."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_main import SMALL

ROOT = os.path.join(os.path.dirname(__file__), "..")
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")
FLAGS = (
  ["--config=configs/gpt_tiny.py"]
  + [f for f in SMALL if not f.startswith("--config.mesh")]
  + [
    "--config.mesh.data=-1",
    "--config.sample_at_end=False",
    "--config.opt.decay=constant",  # stopping at step 4 or 6 then trains the same 4 steps
  ]
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", SSLM_PORT=str(_free_port()), PYTHON=sys.executable)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _launch(num_processes, devices, workdir, *extra, timeout=420):
  return subprocess.run(
    ["bash", LAUNCH, str(num_processes), str(devices), *FLAGS, f"--workdir={workdir}", *extra],
    cwd=ROOT,
    env=_env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _single(workdir, *extra, timeout=300, devices=8):
  return subprocess.run(
    [sys.executable, "-m", "sslm_jax.main", *FLAGS, f"--workdir={workdir}", *extra],
    cwd=ROOT,
    env=_env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train_loss"] for r in map(json.loads, f) if "train_loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """Losses of one process x 8 devices for 6 steps: what every other topology must reproduce."""
  workdir = tmp_path_factory.mktemp("straight")
  result = _single(workdir, "--config.num_train_steps=6")
  assert result.returncode == 0, result.stderr[-3000:]
  return _losses(workdir)


def test_two_processes_match_one_and_checkpoints_cross_topologies(tmp_path, straight):
  t0 = time.perf_counter()
  two = _launch(2, 4, tmp_path, "--config.num_train_steps=4")
  wall = time.perf_counter() - t0
  assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
  print(f"2 processes x 4 devices, 4 steps: {wall:.1f} s wall")
  multi = _losses(tmp_path)
  assert sorted(multi) == [1, 2, 3, 4]
  with open(tmp_path / "metrics.jsonl") as f:
    logged = [r for r in map(json.loads, f) if "train_loss" in r]
  # Goodput names the process that waited longest for input; process 0 writes its own wait too.
  assert all(r["slowest_data_process"] in (0, 1) for r in logged)
  assert all(r["time_data_max_s"] >= r["time_data_s"] for r in logged)
  np.testing.assert_allclose([multi[s] for s in multi], [straight[s] for s in multi], rtol=1e-5)

  # The 2-process checkpoint at step 4 resumes in 1 process x 8 devices.
  resumed = _single(tmp_path, "--config.num_train_steps=6")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming from the checkpoint at step 4" in resumed.stderr
  after = _losses(tmp_path)
  np.testing.assert_allclose([after[5], after[6]], [straight[5], straight[6]], rtol=1e-5)


def test_elastic_resume_8_devices_then_4_then_2_processes(tmp_path, straight):
  assert _single(tmp_path, "--config.num_train_steps=2").returncode == 0
  four = _single(tmp_path, "--config.num_train_steps=4", devices=4)
  assert four.returncode == 0 and "checkpoint at step 2" in four.stderr, four.stderr[-3000:]
  two = _launch(2, 4, tmp_path, "--config.num_train_steps=6")
  assert two.returncode == 0, (two.stdout + two.stderr)[-4000:]
  elastic = _losses(tmp_path)
  assert sorted(elastic) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose(
    [elastic[s] for s in range(1, 7)], [straight[s] for s in range(1, 7)], rtol=1e-5
  )


def test_a_missing_peer_fails_fast_and_names_it(tmp_path):
  port = _free_port()
  t0 = time.perf_counter()
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "sslm_jax.main",
      "--config=configs/gpt_tiny.py",
      f"--workdir={tmp_path}",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=3",
      "--process_id=0",
      "--initialization_timeout=5",
    ],
    cwd=ROOT,
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=120,
  )
  elapsed = time.perf_counter() - t0
  assert result.returncode == 2
  assert "process(es) [1, 2] of 3 did not arrive within 5 s" in result.stderr
  assert elapsed < 60
  assert not os.listdir(tmp_path)
