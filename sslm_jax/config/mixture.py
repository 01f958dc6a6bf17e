"""Data mixtures in a config: several sources with weights (data/mixture.py serves them).

In a config file:

  from sslm_jax.config import mixture
  c.data.mixture.web = mixture.source(0.7, source="text", text_files="/data/web/*.txt")
  c.data.mixture.wiki = mixture.source(0.3, source="tfds", tfds_name="wiki40b/en")

Each source takes the data.* source fields below (unset ones keep the run's data.* values) and
gets its own cache in WORKDIR/sources/NAME/data; all share the run's tokenizer, seq_len and
objective. With a mixture, data.source and its fields are not used. Weights are relative.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import ml_collections

SOURCE_FIELDS = (
  "source",
  "text_files",
  "eval_text_files",
  "text_key",
  "eval_fraction",
  "tfds_name",
  "tfds_text_key",
  "tfds_train_split",
  "tfds_eval_split",
  "tfds_data_dir",
)


def source(weight: float, **fields) -> ml_collections.ConfigDict:
  """One mixture source: its weight and the data.* source fields that differ from the run's."""
  unknown = sorted(set(fields) - set(SOURCE_FIELDS))
  if unknown:
    raise ValueError(f"mixture source fields {unknown} are unknown; use {SOURCE_FIELDS}.")
  return ml_collections.ConfigDict({"weight": float(weight), **fields})


def names(c: ml_collections.ConfigDict) -> list[str]:
  """The mixture's source names, sorted (the order of sources everywhere); [] without one."""
  return sorted(c.data.mixture.keys())


def weights(c: ml_collections.ConfigDict) -> list[float]:
  return [float(c.data.mixture[name].weight) for name in names(c)]


def source_config(c: ml_collections.ConfigDict, name: str, tokenizer_path: str):
  """The run's config as if `name` were its only source, with the run's tokenizer."""
  out = copy.deepcopy(c)
  spec = c.data.mixture[name]
  with out.unlocked():
    for field in SOURCE_FIELDS:
      if field in spec:
        out.data[field] = spec[field]
    out.data.mixture = ml_collections.ConfigDict()
    out.data.tokenizer_path = tokenizer_path
  return out


def source_workdir(workdir: str, name: str) -> str:
  """Where source `name` keeps its cache (in data/ below it)."""
  return os.path.join(workdir, "sources", name)


def validate(c: ml_collections.ConfigDict, require: Callable[[bool, str], None]) -> None:
  for name in names(c):
    spec = c.data.mixture[name]
    where = f"data.mixture.{name}"
    require(name.isidentifier(), f"{where}: source names must be identifiers (letters, digits, _).")
    require(
      isinstance(spec, ml_collections.ConfigDict) and "weight" in spec,
      f"{where} must be sslm_jax.config.mixture.source(weight, ...) (a weight and data.* "
      "source fields).",
    )
    require(
      isinstance(spec.weight, (int, float)) and spec.weight > 0,
      f"{where}.weight={spec.weight!r} must be a positive number (weights are relative).",
    )
    unknown = sorted(set(spec.keys()) - set(SOURCE_FIELDS) - {"weight"})
    require(not unknown, f"{where} has unknown fields {unknown}; use weight and {SOURCE_FIELDS}.")
    kind = spec.get("source", c.data.source)
    require(
      kind in ("builtin", "text", "tfds"),
      f"{where}.source={kind!r}: use 'builtin', 'text' or 'tfds'.",
    )
    require(
      kind != "text" or bool(spec.get("text_files", c.data.text_files)),
      f"{where} reads text files but has no text_files; set {where}.text_files=PATH_OR_GLOB.",
    )
    require(
      kind != "tfds" or bool(spec.get("tfds_name", c.data.tfds_name)),
      f"{where} reads a tfds dataset but has no tfds_name; set {where}.tfds_name=NAME.",
    )
