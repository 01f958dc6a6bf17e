"""The llama and modernbert families on the accelerator paths: splash attention with ModernBERT's
sliding window and Llama's grouped key/value heads equals the XLA path, forward and gradient
(the Pallas kernel in interpret mode on CPU); cuDNN is chosen or refused as its kernel allows;
the model FLOPs match the matmuls the model traces; a (data, fsdp, tensor) mesh gives one
device's losses and refuses key/value heads it cannot split; Muon reads the gated MLP's kernels
as matrices and leaves the output embedding to AdamW.
"""

import dataclasses
import math

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import synthetic_batch, tiny_config
from flax import nnx
from jax._src.cudnn import fused_attention_stablehlo
from test_attention import _reference_kernel

from sslm_jax import config as config_lib
from sslm_jax.config import derived
from sslm_jax.models import attention, flops
from sslm_jax.models import transformer as model_lib
from sslm_jax.models.config import ModelConfig
from sslm_jax.training import loop, muon, sharding
from sslm_jax.training import optimizer as optim
from sslm_jax.training import state as train_state

B, T, N, K, H = 2, 256, 4, 2, 32  # splash takes blocks of 128 positions at least
WINDOW = 64  # keys at most 32 positions away: well inside one block of 128


def _cfg(family: str, impl: str) -> ModelConfig:
  extra = dict(num_kv_heads=K) if family == "llama" else dict(sliding_window=WINDOW, global_every=2)
  return ModelConfig(
    objective="causal_lm" if family == "llama" else "masked_lm",
    vocab_size=256,
    max_len=T,
    num_layers=2,
    num_heads=N,
    emb_dim=N * H,
    mlp_dim=2 * N * H,
    init_std=0.2,  # sharp attention, so a wrong mask shows in the outputs
    attention_impl=impl,
    attention_block_q=128,
    attention_block_kv=128,
    family=family,
    **extra,
  )


def _segment_ids() -> np.ndarray:
  """Packed rows with documents across block edges, and trailing padding."""
  rows = np.zeros((B, T), np.int32)
  rows[0] = np.repeat([1, 2, 3], [100, 60, 96])
  rows[1, :200] = np.repeat([1, 2], [130, 70])
  return rows


def _attention(cfg, mesh=None):
  """Outputs at real positions and the gradients wrt the parameters and the input, as NumPy."""
  rng = np.random.default_rng(0)
  ids_BT = _segment_ids()
  x_BTD = rng.normal(size=(B, T, N * H)).astype(np.float32)
  w_BTD = rng.normal(size=(B, T, N * H)).astype(np.float32) * (ids_BT > 0)[..., None]
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(attention.Attention(cfg, rngs=nnx.Rngs(0)))

  def loss(params, x_BTD):
    module = nnx.merge(graphdef, params)
    out_BTD = module(x_BTD, attention.attention_segments(cfg, jnp.asarray(ids_BT)))
    return jnp.sum(out_BTD * w_BTD), out_BTD

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  if mesh is None:
    (_, out), (d_params, d_x) = fn(params, x_BTD)
  else:
    with sharding.activate(*mesh):
      (_, out), (d_params, d_x) = fn(params, x_BTD)
  grads = [np.asarray(v) for _, v in sorted(nnx.to_flat_state(d_params))]
  return [np.asarray(out)[ids_BT > 0], np.asarray(d_x), *grads]


def _assert_close(got, want, rtol=1e-5):
  """Each array within rtol of the largest magnitude of its reference (float32 rounding)."""
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=0, atol=rtol * np.abs(w).max())


def _max_diff(a, b):
  return float(np.abs(a[0] - b[0]).max())


def _mesh():
  """(data=1, fsdp=2, tensor=2) on 4 devices: one row and two query heads per shard."""
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 2
  return sharding.make_mesh(config.mesh, jax.devices()[:4]), sharding.rules_from_config(())


