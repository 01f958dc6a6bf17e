"""Dropout replays after a resume and ignores the mesh; accumulated gradients ignore the mesh."""

import functools
import itertools
import shutil

import jax
import numpy as np
import pytest
from conftest import synthetic_batch, tiny_config

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.training import hooks as hooks_lib
from sslm_jax.training import loop as train
from sslm_jax.training import optimizer as optim
from sslm_jax.training import sharding
from sslm_jax.training import state as train_state
from sslm_jax.training import step as step_lib

RULES = sharding.DEFAULT_RULES


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _run(config, workdir) -> int:
  """train_and_evaluate on one device, step s+1 on batch `s`; returns the step it started at."""
  starts = []

  def batches(start_step):
    starts.append(start_step)
    for step in itertools.count(start_step):
      yield synthetic_batch(config, seed=step)

  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  hooks = hooks_lib.DataHooks(train_batches=batches)
  train.train_and_evaluate(config, str(workdir), mesh, hooks, checkpoint.fingerprint(config))
  return starts[0]


def _restored(config, workdir):
  """The newest checkpoint restored as a rerun restores it, and what it was restored with."""
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  return train.init_or_restore(config, mesh, str(workdir), checkpoint.fingerprint(config))


# The two objectives share the loop and the key schedule, and BERT's own use of the key is also
# checked on a mesh below: its resume (four more compiles) runs with the slow tests.
@pytest.mark.parametrize(
  "objective", ["causal_lm", pytest.param("masked_lm", marks=pytest.mark.slow)]
)
def test_dropout_replays_exactly_across_a_resume(tmp_path, objective):
  config = tiny_config(objective)
  config.model.dropout_rate = 0.1
  config.num_train_steps, config.opt.warmup_steps = 4, 0
  config.checkpoint_every_steps, config.log_every_steps = 2, 4

  assert _run(config, tmp_path) == 0  # straight through steps 1..4, saving steps 2 and 4
  state, spec, tx, ckpt = _restored(config, tmp_path)
  assert int(state.step) == 4
  straight = _leaves(state.params)
  ckpt.close()
  shutil.rmtree(tmp_path / "checkpoints" / "4")  # as if the run had stopped after step 2
  assert _run(config, tmp_path) == 2  # resumed from step 2: a fresh state, steps 3 and 4 again
  state, _, _, ckpt = _restored(config, tmp_path)
  assert int(state.step) == 4
  for a, b in zip(_leaves(state.params), straight, strict=True):
    np.testing.assert_array_equal(a, b)

  # Dropout is on and keyed by the step: steps 3 and 4 replayed from step 2's state end where the
  # run did, but under other step numbers (which pick the dropout keys and nothing else: the
  # learning rate follows the optimizer's own count) they end elsewhere. With dropout off, or
  # one key for every step, both would end at the same parameters.
  trainer = train.Trainer(
    config, sharding.make_mesh(config.mesh, devices=jax.devices()[:1]), spec, tx
  )
  ends = []
  for shift in (0, 1000):
    state = ckpt.restore(2, spec.abstract)
    state = state.replace(step=state.step + shift)
    for seed in (2, 3):  # the batches of steps 3 and 4
      state, _ = trainer.train(state, trainer.to_global(synthetic_batch(config, seed=seed)))
    ends.append(_leaves(state.params))
  ckpt.close()
  for a, b in zip(ends[0], straight, strict=True):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(ends[1], straight, strict=True))


def _grads_on(mesh, spec, params, batch, key, accum_steps=1):
  """(gradients of the summed loss, metric sums), jitted with the train step's shardings."""
  batch_sharding = sharding.batch_sharding(mesh, RULES)
  grads_fn = functools.partial(
    step_lib._accumulated_grads if accum_steps > 1 else step_lib._summed_grads, spec=spec
  )
  if accum_steps > 1:
    grads_fn = functools.partial(grads_fn, accum_steps=accum_steps)
  fn = jax.jit(
    lambda p, b, k: grads_fn(p, b, key=k),
    in_shardings=(spec.shardings.params, batch_sharding, None),
    out_shardings=(spec.shardings.params, None),
  )
  with sharding.activate(mesh, RULES):
    params = jax.device_put(params, spec.shardings.params)
    grads, sums = fn(params, sharding.global_batch(batch, batch_sharding), key)
  return grads, {k: float(v) for k, v in sums.items()}


