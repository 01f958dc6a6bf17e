"""Which processes join a cluster: each environment JAX knows, faked; none on a plain machine."""

import pytest
from jax._src import hardware_utils
from jax._src.clusters import K8sCluster, cloud_tpu_cluster

from sslm_jax.cluster import join as cluster
from sslm_jax.cluster import rendezvous

# Every variable JAX's cluster environments read.
CLUSTER_VARIABLES = [
  "TPU_WORKER_HOSTNAMES",
  "TPU_PROCESS_ADDRESSES",
  "TPU_WORKER_ID",
  "TPU_SKIP_MDS_QUERY",
  "MEGASCALE_COORDINATOR_ADDRESS",
  "MEGASCALE_NUM_SLICES",
  "MEGASCALE_SLICE_ID",
  "SLURM_JOB_ID",
  "SLURM_STEP_NODELIST",
  "SLURM_NTASKS",
  "SLURM_PROCID",
  "SLURM_LOCALID",
  "OMPI_MCA_orte_hnp_uri",
  "OMPI_COMM_WORLD_SIZE",
  "OMPI_COMM_WORLD_RANK",
  "OMPI_COMM_WORLD_LOCAL_RANK",
  "KUBERNETES_SERVICE_HOST",
  "JAX_COORDINATOR_PORT",
]


class _Calls(list):
  metadata: dict


class _NoWatch:
  def __init__(self, *args):
    pass

  def start(self):
    pass


@pytest.fixture
def joins(monkeypatch):
  """A machine with no cluster: the calls join makes to jax.distributed.initialize are recorded.

  The metadata server is faked by `metadata` (attribute -> value); asking it for anything on a
  machine that is not a TPU VM fails the test.
  """
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)
  calls = _Calls()
  monkeypatch.setattr(cluster.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(cluster.jax.config, "update", lambda name, value: None)
  monkeypatch.setattr(cluster, "_Watch", _NoWatch)
  monkeypatch.setattr(cluster, "_watch", None)
  calls.metadata = {}

  def get_metadata(key):
    assert cloud_tpu_cluster.running_in_cloud_tpu_vm, f"metadata server asked for {key!r}"
    if key in calls.metadata:
      return calls.metadata[key], 200
    return "", 404

  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", get_metadata)
  return calls


def _join(**explicit):
  args = [explicit.get(k) for k in ("coordinator_address", "num_processes", "process_id")]
  cluster.join(*args, initialization_timeout=5, heartbeat_timeout=7, checkpoint_dir="/nowhere")


def test_nothing_present_joins_nothing(joins):
  _join()
  assert cluster.detect() is None
  assert joins == []


@pytest.mark.skipif(
  hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0, reason="a real TPU machine"
)
def test_a_machine_without_tpu_chips_is_no_tpu_vm_whatever_is_installed(joins, monkeypatch):
  # What JAX decided at import on this machine, libtpu installed or not; then GKE's variables
  # (set by hand to quiet libtpu when compiling for a TPU topology) must not make it a pod.
  from jax._src import cloud_tpu_init

  monkeypatch.setattr(
    cloud_tpu_cluster, "running_in_cloud_tpu_vm", cloud_tpu_init.running_in_cloud_tpu_vm
  )
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost,other")
  monkeypatch.setenv("TPU_WORKER_ID", "0")
  _join()
  assert cloud_tpu_init.running_in_cloud_tpu_vm is False
  assert joins == []


def _tpu_vm(joins, monkeypatch, endpoints: str):
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  joins.metadata.update({"agent-worker-number": "1", "worker-network-endpoints": endpoints})


def test_a_tpu_vm_pod_found_through_the_metadata_server_joins(joins, monkeypatch):
  _tpu_vm(joins, monkeypatch, "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5")
  assert cluster.detect() == ("GceTpuCluster", 4)
  _join()
  assert joins == [{"initialization_timeout": 5, "heartbeat_timeout_seconds": 7}]


def test_a_single_host_tpu_vm_has_nobody_to_join(joins, monkeypatch):
  _tpu_vm(joins, monkeypatch, "10.0.0.2")
  assert cluster.detect() == ("GceTpuCluster", 1)
  _join()
  assert joins == []


def test_a_gke_tpu_slice_joins(joins, monkeypatch):
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "pod-0.svc,pod-1.svc")
  monkeypatch.setenv("TPU_WORKER_ID", "1")
  assert cluster.detect() == ("GkeTpuCluster", 2)
  _join()
  assert len(joins) == 1


def test_multislice_with_one_host_per_slice_joins(joins, monkeypatch):
  # One host per slice: no comma in TPU_WORKER_HOSTNAMES, yet two processes in all.
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "slice-1-host-0")
  monkeypatch.setenv("TPU_WORKER_ID", "0")
  monkeypatch.setenv("MEGASCALE_NUM_SLICES", "2")
  monkeypatch.setenv("MEGASCALE_SLICE_ID", "1")
  monkeypatch.setenv("MEGASCALE_COORDINATOR_ADDRESS", "slice-0-host-0")
  assert cluster.detect() == ("GkeTpuCluster", 2)
  _join()
  assert len(joins) == 1


def _slurm(monkeypatch, tasks: int):
  for name, value in {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "gpu[001-002]",
    "SLURM_NTASKS": str(tasks),
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
  }.items():
    monkeypatch.setenv(name, value)