@pytest.mark.parametrize("on_mesh", [False, True], ids=["one device", "fsdp2-tensor2"])
def test_splash_takes_grouped_key_value_heads_as_they_are(on_mesh, monkeypatch):
  want = _attention(_cfg("llama", "xla"))

  def no_copies(*args):
    raise AssertionError("splash was given repeated keys and values")

  monkeypatch.setattr(attention, "repeat_kv", no_copies)
  # On the mesh each shard holds 2 query heads and their 1 key/value head.
  got = _attention(_cfg("llama", "splash"), mesh=_mesh() if on_mesh else None)
  _assert_close(got, want)
  # Grouping matters: query head n reads key/value head n // 2, not n % 2.
  swapped = _attention(dataclasses.replace(_cfg("llama", "xla"), num_kv_heads=N))
  assert _max_diff(got, swapped) > 1e-2


def test_windowed_modernbert_with_splash_equals_xla_through_the_layer_scan():
  """Splash takes ModernBERT's sliding window: the whole model, forward and gradient, on packed
  rows. The window flag is the scanned layer index's, traced (layer 0 global, layer 1 local), and
  splash picks its windowed or its global kernel by it."""
  rng = np.random.default_rng(1)
  ids_BT = _segment_ids()
  tokens_BT = rng.integers(5, 250, (B, T))
  positions_BT = np.concatenate([np.arange(100), np.arange(60), np.arange(96)])[None]
  positions_BT = np.repeat(positions_BT, B, axis=0)
  masked_BP = np.sort(rng.permuted(np.tile(np.arange(200), (B, 1)), axis=1)[:, :16], axis=1)

  def loss_and_grads(cfg):
    # Two heads, half the width: the interpreted kernel's cost is per head and block.
    cfg = dataclasses.replace(cfg, init_std=0.02, num_heads=2, emb_dim=2 * H, mlp_dim=2 * H)
    model = model_lib.build(cfg, seed=0)

    def loss(m):
      logits_BPV = m(tokens_BT, positions_BT, ids_BT, masked_BP)
      return jnp.mean(jax.nn.logsumexp(logits_BPV, axis=-1))

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    return [np.asarray(value), *map(np.asarray, jax.tree.leaves(nnx.to_pure_dict(grads)))]

  want = loss_and_grads(_cfg("modernbert", "xla"))
  _assert_close(loss_and_grads(_cfg("modernbert", "splash")), want, rtol=2e-5)
  # Without the window (layer 1 global too) the gradients are another model's.
  unwindowed = loss_and_grads(dataclasses.replace(_cfg("modernbert", "xla"), sliding_window=0))
  assert (
    max(np.abs(u - w).max() / np.abs(w).max() for u, w in zip(unwindowed, want, strict=True)) > 1e-2
  )


def _family_config(family: str, **model):
  c = tiny_config("causal_lm" if family == "llama" else "masked_lm")
  c.model.family = family
  if family == "modernbert":
    c.model.global_every, c.model.sliding_window = 2, 8
  for k, v in model.items():
    c.model[k] = v
  return c


def test_auto_attention_avoids_cudnn_for_a_sliding_window(monkeypatch):
  monkeypatch.setattr(derived, "gpu_capability", lambda: (9, 0))
  llama = _family_config("llama", num_kv_heads=2, dtype="bfloat16")
  assert config_lib.attention_impl(llama, "gpu") == "cudnn"
  windowed = _family_config("modernbert", dtype="bfloat16")
  windowed.data.seq_len = 128  # splash's blocks
  assert config_lib.attention_impl(windowed, "gpu") == "xla"
  assert config_lib.attention_impl(windowed, "tpu") == "splash"
  windowed.model.global_every = 1  # every layer global: the window is never used
  assert config_lib.attention_impl(windowed, "gpu") == "cudnn"


def test_cudnn_with_a_sliding_window_is_refused():
  config = _family_config("modernbert", attention_impl="cudnn")
  with pytest.raises(config_lib.ConfigError) as raised:
    config_lib.validate(config)
  message = str(raised.value)
  assert "model.attention_impl='cudnn'" in message and "model.sliding_window=8" in message
  assert "'auto'" in message and "'xla'" in message
  with pytest.raises(ValueError, match="sliding window needs the XLA or splash"):
    attention.Attention(_cfg("modernbert", "cudnn"), rngs=nnx.Rngs(0))