def _one_device_and_mesh(config):
  """(one-device mesh, spec, params) and the (data=2, fsdp=2, tensor=2) mesh's (mesh, spec)."""
  model_cfg = config_lib.model_config(config)
  tx = optim.make(config.opt, config.num_train_steps)
  one = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  state, one_spec = train_state.create(model_cfg, config.seed, tx, one, RULES)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh = sharding.make_mesh(config.mesh)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  spec = train_state.state_spec(model_cfg, config.seed, tx, mesh, RULES)
  return (one, one_spec, state.params), (mesh, spec)


def _assert_grads_close(actual, expected, count, rtol=1e-5, atol=1e-6):
  """Gradients of the mean loss (as the step divides them) agree leaf by leaf."""
  for a, b in zip(_leaves(actual), _leaves(expected), strict=True):
    np.testing.assert_allclose(a / count, b / count, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def bert():
  """A BERT with dropout (residual and attention), its batch, and its parameters on one device
  and on the 2x2x2 mesh."""
  config = tiny_config("masked_lm")
  config.model.dropout_rate = 0.1
  config.model.attention_dropout = 0.1  # its bits, [B, N, T, S], must ignore the mesh too
  return synthetic_batch(config), *_one_device_and_mesh(config)


def test_bert_dropout_gradients_do_not_depend_on_the_mesh(bert):
  batch, (one, one_spec, params), (mesh, spec) = bert
  key = jax.random.fold_in(jax.random.key(0), 3)  # train_step's key for step 3 with seed 0

  grads, sums = _grads_on(one, one_spec, params, batch, key)
  sharded_grads, sharded_sums = _grads_on(mesh, spec, params, batch, key)
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(sharded_grads)}
  assert any("fsdp" in s and "tensor" in s for s in specs), specs  # really split both ways
  assert sharded_sums["count"] == sums["count"]
  assert sharded_sums["loss_sum"] == pytest.approx(sums["loss_sum"], rel=1e-5)
  _assert_grads_close(sharded_grads, grads, sums["count"])

  # The masks are in effect: another step's key gives gradients far outside that tolerance.
  other_key = jax.random.fold_in(jax.random.key(0), 4)
  other_grads, _ = _grads_on(one, one_spec, params, batch, other_key)
  with pytest.raises(AssertionError):
    _assert_grads_close(other_grads, grads, sums["count"], rtol=1e-2)


# 8 rows over data*fsdp = 4 batch shards: with 2 microbatches each one takes a row from every
# shard; with 4, each microbatch's 2 rows live on 2 of the 4 shards and XLA moves them.
@pytest.mark.parametrize("accum_steps", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_sharded_gradient_accumulation_equals_one_big_batch(bert, accum_steps):
  batch, (one, one_spec, params), (mesh, spec) = bert
  # Without a key there is no dropout (as in evaluation), so microbatches can equal the batch.
  whole_grads, whole = _grads_on(mesh, spec, params, batch, None)
  accum_grads, accum = _grads_on(mesh, spec, params, batch, None, accum_steps)
  one_grads, one_sums = _grads_on(one, one_spec, params, batch, None, accum_steps)
  assert accum["count"] == whole["count"] == one_sums["count"]
  assert accum["loss_sum"] == pytest.approx(whole["loss_sum"], rel=1e-5)
  assert accum["loss_sum"] == pytest.approx(one_sums["loss_sum"], rel=1e-5)
  _assert_grads_close(accum_grads, whole_grads, whole["count"])
  _assert_grads_close(accum_grads, one_grads, whole["count"])
