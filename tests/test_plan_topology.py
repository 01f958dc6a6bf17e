"""`--plan --topology`: compiling for a named TPU slice on this CPU machine with libtpu.

The compiles need the `libtpu` wheel, which `pip install -e '.[test]'` installs on x86-64
Linux; there, without it these tests fail and say so (CI must never skip them), elsewhere they skip.
Each TPU compile costs tens of CPU seconds, so the shipped base configs are compiled once each
without the step-cost copies, and the cost arithmetic is checked on a small model.
"""

import importlib.util
import json
import os
import platform
import subprocess
import sys

import jax
import pytest

from sslm_jax.cluster import topology

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIGS = os.path.join(ROOT, "configs")
GiB = 2**30
# What libtpu prints when it loads outside a TPU VM without the settings cluster/topology.py gives
# it.
LIBTPU_NOISE = ("TPU_WORKER_HOSTNAMES", "Failed to find host bounds", "Unable to initialize")
SMALL = {
  "model.num_layers": 1,
  "model.emb_dim": 64,
  "model.mlp_dim": 128,
  "data.seq_len": 32,
  "data.vocab_size": 512,
  "batch_size": 16,
  "mesh.data": 1,
  "mesh.fsdp": -1,
}

# Runs plan.topology_plan for each job in a fresh process, as the command line does, and prints
# one JSON line per job: the plan and its report.
_CHILD = r"""
import importlib.util, json, sys
from sslm_jax.cluster import topology
from sslm_jax.training import plan
topology.plan_only_process()
for job in json.loads(sys.argv[1]):
  spec = importlib.util.spec_from_file_location("config_file", job["config"])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in job["set"].items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  result = plan.topology_plan(config, topology.parse(job["topology"]), costs=job["costs"])
  print(json.dumps({"plan": result, "report": plan.format_plan(result)}), flush=True)
"""


def _env():
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)  # as a user runs it: the process itself keeps JAX on the CPU
  return env


