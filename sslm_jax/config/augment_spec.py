"""`data.augment`: the transforms a run applies, written as one string for config files and flags.

  --config.data.augment='synonym:p=0.5,alpha=0.1,thesaurus=/data/syn.tsv;swap:p=0.3'
  --config.data.augment_copies=2

Transforms are separated by `;` and applied in the order written; each is `name` or
`name:field=value,field=value`. Numbers are read as numbers, anything else as text, so a path
may not contain `,` or `;`. The fields are those of sslm_jax.data.augment.transforms (p, alpha and
each transform's own); an empty string turns augmentation off.

What this module checks needs no file: names, fields, p and alpha in [0, 1], and the task.
Sources (thesaurus, WordNet, paraphrases, a BERT workdir) are opened when the data is prepared.
"""

from __future__ import annotations

import re

from sslm_jax.data.augment import transforms as augment
from sslm_jax.data.augment.sources import AugmentError

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_INT_FIELDS = ("max_words", "top_k", "step", "batch")
# Transforms that cut one text into several: a text pair cannot follow them.
SPLITTING = ("split_sentences",)


def _value(text: str):
  if _NUMBER.match(text):
    return float(text) if any(ch in text for ch in ".eE") else int(text)
  return text


def _field(name: str, item: str) -> tuple[str, object]:
  key, eq, value = item.partition("=")
  key, value = key.strip(), value.strip()
  if not (eq and key and value):
    raise AugmentError(
      f"data.augment {name}: {item.strip()!r} is not field=value; write e.g. '{name}:p=0.5'."
    )
  return key, _value(value)


def parse(text: str) -> list[dict]:
  """The specs (dicts with `name`) written in a data.augment string, checked; '' -> []."""
  specs = []
  for part in (p.strip() for p in (text or "").split(";")):
    if not part:
      continue
    name, _, fields = part.partition(":")
    spec = {"name": name.strip()}
    for item in (f for f in fields.split(",") if f.strip()):
      key, value = _field(spec["name"], item)
      if key in spec:
        raise AugmentError(f"data.augment {spec['name']}: {key} is given twice; give it once.")
      spec[key] = value
    specs.append(check(spec))
  names = [s["name"] for s in specs]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise AugmentError(f"data.augment lists {twice[0]} twice; list each transform once.")
  return specs


def check(spec: dict) -> dict:
  """One spec's name, fields, fractions and integer fields, without opening any source."""
  try:
    spec = augment.check_spec(spec)
    for key in ("p", "alpha"):
      augment.fraction(spec, key, 1.0)
  except AugmentError as e:
    raise AugmentError(f"data.{e}") from e
  for key in _INT_FIELDS:
    value = spec.get(key)
    if value is not None and (not isinstance(value, int) or value < 1):
      raise AugmentError(f"data.augment {spec['name']}: {key}={value!r} must be an integer >= 1.")
  return spec


def specs(c) -> list[dict]:
  """The transforms of config `c`, checked against its task; [] when augmentation is off."""
  out = parse(c.data.augment)
  copies = c.data.augment_copies
  if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
    raise AugmentError(
      f"data.augment_copies={copies!r} must be an integer >= 1 (augmented copies per example)."
    )
  task = c.finetune.task
  if out and task == "tagging":
    raise AugmentError(
      f"data.augment={c.data.augment!r} with finetune.task='tagging': the transforms change, "
      "move or cut words, so the per-word labels would no longer line up; set "
      "--config.data.augment='' for tagging."
    )
  cutting = [s["name"] for s in out if s["name"] in SPLITTING]
  if cutting and task == "pair_classification":
    raise AugmentError(
      f"data.augment {cutting[0]} cuts a text into several, which its text_pair cannot follow; "
      "remove it for finetune.task='pair_classification'."
    )
  return out


def canonical(specs_: list[dict]) -> str:
  """A spec list written back as a data.augment string (fields in a fixed order)."""
  parts = []
  for spec in specs_:
    fields = ",".join(f"{k}={spec[k]}" for k in sorted(spec) if k != "name")
    parts.append(f"{spec['name']}:{fields}" if fields else spec["name"])
  return ";".join(parts)
