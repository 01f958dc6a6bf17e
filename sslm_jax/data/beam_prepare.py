"""Preparing the token-row cache as an Apache Beam pipeline (the optional `beam` extra).

The steps of preparation.build_cache(), so the shards and data/meta.json are byte for byte those a
local build_cache writes. Before the pipeline, the launcher loads the tokenizer or trains one, and
reuses a finished cache for the same request as build_cache() does (then no pipeline runs). The
pipeline: the source's units -> Reshuffle (spreads them over the workers) -> each unit that a
previous run did not finish is prepared by preparation.prepare_unit -> once all are done, one
step joins the unit records, in unit order, into data/meta.json.

Workers get the config as a dict and the workdir, read the source themselves and write shards
straight into WORKDIR/data, so off the DirectRunner (Dataflow, Spark, Flink) the workdir and
the source must be paths every worker reads and writes (gs://...), and the workers need
sslm_jax installed (a container image with it, or --extra_package with its sdist).

Apache Beam is imported only inside these functions: the package works without it.
"""

from __future__ import annotations

import ml_collections
from absl import logging

from sslm_jax.data import cache, preparation
from sslm_jax.data.corpus import DataError

COUNTERS = "sslm_jax.prepare"  # namespace of the pipeline's unit counters


def import_beam():
  """apache_beam, or a DataError that names the install command."""
  try:
    import apache_beam  # the optional `beam` extra, imported only to run the pipeline
  except ImportError as e:
    raise DataError(
      "preparing with --runner needs Apache Beam, which is not installed; "
      "pip install 'sslm_jax[beam]'."
    ) from e
  return apache_beam


def start(c: ml_collections.ConfigDict, workdir: str) -> preparation.Plan | None:
  """The launcher's part, before any pipeline: the tokenizer (trained on first use), then the
  plan of the units to prepare, or None when workdir/data holds a finished cache to reuse."""
  tok = cache.tokenizer(c, workdir, may_train=True)
  request = cache.request(c, tok)
  if preparation.cached(c, workdir, request):
    return None
  preparation.open_cache(workdir)
  return preparation.plan(c, tok, request)


def _prepare_unit(element, c_dict, workdir, shard_rows):
  from apache_beam.metrics import Metrics  # on a worker: the optional `beam` extra

  unit, digest = element
  if preparation.finished(cache.paths(workdir)["dir"], unit, digest) is not None:
    Metrics.counter(COUNTERS, "units_finished_before").inc()
  else:
    preparation.prepare_unit(c_dict, workdir, unit, digest, shard_rows)
    Metrics.counter(COUNTERS, "units_prepared").inc()
    logging.info("prepared unit %d (%s)", unit.index, unit.name)
  return unit.index


def _finish(num_units, c_dict, workdir, work):
  c = ml_collections.ConfigDict(c_dict)
  tok = cache.tokenizer(c, workdir, may_train=False)
  preparation.finish(c, workdir, work.request, work.units, tok)
  return num_units


def build_pipeline(pipeline, c: ml_collections.ConfigDict, workdir: str, work):
  """Add preparing `work` (start()'s plan) to `pipeline`; returns the last step's output."""
  beam = import_beam()
  c_dict = c.to_dict()
  return (
    pipeline
    | "Units" >> beam.Create([(u, work.digests[u.index]) for u in work.units])
    | "Spread units" >> beam.Reshuffle()
    | "Prepare unit" >> beam.Map(_prepare_unit, c_dict, workdir, work.shard_rows)
    | "All units" >> beam.combiners.Count.Globally()
    | "Write manifest" >> beam.Map(_finish, c_dict, workdir, work)
  )


def run(c: ml_collections.ConfigDict, workdir: str, runner: str, beam_args=()) -> dict:
  """Prepare workdir's cache on Beam's `runner`, with more pipeline options in `beam_args`
  (command-line style: ["--project=...", ...]). Returns the units prepared and the units a
  previous run had finished, or {"cache_reused": True}."""
  beam = import_beam()
  # The optional `beam` extra, checked just above.
  from apache_beam.metrics.metric import MetricsFilter
  from apache_beam.options.pipeline_options import PipelineOptions  # (the `beam` extra)

  options = PipelineOptions(list(beam_args), runner=runner)
  options.get_all_options()  # Beam refuses a bad option here, before any work
  work = start(c, workdir)
  if work is None:
    return {"cache_reused": True}
  pipeline = beam.Pipeline(options=options)
  build_pipeline(pipeline, c, workdir, work)
  result = pipeline.run()
  state = result.wait_until_finish()
  if state != beam.runners.runner.PipelineState.DONE:
    raise DataError(f"the Beam pipeline ended {state}; see the runner's logs.")
  counts = {"units_prepared": 0, "units_finished_before": 0}
  query = result.metrics().query(MetricsFilter().with_namespace(COUNTERS))
  for counter in query["counters"]:
    counts[counter.key.metric.name] += counter.committed
  return {"cache_reused": False, "units": len(work.units), **counts}
