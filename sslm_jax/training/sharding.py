"""Logical axis names -> mesh axes: the one rules table, the mesh, and derived shardings."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec

from sslm_jax.errors import SslmError

MESH_AXES = ("data", "fsdp", "tensor")

# The one table. Weights: shard `embed` over fsdp (ZeRO-3 style) and the head/MLP/vocab
# dimensions over tensor (Megatron style). Activations: batch over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("kv", None),
  ("mlp", "tensor"),
  ("layers", None),
  ("position", None),
  ("token_type", None),
  ("labels", None),  # a task head's outputs (finetune/heads.py): few, so replicated
  ("act_batch", ("data", "fsdp")),
  ("act_len", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
)


class MeshError(SslmError, ValueError):
  """A mesh or batch shape that does not fit the devices; the message says what to change."""


def rules_from_config(overrides: Sequence[Sequence]) -> tuple:
  """DEFAULT_RULES with `mesh.rules` entries ((name, axes), ...) replacing same-named rows."""
  table = dict(DEFAULT_RULES)
  for name, axes in overrides or ():
    if name not in table:
      raise MeshError(f"mesh.rules names unknown logical axis {name!r}; known: {sorted(table)}.")
    table[name] = tuple(axes) if isinstance(axes, list) else axes
  return tuple(table.items())


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, ...]:
  sizes = [data, fsdp, tensor]
  asked = f"mesh data={data}, fsdp={fsdp}, tensor={tensor}"
  if sizes.count(-1) > 1:
    raise MeshError(f"{asked}: at most one axis may be -1.")
  if any(s == 0 or s < -1 for s in sizes):
    raise MeshError(f"{asked}: sizes must be positive or -1.")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise MeshError(
        f"{asked}: the fixed axes multiply to {known}, which does not "
        f"divide the {num_devices} devices; choose sizes whose product divides {num_devices}."
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(
      f"mesh data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} but there are "
      f"{num_devices} devices; set --config.mesh.data/fsdp/tensor so the product is "
      f"{num_devices}, or leave one axis at -1."
    )
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh; with mesh.dcn_* > 1, a hybrid mesh over several slices.

  On multi-slice TPU, mesh.data/fsdp/tensor are the sizes within one slice (fast ICI links) and
  mesh.dcn_data/dcn_fsdp how many slices each axis spans over the data-center network.
  """
  devices = jax.devices() if devices is None else devices
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  dcn = (mesh_cfg.get("dcn_data", 1), mesh_cfg.get("dcn_fsdp", 1), 1)
  if math.prod(dcn) == 1:
    shape = resolve_mesh_shape(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  if len(devices) % math.prod(dcn):
    raise MeshError(
      f"mesh.dcn_data*dcn_fsdp = {math.prod(dcn)} does not divide the {len(devices)} devices; "
      "set them to the number of slices the job spans."
    )
  per_slice = resolve_mesh_shape(
    mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, len(devices) // math.prod(dcn)
  )
  # TPU devices know their slice; elsewhere (GPU hosts, CPU rehearsals) each process is one.
  by_process = not hasattr(devices[0], "slice_index")
  grid = mesh_utils.create_hybrid_device_mesh(
    per_slice, dcn, devices, process_is_granule=by_process
  )
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def check_batch(mesh: jax.sharding.Mesh, batch_size: int, rules) -> None:
  """The batch splits evenly over the mesh axes it is sharded on."""
  batch = batch_sharding(mesh, rules)
  shards = _num_batch_shards(batch)
  if batch_size % shards:
    raise MeshError(
      f"batch_size={batch_size} is not divisible by {'*'.join(_batch_axes(batch))}={shards}, "
      f"the mesh axes the batch is split over; use a multiple of {shards}."
    )


def check_heads(mesh: jax.sharding.Mesh, rules, num_heads: int, num_kv_heads: int) -> None:
  """The query and key/value heads split evenly over the mesh axes of the `heads` logical axis
  (tensor by default): the key/value kernels [D, K, H] are sharded there and the attention
  kernels run whole heads per shard. num_kv_heads 0 means as many as the query heads."""
  axes = _mesh_axes(logical_to_spec(("heads",), rules))
  shards = math.prod(mesh.shape[a] for a in axes)
  for name, heads in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads or num_heads)):
    if heads % shards:
      sizes = " and ".join(f"--config.mesh.{a}" for a in axes)
      raise MeshError(
        f"model.{name}={heads} is not divisible by {'*'.join(axes)}={shards}, the mesh axes the "
        f"attention heads are split over (logical axis 'heads'); set {sizes} so that they "
        f"divide {heads}, or use a multiple of {shards} heads."
      )


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules):
  """Mesh + logical rules in scope, so model activation constraints resolve while tracing."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield


def logical_to_spec(names, rules) -> PartitionSpec:
  if names is None:
    return PartitionSpec()
  axes = flax_spmd.from_sharding_rules(tuple(names), rules)
  used = [a for entry in axes if entry for a in (entry if isinstance(entry, tuple) else (entry,))]
  if len(used) != len(set(used)):
    raise MeshError(
      f"the sharding rules map logical axes {tuple(names)} to {tuple(axes)}, which uses a mesh "
      "axis twice; change mesh.rules so each mesh axis shards at most one of them."
    )
  return PartitionSpec(*axes)


def _is_var(x):
  return isinstance(x, nnx.Variable)


def param_specs(abstract_params: nnx.State, rules) -> nnx.State:
  """PartitionSpec per parameter, read from the `out_sharding` logical names in its metadata."""
  return jax.tree.map(
    lambda v: v.replace(logical_to_spec(v.get_metadata().get("out_sharding"), rules)),
    abstract_params,
    is_leaf=_is_var,
  )


def specs_to_shardings(specs, mesh):
  return jax.tree.map(
    lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )


def batch_sharding(mesh: jax.sharding.Mesh, rules) -> NamedSharding:
  """Batch arrays are split on their leading (batch) axis over the data-parallel axes."""
  return NamedSharding(mesh, logical_to_spec(("act_batch",), rules))


def _batch_axes(sharding: NamedSharding) -> tuple[str, ...]:
  """The mesh axes that split a batch's leading dimension."""
  return _mesh_axes(sharding.spec)


