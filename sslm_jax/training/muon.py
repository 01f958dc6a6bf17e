"""Muon for the weight matrices, AdamW for the rest (opt.name='muon').

Muon (optax.contrib.scale_by_muon) orthogonalises each kernel's momentum by Newton-Schulz
iterations; it is defined for matrices, so each kernel is read as one: its `out_sharding` logical
names say which axes it reduces over (the input) and which it produces (the output), and the
scanned layers' `layers` axis is a batch of independent matrices. Attention's q/k/v kernels
[L, D, N, H] are [D] -> [N, H] matrices (llama's key/value kernels [L, D, K, H] likewise), its
output kernel [L, N, H, D] is [N, H] -> [D]; the MLP's kernels, gated (gate, up, down) or not, are
[D] -> [F] and [F] -> [D]. The updates are scaled to AdamW's RMS (consistent_rms=0.2, as in "Muon
is Scalable for LLM Training"), so the AdamW learning rate and weight decay carry over.
Embeddings (llama's untied lm_head is one too: a [V, D] table), biases, norms (qk-norm's
included) and task heads' output kernels (their `labels` axis) take AdamW, with the decay mask of
training/optimizer.py.
"""

from __future__ import annotations

import math

import jax
import optax
from flax import nnx
from optax.contrib import MuonDimensionNumbers, scale_by_muon

MUON, ADAMW = "muon", "adamw"
CONSISTENT_RMS = 0.2  # updates of AdamW's RMS: its learning rate and weight decay carry over
_BATCH_AXES = ("layers",)  # a stack of scanned layers: one matrix per layer
_JOINED = ("heads", "kv")  # attention's heads and head width form one matrix axis together
_OUTPUT_LAYER_AXES = ("labels",)  # a task head's outputs: AdamW, as for the tied embedding


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _name(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def _groups(names: tuple[str, ...]) -> list[tuple[int, ...]]:
  """The matrix axes of a kernel's logical names: batch axes left out, heads and kv joined."""
  groups: list[tuple[int, ...]] = []
  for i, name in enumerate(names):
    if name in _BATCH_AXES:
      continue
    if groups and name in _JOINED and names[groups[-1][-1]] in _JOINED:
      groups[-1] += (i,)
    else:
      groups.append((i,))
  return groups


def dimension_numbers(path, variable) -> MuonDimensionNumbers | None:
  """How Muon reads a parameter as a matrix, or None when AdamW updates it."""
  role = str(getattr(path[-1], "key", path[-1]))
  names = variable.get_metadata().get("out_sharding")
  if role != "kernel" or names is None and variable.ndim != 2:
    return None
  names = tuple(names) if names is not None else ("in", "out")
  if any(n in _OUTPUT_LAYER_AXES for n in names):
    return None
  groups = _groups(names)
  if len(groups) != 2:
    raise ValueError(
      f"parameter {_name(path)} with axes {names}: no rule reads it as a matrix for Muon in "
      "training/muon.py."
    )
  return MuonDimensionNumbers(reduction_axis=groups[0], output_axis=groups[1])


def labels(params: nnx.State) -> nnx.State:
  """'muon' or 'adamw' per parameter."""
  return jax.tree_util.tree_map_with_path(
    lambda path, v: v.replace(MUON if dimension_numbers(path, v) else ADAMW),
    params,
    is_leaf=_is_var,
  )


def is_masked(x) -> bool:
  """A leaf (or parameter) that optax.partition masked out of another part's tree."""
  return isinstance(x, optax.MaskedNode) or (
    _is_var(x) and isinstance(x.get_value(), optax.MaskedNode)
  )


def _map_matrices(fn, updates):
  """fn(variable, dimension numbers) on each matrix of the muon part of `updates` (whose other
  parameters optax.partition has masked out)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, v: v if is_masked(v) else fn(v, dimension_numbers(path, v)),
    updates,
    is_leaf=lambda x: _is_var(x) or isinstance(x, optax.MaskedNode),
  )


def _muon_dimension_numbers(updates):
  return _map_matrices(lambda v, dims: v.replace(dims), updates)


def _scale_to_adamw_rms() -> optax.GradientTransformation:
  """Orthogonalised updates times sqrt(max(fan_in, fan_out)) * CONSISTENT_RMS: AdamW's RMS."""

  def scale(v, dims):
    fan_in = math.prod(v.shape[a] for a in dims.reduction_axis)
    fan_out = math.prod(v.shape[a] for a in dims.output_axis)
    return v.replace(v.get_value() * (math.sqrt(max(fan_in, fan_out)) * CONSISTENT_RMS))

  def update(updates, state, params=None):
    return _map_matrices(scale, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def make(opt, learning_rate: optax.Schedule, adamw: optax.GradientTransformation):
  """Muon (momentum 0.95, Nesterov: optax's defaults) at `learning_rate` on the matrices, with
  AdamW's decoupled weight decay (every kernel decays), and `adamw` on the rest."""
  muon = optax.chain(
    scale_by_muon(eps=opt.eps, weight_dimension_numbers=_muon_dimension_numbers),
    _scale_to_adamw_rms(),
    optax.add_decayed_weights(opt.weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
  return optax.partition({MUON: muon, ADAMW: adamw}, labels)
