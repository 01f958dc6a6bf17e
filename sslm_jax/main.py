"""Entry point: python -m sslm_jax.main --config=configs/gpt_tiny.py --workdir=runs/gpt_tiny

Rerunning the same command with the same --workdir resumes from the newest checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging as std_logging
import os
import sys

from sslm_jax.errors import SslmError, UsageError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from jax._src import compilation_cache
from jax.experimental import multihost_utils
from ml_collections import config_flags

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.checkpoints import hf_config
from sslm_jax.cluster import join as cluster
from sslm_jax.cluster import lease as lease_lib
from sslm_jax.cluster import topology as topology_lib
from sslm_jax.data import labelled
from sslm_jax.finetune import loop as finetune
from sslm_jax.inference import sample as sample_lib
from sslm_jax.training import hooks as hooks_lib
from sslm_jax.training import loop as train
from sslm_jax.training import plan as plan_lib
from sslm_jax.training import sharding

config_flags.DEFINE_config_file("config", None, "Experiment config file (ml_collections).")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer, config.")
cluster.define_join_flags()
flags.DEFINE_integer(
  "heartbeat_timeout",
  20,
  "Multi-process runs: seconds of silence after which a process counts as lost; the others then "
  "exit with an error naming the checkpoint to resume from.",
)
flags.DEFINE_float(
  "lease_timeout",
  120,
  "Seconds without a heartbeat after which another run may take over this run's workdir "
  "(a run that died on the same host is taken over at once).",
)
flags.DEFINE_bool(
  "plan", False, "Train nothing: print per-device memory of parameters, optimizer and step."
)
flags.DEFINE_string(
  "topology",
  None,
  "With --plan: compile for this TPU slice instead of the local devices (needs libtpu, no TPU), "
  "e.g. v5p-64, v5e-256, v6e-64, v4-128, or 2xv5p-64 for two slices.",
)
flags.DEFINE_string(
  "compilation_cache_dir",
  "",
  "Persistent XLA compilation cache, so reruns and resumes skip compiling (default: JAX's "
  "own JAX_COMPILATION_CACHE_DIR when set, else WORKDIR/xla_cache; 'none' turns it off). A "
  "user-wide directory serves every run.",
)
flags.DEFINE_list(
  "allow_config_change",
  [],
  "Config fields allowed to differ from the checkpoint being resumed (e.g. opt.learning_rate), "
  "or 'all'. Fields that set array shapes can never change.",
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _load_config_file(path: str):
  if not os.path.isfile(path):
    raise UsageError(f"config file {path!r} does not exist; pass --config=configs/<name>.py.")
  spec = importlib.util.spec_from_file_location("_sslm_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _explain_flag_error(argv: list[str], error: Exception) -> str:
  """Turn an ml_collections override error into a message naming the closest valid field."""
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if path is None:
    return f"{error}"
  base = _load_config_file(path)
  for arg in argv:
    if arg.startswith("--config.") and "=" in arg:
      name = arg[len("--config.") : arg.index("=")]
      if name not in set(config_lib.field_names(base)):
        near = config_lib.closest_field(base, name)
        hint = f" Did you mean --config.{near}?" if near else ""
        return f"unknown config field {name!r} in {arg!r}.{hint}"
  return f"bad --config flags: {error}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors instead of tracebacks for config mistakes."""
  try:
    rest = FLAGS(argv)
    _ = FLAGS.config.seed  # a config file that failed to load raises here
    return rest
  except Exception as e:  # any parse failure becomes a one-line usage error
    try:
      message = _explain_flag_error(argv, e)
    except UsageError as usage:
      message = str(usage)
    except Exception as load_error:  # e.g. a syntax error in the config file
      message = f"could not load the config file: {type(load_error).__name__}: {load_error}"
    _fail(message)


def _fail(message: str):
  """Exit 2 with the error as the last line of stderr.

  os._exit skips interpreter shutdown, where background threads of a failed asynchronous save
  would otherwise print their own tracebacks after this line. Everything of ours is closed by now.
  """
  logging.flush()
  sys.stdout.flush()
  print(f"sslm_jax: error: {message}", file=sys.stderr, flush=True)
  os._exit(2)