def test_cudnn_takes_grouped_key_value_heads_as_they_are(monkeypatch):
  """The cuDNN entry point (stood in for: no GPU here) is given K key/value heads, and the
  llama's outputs equal the XLA path's."""
  shapes, calls = [], []
  reference = _reference_kernel(calls)

  def kernel(query, key, value, *args, **kw):
    shapes.append((query.shape[2], key.shape[2], value.shape[2]))
    group = query.shape[2] // key.shape[2]
    return reference(query, *(jnp.repeat(x, group, axis=2) for x in (key, value)), *args, **kw)

  monkeypatch.setattr(fused_attention_stablehlo, "dot_product_attention", kernel)
  xla_cfg = dataclasses.replace(_cfg("llama", "xla"), max_len=32, max_segments=2)
  cudnn_cfg = dataclasses.replace(xla_cfg, attention_impl="cudnn")
  tokens_BT = np.random.default_rng(0).integers(5, 250, (2, 32))
  positions_BT = np.tile(np.concatenate([np.arange(20), np.arange(12)]), (2, 1))
  ids_BT = np.tile(np.repeat([1, 2], [20, 12]), (2, 1)).astype(np.int32)
  # Eager: the stand-in reads its arguments as NumPy.
  want = model_lib.build(xla_cfg, seed=0)(tokens_BT, positions_BT, ids_BT)
  got = model_lib.build(cudnn_cfg, seed=0)(tokens_BT, positions_BT, ids_BT)
  assert set(shapes) == {(N, K, K)}
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * np.abs(want).max())