def test_a_slurm_step_joins(joins, monkeypatch):
  _slurm(monkeypatch, tasks=4)
  assert cluster.detect() == ("SlurmCluster", 4)
  _join()
  assert len(joins) == 1


def test_a_one_task_slurm_job_has_nobody_to_join(joins, monkeypatch):
  _slurm(monkeypatch, tasks=1)
  _join()
  assert joins == []


def test_open_mpi_joins(joins, monkeypatch):
  monkeypatch.setenv("OMPI_MCA_orte_hnp_uri", "1531576320.0;tcp://10.96.0.1:34911")
  monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
  monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
  monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "0")
  assert cluster.detect() == ("OmpiCluster", 2)
  _join()
  assert len(joins) == 1


def test_kubernetes_joins_when_its_client_can_ask_the_api(joins, monkeypatch):
  monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
  monkeypatch.setattr(cluster, "_has_kubernetes_client", lambda: False)
  _join()
  assert joins == []  # any pod has the variable; without the client JAX cannot join
  monkeypatch.setattr(cluster, "_has_kubernetes_client", lambda: True)
  monkeypatch.setattr(K8sCluster, "is_env_present", classmethod(lambda cls: True))
  monkeypatch.setattr(K8sCluster, "get_process_count", classmethod(lambda cls: 3))
  assert cluster.detect() == ("K8sCluster", 3)
  _join()
  assert len(joins) == 1


def test_a_metadata_server_that_fails_is_an_error_not_a_single_host_run(joins, monkeypatch):
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)

  def unreachable(key):
    raise ConnectionError("metadata.google.internal unreachable")

  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", unreachable)
  with pytest.raises(rendezvous.JoinError, match="GceTpuCluster.*--coordinator_address"):
    _join()
  assert joins == []


def test_explicit_flags_hold_a_roll_call_and_join_without_detection(joins, monkeypatch):
  rolls = []
  monkeypatch.setattr(cluster.rendezvous, "roll_call", lambda *a: rolls.append(a))
  monkeypatch.setattr(cluster, "detect", lambda: pytest.fail("detection with explicit flags"))
  _join(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
  assert rolls == [("10.0.0.1:1234", 2, 1, 5)]
  assert joins == [
    {
      "initialization_timeout": 5,
      "heartbeat_timeout_seconds": 7,
      "coordinator_address": "10.0.0.1:1234",
      "num_processes": 2,
      "process_id": 1,
    }
  ]
  with pytest.raises(rendezvous.JoinError, match="needs --num_processes and --process_id"):
    _join(coordinator_address="10.0.0.1:1234", num_processes=2)


def test_the_resume_hint_names_the_newest_finished_checkpoint(tmp_path):
  assert "start again from step 0" in cluster.resume_hint(str(tmp_path / "none"))
  for name in ("5", "10", "15.orbax-checkpoint-tmp-123"):
    (tmp_path / name).mkdir()
  assert f"checkpoint at step 10 in {tmp_path}." in cluster.resume_hint(str(tmp_path))


def test_libtpu_is_not_started_on_a_host_without_tpu_chips():
  """With libtpu installed (the test extra brings it), JAX would start it anyway and libtpu would
  print lines about TPU workers before failing; the trainer's commands skip it."""
  import importlib.util
  import os
  import subprocess
  import sys

  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed here: nothing to skip")
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
    pytest.skip("this host has TPU chips")
  script = (
    "from sslm_jax.cluster import join as cluster\n"
    "cluster.skip_tpu_without_chips()\n"
    "import jax\n"
    "print(jax.default_backend())\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  result = subprocess.run(
    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["cpu"]
  for noise in ("TPU_WORKER_HOSTNAMES", "libtpu", "InitGoogle", "accelerator type"):
    assert noise not in result.stderr, result.stderr


class _KeyValueStore:
  """The coordination service's key-value calls that slowest_data_wait makes."""

  def __init__(self):
    self.values = {}

  def key_value_set(self, key, value):
    self.values[key] = value

  def blocking_key_value_get(self, key, timeout_ms):
    if key not in self.values:
      raise RuntimeError(f"DEADLINE_EXCEEDED after {timeout_ms} ms")
    return self.values[key]

  def key_value_delete(self, key):
    del self.values[key]


def test_the_slowest_data_wait_reaches_process_0_without_a_collective(monkeypatch):
  store = _KeyValueStore()
  monkeypatch.setattr(cluster.jax_distributed.global_state, "client", store)
  monkeypatch.setattr(cluster.jax, "process_count", lambda: 3)
  for process, seconds in ((1, 0.5), (2, 0.25)):  # the others post and go on
    monkeypatch.setattr(cluster.jax, "process_index", lambda p=process: p)
    assert cluster.slowest_data_wait(10, seconds) == {}
  monkeypatch.setattr(cluster.jax, "process_index", lambda: 0)
  assert cluster.slowest_data_wait(10, 0.125) == {
    "time_data_max_s": 0.5,
    "slowest_data_process": 1,
  }
  assert store.values == {}  # read once, then deleted
  # A process that never posts (lost, or far behind): the record goes without the fields.
  monkeypatch.setattr(cluster, "_GATHER_TIMEOUT_S", 0)
  store.values["sslm_jax/time_data_s/20/1"] = "0.5"
  assert cluster.slowest_data_wait(20, 0.125) == {}
