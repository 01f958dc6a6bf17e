"""Splash attention (model.attention_impl='splash') equals the XLA path on packed rows.

On CPU the Pallas kernel runs in interpret mode: the same kernel code, executed block by block,
so these checks cover its wiring (layout, scaling, segment ids, causality, shard_map) and its
numerics. The kernel takes blocks of 128 positions at least, so rows here are 256 long: two
query and two key blocks, of which the causal mask skips one. One test compiles the kernel
natively for TPU v5p devices with libtpu, ahead of time and without a TPU.
"""

import dataclasses
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx

from sslm_jax.models import attention
from sslm_jax.models.config import ModelConfig
from sslm_jax.training import sharding

ROOT = os.path.join(os.path.dirname(__file__), "..")
B, T, N, H = 4, 256, 4, 32  # 4 rows and 4 heads: 1 row and 2 heads per shard on the mesh


def _cfg(objective: str, impl: str) -> ModelConfig:
  return ModelConfig(
    objective=objective,
    vocab_size=256,
    max_len=T,
    num_layers=1,
    num_heads=N,
    emb_dim=N * H,
    mlp_dim=2 * N * H,
    init_std=0.2,  # sharper attention than GPT-2's 0.02, so a wrong mask shows in the outputs
    attention_impl=impl,
    attention_block_q=128,
    attention_block_kv=128,
  )


def _segment_ids() -> np.ndarray:
  """Packed rows: documents of several lengths, across block edges, with trailing padding."""
  rows = np.zeros((B, T), np.int32)
  rows[0] = np.repeat([1, 2, 3], [100, 60, 96])
  rows[1] = np.repeat(np.arange(1, 9), 32)
  rows[2, :200] = np.repeat([1, 2], [130, 70])  # 56 positions of padding
  rows[3, :37] = 1  # one short document, then padding over both blocks
  return rows


def _inputs():
  rng = np.random.default_rng(0)
  x_BTD = rng.normal(size=(B, T, N * H)).astype(np.float32)
  w_BTD = rng.normal(size=(B, T, N * H)).astype(np.float32) * (_segment_ids() > 0)[..., None]
  return x_BTD, w_BTD


def _attention_fn(cfg, segment_ids_BT, w_BTD):
  """(params, jitted (params, x) -> ((loss, out), (dparams, dx))): the loss weights only real
  positions, so padding outputs take no part."""
  with nnx.use_eager_sharding(False):
    graphdef, params = nnx.split(attention.Attention(cfg, rngs=nnx.Rngs(0)))

  def loss(params, x_BTD):
    module = nnx.merge(graphdef, params)
    out_BTD = module(x_BTD, attention.attention_segments(cfg, jnp.asarray(segment_ids_BT)))
    return jnp.sum(out_BTD * w_BTD), out_BTD

  return params, jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _mesh():
  config = tiny_config()
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  return sharding.make_mesh(config.mesh), sharding.rules_from_config(())


def _run(objective, impl, segment_ids_BT, mesh=None):
  """Outputs (at real positions) and gradients wrt the parameters and the input, as NumPy."""
  x_BTD, w_BTD = _inputs()
  params, fn = _attention_fn(_cfg(objective, impl), segment_ids_BT, w_BTD)
  if mesh is None:
    (_, out_BTD), (d_params, d_x) = fn(params, x_BTD)
  else:
    with sharding.activate(*mesh):
      (_, out_BTD), (d_params, d_x) = fn(params, x_BTD)
  real = segment_ids_BT > 0
  grads = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(d_params)}
  return np.asarray(out_BTD)[real], grads, np.asarray(d_x)


def _max_diffs(got, want):
  """Max abs difference of the outputs, of the input's gradient and of any parameter's."""
  (out, grads, d_x), (out_w, grads_w, d_x_w) = got, want
  assert grads.keys() == grads_w.keys()
  return {
    "out": float(np.abs(out - out_w).max()),
    "d_params": max(float(np.abs(grads[k] - grads_w[k]).max()) for k in grads),
    "d_x": float(np.abs(d_x - d_x_w).max()),
  }


def _assert_close(got, want, rtol=1e-5):
  """Within rtol of the largest magnitude of the reference: outputs, the input's gradient, and
  the parameters' gradients taken together (the key bias's is zero up to rounding: it adds the
  same amount to every score of a query)."""
  (out, grads, d_x), (out_w, grads_w, d_x_w) = got, want
  np.testing.assert_allclose(out, out_w, rtol=0, atol=rtol * np.abs(out_w).max())
  np.testing.assert_allclose(d_x, d_x_w, rtol=0, atol=rtol * np.abs(d_x_w).max())
  largest = max(np.abs(g).max() for g in grads_w.values())
  for k in grads_w:
    np.testing.assert_allclose(grads[k], grads_w[k], rtol=0, atol=rtol * largest, err_msg=k)


@pytest.fixture(scope="module")
def xla_results():
  return {obj: _run(obj, "xla", _segment_ids()) for obj in ("causal_lm", "masked_lm")}