def _dot_flops(jaxpr) -> int:
  """2 * output elements * contracted length, over every dot_general a jaxpr runs (a scan's
  body times its length)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contracted, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[a] for a in contracted)
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (jex.ClosedJaxpr, jex.Jaxpr)):
          total += times * _dot_flops(getattr(sub, "jaxpr", sub))
  return total


def _traced_flops_per_token(cfg: ModelConfig, batch: int = 2) -> float:
  """Matmul FLOPs per token of the model's forward and backward pass as JAX traces it (XLA
  attention: the whole score matrix, masked or not)."""
  t = cfg.max_len
  graphdef, params = nnx.split(model_lib.build(cfg, seed=0))
  args = [jnp.zeros((batch, t), jnp.int32), jnp.zeros((batch, t), jnp.int32)]
  args.append(jnp.ones((batch, t), jnp.int32))
  if not cfg.causal:
    args.append(jnp.zeros((batch, t // 4), jnp.int32))  # P = T / 4 predictions

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params)(*args))

  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr
  return _dot_flops(jaxpr) / (batch * t)


def _flops_cfg(family: str, t: int, **changes) -> ModelConfig:
  base = _cfg(family, "xla")
  if family == "llama":
    changes = {"qk_norm": True, "tie_embeddings": False, **changes}
  if family == "modernbert":
    changes = {"sliding_window": 16, **changes}  # keys at most 8 away, of 32 or 64
  return dataclasses.replace(base, max_len=t, emb_dim=64, mlp_dim=96, init_std=0.02, **changes)


@pytest.mark.parametrize("family", ["llama", "modernbert"])
def test_model_flops_count_the_matmuls_the_model_runs(family):
  """Per token, the traced matmuls are a fixed part (projections, gated MLP, head) plus an
  attention part that grows with T (found from T and 2T). The model counts the fixed part and
  the attention part for the pairs each layer attends: causal half, a local layer its window
  (counted here from the XLA path's own window mask)."""
  t = 32
  unwindowed = {} if family == "llama" else {"sliding_window": 0}
  traced = _traced_flops_per_token(_flops_cfg(family, t, **unwindowed))
  attention_per_t = _traced_flops_per_token(_flops_cfg(family, 2 * t, **unwindowed)) / t
  attention_per_t -= traced / t
  fixed = traced - attention_per_t * t
  predictions = None if family == "llama" else t // 4
  cfg = _flops_cfg(family, t)
  if family == "llama":
    expected = fixed + attention_per_t * t / 2
  else:
    every_key = jnp.ones((1, 1, t, t), bool)
    window_keys = int(attention.window_mask(every_key, cfg.sliding_window, True).sum()) / t
    assert 0 < window_keys < t / 2
    per_layer = attention_per_t / cfg.num_layers  # layer 0 global, layer 1 local
    expected = fixed + per_layer * t + per_layer * window_keys
  assert flops.model_flops_per_token(cfg, predictions) == pytest.approx(expected, rel=1e-9)


def _train_losses(config, devices, steps=2):
  """train_loss of `steps` train steps on repeated synthetic batches, on a mesh of `devices`."""
  mesh = sharding.make_mesh(config.mesh, devices)
  tx = optim.make(config.opt, config.num_train_steps)
  state, spec = train_state.create(
    config_lib.model_config(config), config.seed, tx, mesh, sharding.DEFAULT_RULES
  )
  trainer = loop.Trainer(config, mesh, spec, tx)
  losses = []
  for step in range(steps):
    state, metrics = trainer.train(state, trainer.to_global(synthetic_batch(config, step, 2)))
    losses.append(float(metrics["train_loss"]))
  return losses


@pytest.mark.parametrize("family", ["llama", "modernbert"])
def test_sharded_losses_match_one_device(family):
  config = _family_config(family)
  if family == "llama":
    config.model.num_kv_heads, config.model.qk_norm, config.model.tie_embeddings = 2, True, False
  one = _train_losses(config, jax.devices()[:1])
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  many = _train_losses(config, jax.devices())
  assert one[0] != one[-1]
  np.testing.assert_allclose(many, one, rtol=1e-5)


def test_key_value_heads_the_tensor_axis_cannot_split_are_refused():
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 4
  mesh, rules = sharding.make_mesh(config.mesh), sharding.DEFAULT_RULES
  sharding.check_heads(mesh, rules, num_heads=4, num_kv_heads=4)
  sharding.check_heads(mesh, rules, num_heads=8, num_kv_heads=0)  # 0: as many as the queries
  with pytest.raises(sharding.MeshError) as raised:
    sharding.check_heads(mesh, rules, num_heads=4, num_kv_heads=2)
  assert "model.num_kv_heads=2 is not divisible by tensor=4" in str(raised.value)
  assert "--config.mesh.tensor" in str(raised.value)
  with pytest.raises(sharding.MeshError, match="model.num_heads=6 is not divisible"):
    sharding.check_heads(mesh, rules, num_heads=6, num_kv_heads=2)
  # With the heads replicated (mesh.rules), any count splits.
  replicated = sharding.rules_from_config([("heads", None)])
  sharding.check_heads(mesh, replicated, num_heads=4, num_kv_heads=2)


@pytest.mark.parametrize("family", ["llama", "modernbert"])
def test_muon_takes_the_gated_mlp_and_adamw_the_embeddings_and_norms(family):
  config = _family_config(family)
  if family == "llama":
    config.model.num_kv_heads, config.model.qk_norm, config.model.tie_embeddings = 2, True, False
  model = model_lib.build(config_lib.model_config(config), seed=0)
  labels = {
    "/".join(map(str, path)): v.get_value()
    for path, v in nnx.to_flat_state(muon.labels(nnx.state(model, nnx.Param)))
  }
  matrices = {k for k, v in labels.items() if v == muon.MUON}
  blocks = "stack/blocks/"
  expected = {f"{blocks}attention/{name}/kernel" for name in ("query", "key", "value", "out")} | {
    f"{blocks}mlp/{name}/kernel" for name in ("gate", "up", "down")
  }
  if family == "modernbert":
    expected.add("mlm_head/transform/kernel")
  assert matrices == expected
  # AdamW: the embedding tables (llama's own lm_head among them), the norms' scales (qk-norm's
  # over the head width too) and the MLM decoder's bias.
  adamw = set(labels) - matrices
  assert all(k.endswith(("/embedding", "/scale", "/decoder_bias")) for k in adamw), adamw
  if family == "llama":
    assert {"lm_head/embedding", f"{blocks}attention/key_norm/scale"} <= adamw
  # The gate reads D -> F, the down projection F -> D, each layer of the scan on its own.
  params = nnx.state(model, nnx.Param)
  dims = {
    name: muon.dimension_numbers(
      [jax.tree_util.DictKey(k) for k in ("stack", "blocks", "mlp", name, "kernel")],
      params["stack"]["blocks"]["mlp"][name]["kernel"],
    )
    for name in ("gate", "up", "down")
  }
  assert {k: (v.reduction_axis, v.output_axis) for k, v in dims.items()} == {
    "gate": ((1,), (2,)),
    "up": ((1,), (2,)),
    "down": ((1,), (2,)),
  }
