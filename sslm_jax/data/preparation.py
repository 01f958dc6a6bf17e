"""Preparing the token-row cache: streaming, in parallel, resumable.

The source is cut into units (data/units.py). Each unit is read, augmented (train split),
tokenized and packed on its own, streaming: its rows go to shards as they are made, so memory
is bounded by one tokenizer batch and one shard buffer, whatever the corpus size. A unit's
record (data/units/NNNNN.json) is written after its shards; a rerun skips units whose record
matches, so a killed prepare keeps what it finished. Each of the n processes prepares its share
of the units (units.assign: by size, largest first) on a pool of `num_workers` processes; then
process 0 joins the records, in unit order, into data/meta.json, the manifest that build()
opens. The rows, and so the batch for any step, are
the same for any number of workers or hosts. data/beam_prepare.py runs the same steps as an
Apache Beam pipeline.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable

import ml_collections
from absl import logging

from sslm_jax.data import cache, corpus, gfile, joining, packing, shards, units
from sslm_jax.data.augment import apply as augment_data
from sslm_jax.data.corpus import DataError

UNITS_DIR = "units"
_AUGMENT_INDEX_STRIDE = 1 << 32  # document n of unit u is augmented as example u * stride + n


def _record_path(data_dir: str, index: int) -> str:
  return os.path.join(data_dir, UNITS_DIR, f"{index:05d}.json")


def _digest(request: dict, unit: units.Unit, shard_rows: int) -> str:
  text = json.dumps([request, repr(unit), shard_rows], sort_keys=True)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_json(path: str) -> dict | None:
  if not gfile.exists(path):
    return None
  with gfile.GFile(path, "r") as f:
    return json.load(f)


def _write_json(path: str, record: dict) -> None:
  data = json.dumps(record, indent=1).encode("utf-8")
  cache.atomic_write(path, lambda f: f.write(data))


def finished(data_dir: str, unit: units.Unit, digest: str) -> dict | None:
  """The unit's record when a previous prepare finished it for the same request."""
  record = _read_json(_record_path(data_dir, unit.index))
  if record is None or record["digest"] != digest:
    return None
  for split in record["splits"].values():
    for name, _ in split["shards"]:
      if not gfile.exists(os.path.join(data_dir, name)):
        return None
  return record


def _add_augmented(packer: packing.Packer, augmentation, pending: list) -> None:
  """The pending train documents, each followed by its changed copies; empties `pending`."""
  for text in augmentation.with_copies([t for t, _ in pending], [i for _, i in pending]):
    packer.add(text)
  pending.clear()


def prepare_unit(c_dict: dict, workdir: str, unit: units.Unit, digest: str, shard_rows: int):
  """Read, augment, tokenize and pack one unit into shards; returns (and writes) its record.

  Runs in a pool worker (hence the config as a dict) or in the calling process.
  """
  c = ml_collections.ConfigDict(c_dict)
  data_dir = cache.paths(workdir)["dir"]
  tok = cache.tokenizer(c, workdir, may_train=False)
  start_id, end_id = cache.doc_ids(c, tok)
  row_len = cache.row_len(c)
  augmentation = augment_data.Augmentation.from_config(c) if "train" in unit.splits else None
  stats, samples = corpus.DecodeStats(), []
  writers, packers = {}, {}
  for split in unit.splits:
    writers[split] = shards.ShardWriter(
      data_dir, f"{split}-{unit.index:05d}", row_len, packing.row_dtype(tok), shard_rows
    )
    packers[split] = packing.Packer(
      tok,
      start_id=start_id,
      end_id=end_id,
      row_len=row_len,
      emit=writers[split].write,
      what=f"{unit.name} ({split})",
    )
  train_docs = 0
  try:
    pending: list[tuple[str, int]] = []  # train documents to augment, CHUNK at a time
    for split, text, key in units.keyed_documents(c, unit, stats):
      if split == "train" and augmentation is not None:
        example = units.augment_index(unit, key)
        example = unit.index * _AUGMENT_INDEX_STRIDE + train_docs if example is None else example
        pending.append((text, example))
        train_docs += 1
        if len(pending) >= augment_data.CHUNK:
          _add_augmented(packers[split], augmentation, pending)
        continue
      packers[split].add(text)
      if split == "eval" and len(samples) < corpus.NUM_SAMPLE_TEXTS:
        samples.append(corpus.snippet(text))
    if pending:
      _add_augmented(packers["train"], augmentation, pending)
    for packer in packers.values():
      packer.close()
  except BaseException:
    for writer in writers.values():
      writer.abort()
    raise
  record = {
    "digest": digest,
    "unit": unit.name,
    "splits": {
      split: {
        "docs": packers[split].num_docs,
        "tokens": packers[split].num_tokens,
        "rows": packers[split].num_rows,
        "shards": [list(s) for s in writers[split].close()],
      }
      | ({joining.CARRY: packers[split].remainder.tolist()} if unit.byte_range else {})
      for split in unit.splits
    },
    "samples": samples,
    "undecodable": {"files": sorted(stats.files), "docs": stats.docs},
    "augment": augmentation.counts.record() if augmentation is not None else None,
  }
  _write_json(_record_path(data_dir, unit.index), record)
  return record