@pytest.mark.parametrize("on_mesh", [False, True], ids=["one device", "data2-fsdp2-tensor2"])
def test_splash_equals_xla(objective, on_mesh, xla_results):
  got = _run(objective, "splash", _segment_ids(), _mesh() if on_mesh else None)
  want = xla_results[objective]
  diffs = _max_diffs(got, want)
  print(f"\nsplash vs xla, {objective}, {'mesh' if on_mesh else 'one device'}: {diffs}")
  _assert_close(got, want)
  # The comparison can fail: splash's outputs are far from bidirectional attention's when
  # causal (and the reverse), and from those of the same rows unpacked (one document each).
  other = "masked_lm" if objective == "causal_lm" else "causal_lm"
  assert _max_diffs(got, xla_results[other])["out"] > 1e-2
  unpacked = _run(objective, "xla", (_segment_ids() > 0).astype(np.int32))
  assert _max_diffs(got, unpacked)["out"] > 1e-2


def _lowered_text(objective, impl, mesh=None):
  x_BTD, w_BTD = _inputs()
  params, fn = _attention_fn(_cfg(objective, impl), _segment_ids(), w_BTD)
  if mesh is None:
    return fn.lower(params, x_BTD).as_text()
  with sharding.activate(*mesh):
    return fn.lower(params, x_BTD).as_text()


@pytest.mark.parametrize("on_mesh", [False, True], ids=["one device", "data2-fsdp2-tensor2"])
def test_splash_builds_no_dense_mask(on_mesh):
  mesh = _mesh() if on_mesh else None
  # Any tensor with a T x T (query x key) pair of dimensions, on the whole batch or one shard.
  square = re.compile(rf"tensor<(\d+x)*{T}x{T}(x\d+)*x[a-z]")
  assert square.search(_lowered_text("masked_lm", "xla", mesh))  # the XLA path builds one
  text = _lowered_text("masked_lm", "splash", mesh)
  assert not square.search(text), square.search(text).group(0)
  # On the mesh the kernel runs under shard_map on 1 row and 2 heads per shard, heads first.
  assert ("sdy.manual_computation" in text) == on_mesh
  assert (f"tensor<1x{N // 2}x{T}x{H}xf32>" in text) == on_mesh


def test_splash_segments_are_the_ids_themselves():
  cfg = _cfg("causal_lm", "splash")
  ids_BT = jnp.asarray(_segment_ids())
  assert attention.attention_segments(cfg, ids_BT) is ids_BT
  xla = attention.attention_segments(dataclasses.replace(cfg, attention_impl="xla"), ids_BT)
  assert xla.shape == (B, 1, T, T)


def test_blocks_that_the_kernel_cannot_take_are_refused():
  x_BTD, w_BTD = _inputs()
  cfg = dataclasses.replace(_cfg("causal_lm", "splash"), attention_block_kv=64)
  params, fn = _attention_fn(cfg, _segment_ids(), w_BTD)
  with pytest.raises(ValueError, match="multiples of 128"):
    fn(params, x_BTD)


# Compiles a 1-layer GPT and BERT train step with splash attention for 4 TPU v5p chips, as
# `--plan --topology` does, and prints per config whether the kernel went in natively (a Mosaic
# custom call) and the compiled step's temporary bytes.
_CHILD = r"""
import importlib.util, json, os
from sslm_jax.cluster import topology
from sslm_jax.training import plan, sharding
topology.plan_only_process()
devices = topology.devices(topology.parse("v5p-8"))
for name in ("gpt_tiny", "bert_tiny"):
  spec = importlib.util.spec_from_file_location(name, os.path.join("configs", name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.num_layers, config.model.emb_dim, config.model.mlp_dim = 1, 256, 512
  config.model.dtype, config.model.attention_impl = "bfloat16", "splash"
  config.model.attention_block_q = config.model.attention_block_kv = 128
  config.data.seq_len, config.batch_size = 256, 8
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 2
  mesh = sharding.make_mesh(config.mesh, devices)
  _, lowered = plan._lower(config, mesh)
  text = lowered.as_text()
  compiled = lowered.compile()
  print(json.dumps({
    "config": name,
    "platform": mesh.devices.flat[0].platform,
    "mosaic": text.count("tpu_custom_call"),
    "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
  }), flush=True)
"""


@pytest.mark.slow
def test_splash_compiles_natively_for_tpu():
  if sys.platform != "linux" or platform.machine() != "x86_64":
    pytest.skip("the test extra installs libtpu on x86-64 Linux only (where CI runs)")
  if importlib.util.find_spec("libtpu") is None:
    pytest.fail("libtpu is not installed: pip install -e '.[test]' installs it.")
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)  # as `--plan --topology` runs: the process stays on the CPU
  result = subprocess.run(
    [sys.executable, "-c", _CHILD], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stderr[-4000:]
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  assert [line["config"] for line in lines] == ["gpt_tiny", "bert_tiny"]
  for line in lines:
    # Forward, dq and dkv kernels; in interpret mode there would be none.
    assert line["platform"] == "tpu" and line["mosaic"] >= 3, line
    assert line["temp_bytes"] > 0, line
