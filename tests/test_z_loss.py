"""opt.z_loss: PaLM's auxiliary z_loss * logsumexp(logits)^2, made inside the chunked cross-entropy
(training/vocab_loss.py) without whole float32 logits, equals the plain-JAX loss and gradient;
evaluation leaves it out."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import synthetic_batch, tiny_config
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sslm_jax import config as config_lib
from sslm_jax.models import layers
from sslm_jax.models import transformer as model_lib
from sslm_jax.models.config import ModelConfig
from sslm_jax.training import hooks as hooks_lib
from sslm_jax.training import losses as objectives
from sslm_jax.training import sharding, vocab_loss
from sslm_jax.training import state as train_state
from sslm_jax.training import step as step_lib

Z = 0.05  # large enough for the z-loss to be a fifth of the loss at these logits (lse ~ 5)
B, T, P, V, IDS = 4, 16, 6, 160, 130  # rows 130.. of the embedding are vocabulary padding


def _reference_sums(model, batch):
  """Whole logits, optax's cross-entropy and jax.nn.logsumexp: the loss with its z-loss."""
  args = [batch["inputs"], batch["positions"], batch["segment_ids"]]
  if model.cfg.causal:
    logits, targets, weights = model(*args), batch["targets"], batch["weights"]
  else:
    logits = model(*args, batch["masked_positions"])
    targets, weights = batch["masked_targets"], batch["masked_weights"]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  z_sum = jnp.sum(weights * jax.nn.logsumexp(logits, axis=-1) ** 2)
  return {"loss_sum": jnp.sum(weights * nll) + Z * z_sum, "z_loss_sum": Z * z_sum}


def _value_and_grad(graphdef, sums_fn, batch):
  def loss_sum(params):
    sums = sums_fn(nnx.merge(graphdef, params), batch)
    return sums["loss_sum"], sums["z_loss_sum"]

  return jax.jit(jax.value_and_grad(loss_sum, has_aux=True))


def _case(objective, chunk_len):
  cfg = ModelConfig(
    objective=objective, vocab_size=V, real_vocab_size=IDS, max_len=T, num_layers=1,
    num_heads=2, emb_dim=32, mlp_dim=64, loss_chunk_len=chunk_len,
  )  # fmt: skip
  graphdef, params = nnx.split(model_lib.build(cfg, seed=0), nnx.Param)
  rng = np.random.default_rng(0)
  batch = {
    "inputs": rng.integers(7, IDS, (B, T)).astype(np.int32),
    "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
    "segment_ids": np.ones((B, T), np.int32),
  }
  n, keys = (T, ("targets", "weights")) if cfg.causal else (P, ("masked_targets", "masked_weights"))
  if not cfg.causal:
    batch["masked_positions"] = np.sort(
      rng.permuted(np.tile(np.arange(T), (B, 1)), axis=1)[:, :P], 1
    )
  batch[keys[0]] = rng.integers(7, IDS, (B, n)).astype(np.int32)
  batch[keys[1]] = rng.choice([0.0, 1.0, 2.0], (B, n)).astype(np.float32)
  return graphdef, params, batch


def _assert_close(got, want, rtol):
  """Each leaf within rtol of its largest value, floored at 1e-3 of the tree's largest: some
  gradients are zero in exact arithmetic (the attention key bias) and only rounding is left."""
  pairs = [
    (np.asarray(a, np.float64), np.asarray(b, np.float64))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
  ]
  floor = 1e-3 * max(np.abs(b).max() for _, b in pairs)
  for a, b in pairs:
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(np.abs(b).max(), floor))


def _arrays_reference(x, emb, bias, targets, weights):
  logits = jnp.einsum("BXD,VD->BXV", x, emb) + bias
  logits = jnp.where(jnp.arange(V) < IDS, logits, layers.PADDING_LOGIT)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  z_sum = jnp.sum(weights * jax.nn.logsumexp(logits, axis=-1) ** 2)
  return jnp.sum(weights * nll) + Z * z_sum, Z * z_sum


