"""`data.augment`: the transforms a run applies, written as one string for config files and flags.

  --config.data.augment='synonym:p=0.5,alpha=0.1,thesaurus=/data/syn.tsv;swap:p=0.3'
  --config.data.augment_copies=2

Transforms are separated by `;` and applied in the order written; each is `name` or
`name:field=value,field=value`. Numbers are read as numbers, anything else as text, so a path
may not contain `,` or `;`. The fields are p, alpha and each transform's own (FIELDS; what they
do: sslm_jax.data.augment.transforms); an empty string turns augmentation off.

What this module checks needs no file: names, fields, p and alpha in [0, 1], and the task.
Sources (thesaurus, WordNet, paraphrases, a BERT workdir) are opened when the data is prepared,
by sslm_jax.data.augment, which raises the same AugmentError.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from sslm_jax.errors import SslmError

NAMES = ("synonym", "insert", "swap", "delete", "split_sentences", "paraphrase", "contextual")
# Each transform's own fields, besides name, p and alpha.
FIELDS = {
  "synonym": ("thesaurus", "wordnet"),
  "insert": ("thesaurus", "wordnet"),
  "swap": (),
  "delete": (),
  "split_sentences": ("max_words",),
  "paraphrase": ("paraphrases", "callable", "batch"),
  "contextual": ("workdir", "step", "top_k"),
}

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_INT_FIELDS = ("max_words", "top_k", "step", "batch")
# Transforms that cut one text into several: a text pair cannot follow them.
SPLITTING = ("split_sentences",)


class AugmentError(SslmError, ValueError):
  """A transform spec or source file that cannot be used; the message names the problem and fix."""


def fraction(spec: dict, key: str, default: float) -> float:
  """spec[key] (else `default`), which must lie in [0, 1]."""
  value = spec.get(key, default)
  ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0
  if not ok:
    raise AugmentError(f"augment {spec['name']}: {key}={value!r} is outside [0, 1]; use 0 to 1.")
  return float(value)


def one_of(spec: dict, keys: tuple[str, str], hint: str) -> tuple[str, str]:
  """(key, value) of the one of `keys` that spec sets; AugmentError unless exactly one is."""
  given = [k for k in keys if spec.get(k)]
  if len(given) != 1:
    raise AugmentError(f"augment {spec['name']}: set exactly one of {' or '.join(keys)} ({hint}).")
  return given[0], str(spec[given[0]])


def check_spec(spec) -> dict:
  """A spec (a mapping or ConfigDict) as a dict, once its name and field names are known."""
  if hasattr(spec, "to_dict"):
    spec = spec.to_dict()
  if not isinstance(spec, Mapping) or "name" not in spec:
    raise AugmentError(f"augment spec {spec!r} has no name; write {{'name': 'swap', 'p': 0.5}}.")
  spec, name = dict(spec), spec["name"]
  if name not in FIELDS:
    raise AugmentError(f"augment transform {name!r} is unknown; use one of {', '.join(NAMES)}.")
  allowed = ("name", "p", "alpha", *FIELDS[name])
  unknown = sorted(set(spec) - set(allowed))
  if unknown:
    raise AugmentError(
      f"augment {name}: unknown field(s) {unknown}; allowed: {', '.join(allowed)}."
    )
  return spec


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
    spec = check_spec(spec)
    for key in ("p", "alpha"):
      fraction(spec, key, 1.0)
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
