"""Joining the other processes of a run, watching them, and leaving together.

`join` calls `jax.distributed.initialize` whenever this process is one of several: explicit
--coordinator_address flags, or any cluster environment JAX itself recognises (Cloud TPU VM
metadata, GKE and multislice TPU variables, SLURM, Open MPI, Kubernetes). Detection asks JAX's
own cluster environments, so it is as fast and side-effect free as JAX's: on a machine without
TPU chips no metadata server is asked, whether or not the `libtpu` wheel is installed.

Once joined, a background watch asks JAX's coordination service which processes are alive. When
one is lost (killed, crashed, its host gone), every survivor exits at once with an error naming
the step and the checkpoint a rerun resumes from, instead of hanging in a collective and then
aborting with native stack traces. JAX's "recoverability" mode keeps its runtime from killing the
survivors itself, so that this message can be the last line, and the coordination service runs
in a child process of process 0 (cluster/coordinator.py), so that losing process 0 is reported the
same way; `leave` then orders a clean exit (process 0 owns the service, so it goes last).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax._src import clusters as jax_clusters
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

from sslm_jax.cluster import coordinator, rendezvous

WATCH_PERIOD_S = 2.0
_LEAVE_TIMEOUT_S = 60
_GATHER_TIMEOUT_S = 60


def skip_tpu_without_chips() -> None:
  """Keep JAX from starting libtpu on a host without TPU chips.

  With the `libtpu` wheel installed (the test extra brings it for the TPU plans), JAX tries the
  TPU backend first wherever it runs, and libtpu prints lines about TPU hosts and workers before
  it fails, ahead of everything the run has to say. Call before JAX starts its backends; an
  explicit JAX_PLATFORMS is left alone.
  """
  from jax._src import hardware_utils, xla_bridge

  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
    return
  xla_bridge._backend_factories.pop("tpu", None)


def _has_kubernetes_client() -> bool:
  return importlib.util.find_spec("kubernetes") is not None


def _present(env) -> bool:
  if env.opt_in_only_method:  # mpi4py: JAX uses it only when asked by name
    return False
  if env.__name__ == "K8sCluster" and not _has_kubernetes_client():
    return False  # JAX would warn on every Kubernetes pod; without the package it cannot join
  return env.is_env_present()


def detect() -> tuple[str, int] | None:
  """(environment, number of processes) of the cluster JAX would join here, or None.

  Environments are tried in JAX's own order. A probe that fails (a metadata server or a
  Kubernetes API that does not answer) raises JoinError rather than training alone.
  """
  for env in jax_clusters.ClusterEnv._cluster_types:
    try:
      if not _present(env):
        continue
      count = env.get_process_count()
    except Exception as e:  # requests, kubernetes and socket errors alike
      raise rendezvous.JoinError(
        f"this looks like a {env.__name__} environment, but asking it for the other processes "
        f"failed ({type(e).__name__}: {e}). Start every process with --coordinator_address, "
        "--num_processes and --process_id instead."
      ) from e
    return env.__name__, count
  return None


class _Watch(threading.Thread):
  """Exit this process, with a message, as soon as another process of the run is lost."""

  def __init__(self, checkpoint_dir: str | None, period_s: float):
    super().__init__(name="sslm_jax_process_watch", daemon=True)
    self.checkpoint_dir, self.period_s = checkpoint_dir, period_s
    self.step: int | None = None  # the training step this process reached
    self.armed = threading.Event()
    self.armed.set()
    self.verdict = threading.Event()  # set once a loss has been reported

  def run(self):
    # JAX has no public call for this; it is what jax.experimental.multihost_utils.live_devices
    # uses. It returns once every live process asked, so it also paces the watches together.
    client = jax_distributed.global_state.client
    everyone = list(range(jax.process_count()))
    while self.armed.wait() and not self.verdict.wait(self.period_s):
      try:
        missing = sorted(set(everyone) - set(client.get_live_nodes(everyone)))
      except Exception:  # the coordination service itself is gone (process 0 and its child)
        missing = [0]
      if missing and self.armed.is_set():
        self._exit(missing)

  def _exit(self, missing: list[int]) -> None:
    self.verdict.set()
    where = "before training started" if self.step is None else f"at step {self.step}"
    logging.flush()  # so that the message below is the last line
    sys.stdout.flush()
    print(
      f"sslm_jax: error: process(es) {missing} of {jax.process_count()} stopped answering "
      f"{where} (killed, crashed or its host lost); process {jax.process_index()} stops too. "
      f"{resume_hint(self.checkpoint_dir)}",
      file=sys.stderr,
      flush=True,
    )
    os._exit(2)  # skips JAX's shutdown barrier, which would wait for the lost process


def resume_hint(checkpoint_dir: str | None) -> str:
  """Which checkpoint the same command, run again, resumes from."""
  try:
    steps = ocp.utils.checkpoint_steps(checkpoint_dir) if checkpoint_dir else []
  except Exception:  # no directory yet, or storage that cannot be listed
    steps = []
  if not steps:
    return "Rerun the same command to start again from step 0 (no checkpoint was saved yet)."
  return (
    f"Rerun the same command to resume from the checkpoint at step {max(steps)} "
    f"in {checkpoint_dir}."
  )


_watch: _Watch | None = None


def define_join_flags() -> None:
  """The flags `join_from_flags` reads, for each command that may run as one of several
  processes (sslm_jax.main, sslm_jax.prepare)."""
  from absl import flags

  flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs off TPU/SLURM."
  )
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
  flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to wait for every process to join before failing."
  )


def join_from_flags(*, heartbeat_timeout: int, checkpoint_dir: str | None = None) -> None:
  """`join` with the flags of define_join_flags."""
  from absl import flags

  f = flags.FLAGS
  join(
    f.coordinator_address,
    f.num_processes,
    f.process_id,
    initialization_timeout=f.initialization_timeout,
    heartbeat_timeout=heartbeat_timeout,
    checkpoint_dir=checkpoint_dir,
  )


def join(
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  *,
  initialization_timeout: int,
  heartbeat_timeout: int,
  checkpoint_dir: str | None = None,
) -> None:
  """Initialise jax.distributed when this process is one of several; otherwise do nothing."""
  global _watch
  kwargs = {}
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise rendezvous.JoinError(
        "--coordinator_address needs --num_processes and --process_id too."
      )
    rendezvous.roll_call(coordinator_address, num_processes, process_id, initialization_timeout)
    kwargs = dict(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  else:
    found = detect()
    if found is None or found[1] < 2:
      return
    logging.info("%s environment with %d processes: joining them.", *found)
  # Without it JAX's runtime aborts every survivor when a process is lost (see _Watch).
  jax.config.update("jax_enable_recoverability", True)
  with coordinator.own_process():  # so that losing process 0 is reported like any other loss
    jax.distributed.initialize(
      initialization_timeout=initialization_timeout,
      heartbeat_timeout_seconds=heartbeat_timeout,
      **kwargs,
    )
  logging.info("Process %d of %d joined.", jax.process_index(), jax.process_count())
  _watch = _Watch(checkpoint_dir, WATCH_PERIOD_S)
  _watch.start()


def note_step(step: int) -> None:
  """The training loop's progress, named in the message if another process is lost."""
  if _watch is not None:
    _watch.step = step