def _mesh_axes(spec: PartitionSpec) -> tuple[str, ...]:
  """The mesh axes that split an array's leading dimension."""
  first = spec[0] if len(spec) else None
  if first is None:
    return ()
  return first if isinstance(first, tuple) else (first,)


def _num_batch_shards(sharding: NamedSharding) -> int:
  return math.prod(sharding.mesh.shape[a] for a in _batch_axes(sharding))


def batch_rows(sharding: NamedSharding, batch_size: int, devices=None) -> np.ndarray:
  """Sorted indices of the rows of every global batch that `devices` (default: this process's)
  hold, read from the sharding's own device -> index map.

  Processes whose devices are replicas of each other (a `tensor` axis across hosts) get the same
  rows. On a pod the mesh follows the chips' torus, so one host's rows can be several separate
  spans; loaded in this order they are what `global_batch` expects.
  """
  devices = sharding.addressable_devices if devices is None else devices
  index_map = sharding.devices_indices_map((batch_size,))
  spans = sorted({index_map[d][0].indices(batch_size)[:2] for d in devices})
  return np.concatenate([np.arange(start, end) for start, end in spans])


@functools.cache
def _shard_counts(sharding: NamedSharding) -> tuple[int, int]:
  """(distinct batch shards, those this process holds): fixed per sharding, so counted once."""
  shards = _num_batch_shards(sharding)
  return shards, len(batch_rows(sharding, shards))


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
  """This process's rows, as `batch_rows` gives them, -> global jax.Arrays.

  The global size follows from the sharding: the local rows fill this process's distinct shards.
  Replica processes pass the same rows, so every copy of a shard holds the same data.
  """
  shards, local_shards = _shard_counts(sharding)
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    global_shape = (v.shape[0] // local_shards * shards, *v.shape[1:])
    out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
  return out
