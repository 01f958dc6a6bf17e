import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.training import optimizer as optim
from sslm_jax.training import plan, sharding
from sslm_jax.training import state as train_state

TABLE = os.path.join(os.path.dirname(__file__), "data", "partition_specs.json")


def _state(config, shape):
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  mesh = sharding.make_mesh(config.mesh)
  tx = optim.make(config.opt, config.num_train_steps)
  model_cfg = config_lib.model_config(config)
  return train_state.create(model_cfg, 0, tx, mesh, sharding.DEFAULT_RULES)


@pytest.mark.parametrize("objective", ["causal_lm", "masked_lm"])
def test_parameter_specs_match_the_checked_in_table(objective):
  with open(TABLE) as f:
    expected = json.load(f)[objective]
  state, _ = _state(tiny_config(objective), (2, 2, 2))
  actual = {
    "/".join(map(str, path)): str(var.get_value().sharding.spec)
    for path, var in nnx.to_flat_state(state.params)
  }
  assert actual == expected


def _unsharded_bytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree) if "fsdp" not in str(x.sharding.spec))


def test_fsdp_holds_one_eighth_of_params_and_adam_state_per_device():
  config = tiny_config("causal_lm")
  config.model.emb_dim, config.model.mlp_dim = 64, 256
  state, _ = _state(config, (1, 8, 1))
  for tree in (state.params, state.opt_state):
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    per_device = train_state.bytes_per_device(tree)
    # Every array with an `embed` axis is split 8 ways; what is left whole is the few vectors
    # without one (q/k/v and MLP biases) and Adam's step count.
    assert per_device == pytest.approx(
      (total - _unsharded_bytes(tree)) / 8 + _unsharded_bytes(tree), abs=64
    )
    assert _unsharded_bytes(tree) < 0.02 * total
  replicated, _ = _state(tiny_config("causal_lm"), (8, 1, 1))
  assert train_state.bytes_per_device(replicated.params) == sum(
    x.nbytes for x in jax.tree.leaves(replicated.params)
  )


@pytest.mark.parametrize(
  "shape, words",
  [
    ((3, 1, 1), "3*1*1 = 3 but there are 8 devices"),
    ((-1, -1, 1), "at most one axis may be -1"),
    ((-1, 3, 1), "does not divide the 8 devices"),
  ],
)
def test_mesh_errors_say_what_to_change(shape, words):
  with pytest.raises(sharding.MeshError, match=words.replace("*", r"\*")):
    sharding.resolve_mesh_shape(*shape, num_devices=8)


def test_minus_one_takes_the_remaining_devices():
  assert sharding.resolve_mesh_shape(-1, 2, 2, num_devices=8) == (2, 2, 2)
  assert sharding.resolve_mesh_shape(1, -1, 1, num_devices=8) == (1, 8, 1)


def test_batch_must_divide_over_data_parallel_axes():
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 4, 2, 1
  mesh = sharding.make_mesh(config.mesh)
  with pytest.raises(sharding.MeshError, match=r"not divisible by data\*fsdp=8.*multiple of 8"):
    sharding.check_batch(mesh, 12, sharding.DEFAULT_RULES)
  sharding.check_batch(mesh, 16, sharding.DEFAULT_RULES)


def _rows_per_process(shape, num_processes, rules=sharding.DEFAULT_RULES, batch_size=16):
  """The rows each process loads, as (start, end) spans, faking processes as consecutive runs of
  jax.devices() (as the devices of a real multi-process run are numbered)."""
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  batch = sharding.batch_sharding(sharding.make_mesh(config.mesh), rules)
  per = len(jax.devices()) // num_processes
  groups = [jax.devices()[p * per : (p + 1) * per] for p in range(num_processes)]
  out = []
  for devices in groups:
    rows = sharding.batch_rows(batch, batch_size, devices)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    out.append([(int(r[0]), int(r[-1]) + 1) for r in np.split(rows, breaks)])
  return out


@pytest.mark.parametrize(
  "shape, num_processes, rows",
  [
    ((8, 1, 1), 2, [[(0, 8)], [(8, 16)]]),  # data parallel: each process its half
    ((1, 2, 4), 2, [[(0, 8)], [(8, 16)]]),  # tensor within a process
    ((1, 1, 8), 2, [[(0, 16)], [(0, 16)]]),  # tensor across both: replicas load the whole batch
    ((2, 1, 4), 4, [[(0, 8)], [(0, 8)], [(8, 16)], [(8, 16)]]),  # pairs of processes are replicas
    ((2, 2, 2), 8, [[(a, a + 4)] for a in (0, 0, 4, 4, 8, 8, 12, 12)]),
    ((2, 2, 2), 1, [[(0, 16)]]),
  ],
)
def test_each_process_loads_the_rows_its_devices_hold(shape, num_processes, rows):
  assert _rows_per_process(shape, num_processes) == rows


def test_a_process_may_hold_rows_in_several_spans():
  """Batch split fsdp-major: process 0 (data=0) holds shards 0 and 2, i.e. two separate spans,
  as one host of a pod does when the mesh follows the torus; they are loaded, not refused."""
  swapped = sharding.rules_from_config([("act_batch", ("fsdp", "data"))])
  assert _rows_per_process((2, 2, 2), 2, swapped) == [[(0, 4), (8, 12)], [(4, 8), (12, 16)]]
  assert _rows_per_process((2, 1, 4), 2, swapped) == [[(0, 8)], [(8, 16)]]


def test_memory_plan_shrinks_with_fsdp():
  config = tiny_config("causal_lm")
  config.mesh.data = 8
  data_plan = plan.memory_plan(config, sharding.make_mesh(config.mesh))
  config.mesh.data, config.mesh.fsdp = 1, 8
  fsdp_plan = plan.memory_plan(config, sharding.make_mesh(config.mesh))
  assert fsdp_plan["params_bytes"] < data_plan["params_bytes"] / 7
  assert fsdp_plan["opt_state_bytes"] < data_plan["opt_state_bytes"] / 7
  assert 0 < fsdp_plan["step_total_bytes"] < data_plan["step_total_bytes"]
  assert "optimizer state" in plan.format_plan(fsdp_plan)


def test_rules_are_overridable_from_the_config():
  rules = sharding.rules_from_config([("embed", None), ("mlp", ["fsdp", "tensor"])])
  table = dict(rules)
  assert table["embed"] is None and table["mlp"] == ("fsdp", "tensor")
  assert sharding.logical_to_spec(("embed", "mlp"), rules) == jax.sharding.PartitionSpec(
    None, ("fsdp", "tensor")
  )
  with pytest.raises(sharding.MeshError, match="uses a mesh axis twice"):
    sharding.logical_to_spec(("embed", "mlp"), sharding.rules_from_config([("mlp", "fsdp")]))
  with pytest.raises(sharding.MeshError, match="unknown logical axis 'embedding'"):
    sharding.rules_from_config([("embedding", None)])
