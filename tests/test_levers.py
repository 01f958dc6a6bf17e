"""Speed levers change how the step runs, never what it computes."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import synthetic_batch, tiny_config
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.config import derived as config_derived
from sslm_jax.models import transformer as model_lib
from sslm_jax.training import loop as train
from sslm_jax.training import losses as objectives
from sslm_jax.training import optimizer as optim
from sslm_jax.training import sharding
from sslm_jax.training import state as train_state
from sslm_jax.training import step as step_lib


def _loss_and_grads(model_cfg, batch):
  model = model_lib.build(model_cfg, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    return objectives.mean_loss(objectives.metric_sums(nnx.merge(graphdef, params), batch))

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), jax.tree.leaves(grads)


@pytest.mark.parametrize(
  "change",
  [
    {"scan_layers": False},
    {"remat_policy": "full"},
    {"remat_policy": "dots"},
    {"remat_policy": "dots_no_batch"},
  ],
  ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_scan_and_remat_give_the_same_loss_and_gradients(objective, change):
  config = tiny_config(objective)
  config.model.num_layers = 3
  base = config_lib.model_config(config)
  batch = synthetic_batch(config)
  loss, grads = _loss_and_grads(base, batch)
  loss2, grads2 = _loss_and_grads(dataclasses.replace(base, **change), batch)
  assert loss2 == pytest.approx(loss, rel=1e-6)
  for g, g2 in zip(grads, grads2, strict=True):
    np.testing.assert_allclose(g2, g, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("accum_steps", [2, 4])
def test_gradient_accumulation_equals_one_big_batch(objective, accum_steps):
  config = tiny_config(objective)
  batch = synthetic_batch(config)
  model_cfg = config_lib.model_config(config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  tx = optim.make(config.opt, 10)
  state, spec = train_state.create(model_cfg, 0, tx, mesh, sharding.DEFAULT_RULES)
  whole_grads, whole = jax.jit(lambda p: step_lib._summed_grads(p, batch, spec=spec, key=None))(
    state.params
  )
  accum_grads, accum = jax.jit(
    lambda p: step_lib._accumulated_grads(p, batch, spec=spec, key=None, accum_steps=accum_steps)
  )(state.params)
  assert float(accum["count"]) == float(whole["count"])
  assert float(accum["loss_sum"]) == pytest.approx(float(whole["loss_sum"]), rel=1e-6)
  count = float(whole["count"])  # the step divides summed gradients by the predicted tokens
  for a, b in zip(jax.tree.leaves(accum_grads), jax.tree.leaves(whole_grads), strict=True):
    np.testing.assert_allclose(np.asarray(a) / count, np.asarray(b) / count, rtol=1e-4, atol=1e-8)


def _compiled_trainer(config):
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  tx = optim.make(config.opt, 10)
  state, spec = train_state.create(
    config_lib.model_config(config), 0, tx, mesh, sharding.DEFAULT_RULES
  )
  trainer = train.Trainer(config, mesh, spec, tx)
  batch = trainer.to_global(synthetic_batch(config))
  trainer.compile(state, batch)
  return trainer, state, batch


def test_gradient_accumulation_runs_in_the_train_step():
  config = tiny_config("causal_lm")
  config.opt.grad_accum_steps = 4
  trainer, state, batch = _compiled_trainer(config)
  state, metrics = trainer.train(state, batch)
  assert int(state.step) == 1 and float(metrics["predicted_tokens"]) > 0


@pytest.mark.slow
def test_bfloat16_compute_trains(objective):
  config = tiny_config(objective)
  config.model.dtype = "bfloat16"
  config.opt.learning_rate, config.opt.warmup_steps = 3e-3, 0
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  tx = optim.make(config.opt, 100)
  model_cfg = config_lib.model_config(config)
  state, spec = train_state.create(model_cfg, 0, tx, mesh, sharding.DEFAULT_RULES)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
  batch = synthetic_batch(config)
  step = jax.jit(
    lambda s: step_lib.train_step(
      s, batch, spec=spec, tx=tx, lr_schedule=lambda _: 0.0, seed=0, dropout=False
    )
  )
  losses = []
  for _ in range(30):
    state, metrics = step(state)
    losses.append(float(metrics["train_loss"]))
  assert np.isfinite(losses).all() and losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize(
  "backend, capability, dtype, expected",
  [
    ("cpu", (0,), "bfloat16", "xla"),
    ("gpu", (9, 0), "float32", "xla"),
    ("gpu", (9, 0), "bfloat16", "cudnn"),
    ("gpu", (8, 0), "bfloat16", "xla"),  # packed lengths/offsets need Hopper
  ],
)
def test_auto_attention_takes_cudnn_only_on_hopper_gpus_in_half_precision(
  monkeypatch, backend, capability, dtype, expected
):
  monkeypatch.setattr(config_derived.jax, "default_backend", lambda: backend)
  monkeypatch.setattr(config_derived, "gpu_capability", lambda: capability)
  config = tiny_config("causal_lm")
  config.model.dtype = dtype
  assert config_lib.model_config(config).attention_impl == expected
  config.model.num_heads, config.model.emb_dim = 1, 256  # head dim 256: beyond cuDNN flash
  assert config_lib.model_config(config).attention_impl == "xla"


def test_compiler_options_parse_values_and_repeated_fields():
  assert step_lib.compiler_options("") == {}
  assert step_lib.compiler_options("a=X,Y, b=true,c=3,d=False") == {
    "a": "X,Y",
    "b": True,
    "c": 3,
    "d": False,
  }


@pytest.mark.slow
def test_compiler_options_reach_the_train_step_compile():
  config = tiny_config("causal_lm")
  config.compiler_options = "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_ELTWISE"
  trainer, state, batch = _compiled_trainer(config)
  # The option changes which ops XLA hands to YNNPACK, so the compiled step differs.
  with_option = trainer._train.as_text()
  config.compiler_options = ""
  plain = _compiled_trainer(config)[0]._train.as_text()
  assert with_option != plain
  _, metrics = trainer.train(state, batch)
  assert np.isfinite(float(metrics["train_loss"]))
  config.compiler_options = "xla_no_such_option=1"
  with pytest.raises(config_lib.ConfigError, match="compiler_options"):
    _compiled_trainer(config)