def _log_done(done: int, total: int, unit: units.Unit, record: dict) -> None:
  sizes = ", ".join(
    f"{split} {s['docs']} docs {s['tokens']} tokens {s['rows']} rows"
    for split, s in record["splits"].items()
  )
  logging.info("prepared unit %d/%d (%s): %s", done, total, unit.name, sizes)


@dataclasses.dataclass(frozen=True)
class Plan:
  """The work of preparing a config's cache: the request the rows answer, the source's units,
  each unit's digest (its record is reused when the digest matches) and the rows per shard."""

  request: dict
  units: list[units.Unit]
  digests: dict[int, str]
  shard_rows: int


def plan(c: ml_collections.ConfigDict, tok, request: dict) -> Plan:
  """The units, digests and shard size of preparing `c` with `tok` for `request`."""
  all_units = units.units(c)
  shard_rows = c.data.shard_rows or shards.rows_per_shard(cache.row_len(c), packing.row_dtype(tok))
  digests = {u.index: _digest(request, u, shard_rows) for u in all_units}
  return Plan(request, all_units, digests, shard_rows)


def cached(c: ml_collections.ConfigDict, workdir: str, request: dict) -> bool:
  """Whether workdir/data holds a finished cache for `request` (then its sizes are checked)."""
  meta = cache.read_meta(workdir)
  if meta is None or meta["request"] != request:
    return False
  logging.info("reusing the data cache in %s", cache.paths(workdir)["dir"])
  cache.check_sizes(c, meta)
  return True


def open_cache(workdir: str) -> None:
  """Remove the manifest of a cache for another request (finish() writes the new one) and make
  the directory of unit records; finished units of the same request are kept."""
  paths = cache.paths(workdir)
  if gfile.exists(paths["meta"]):
    gfile.remove(paths["meta"])
  gfile.makedirs(os.path.join(paths["dir"], UNITS_DIR))


def peak_rss_mib() -> float | None:
  """This process's peak resident memory since its program started (Linux VmHWM; ru_maxrss
  would count a worker's parent's memory at the fork before exec)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def _unit_in_worker(*args) -> tuple[dict, float | None]:
  return prepare_unit(*args), peak_rss_mib()


def _prepare_units(
  c, workdir, todo: list[units.Unit], digests, shard_rows, num_workers
) -> float | None:
  """Prepare `todo` here (num_workers == 1) or on a pool of fresh worker processes; returns
  the largest worker's peak memory in MiB (None without workers)."""
  args = lambda u: (c.to_dict(), workdir, u, digests[u.index], shard_rows)  # noqa: E731
  if num_workers <= 1 or len(todo) <= 1:
    for done, unit in enumerate(todo, start=1):
      _log_done(done, len(todo), unit, prepare_unit(*args(unit)))
    return None
  # Fresh interpreters: forking a process that runs TensorFlow's and JAX's threads can hang.
  context = multiprocessing.get_context("spawn")
  workers, peak = min(num_workers, len(todo)), 0.0
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    futures = {pool.submit(_unit_in_worker, *args(u)): u for u in todo}
    try:
      for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
        record, worker_peak = future.result()  # a worker's error is raised here
        _log_done(done, len(todo), futures[future], record)
        peak = max(peak, worker_peak or 0.0)
    except BaseException:
      pool.shutdown(cancel_futures=True)  # units not started yet are not started
      raise
  return peak or None


def _manifest(c, request: dict, records: list[dict], row_len: int, dtype: str) -> dict:
  """meta.json: the request, each split's sizes and shards in unit order, and the summaries."""
  meta = {"request": request, "row_len": row_len, "dtype": dtype, "samples": []}
  for split in units.SPLITS:
    parts = [r["splits"][split] for r in records if split in r["splits"]]
    meta[split] = {
      "docs": sum(p["docs"] for p in parts),
      "tokens": sum(p["tokens"] for p in parts),
      "rows": sum(p["rows"] for p in parts),
      "shards": [s for p in parts for s in p["shards"] if s[1]],
    }
  for r in records:
    meta["samples"] += r["samples"][: corpus.NUM_SAMPLE_TEXTS - len(meta["samples"])]
  files = {f for r in records for f in r["undecodable"]["files"]}
  meta["undecodable"] = {
    "files": len(files),
    "docs": sum(r["undecodable"]["docs"] for r in records),
  }
  counts = [r["augment"] for r in records if r["augment"] is not None]
  if counts:
    meta["augment"] = {
      "split": "train",
      "data": "pretraining documents",
      **augment_data.merge_counts(counts),
    }
  return meta


