"""A frozen encoder takes no gradient and no part in clipping; class weights; classification's
early-stopping default sees minority classes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_finetune import _config, _equal, _mesh, task_dir  # noqa: F401 (a fixture)

from sslm_jax import config as config_lib
from sslm_jax.config import finetune as finetune_config
from sslm_jax.finetune import class_weights, early_stopping, heads
from sslm_jax.finetune import loop as finetune
from sslm_jax.training import optimizer as optim
from sslm_jax.training import sharding
from sslm_jax.training import state as train_state
from sslm_jax.training import step as step_lib


def _step(config, workdir):
  """(jitted train step, the fresh state, a batch) of the fine-tuning run `config` describes."""
  prepared = finetune.prepare_finetuning(config, str(workdir))
  objective = prepared.objective
  tx = objective.optimizer()
  mesh, rules = _mesh(config), sharding.DEFAULT_RULES
  state, spec = train_state.create(
    objective.model_cfg, config.seed, tx, mesh, rules, build=objective.build
  )
  step = _train_step(config, spec, tx, objective.metric_sums)
  return jax.jit(step), state, prepared.data.batch_for_step(0), spec, objective


def _train_step(config, spec, tx, sums_fn):
  """step_lib.train_step for `config` with `tx` and `sums_fn`, dropout off."""
  return functools.partial(
    step_lib.train_step,
    spec=spec,
    tx=tx,
    lr_schedule=optim.schedule(config.opt, config.num_train_steps),
    seed=config.seed,
    dropout=False,
    sums_fn=sums_fn,
  )


def _pure(params):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(params))


def _reference(config, state, batch, spec) -> dict:
  """The parameters after one step of optax's own multi_transform: the optimizer (clipping
  included) on the head alone, the encoder's gradient dropped."""

  def labels(params):
    return jax.tree_util.tree_map_with_path(
      lambda p, _: "frozen" if p[0].key == "encoder" else "train", params
    )

  tx = optim.make(config.opt, config.num_train_steps)
  tx_ref = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  ref_state = train_state.TrainState(state.step, state.params, tx_ref.init(state.params))
  ref_step = _train_step(
    config, spec, tx_ref, lambda m, b, k=None: heads.task_sums(m, b, "classification", k)
  )
  return _pure(jax.jit(ref_step)(ref_state, batch)[0].params)


def _assert_close(a, b):
  for got, want in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_a_frozen_encoder_takes_no_gradient_and_no_part_in_clipping(task_dir, tmp_path):  # noqa: F811
  config = _config(task_dir)
  config.opt.grad_clip_norm = 1e-3  # small enough to clip every step
  config.opt.warmup_steps = 0  # the first step updates
  config.finetune.freeze_encoder = True
  step, state, batch, spec, objective = _step(config, tmp_path / "frozen")
  before = _pure(state.params)
  new_state, _ = step(state, batch)
  after = _pure(new_state.params)
  assert _equal(after["encoder"], before["encoder"])  # bit-identical
  _assert_close(after["head"], _reference(config, state, batch, spec)["head"])
  assert not _equal(after["head"], before["head"])
  # Fewer FLOPs than the same step with the encoder trained: no backward pass through it.
  config.finetune.freeze_encoder = False
  unfrozen, state2, batch2, _, _ = _step(config, tmp_path / "unfrozen")
  frozen_flops = step.lower(state, batch).compile().cost_analysis()["flops"]
  unfrozen_flops = unfrozen.lower(state2, batch2).compile().cost_analysis()["flops"]
  assert frozen_flops < 0.7 * unfrozen_flops, (frozen_flops, unfrozen_flops)


def test_freezing_for_some_steps_clips_the_head_alone(task_dir, tmp_path):  # noqa: F811
  # freeze_encoder_steps: the gradient is still computed, but zeroed before the clip.
  config = _config(task_dir)
  config.opt.grad_clip_norm, config.opt.warmup_steps = 1e-3, 0
  config.finetune.freeze_encoder_steps = 2
  step, state, batch, spec, _ = _step(config, tmp_path / "steps")
  after = _pure(step(state, batch)[0].params)
  assert _equal(after["encoder"], _pure(state.params)["encoder"])
  _assert_close(after["head"], _reference(config, state, batch, spec)["head"])


def test_class_weights():
  labels_N = np.array([0] * 80 + [1] * 15 + [2] * 5)
  balanced_K = class_weights.weights("balanced", ("a", "b", "c"), labels_N)
  np.testing.assert_allclose(balanced_K, [100 / 240, 100 / 45, 100 / 15], rtol=1e-6)
  np.testing.assert_array_equal(
    class_weights.weights("c=4, a=0.5", ("a", "b", "c"), labels_N), [0.5, 1, 4]
  )
  assert class_weights.weights("", ("a",), labels_N) is None
  with pytest.raises(ValueError, match="the label 'd'"):
    class_weights.weights("d=2", ("a", "b", "c"), labels_N)
  assert "LABEL=WEIGHT" in finetune_config.class_weights_error("classification", "a=-1")
  assert "leave it ''" in finetune_config.class_weights_error("regression", "balanced")
  assert finetune_config.class_weights_error("pair_classification", "balanced") is None
  config = config_lib.defaults()
  config.finetune.task, config.finetune.class_weights = "classification", "a=x"
  with pytest.raises(config_lib.ConfigError, match="is not LABEL=WEIGHT"):
    config_lib.validate(config)


def test_class_weights_weigh_the_loss_sum_and_the_count():
  outputs_BK = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  batch = {"labels": jnp.array([0, 1, 1]), "weights": jnp.array([1.0, 1.0, 0.0])}
  loss_B = optax.softmax_cross_entropy_with_integer_labels(outputs_BK, batch["labels"])
  weighted = heads.task_sums(
    lambda b, k=None: outputs_BK, batch, "classification", None, [1.0, 3.0]
  )
  assert float(weighted["count"]) == 4.0  # the weight-0 padding row stays out
  assert float(weighted["loss_sum"]) == pytest.approx(float(loss_B[0] + 3 * loss_B[1]))


def test_balanced_weights_reach_the_objective_and_the_record(task_dir, tmp_path):  # noqa: F811
  config = _config(task_dir)
  config.finetune.class_weights = "balanced"
  objective = finetune.prepare_finetuning(config, str(tmp_path / "run")).objective
  np.testing.assert_allclose(objective.class_weights_K, [1.0, 1.0])  # the task is balanced
  assert finetune._finetune_record(config)["class_weights"] == "balanced"
  config.finetune.class_weights = ""
  assert "class_weights" not in finetune._finetune_record(config)  # older workdirs resume


def test_classification_keeps_the_best_macro_f1_by_default():
  assert early_stopping.metric_for("classification", "") == "eval_macro_f1"
  assert early_stopping.metric_for("pair_classification", "") == "eval_macro_f1"
  # The majority class of 80/15/5 data: accuracy 0.8, macro-F1 0.3.
  tracker = early_stopping.Tracker(early_stopping.metric_for("classification", ""), patience=1)
  tracker.update(10, {"eval_accuracy": 0.6, "eval_macro_f1": 0.55})
  tracker.update(20, {"eval_accuracy": 0.8, "eval_macro_f1": 0.30})
  assert tracker.best_step == 10 and tracker.should_stop
