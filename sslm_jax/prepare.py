"""Prepare a config's data cache (tokenizer, token-row shards, manifest) as a job of its own.

  python -m sslm_jax.prepare --config=configs/gpt_base.py --workdir=runs/gpt \\
    --config.data.source=text --config.data.text_files='/data/owt/*.txt' --num_workers=16

Training prepares the cache itself when it is missing; this command does the same work ahead
of time, on every core (--num_workers worker processes; default: one per core) and, launched on
every host of a pod or cluster like sslm_jax.main (TPU pods and SLURM are detected; else
--coordinator_address, --num_processes and --process_id), on every host: process p of n
prepares units p, p + n, ... of the source. A killed prepare keeps its finished units; rerun
it to continue. The cache is identical for any number of workers or hosts. The last line is
JSON: documents, tokens, rows, seconds, tokens per second, and the peak memory of this process
and of its largest worker process.
"""

from __future__ import annotations

import json
import os
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sslm_jax import cluster, commands  # noqa: E402
from sslm_jax import config as config_lib  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Experiment config file (ml_collections).")
flags.DEFINE_string("workdir", None, "Run directory: the cache goes to WORKDIR/data.")
flags.DEFINE_integer(
  "num_workers", None, "Worker processes on this host (default: one per core of this host)."
)
flags.DEFINE_string(
  "coordinator_address", None, "host:port of process 0, for multi-host preparation off TPU/SLURM."
)
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_integer(
  "initialization_timeout", 300, "Seconds to wait for every process to join before failing."
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _peak_rss_mib(who) -> float:
  """Peak resident memory of this process (RUSAGE_SELF) or of its largest finished worker
  process (RUSAGE_CHILDREN), in MiB."""
  return resource.getrusage(who).ru_maxrss / 1024  # kilobytes on Linux


def main(argv):
  import jax
  from absl import logging
  from jax.experimental import multihost_utils

  from sslm_jax.data import cache, pipeline

  if len(argv) > 1:
    raise commands.UsageError(f"unexpected arguments {argv[1:]}; options are flags (--name=value).")
  workers = FLAGS.num_workers if FLAGS.num_workers is not None else os.cpu_count() or 1
  if workers < 1:
    raise commands.UsageError(f"--num_workers={workers}: use at least 1.")
  logging.set_verbosity(logging.INFO)  # progress: one line per unit prepared
  c = FLAGS.config
  config_lib.validate(c)
  cluster.join(
    FLAGS.coordinator_address,
    FLAGS.num_processes,
    FLAGS.process_id,
    initialization_timeout=FLAGS.initialization_timeout,
    heartbeat_timeout=60,
  )
  multi = jax.process_count() > 1
  start = time.perf_counter()
  pipeline.prepare(
    c,
    FLAGS.workdir,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_workers=workers,
    barrier=multihost_utils.sync_global_devices if multi else lambda name: None,
  )
  seconds = time.perf_counter() - start
  meta = cache.read_meta(FLAGS.workdir)
  tokens = meta["train"]["tokens"] + meta["eval"]["tokens"]
  summary = {
    "process": jax.process_index(),
    "processes": jax.process_count(),
    "num_workers": workers,
    **{f"{s}_{k}": meta[s][k] for s in ("train", "eval") for k in ("docs", "tokens", "rows")},
    "shards": len(meta["train"]["shards"]) + len(meta["eval"]["shards"]),
    "seconds": round(seconds, 3),
    "tokens_per_sec": round(tokens / seconds, 1),
    "peak_rss_mib": round(_peak_rss_mib(resource.RUSAGE_SELF), 1),
    "peak_worker_rss_mib": round(_peak_rss_mib(resource.RUSAGE_CHILDREN), 1),
  }
  if multi:
    cluster.leave()
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  from sslm_jax.data.augment_sources import AugmentError
  from sslm_jax.data.corpus import DataError

  commands.run_command(main, errors=(config_lib.ConfigError, DataError, AugmentError))