def _arrays_ours(x, emb, bias, targets, weights, chunk_len):
  sums = vocab_loss.cross_entropy_sums(
    x, emb, bias, targets, weights, num_ids=IDS, dtype="float32", chunk_len=chunk_len, z_loss=Z
  )
  return sums.loss_sum, Z * sums.z_sum


@pytest.mark.parametrize("chunk_len,mesh", [(0, False), (5, False), (4, True)])
def test_chunked_z_loss_and_its_gradient_match_plain_jax(chunk_len, mesh):
  rng = np.random.default_rng(0)
  x, emb, bias = (rng.normal(0, s, shape).astype(np.float32) for s, shape in
                  ((1.0, (B, T, 32)), (0.5, (V, 32)), (0.5, (V,))))  # fmt: skip
  targets = rng.integers(0, IDS, (B, T)).astype(np.int32)
  weights = rng.choice([0.0, 1.0, 2.0], (B, T)).astype(np.float32)
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
  (want, want_z), want_grads = grad(_arrays_reference)(x, emb, bias, targets, weights)
  assert float(want_z) > 0.1 * float(want)  # the z-loss is a real part of the loss here
  ours = grad(functools.partial(_arrays_ours, chunk_len=chunk_len))
  if mesh:
    config = tiny_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    mesh, rules = sharding.make_mesh(config.mesh), sharding.rules_from_config(())
    rows, spec = PartitionSpec(("data", "fsdp")), PartitionSpec
    specs = (rows, spec("tensor", "fsdp"), spec("tensor"), rows, rows)
    with sharding.activate(mesh, rules):
      args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(
        (x, emb, bias, targets, weights), specs, strict=True)]  # fmt: skip
      (got, got_z), got_grads = ours(*args)
  else:
    (got, got_z), got_grads = ours(x, emb, bias, targets, weights)
  _assert_close((got, got_z), (want, want_z), 1e-6)
  _assert_close(got_grads, want_grads, 1e-5)


def test_model_z_loss_and_its_gradient_match_plain_jax(objective):
  graphdef, params, batch = _case(objective, 5)
  (want, want_z), want_grads = _value_and_grad(graphdef, _reference_sums, batch)(params)
  ours = functools.partial(objectives.metric_sums, z_loss=Z)
  (got, got_z), got_grads = _value_and_grad(graphdef, ours, batch)(params)
  assert float(want_z) > 0.1 * float(want)
  _assert_close((got, got_z), (want, want_z), 1e-6)
  _assert_close(got_grads, want_grads, 1e-5)


def test_train_step_reports_the_z_loss_apart_and_evaluation_leaves_it_out():
  config = tiny_config()
  config.opt.z_loss, config.model.num_layers = 1e-3, 1
  config_lib.validate(config)
  objective = hooks_lib.Objective(config)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  tx = objective.optimizer()
  state, spec = train_state.create(objective.model_cfg, 0, tx, mesh, sharding.DEFAULT_RULES)
  batch = synthetic_batch(config)
  step = functools.partial(
    step_lib.train_step, spec=spec, tx=tx, lr_schedule=lambda s: 0.0, seed=0, dropout=False,
    sums_fn=objective.metric_sums,
  )  # fmt: skip
  _, metrics = jax.jit(step)(state, batch)
  evaluated = objective.eval_outputs(spec.merge(state.params), batch)
  assert "z_loss_sum" not in evaluated
  eval_loss = evaluated["loss_sum"] / evaluated["count"]
  np.testing.assert_allclose(metrics["train_loss"], eval_loss, rtol=1e-6)
  assert 0 < float(metrics["train_z_loss"]) < 1e-3 * 40  # lse^2 of ~log(256)^2 ~ 31 per token
  config.opt.z_loss = -1.0
  with pytest.raises(config_lib.ConfigError, match="opt.z_loss"):
    config_lib.validate(config)
