"""The parameter paths and shapes a saved tree holds, compared with those a model expects.

Orbax's partial restore fills a target leaf the save does not hold with an empty placeholder and
ignores saved leaves the target does not name, so restoring a fine-tuned tree into a pretraining
model (or the reverse) would "succeed" and crash later. `check` reads only the tree's metadata
and stops first, naming the first differing paths.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from etils import epath

from sslm_jax.errors import SslmError

_SHOWN = 3  # differing paths named per kind


class TreeMismatch(SslmError, ValueError):
  """A saved parameter tree is not the tree of the model it is restored into."""


def _name(path) -> str:
  parts = []
  for key in path:
    part = getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))
    parts.append(str(part))
  if parts and parts[-1] == "value":  # nnx.Variable's own level
    parts = parts[:-1]
  return "/".join(parts)


def shapes(tree) -> dict[str, tuple]:
  """'encoder/embed/embedding' -> shape, for every leaf of `tree` (arrays, ShapeDtypeStructs or
  Orbax's array metadata)."""
  return {
    _name(p): tuple(getattr(v, "shape", ()) or ())
    for p, v in jax.tree_util.tree_leaves_with_path(tree)
  }


def saved_params(tree_dir: epath.Path) -> dict[str, tuple]:
  """shapes() of the `params` subtree saved in `tree_dir` (a checkpoint's state/ directory, or a
  params-only save); reads metadata only."""
  metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(tree_dir))
  return shapes(dict(metadata.tree).get("params", {}))


def _listed(names: list[str]) -> str:
  more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
  return ", ".join(names[:_SHOWN]) + more


def difference(saved: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
  """None when the two trees hold the same paths with the same shapes, else what differs."""
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  reshaped = [
    f"{k} {list(saved[k])} (expected {list(expected[k])})"
    for k in sorted(set(saved) & set(expected))
    if saved[k] != expected[k]
  ]
  parts = []
  if missing:
    parts.append(f"missing {_listed(missing)}")
  if unexpected:
    parts.append(f"unexpected {_listed(unexpected)}")
  if reshaped:
    parts.append(f"other shapes {_listed(reshaped)}")
  return "; ".join(parts) or None


def check(tree_dir: epath.Path, expected_params, what: str, fix: str) -> None:
  """Raise TreeMismatch (one line: `what`, the differing paths, `fix`) unless `tree_dir` holds
  exactly the parameter paths and shapes of `expected_params` (an abstract or real params tree)."""
  found = difference(saved_params(tree_dir), shapes(expected_params))
  if found:
    raise TreeMismatch(f"{what} holds the parameters of another model ({found}); {fix}")
