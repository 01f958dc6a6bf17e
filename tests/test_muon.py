"""opt.name='muon': Muon on the weight matrices (each kernel read as a matrix by its logical axes),
AdamW on the rest; its state is sharded as the parameters are, and a resumed run is exact."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from jax.sharding import PartitionSpec
from optax.contrib import MuonDimensionNumbers as Dims
from test_train import Killed, _run

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.models import transformer as model_lib
from sslm_jax.training import loop as train
from sslm_jax.training import muon, plan, sharding
from sslm_jax.training import optimizer as optim

_MATRICES = {
  "stack/blocks/attention/query/kernel": Dims((1,), (2, 3)),  # [L, D, N, H]: D -> (N, H)
  "stack/blocks/attention/key/kernel": Dims((1,), (2, 3)),
  "stack/blocks/attention/value/kernel": Dims((1,), (2, 3)),
  "stack/blocks/attention/out/kernel": Dims((1, 2), (3,)),  # [L, N, H, D]: (N, H) -> D
  "stack/blocks/mlp/fc/kernel": Dims((1,), (2,)),
  "stack/blocks/mlp/proj/kernel": Dims((1,), (2,)),
}


def _dims(params):
  return {
    "/".join(str(getattr(p, "key", p)) for p in path): muon.dimension_numbers(path, v)
    for path, v in jax.tree_util.tree_leaves_with_path(params, is_leaf=muon._is_var)
  }


def test_each_kernel_is_a_matrix_and_everything_else_takes_adamw(objective):
  model = model_lib.build(config_lib.model_config(tiny_config(objective)), seed=0)
  dims = _dims(nnx.state(model, nnx.Param))
  expected = dict(_MATRICES)
  if objective == "masked_lm":
    expected["mlm_head/transform/kernel"] = Dims((0,), (1,))
  assert {k: v for k, v in dims.items() if v is not None} == expected
  head = nnx.Param(
    np.zeros((4, 3)), out_sharding=("embed", "labels"), eager_sharding=False
  )  # a task head's outputs
  assert muon.dimension_numbers(("kernel",), head) is None
  odd = nnx.Param(np.zeros((4, 3, 2)), out_sharding=("embed", "mlp", "vocab"), eager_sharding=False)
  with pytest.raises(ValueError, match="x/kernel with axes .* no rule reads it as a matrix"):
    muon.dimension_numbers(("x", "kernel"), odd)


def test_muon_orthogonalises_each_layer_of_a_scanned_kernel_on_its_own():
  config = tiny_config()
  config.opt.name, config.opt.warmup_steps = "muon", 0
  model = model_lib.build(config_lib.model_config(config), seed=0)
  params = nnx.state(model, nnx.Param)
  grads = jax.tree.map(lambda p: np.zeros(p.shape, np.float32), params)
  rng = np.random.default_rng(0)
  fc = grads["stack"]["blocks"]["mlp"]["fc"]["kernel"]
  fc[...] = np.concatenate([rng.normal(size=(1, 64, 128)), np.zeros((1, 64, 128))]).astype("f4")
  tx = optim.make(config.opt, config.num_train_steps)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  update = np.asarray(updates["stack"]["blocks"]["mlp"]["fc"]["kernel"][...])
  lr, wd = config.opt.learning_rate, config.opt.weight_decay
  decay = -lr * wd * np.asarray(params["stack"]["blocks"]["mlp"]["fc"]["kernel"][...])
  np.testing.assert_allclose(update[1], decay[1], rtol=1e-5)  # layer 1 had no gradient
  singular = np.linalg.svd(update[0] - decay[0], compute_uv=False)
  assert singular.max() < 2 * singular.min()  # close to orthogonal: all directions alike
  embedding = updates["token_embed"]["embedding"][...]
  assert not np.any(np.asarray(embedding))  # AdamW, no gradient, no decay of embeddings


def _run_on_4(config, workdir, kill_at=None):
  """The run, then its final state and spec as a resume reads them, on 4 devices."""
  devices = jax.devices()[:4]
  _run(config, workdir, devices=devices, kill_at=kill_at)
  mesh = sharding.make_mesh(config.mesh, devices=devices)
  return train.init_or_restore(config, mesh, str(workdir), checkpoint.fingerprint(config))[:2]


def test_muon_state_is_sharded_as_the_parameters_and_resumes_exactly(tmp_path):
  config = tiny_config()
  config.opt.name, config.num_train_steps = "muon", 4
  config.log_every_steps = config.checkpoint_every_steps = 2
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 2
  config_lib.validate(config)
  straight, spec = _run_on_4(config, tmp_path / "straight")
  with pytest.raises(Killed):
    _run_on_4(config, tmp_path / "resumed", kill_at=2)
  resumed, _ = _run_on_4(config, tmp_path / "resumed")
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The muon momentum of a kernel lies as the kernel does: split over fsdp and tensor.
  kernel = spec.shardings.params["stack"]["blocks"]["attention"]["query"]["kernel"].get_value()
  momentum = [
    s for path, s in jax.tree_util.tree_leaves_with_path(spec.shardings.opt_state)
    if "query']['kernel" in jax.tree_util.keystr(path)
  ]  # fmt: skip
  assert kernel.spec == PartitionSpec(None, "fsdp", "tensor", None) and momentum == [kernel]


def test_the_memory_plan_counts_muon_state():
  config = tiny_config()
  config.opt.name, config.mesh.fsdp, config.mesh.data = "muon", 2, 1
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:2])
  memory = plan.memory_plan(config, mesh)
  # One momentum for the matrices, AdamW's two moments for the rest (AdamW: two for all).
  assert memory["params_bytes"] < memory["opt_state_bytes"] < 2 * memory["params_bytes"]
  assert memory["step_total_bytes"] > memory["opt_state_bytes"]