def _plans(*jobs):
  result = subprocess.run(
    [sys.executable, "-c", _CHILD, json.dumps(jobs)],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  assert not any(n in result.stderr for n in LIBTPU_NOISE), result.stderr[-4000:]
  return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def _job(config, topology_name, costs=False, **settings):
  return {
    "config": os.path.join(CONFIGS, f"{config}.py"),
    "topology": topology_name,
    "costs": costs,
    "set": {k.replace("__", "."): v for k, v in settings.items()},
  }


def _main(*args):
  return subprocess.run(
    [sys.executable, "-m", "sslm_jax.main", "--workdir=/nonexistent/plan", "--plan", *args],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.fixture(scope="module")
def libtpu():
  if sys.platform != "linux" or platform.machine() != "x86_64":  # where the test extra has it
    pytest.skip("the test extra installs libtpu on x86-64 Linux only (where CI runs)")
  if importlib.util.find_spec("libtpu") is None:
    pytest.fail(
      "libtpu is not installed, and these tests compile for TPU slices with it: "
      "pip install -e '.[test]' installs it (CI always does)."
    )


@pytest.mark.parametrize(
  "name, chips, libtpu_name, slices",
  [
    ("v5p-64", 32, "v5p:2x4x4", 1),
    ("v5p-8", 4, "v5p:2x2x1", 1),
    ("v5p-12288", 6144, "v5p:16x16x24", 1),
    ("v4-8", 4, "v4:2x2x1", 1),
    ("v4-128", 64, "v4:4x4x4", 1),
    ("v5e-256", 256, "v5e:16x16", 1),
    ("v5litepod-16", 16, "v5e:4x4", 1),
    ("v5e-1", 1, "v5e:1x1", 1),
    ("v6e-8", 8, "v6e:2x4", 1),
    ("2xv5p-64", 64, "v5p:2x4x4", 2),
    ("4xv6e-256", 1024, "v6e:16x16", 4),
    ("v5p:4x4x2", 32, "v5p:4x4x2", 1),
    ("2xV5E:2x2", 8, "v5e:2x2", 2),
  ],
)
def test_topology_names(name, chips, libtpu_name, slices):
  t = topology.parse(name)
  assert (t.num_chips, t.libtpu_name, t.num_slices) == (chips, libtpu_name, slices)


@pytest.mark.parametrize(
  "name",
  [
    "v5p-63",
    "v5p-6",
    "v5p-4",
    "v5e-2",
    "v5e-512",
    "v4-16384",
    "v7x-8",
    "tpu-v5p-64",
    "v5p",
    "v5p:4x4",
    "v5e:2x2x2",
    "0xv5p-8",
    "2x",
    "",
  ],
)
def test_bad_topology_names_list_the_valid_forms(name):
  with pytest.raises(topology.TopologyError) as raised:
    topology.parse(name)
  message = str(raised.value)
  assert "valid forms" in message and "2xv5p-64" in message and "\n" not in message


def test_without_libtpu_the_error_says_what_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  with pytest.raises(topology.TopologyError) as raised:
    topology.devices(topology.parse("v5p-8"))
  assert f'pip install "jax[tpu]=={jax.__version__}"' in str(raised.value)
  assert "libtpu==" in str(raised.value)


@pytest.mark.slow
def test_base_configs_fit_a_v5e_pod(libtpu):
  # data=4 keeps each host's batch rows contiguous on the 16x16 torus (see sharding.check_batch).
  pod = {"model__dtype": "bfloat16", "mesh__data": 4, "mesh__fsdp": -1}
  # One process for the four: libtpu starts once.
  names = ("gpt_base", "bert_base", "llama_base", "modernbert_base")
  plans = _plans(*(_job(name, "v5e-256", **pod) for name in names))
  assert len(plans) == len(names)
  for result in plans:
    plan, report = result["plan"], result["report"]
    assert plan["mesh"] == {"data": 4, "fsdp": 64, "tensor": 1}
    assert (plan["num_chips"], plan["num_hosts"]) == (256, 32)
    assert plan["attention_impl"] == "splash", report  # llama's GQA, modernbert's window too
    assert plan["params_bytes"] < 16 * 2**20  # 0.5-0.6 GB of float32 weights, split over fsdp=64
    assert 0 < plan["step_total_bytes"] < plan["device_limit_bytes"] == 16 * GiB
    assert "verdict: fits in 16.000 GiB per chip" in report, report


def test_an_oversized_config_does_not_fit(libtpu):
  # 3.2G parameters replicated on every chip: weights and Adam moments alone are ~38 GB per chip.
  huge = dict(SMALL, mesh__data=-1, mesh__fsdp=1, model__emb_dim=16384, model__mlp_dim=65536)
  huge = {k.replace(".", "__"): v for k, v in huge.items()}
  (result,) = _plans(_job("gpt_tiny", "v5e-4", **huge))
  assert result["plan"]["params_bytes"] > 12 * GiB
  assert "verdict: DOES NOT FIT in 16.000 GiB per chip" in result["report"], result["report"]
  assert "exceeds available HBM" in result["report"]  # XLA's own words, when it refuses


@pytest.mark.slow
def test_step_costs_count_every_scanned_layer(libtpu):
  small = {k.replace(".", "__"): v for k, v in SMALL.items()}
  small.update(model__num_layers=3, model__dtype="bfloat16")
  scanned, unrolled = _plans(
    _job("gpt_tiny", "v5e-4", costs=True, **small),
    _job("gpt_tiny", "v5e-4", costs=True, model__scan_layers=False, **small),
  )
  assert "MFU ceiling" in scanned["report"]
  scanned, unrolled = scanned["plan"], unrolled["plan"]
  # XLA counts a loop body once: uncorrected, the scanned step would show about 1/3 of the work.
  assert scanned["xla_flops"] == pytest.approx(unrolled["xla_flops"], rel=0.05)
  assert (scanned["cost_compiles"], unrolled["cost_compiles"]) == (1, 0)
  # Bytes agree less well: XLA fuses a scan body and an unrolled layer differently.
  assert scanned["xla_bytes"] == pytest.approx(unrolled["xla_bytes"], rel=0.5)
  per_chip_model_flops = scanned["model_flops"] / scanned["num_chips"]
  assert 0.7 < per_chip_model_flops / scanned["xla_flops"] < 1.3


@pytest.mark.slow
def test_gpt_base_costs_agree_with_the_model_on_a_pod_and_on_four_chips(libtpu):
  # The shipped config as it is (no dtype flag), 8 sequences of 1024 per chip on both meshes. At
  # fsdp=32 XLA builds windowed-einsum loops; the cost copies must be loop-free all the same.
  pod, four = _plans(
    _job("gpt_base", "v5p-64", costs=True, mesh__data=1, mesh__fsdp=-1),
    _job("gpt_base", "v5p-8", costs=True, mesh__data=1, mesh__fsdp=-1, batch_size=32),
  )
  for result in (pod, four):
    plan, report = result["plan"], result["report"]
    assert (plan["dtype"], plan["attention_impl"]) == ("bfloat16", "splash"), report
    assert "computing in bfloat16" in report and "MFU ceiling" in report, report
    assert "not a measured MFU" in report, report
    model_per_chip = plan["model_flops"] / plan["num_chips"]
    counted = plan["xla_flops"] + plan["kernel_flops"]
    assert 0.9 < counted / model_per_chip < 1.1, report
    assert plan["kernel_flops"] > 0 and plan["kernel_bytes"] > 0
    assert 0 < plan["step_total_bytes"] < plan["device_limit_bytes"]
  assert pod["plan"]["mesh"]["fsdp"] == 32 and four["plan"]["mesh"]["fsdp"] == 4
  # Same per-chip batch: the HBM traffic per chip differs only by the weights' gathers.
  pod_bytes = pod["plan"]["xla_bytes"] + pod["plan"]["kernel_bytes"]
  four_bytes = four["plan"]["xla_bytes"] + four["plan"]["kernel_bytes"]
  assert pod_bytes == pytest.approx(four_bytes, rel=0.15)


def test_multislice_plan_from_the_command_line(libtpu):
  flags = [f"--config.{k}={v}" for k, v in SMALL.items()]
  result = _main(
    "--config=configs/gpt_tiny.py", "--topology=2xv5e-4", "--config.mesh.dcn_data=2", *flags
  )
  assert result.returncode == 0, result.stderr[-4000:]
  assert not any(n in result.stderr for n in LIBTPU_NOISE), result.stderr[-4000:]
  assert "8 TPU v5e chips on 2 hosts (2 slices of libtpu topology v5e:2x2)" in result.stdout
  assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1}" in result.stdout
  assert "verdict: fits in 16.000 GiB per chip" in result.stdout
  assert "MFU ceiling" in result.stdout


@pytest.mark.parametrize(
  "args, words",
  [
    (["--topology=v7x-8"], "valid forms"),
    (["--topology=v5p-8", "--config.mesh.data=1", "--config.mesh.fsdp=8"], "4 devices"),
    (["--topology=2xv5e-4"], "--config.mesh.dcn_data=2"),
  ],
)
def test_plans_that_cannot_work_are_refused_in_one_line(libtpu, args, words):
  result = _main("--config=configs/gpt_tiny.py", *args)
  assert result.returncode == 2, result.stdout + result.stderr[-3000:]
  assert words in result.stderr.splitlines()[-1]
  assert "Traceback" not in result.stderr


def test_topology_without_plan_is_refused():
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "sslm_jax.main",
      "--config=configs/gpt_tiny.py",
      "--workdir=/nonexistent/plan",
      "--topology=v5p-8",
    ],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 2 and "add --plan" in result.stderr.splitlines()[-1]
