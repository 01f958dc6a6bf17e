"""Entry point: python -m sslm_jax.main --config=configs/gpt_tiny.py --workdir=runs/gpt_tiny

Rerunning the same command with the same --workdir resumes from the newest checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging as std_logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax
from absl import app, flags, logging
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from sslm_jax import checkpoint, rendezvous, sharding, train
from sslm_jax import config as config_lib
from sslm_jax import plan as plan_lib
from sslm_jax import sample as sample_lib
from sslm_jax import tokenizer as tokenizer_lib

config_flags.DEFINE_config_file("config", None, "Experiment config file (ml_collections).")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer, config.")
flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, for multi-process runs off TPU/SLURM."
)
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_integer(
  "initialization_timeout", 300, "Seconds to wait for every process to join before failing."
)
flags.DEFINE_bool(
  "plan", False, "Train nothing: print per-device memory of parameters, optimizer and step."
)
flags.DEFINE_list(
  "allow_config_change",
  [],
  "Config fields allowed to differ from the checkpoint being resumed (e.g. opt.learning_rate), "
  "or 'all'. Fields that set array shapes can never change.",
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


class UsageError(ValueError):
  """A command line that cannot work; the message says what to change."""


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


OUR_ERRORS = (
  UsageError,
  config_lib.ConfigError,
  sharding.MeshError,
  checkpoint.CheckpointMismatch,
  checkpoint.CheckpointError,
  tokenizer_lib.TokenizerError,
  train.NonFiniteError,
  rendezvous.JoinError,
)


def _check_resumable(config, workdir: str) -> dict:
  """Refuse, before touching the workdir, a checkpoint of another objective or shape."""
  fp = checkpoint.fingerprint(config)
  saved = checkpoint.saved_fingerprint(f"{workdir}/checkpoints")
  if saved is not None:
    checkpoint.check_fingerprint(saved[1], fp, workdir, _allowed_changes())
  return fp


def _allowed_changes() -> frozenset:
  allowed = frozenset(FLAGS.allow_config_change)
  unknown = allowed - set(checkpoint.RUN_FIELDS) - set(checkpoint.SHAPE_FIELDS) - {"all"}
  if unknown:
    raise UsageError(
      f"--allow_config_change names {sorted(unknown)}, which checkpoints do not record; "
      f"allowed: all, {', '.join(checkpoint.RUN_FIELDS)}."
    )
  return allowed


def _check_writable(workdir: str) -> None:
  probe = epath.Path(workdir) / ".sslm_jax_write_probe"
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise UsageError(
      f"workdir {workdir} is not writable ({e.strerror or e}); choose a --workdir you can write."
    ) from e


def _samples_hook(config, data):
  def on_end(merge, state):
    if not config.sample_at_end:
      return
    lines = sample_lib.show(merge(state.params), data.tokenizer, data.sample_texts(2))
    if jax.process_index() == 0:
      print("\n".join(["", "Samples from held-out text:", *lines]), flush=True)

  return on_end


def run(config, workdir: str) -> dict:
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(mesh, config.batch_size, jax.process_count())
  if FLAGS.plan:
    report = plan_lib.format_plan(plan_lib.memory_plan(config, mesh))
    if jax.process_index() == 0:
      print(report, flush=True)
    return {}
  fingerprint = _check_resumable(config, workdir)
  from sslm_jax.data import pipeline  # the only TensorFlow import, kept out of the core

  if jax.process_index() == 0:
    _check_writable(workdir)
    pipeline.prepare(config, workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("data prepared")
  data = pipeline.build(config, workdir, jax.process_index(), jax.process_count())
  fingerprint["tokenizer_sha256"] = data.tokenizer.sha256
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
  hooks = train.DataHooks(
    train_batches=data.train_batches,
    eval_batches=data.eval_batches,
    on_end=_samples_hook(config, data),
  )
  return train.train_and_evaluate(
    config, workdir, mesh, hooks, fingerprint, allow_changes=_allowed_changes()
  )


def initialize_distributed() -> None:
  """Join the other processes: explicit flags, or JAX's auto-detection on Cloud TPU and SLURM."""
  explicit = FLAGS.coordinator_address is not None
  on_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  on_tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if not (explicit or on_slurm or on_tpu_pod):
    return
  if explicit and (FLAGS.num_processes is None or FLAGS.process_id is None):
    raise UsageError("--coordinator_address needs --num_processes and --process_id too.")
  kwargs = {"initialization_timeout": FLAGS.initialization_timeout}
  if explicit:
    rendezvous.roll_call(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, FLAGS.initialization_timeout
    )
    kwargs.update(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes,
      process_id=FLAGS.process_id,
    )
  jax.distributed.initialize(**kwargs)
  logging.info("Process %d of %d joined.", jax.process_index(), jax.process_count())


def _quiet_orbax_info() -> None:
  """Orbax logs ~20 INFO lines per save; keep its warnings and errors, drop the rest."""
  logging.get_absl_handler().addFilter(
    lambda record: record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname
  )


def main(argv):
  del argv
  from sslm_jax.data import pipeline

  _quiet_orbax_info()
  try:
    initialize_distributed()
    run(FLAGS.config, FLAGS.workdir)
  except (*OUR_ERRORS, pipeline.DataError) as e:
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
