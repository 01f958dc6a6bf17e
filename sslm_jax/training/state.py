"""The train state and its sharded creation: eval_shape -> shardings -> jit(init)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import PartitionSpec

from sslm_jax.models import transformer as model_lib
from sslm_jax.models.config import ModelConfig
from sslm_jax.training import muon, sharding


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied so far
  params: nnx.State
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """Everything static about the state: how to rebuild the model and where each leaf lives."""

  graphdef: nnx.GraphDef
  abstract: TrainState  # ShapeDtypeStructs carrying their shardings
  shardings: TrainState  # NamedSharding per leaf

  def merge(self, params: nnx.State):
    return nnx.merge(self.graphdef, params)


def _is_var(x):
  return isinstance(x, nnx.Variable)


def _builder(model_cfg: ModelConfig, build):
  """seed -> a fresh model: `build` where given (a fine-tuning model), else the pretraining one."""
  return build if build is not None else (lambda seed: model_lib.build(model_cfg, seed))


def _init_fn(build, seed: int, tx: optax.GradientTransformation):
  def init() -> TrainState:
    params = nnx.state(build(seed), nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return init


def state_spec(model_cfg, seed, tx, mesh, rules, build=None) -> StateSpec:
  """Shapes and shardings of the whole state, without allocating it.

  `build` (seed -> model) replaces the pretraining model, e.g. with a fine-tuning Classifier.
  """
  build = _builder(model_cfg, build)
  abstract_model = nnx.eval_shape(lambda: build(seed))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  param_specs = sharding.param_specs(abstract_params, rules)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # Optimizer state laid out as its parameter; a leaf that optax.partition masked out of one
  # part's state (Muon's momentum of an embedding) stays the empty MaskedNode it is.
  opt_specs = optax.tree_map_params(
    tx,
    lambda leaf, spec: leaf if muon.is_masked(leaf) else spec,
    abstract_opt,
    param_specs,
    transform_non_params=lambda _: PartitionSpec(),
    is_leaf=_is_var,
  )
  specs = TrainState(step=PartitionSpec(), params=param_specs, opt_state=opt_specs)
  shardings = sharding.specs_to_shardings(specs, mesh)
  abstract = jax.eval_shape(_init_fn(build, seed, tx))
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return StateSpec(graphdef=graphdef, abstract=abstract, shardings=shardings)


def create(
  model_cfg, seed, tx, mesh, rules, initial_params=None, build=None
) -> tuple[TrainState, StateSpec]:
  """A freshly initialised state, each leaf created directly in its shards.

  `initial_params` (a pure dict of host arrays, as hf.load_params returns) replaces the random
  parameters; each process places only its own shards of them. `build` as in state_spec.
  """
  spec = state_spec(model_cfg, seed, tx, mesh, rules, build)
  with sharding.activate(mesh, rules):
    if initial_params is None:
      build = _builder(model_cfg, build)
      state = jax.jit(_init_fn(build, seed, tx), out_shardings=spec.shardings)()
    else:
      state = _state_from(initial_params, spec, tx)
  return state, spec


def _state_from(initial_params: dict, spec: StateSpec, tx) -> TrainState:
  def place(abstract, host):
    host = np.asarray(host, abstract.dtype)
    return jax.make_array_from_callback(abstract.shape, abstract.sharding, lambda i: host[i])

  params = jax.tree.map(lambda a: a, spec.abstract.params)  # a copy, filled in below
  nnx.replace_by_pure_dict(
    params, jax.tree.map(place, nnx.to_pure_dict(spec.abstract.params), initial_params)
  )

  def init(params) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return jax.jit(init, out_shardings=spec.shardings)(params)


def bytes_per_device(tree) -> int:
  """Bytes of one device's shards of a tree of (abstract or real) sharded arrays."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard_shape = leaf.sharding.shard_shape(leaf.shape)
    total += jnp.dtype(leaf.dtype).itemsize * math.prod(shard_shape)
  return total
