"""The files preparation.build_cache() writes into a workdir, tokenizer.model and data/ (the
token rows and meta.json), and what a resume compares with them before anything is rebuilt.

meta.json records the request the rows answer (see `request`); build_cache() writes it last, so a
cache without one is incomplete.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable

import ml_collections
from absl import logging

from sslm_jax.checkpoints.restore import named_tokenizer
from sslm_jax.config import mixture as mixture_config
from sslm_jax.data import corpus, gfile, permute, shards, units
from sslm_jax.data.augment import apply as augment_data
from sslm_jax.data.corpus import DataError
from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib

# 1: one .npy file per split, packed as one stream; 2: shards per unit (data/units.py).
CACHE_VERSION = 2


def row_len(c: ml_collections.ConfigDict) -> int:
  return c.data.seq_len + 1 if c.objective == "causal_lm" else c.data.seq_len


def doc_ids(c: ml_collections.ConfigDict, tok) -> tuple[int, int]:
  """The ids that open and close each document: (bos, eos) or (cls, sep).

  Where they are one id (GPT-2's <|endoftext|>) each document is opened by it and not closed,
  so one separator stands at each document boundary.
  """
  if c.objective == "causal_lm":
    return tok.bos_id, tok.eos_id
  return tok.cls_id, tok.sep_id


def _check_specials(c: ml_collections.ConfigDict, tok) -> None:
  """A tokenizer.json must have the special tokens the objective frames documents with."""
  needed = ("bos_id", "eos_id") if c.objective == "causal_lm" else ("cls_id", "sep_id", "mask_id")
  missing = [name for name in needed if getattr(tok, name) is None]
  if missing:
    raise DataError(
      f"tokenizer {tok.path} has no special token for {missing}, which objective="
      f"{c.objective} needs; use a tokenizer that has them (GPT-2's <|endoftext|> for "
      "causal_lm, BERT's [CLS]/[SEP]/[MASK] for masked_lm)."
    )


def _source_name(c: ml_collections.ConfigDict, split: str) -> str:
  d = c.data
  if d.source == "text":
    files = d.eval_text_files if split == "eval" and d.eval_text_files else d.text_files
    return f"text files {files!r} ({split} split)"
  if d.source == "tfds":
    return f"tfds {d.tfds_name}:{d.tfds_train_split if split == 'train' else d.tfds_eval_split}"
  return f"builtin (Python standard library sources, {split} split)"


def paths(workdir: str) -> dict[str, str]:
  data = os.path.join(workdir, "data")
  return {
    "dir": data,
    "meta": os.path.join(data, "meta.json"),
  }


def atomic_write(path: str, write: Callable) -> None:
  """Write beside `path` under a temporary name, then rename: never a half file at `path`."""
  head, tail = os.path.split(path)
  tmp = os.path.join(head, f".{tail}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  with gfile.GFile(tmp, "wb") as f:
    write(f)
  gfile.rename(tmp, path, overwrite=True)


def read_meta(workdir: str) -> dict | None:
  path = paths(workdir)["meta"]
  if not gfile.exists(path):
    return None
  with gfile.GFile(path, "r") as f:
    return json.load(f)


def split_rows(workdir: str, split: str, opener=None, read_threads=128) -> shards.ShardedRows:
  """The 'train' or 'eval' rows of the cache in workdir/data, as listed in its meta.json;
  remote ones are read `read_threads` ranged reads at a time."""
  meta = read_meta(workdir)
  if meta is None:
    raise DataError(
      f"no data cache in {paths(workdir)['dir']}; run preparation.build_cache(config, workdir) "
      "first."
    )
  return shards.ShardedRows(
    paths(workdir)["dir"], meta[split]["shards"], meta["row_len"], meta["dtype"], opener,
    read_threads,
  )  # fmt: skip


def request(c: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer) -> dict:
  """Everything the cached rows depend on; any change means a rebuild."""
  request = {
    "version": CACHE_VERSION,
    "objective": c.objective,
    "seq_len": c.data.seq_len,
    "row_len": row_len(c),
    "tokenizer_sha256": tok.sha256,
    "source": corpus.describe(c),
  }
  augmentation = augment_data.cache_identity(c)
  if augmentation is not None:  # absent when off, so caches built before it stay valid
    request["augment"] = augmentation
  return json.loads(json.dumps(request))  # the form it has after a round trip through meta.json


def _one_batch(c: ml_collections.ConfigDict) -> str:
  extra = row_len(c) - c.data.seq_len
  seq = f"(seq_len+{extra})" if extra else "seq_len"
  return (
    f"one batch needs batch_size*{seq}={c.batch_size}*{row_len(c)}="
    f"{c.batch_size * row_len(c)} tokens"
  )


def check_sizes(c: ml_collections.ConfigDict, meta: dict) -> None:
  """Both splits must fill at least one global batch."""
  train, ev = meta["train"], meta["eval"]
  if train["rows"] < c.batch_size:
    raise DataError(
      f"{_source_name(c, 'train')} has {train['tokens']} tokens in {train['docs']} documents; "
      f"{_one_batch(c)}. Use more data, or lower --config.batch_size or --config.data.seq_len."
    )
  if ev["rows"] < c.batch_size:
    raise DataError(
      f"eval split too small: {_source_name(c, 'eval')} has {ev['tokens']} tokens in "
      f"{ev['docs']} documents ({ev['rows']} rows); {_one_batch(c)}. Raise "
      "--config.data.eval_fraction, set --config.data.eval_text_files, or lower "
      "--config.batch_size."
    )


def _missing_source(c: ml_collections.ConfigDict, source: str) -> tokenizer_lib.TokenizerError:
  if not c.data.tokenizer_path:
    return tokenizer_lib.TokenizerError(
      f"init_from_hf={c.init_from_hf} has no tokenizer.json; pass the tokenizer its weights "
      "were trained with as --config.data.tokenizer_path=FILE."
    )
  fix = "leave it empty to train one"
  if c.init_from_hf:
    fix = "pass the tokenizer the init_from_hf weights were trained with"
  return tokenizer_lib.TokenizerError(
    f"tokenizer file {source} does not exist; fix data.tokenizer_path or {fix}."
  )


def _resolve(c: ml_collections.ConfigDict, workdir: str) -> tuple[str | None, bool]:
  """(the tokenizer file to read, whether it is the workdir's own copy); (None, False) where a
  new one is to be trained. Reads only.

  The workdir's copy is what the run trained with: a config naming another file is refused, and
  one naming a file that has moved since the copy was made reads the copy.
  """
  own, source = tokenizer_files.workdir_file(workdir), named_tokenizer(c)
  if not source:
    return own, own is not None
  if not gfile.exists(source):
    if own is None:
      raise _missing_source(c, source)
    logging.info("tokenizer %s not found; reading the workdir's copy %s", source, own)
    return own, True
  if own is not None:
    tokenizer_files.check_adoptable(source, workdir)
    return own, True
  return source, False


def tokenizer_file(c: ml_collections.ConfigDict, workdir: str) -> str:
  """The workdir's own tokenizer copy, else the file the config names, else where a new
  tokenizer.model is trained."""
  path, _ = _resolve(c, workdir)
  return path or os.path.join(workdir, "tokenizer.model")


def _tokenizer_sample(c: ml_collections.ConfigDict) -> list[str]:
  """The first data.tokenizer_sample_bytes of the train split (never eval text); of a mixture,
  each source's first share of them, by weight."""
  budget = c.data.tokenizer_sample_bytes
  if not c.data.mixture:
    return corpus.tokenizer_sample(units.split_documents(c, "train", corpus.DecodeStats()), budget)
  weights, sample = mixture_config.weights(c), []
  for name, weight in zip(mixture_config.names(c), weights, strict=True):
    source = mixture_config.source_config(c, name, "")
    docs = units.split_documents(source, "train", corpus.DecodeStats())
    sample += corpus.tokenizer_sample(docs, int(budget * weight / sum(weights)))
  return sample


def _train_tokenizer(c: ml_collections.ConfigDict, path: str) -> tokenizer_lib.Tokenizer:
  """Train on _tokenizer_sample (never on eval text)."""
  sample = _tokenizer_sample(c)
  if not sample:
    raise DataError(
      f"{_source_name(c, 'train')} has no text; {_one_batch(c)}. Check data.source and its "
      "files or dataset (and that data.tokenizer_sample_bytes > 0)."
    )
  logging.info("training a %d-piece tokenizer on %d documents", c.data.vocab_size, len(sample))
  return tokenizer_lib.train(sample, c.data.vocab_size, path)


def tokenizer(
  c: ml_collections.ConfigDict, workdir: str, may_train: bool
) -> tokenizer_lib.Tokenizer:
  """The workdir's tokenizer: its own copy (tokenizer.model or tokenizer.json), else the file the
  config names (data.tokenizer_path, or init_from_hf's tokenizer.json), copied into the workdir
  when `may_train`, else a new SentencePiece model trained on first use."""
  path, own = _resolve(c, workdir)
  origin = "data.tokenizer_path" if c.data.tokenizer_path else path
  if path is None:
    path = origin = os.path.join(workdir, "tokenizer.model")
    if not may_train:
      raise DataError(
        f"{path} does not exist; run preparation.build_cache(config, workdir) before build()."
      )
    tok, own = _train_tokenizer(c, path), True
  else:
    tok = tokenizer_files.load(path)
  _check_size(c, tok, origin)
  _check_specials(c, tok)
  if may_train and not own:  # checked first: a refused tokenizer is never copied
    tok = tokenizer_files.load(tokenizer_files.adopt(path, workdir))
  return tok


def _check_size(c: ml_collections.ConfigDict, tok, origin: str) -> None:
  if tok.vocab_size != c.data.vocab_size:
    raise DataError(
      f"the tokenizer {origin} has {tok.vocab_size} pieces but data.vocab_size="
      f"{c.data.vocab_size}; set --config.data.vocab_size={tok.vocab_size}"
      + ("." if named_tokenizer(c) else ", or use a new --workdir to train one of the new size.")
    )


def _existing_tokenizer(c: ml_collections.ConfigDict, workdir: str):
  """The tokenizer build_cache() would use, or None where it would train a new one (reads only)."""
  path, _ = _resolve(c, workdir)
  return tokenizer_files.load(path) if path else None


def resume_record(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """What a checkpoint records about its data beside the config, computed without writing."""
  tok = _existing_tokenizer(c, workdir)
  if c.data.mixture:
    listing = {name: corpus.listing(src) for name, src, _ in mixture_sources(c, workdir)}
  else:
    listing = corpus.listing(c)
  return {
    "tokenizer_sha256": tok.sha256 if tok else "none yet (prepare would train a new one)",
    "data_listing": listing,
    "data_order": permute.ORDER_VERSION,
  }


def mixture_sources(c: ml_collections.ConfigDict, workdir: str):
  """(name, config, workdir) of each source of a mixture."""
  path = tokenizer_file(c, workdir)
  for name in mixture_config.names(c):
    yield (
      name,
      mixture_config.source_config(c, name, path),
      mixture_config.source_workdir(workdir, name),
    )


def cache_requests(c: ml_collections.ConfigDict, workdir: str) -> tuple[dict, dict] | None:
  """(what the cache in workdir/data was built from, what build_cache() would build it from now).

  None when there is no cache or no tokenizer yet: then nothing cached is replaced.
  """
  if c.data.mixture:  # each source's cache
    pairs = {name: cache_requests(src, w) for name, src, w in mixture_sources(c, workdir)}
    if None in pairs.values():
      return None
    return {n: p[0] for n, p in pairs.items()}, {n: p[1] for n, p in pairs.items()}
  meta, tok = read_meta(workdir), _existing_tokenizer(c, workdir)
  if meta is None or tok is None:
    return None
  return meta["request"], request(c, tok)