def wait_for_lost_process(timeout_s: float) -> None:
  """After an unexpected error: give the watch time to blame a lost process (it then exits)."""
  if _watch is not None and _watch.armed.is_set():
    _watch.verdict.wait(timeout_s)


def values_on_process_0(name: str, step: int, value: float) -> list[float | None] | None:
  """Every process's `value` for `step`, indexed by process, on process 0; None elsewhere.

  For host-side metrics. They travel through JAX's coordination service, not a collective: no
  collective is added to the training loop, and the other processes only post their value and
  go on. Process 0 waits at most 60 s per peer (the watch ends the run first if one was lost);
  a value still missing then is None. Every process must call it at the same steps.
  """
  client, me = jax_distributed.global_state.client, jax.process_index()
  if me != 0:
    client.key_value_set(f"sslm_jax/{name}/{step}/{me}", repr(float(value)))
    return None
  values: list[float | None] = [float(value)]
  for i in range(1, jax.process_count()):
    key = f"sslm_jax/{name}/{step}/{i}"
    try:
      values.append(float(client.blocking_key_value_get(key, _GATHER_TIMEOUT_S * 1000)))
      client.key_value_delete(key)
    except Exception as e:  # a deadline: the process is slow or lost; the watch judges which
      logging.warning("No %s from process %d for step %d: %s", name, i, step, e)
      values.append(None)
  return values


def slowest_data_wait(step: int, seconds: float) -> dict:
  """For process 0's record: the interval's longest wait for input over all processes, and which
  process it was. {} on the other processes, or when one did not answer in time."""
  waits = values_on_process_0("time_data_s", step, seconds)
  known = {i: w for i, w in enumerate(waits or []) if w is not None}
  if len(known) < jax.process_count():
    return {}
  slowest = max(known, key=known.get)
  return {"time_data_max_s": known[slowest], "slowest_data_process": slowest}


def leave() -> None:
  """End a run that finished (or stopped) cleanly on every process without false alarms.

  Every process waits for the others here, then stops watching; process 0 then waits for the
  others to disconnect, since the coordination service they still talk to lives in it.
  """
  global _watch
  if _watch is None:
    return
  client = jax_distributed.global_state.client
  client.wait_at_barrier("sslm_jax_leave", _LEAVE_TIMEOUT_S * 1000)
  _watch.armed.clear()
  coordinator.finished_cleanly()
  _watch = None
  if jax.process_index() != 0:
    return
  others_gone = threading.Event()

  def wait_for_others():
    everyone = list(range(jax.process_count()))
    while set(client.get_live_nodes(everyone)) != {0}:
      time.sleep(0.1)
    others_gone.set()

  threading.Thread(target=wait_for_others, daemon=True).start()
  if not others_gone.wait(_LEAVE_TIMEOUT_S):
    logging.warning("Other processes still connected after %d s; leaving anyway.", _LEAVE_TIMEOUT_S)


def barrier(name: str) -> None:
  """Every process waits here for all the others (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