def _remove_unlisted(data_dir: str, meta: dict, num_units: int) -> None:
  """Shards, unit records and version-1 files that the new manifest does not use."""
  keep = {name for split in units.SPLITS for name, _ in meta[split]["shards"]}
  for name in gfile.listdir(data_dir):
    stale_shard = name.endswith(".bin") and name not in keep
    if stale_shard or name in ("train_rows.npy", "eval_rows.npy"):
      gfile.remove(os.path.join(data_dir, name))
  record_dir = os.path.join(data_dir, UNITS_DIR)
  for name in gfile.listdir(record_dir):
    if name.endswith(".json") and int(name.split(".")[0]) >= num_units:
      gfile.remove(os.path.join(record_dir, name))


def finish(c, workdir: str, request: dict, all_units: list[units.Unit], tok) -> None:
  """Join the unit records, in unit order, into data/meta.json and remove what it does not list."""
  paths = cache.paths(workdir)
  records = [_read_json(_record_path(paths["dir"], u.index)) for u in all_units]
  missing = [u.name for u, r in zip(all_units, records, strict=True) if r is None]
  if missing:
    raise DataError(f"units {missing[:5]} were not prepared by any process; rerun prepare.")
  shard_rows = c.data.shard_rows or shards.rows_per_shard(cache.row_len(c), packing.row_dtype(tok))
  joining.join_ranges(
    paths["dir"], all_units, records, cache.row_len(c), packing.row_dtype(tok), shard_rows
  )
  meta = _manifest(c, request, records, cache.row_len(c), packing.row_dtype(tok).name)
  if meta["undecodable"]["docs"]:
    logging.warning(
      "%d documents in %d files had bytes that are not UTF-8; they were replaced by U+FFFD.",
      meta["undecodable"]["docs"],
      meta["undecodable"]["files"],
    )
  cache.check_sizes(c, meta)
  if "augment" in meta:
    augment_data.write_report(
      workdir,
      "pretraining documents",
      {k: v for k, v in meta["augment"].items() if k not in ("split", "data")},
    )
  _remove_unlisted(paths["dir"], meta, len(all_units))
  _write_json(paths["meta"], meta)
  sizes = {s: {k: meta[s][k] for k in ("docs", "tokens", "rows")} for s in units.SPLITS}
  logging.info("data cache written to %s: %s", paths["dir"], sizes)


def build_cache(
  c: ml_collections.ConfigDict,
  workdir: str,
  *,
  process_index: int = 0,
  process_count: int = 1,
  num_workers: int = 1,
  barrier: Callable[[str], None] = lambda name: None,
  source: bool = False,
) -> float | None:
  """Build the workdir's tokenizer (trained, or a copy of the file the config names) and
  workdir/data/ unless they already match the config. A mixture `source` reads the run's
  tokenizer and keeps no copy.

  Every process of a run calls it (`barrier` waits for all of them); each prepares its share
  of the units on `num_workers` worker processes. A killed or failed prepare leaves no
  meta.json, and build() refuses to run without one that matches the config. Returns the
  largest worker process's peak memory in MiB (None when no worker process ran).
  """
  paths = cache.paths(workdir)
  if process_index == 0 and not source:
    cache.tokenizer(c, workdir, may_train=True)  # trains or copies one on first use
  barrier("tokenizer ready")
  if c.data.mixture:  # each source's own cache, with the run's tokenizer
    peaks = []
    for name, source_config, source_workdir in cache.mixture_sources(c, workdir):
      logging.info("preparing mixture source %r", name)
      try:
        peak = build_cache(
          source_config, source_workdir, process_index=process_index, process_count=process_count,
          num_workers=num_workers, barrier=barrier, source=True,
        )  # fmt: skip
      except DataError as e:
        raise DataError(
          f"mixture source {name!r}: {e} (a source's own fields are set as "
          f"--config.data.mixture.{name}.FIELD, e.g. eval_fraction)"
        ) from e
      peaks += [peak] if peak else []
    return max(peaks, default=None)
  tok = cache.tokenizer(c, workdir, may_train=False)
  request = cache.request(c, tok)
  reuse = cached(c, workdir, request)
  barrier("data cache checked")
  if reuse:
    return None
  if process_index == 0:
    open_cache(workdir)
  barrier("data cache opened")
  work = plan(c, tok, request)
  mine = units.assign(work.units, process_count)[process_index]
  todo = [u for u in mine if finished(paths["dir"], u, work.digests[u.index]) is None]
  if len(todo) < len(mine):
    logging.info(
      "prepare: %d of %d units were finished before; preparing %d",
      len(mine) - len(todo),
      len(mine),
      len(todo),
    )
  worker_peak = _prepare_units(c, workdir, todo, work.digests, work.shard_rows, num_workers)
  barrier("data units prepared")
  if process_index == 0:
    finish(c, workdir, request, work.units, tok)
  barrier("data cache written")
  if process_index != 0:
    cache.check_sizes(c, cache.read_meta(workdir))
  return worker_peak