def _check_resumable(config, workdir: str) -> dict:
  """Refuse, before anything in the workdir is written, a checkpoint of another run.

  Compares the config fields, the data listing, the tokenizer and the data cache, all read
  without writing, so a refused run leaves the tokenizer and the cache as they were.
  """
  # Reads the data listing; TensorFlow stays out of the core.
  from sslm_jax.data import cache as cache_lib

  fp = checkpoint.fingerprint(config, cache_lib.resume_record(config, workdir))
  cache = lambda: cache_lib.cache_requests(config, workdir)  # noqa: E731
  checkpoint.check_resumable(workdir, fp, _allowed_changes(), cache)
  return fp


def _allowed_changes() -> frozenset:
  allowed = frozenset(FLAGS.allow_config_change)
  unknown = allowed - set(checkpoint.CHANGEABLE) - set(checkpoint.SHAPE_FIELDS) - {"all"}
  if unknown:
    raise UsageError(
      f"--allow_config_change names {sorted(unknown)}, which checkpoints do not record; "
      f"allowed: all, {', '.join(checkpoint.CHANGEABLE)}."
    )
  return allowed


def _samples_hook(config, data):
  def on_end(merge, state):
    if not config.sample_at_end:
      return
    lines = sample_lib.show(merge(state.params), data.tokenizer, data.sample_texts(2))
    if jax.process_index() == 0:
      print("\n".join(["", "Samples from held-out text:", *lines]), flush=True)

  return on_end


def _from_process_0(text: str) -> str:
  """Process 0's `text` (up to 4 KiB of UTF-8), on every process."""
  if jax.process_count() == 1:
    return text
  buffer = np.zeros(4096, np.uint8)
  encoded = text.encode()[: buffer.size]
  buffer[: len(encoded)] = np.frombuffer(encoded, np.uint8)
  received = np.asarray(multihost_utils.broadcast_one_to_all(buffer), np.uint8)
  return received.tobytes().rstrip(b"\0").decode(errors="replace")


@contextlib.contextmanager
def _workdir_lease(workdir: str):
  """Hold the workdir for this run, or refuse on every process if another live run holds it.

  Process 0 takes the lease and tells the others the outcome, so no process is left waiting.
  """
  if FLAGS.lease_timeout <= 0:
    raise UsageError(f"--lease_timeout must be positive, got {FLAGS.lease_timeout}.")
  held, refusal = None, ""
  if jax.process_index() == 0:
    try:
      lease_lib.check_writable(workdir)
      held = lease_lib.acquire(workdir, FLAGS.lease_timeout, on_lost=_fail)
    except Exception as e:  # whatever happened, every process must hear of it
      ours = isinstance(e, (lease_lib.WorkdirError, lease_lib.LeaseHeld))
      refusal = str(e) if ours else f"could not take the lease in {workdir} ({e!r})."
  refusal = _from_process_0(refusal)
  if refusal:
    raise UsageError(refusal)
  try:
    yield
  finally:
    if held is not None:
      held.release()


def _plan_topology(config) -> dict:
  """--plan --topology: compile for a described TPU slice; nothing runs on this machine."""
  if not FLAGS.plan:
    raise UsageError(f"--topology={FLAGS.topology} describes a slice to plan for; add --plan.")
  topology = topology_lib.parse(FLAGS.topology)
  topology_lib.plan_only_process()  # before validate() asks JAX for its default backend
  config_lib.validate(config)
  plan = plan_lib.topology_plan(config, topology)
  if jax.process_index() == 0:
    print(plan_lib.format_plan(plan), flush=True)
  return {}


def run(config, workdir: str) -> dict:
  if FLAGS.topology:
    return _plan_topology(config)
  config_lib.validate(config)
  hf_config.check_init_from_hf(config)  # a directory that does not fit: before any write
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.mesh.rules)
  sharding.check_batch(mesh, config.batch_size, rules)
  sharding.check_heads(mesh, rules, config.model.num_heads, config.model.num_kv_heads)
  if FLAGS.plan:
    report = plan_lib.format_plan(plan_lib.memory_plan(config, mesh))
    if jax.process_index() == 0:
      print(report, flush=True)
    return {}
  _check_init_from_hf(config, workdir)  # before the lease creates the workdir
  with _workdir_lease(workdir):
    return _train(config, workdir, mesh)


