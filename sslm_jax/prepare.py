"""Prepare a config's data cache (tokenizer, token-row shards, manifest) as a job of its own.

  python -m sslm_jax.prepare --config=configs/gpt_base.py --workdir=runs/gpt \\
    --config.data.source=text --config.data.text_files='/data/owt/*.txt' --num_workers=16

Training prepares the cache itself when it is missing; this command does the same work ahead
of time, on every core (--num_workers worker processes; default: one per core) and, launched on
every host of a pod or cluster like sslm_jax.main (TPU pods and SLURM are detected; else
--coordinator_address, --num_processes and --process_id), on every host: the units of the
source are shared out by size, largest first. A killed prepare keeps its finished units; rerun
it to continue. The cache is identical for any number of workers or hosts. The last line is
JSON: documents, tokens, rows, seconds, tokens per second, and the peak memory of this process
and of its largest worker process (null without workers).

With --runner the same preparation runs as an Apache Beam pipeline (pip install
'sslm_jax[beam]'; see sslm_jax/data/beam_prepare.py), writing the same shards and meta.json
byte for byte. Beam's own pipeline options follow a lone `--`, which ends this command's flags:

  python -m sslm_jax.prepare --config=configs/gpt_base.py --workdir=runs/gpt --runner=DirectRunner
  python -m sslm_jax.prepare --config=configs/gpt_base.py --workdir=gs://bucket/runs/gpt \
    --config.data.source=text --config.data.text_files='gs://bucket/owt/*.txt' \
    --runner=DataflowRunner -- --project=PROJECT --region=us-central1 \
    --temp_location=gs://bucket/tmp --sdk_container_image=IMAGE_WITH_SSLM_JAX

Beam then distributes the units (--num_workers and the multi-host flags do not apply); the
JSON line names the runner and counts the units prepared and those a previous run finished.
"""

from __future__ import annotations

import json
import os
import resource
import time

from sslm_jax.errors import UsageError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sslm_jax import commands
from sslm_jax import config as config_lib  # noqa: E402
from sslm_jax.cluster import join as cluster

config_flags.DEFINE_config_file("config", None, "Experiment config file (ml_collections).")
flags.DEFINE_string("workdir", None, "Run directory: the cache goes to WORKDIR/data.")
flags.DEFINE_integer(
  "num_workers", None, "Worker processes on this host (default: one per core of this host)."
)
cluster.define_join_flags()
flags.DEFINE_string(
  "runner",
  "",
  "Apache Beam runner (DirectRunner, DataflowRunner, SparkRunner, FlinkRunner): prepare as a "
  "Beam pipeline, with Beam's pipeline options after `--`. Empty: worker processes here.",
)
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _prepare_here(c) -> tuple[dict, float]:
  """Worker processes on this host, and on every host of a cluster it joins; (facts, seconds)."""
  import jax
  from jax.experimental import multihost_utils

  from sslm_jax.data import preparation  # TensorFlow: not for --help or a bad flag

  workers = FLAGS.num_workers if FLAGS.num_workers is not None else os.cpu_count() or 1
  if workers < 1:
    raise UsageError(f"--num_workers={workers}: use at least 1.")
  # Before anything starts JAX's backend (validate() asks for devices).
  cluster.join_from_flags(heartbeat_timeout=60)
  config_lib.validate(c)
  multi = jax.process_count() > 1
  start = time.perf_counter()
  worker_peak = preparation.build_cache(
    c,
    FLAGS.workdir,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    num_workers=workers,
    barrier=multihost_utils.sync_global_devices if multi else lambda name: None,
  )
  seconds = time.perf_counter() - start
  if multi:
    cluster.leave()
  facts = {"process": jax.process_index(), "processes": jax.process_count()}
  peak = None if worker_peak is None else round(worker_peak, 1)
  return {**facts, "num_workers": workers, "peak_worker_rss_mib": peak}, seconds


def _prepare_on_beam(c, beam_args: list[str]) -> tuple[dict, float]:
  from sslm_jax.data import beam_prepare  # TensorFlow: not for --help or a bad flag

  if FLAGS.num_workers is not None or FLAGS.coordinator_address:
    raise UsageError(
      "--num_workers and --coordinator_address do not apply with --runner: Beam places the "
      "work; give its options after `--` (e.g. -- --direct_num_workers=4 or --max_num_workers=32)."
    )
  from sslm_jax.data import cache  # TensorFlow: not for --help or a bad flag

  config_lib.validate(c)
  beam_prepare.import_beam()  # before any work, so a missing Beam fails at once
  start = time.perf_counter()
  if not c.data.mixture:
    counts = beam_prepare.run(c, FLAGS.workdir, FLAGS.runner, beam_args)
    return {"runner": FLAGS.runner, **counts}, time.perf_counter() - start
  cache.tokenizer(c, FLAGS.workdir, may_train=True)  # one for every source
  counts = {
    name: beam_prepare.run(source, workdir, FLAGS.runner, beam_args)
    for name, source, workdir in cache.mixture_sources(c, FLAGS.workdir)
  }
  return {"runner": FLAGS.runner, "sources": counts}, time.perf_counter() - start


def _manifests(c) -> list[dict]:
  """The meta.json of the cache, or of each mixture source's cache."""
  from sslm_jax.data import cache  # TensorFlow: not for --help or a bad flag

  if not c.data.mixture:
    return [cache.read_meta(FLAGS.workdir)]
  return [cache.read_meta(w) for _, _, w in cache.mixture_sources(c, FLAGS.workdir)]


def main(argv):
  from absl import logging

  if len(argv) > 1 and not FLAGS.runner:
    raise UsageError(
      f"unexpected arguments {argv[1:]}; options are flags (--name=value), and Beam pipeline "
      "options after `--` go with --runner."
    )
  logging.set_verbosity(logging.INFO)  # progress: one line per unit prepared
  c = FLAGS.config
  how, seconds = _prepare_on_beam(c, argv[1:]) if FLAGS.runner else _prepare_here(c)
  metas = _manifests(c)
  sizes = {
    f"{s}_{k}": sum(m[s][k] for m in metas)
    for s in ("train", "eval")
    for k in ("docs", "tokens", "rows")
  }
  tokens = sizes["train_tokens"] + sizes["eval_tokens"]
  summary = {
    **how,
    **sizes,
    "shards": sum(len(m["train"]["shards"]) + len(m["eval"]["shards"]) for m in metas),
    "seconds": round(seconds, 3),
    "tokens_per_sec": round(tokens / seconds, 1),
    "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
  }
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  commands.run_command(main)