def _check_init_from_hf(config, workdir: str) -> None:
  """A run that will start from init_from_hf (no checkpoint to resume) can read it: checked
  before anything is written. A resumed run never reads the directory."""
  if not config.init_from_hf:
    return
  directory = epath.Path(workdir) / "checkpoints"
  if directory.exists() and any(p.name.isdigit() for p in directory.iterdir()):
    return
  hf_config.check_readable(config.init_from_hf)


def _train(config, workdir: str, mesh) -> dict:
  """Everything that reads or writes the workdir; runs under its lease."""
  if config.finetune.task:
    return _finetune(config, workdir, mesh)
  fingerprint = _check_resumable(config, workdir)
  _use_compilation_cache(workdir)  # only now: a refused run leaves the workdir untouched
  # The only TensorFlow import, kept out of the core.
  from sslm_jax.data import pipeline, preparation

  if jax.process_count() > 1:  # every process has read the workdir before process 0 writes
    multihost_utils.sync_global_devices("resume checked")
  preparation.build_cache(  # every process prepares its share of the data's units
    config,
    workdir,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_workers=config.data.prepare_workers,
    barrier=cluster.barrier,
  )
  # The rows the mesh places on this process: tensor-parallel replicas on other hosts load the same.
  batch = sharding.batch_sharding(mesh, sharding.rules_from_config(config.mesh.rules))
  data = pipeline.build(config, workdir, rows=sharding.batch_rows(batch, config.batch_size))
  fingerprint["tokenizer_sha256"] = data.tokenizer.sha256
  pipeline.size_packing(config, data)
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
  hooks = hooks_lib.DataHooks(
    train_batches=data.train_batches,
    eval_batches=data.eval_batches,
    on_end=_samples_hook(config, data),
  )
  return train.train_and_evaluate(
    config, workdir, mesh, hooks, fingerprint, allow_changes=_allowed_changes()
  )


def _finetune(config, workdir: str, mesh) -> dict:
  """A task head on a pretrained encoder (finetune/loop.py); its data needs TensorFlow only for a
  TFDS dataset (finetune.tfds_name)."""
  batch = sharding.batch_sharding(mesh, sharding.rules_from_config(config.mesh.rules))
  rows = sharding.batch_rows(batch, config.batch_size)
  allowed = _allowed_changes()
  try:
    setup = finetune.prepare_finetuning(config, workdir, rows, allowed)  # refuses before writing
    _use_compilation_cache(workdir)
    return finetune.run(config, workdir, mesh, rows, allowed, setup)
  except labelled.LabelledDataError as e:
    raise UsageError(str(e)) from e


def initialize_distributed() -> None:
  """Join the other processes: explicit flags, or any cluster environment JAX detects."""
  cluster.join_from_flags(
    heartbeat_timeout=FLAGS.heartbeat_timeout, checkpoint_dir=f"{FLAGS.workdir}/checkpoints"
  )


def _quiet_library_info() -> None:
  """Keep the log to what matters: drop Orbax's ~20 INFO lines per save and JAX's INFO line about
  backends this machine does not have (libtpu missing on a CPU or GPU host); warnings and errors
  of both are kept."""

  def keep(record) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    if "/orbax/" in record.pathname:
      return False
    return not record.getMessage().startswith("Unable to initialize backend")

  logging.get_absl_handler().addFilter(keep)


def _use_compilation_cache(workdir: str) -> None:
  """Persistent XLA compilation cache: reruns and resumes load the compiled steps."""
  directory = FLAGS.compilation_cache_dir
  if directory == "none":
    return
  directory = directory or jax.config.jax_compilation_cache_dir or f"{workdir}/xla_cache"
  if "://" not in directory:
    directory = os.path.abspath(directory)
  jax.config.update("jax_compilation_cache_dir", directory)
  # Multi-process runs compiled small programs (the lease broadcast) before the cache was set;
  # JAX decides once whether to use a cache, so let it decide again.
  compilation_cache.reset_cache()


def main(argv):
  del argv
  _quiet_library_info()
  cluster.skip_tpu_without_chips()
  try:
    config_lib.request_determinism(FLAGS.config)  # XLA reads its flags when the backend starts
    initialize_distributed()
    run(FLAGS.config, FLAGS.workdir)
    cluster.leave()
  except SslmError as e:
    _fail(str(e))
  except Exception:
    # A collective that failed because another process died: the watch names it (and exits).
    cluster.wait_for_lost_process(FLAGS.heartbeat_timeout + 2 * cluster.WATCH_PERIOD_S)
    raise


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
