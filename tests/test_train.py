import glob
import json
import math
import os

import jax
import numpy as np
import pytest
from conftest import synthetic_batch, tiny_config

from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.training import hooks as hooks_lib
from sslm_jax.training import loop as train
from sslm_jax.training import sharding


class Killed(Exception):
  pass


def _hooks(config, batch=None, kill_at=None):
  def batches(start_step):
    step = start_step
    while True:
      if step == kill_at:
        raise Killed
      yield batch if batch is not None else synthetic_batch(config, seed=step)
      step += 1

  return hooks_lib.DataHooks(
    train_batches=batches, eval_batches=lambda: [synthetic_batch(config, seed=10_000)]
  )


def _run(config, workdir, devices=None, batch=None, kill_at=None):
  mesh = sharding.make_mesh(config.mesh, devices=devices or jax.devices()[:1])
  fp = checkpoint.fingerprint(config)
  hooks = _hooks(config, batch, kill_at)
  return train.train_and_evaluate(config, str(workdir), mesh, hooks, fp)


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_run_writes_metrics_checkpoints_tensorboard_and_resumes(tmp_path, objective):
  config = tiny_config(objective)
  _run(config, tmp_path)
  records = _records(tmp_path)
  assert [r["step"] for r in records] == [0, 2, 4, 6, 8]
  assert "eval_loss" in records[0] and "train_loss" not in records[0]
  records = records[1:]
  for key in ("train_loss", "learning_rate", "grad_norm", "tokens_per_sec"):
    assert all(key in r for r in records)
  assert all(0 < r["mfu"] < 1 for r in records)
  assert records[0]["time_compile_s"] > 0 and records[1]["time_compile_s"] == 0
  assert records[1]["time_eval_s"] > 0 and records[2]["time_checkpoint_s"] > 0  # step 4's save
  assert all(r["time_step_s"] > 0 and r["time_data_s"] >= 0 for r in records)
  eval_keys = {"eval_loss", "eval_perplexity"} | (
    {"eval_bits_per_byte"} if objective == "causal_lm" else {"eval_mlm_accuracy"}
  )
  assert eval_keys - {"eval_bits_per_byte"} <= set(records[1])  # bytes need real text
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))

  config.num_train_steps = 12
  _run(config, tmp_path)
  steps = [r["step"] for r in _records(tmp_path)]
  assert steps == [0, 2, 4, 6, 8, 10, 12]
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int)[-1] == "12"


def test_resume_continues_exactly(tmp_path):
  config = tiny_config("causal_lm")
  config.num_train_steps, config.log_every_steps = 8, 1
  _run(config, tmp_path / "straight")
  with pytest.raises(Killed):  # dies while fetching step 7's batch; newest checkpoint: step 4
    _run(config, tmp_path / "resumed", kill_at=6)
  assert [r["step"] for r in _records(tmp_path / "resumed")] == [0, 1, 2, 3, 4, 5, 6]
  _run(config, tmp_path / "resumed")
  straight = [r.get("train_loss") for r in _records(tmp_path / "straight")]
  resumed = [r.get("train_loss") for r in _records(tmp_path / "resumed")]
  assert straight == resumed


def test_refuses_checkpoint_of_another_shape(tmp_path):
  config = tiny_config("causal_lm")
  _run(config, tmp_path)
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  config.model.emb_dim = 32
  with pytest.raises(checkpoint.CheckpointMismatch, match="model.emb_dim: checkpoint has 64"):
    _run(config, tmp_path)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_non_finite_loss_stops_with_step_and_last_checkpoint(tmp_path):
  config = tiny_config("causal_lm")
  batch = synthetic_batch(config)
  batch["weights"] = np.full_like(batch["weights"], np.nan)
  with pytest.raises(hooks_lib.NonFiniteError, match="at step 1.*Last good checkpoint: none"):
    _run(config, tmp_path, batch=batch)
  assert not os.listdir(tmp_path / "checkpoints")


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_sharded_losses_match_one_device(tmp_path, mesh_shape):
  config = tiny_config("causal_lm")
  config.num_train_steps, config.log_every_steps, config.eval_every_steps = 4, 1, 100
  config.checkpoint_every_steps = 100
  _run(config, tmp_path / "one")
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
  _run(config, tmp_path / "many", devices=jax.devices())
  one = [r["train_loss"] for r in _records(tmp_path / "one")[1:]]
  many = [r["train_loss"] for r in _records(tmp_path / "many")[1:]]
  np.testing.assert_allclose(many, one, rtol=1e-5)


def test_intended_config_changes_need_the_flag_and_shapes_never_change(tmp_path):
  config = tiny_config("causal_lm")
  _run(config, tmp_path)
  config.num_train_steps, config.opt.learning_rate = 10, 5e-4
  with pytest.raises(
    checkpoint.CheckpointMismatch, match="--allow_config_change=opt.learning_rate"
  ):
    _run(config, tmp_path)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  fp = checkpoint.fingerprint(config)
  train.train_and_evaluate(
    config, str(tmp_path), mesh, _hooks(config), fp, allow_changes={"opt.learning_rate"}
  )
  assert _records(tmp_path)[-1]["step"] == 10
  config.model.mlp_dim = 96
  with pytest.raises(checkpoint.CheckpointMismatch, match="Use a new --workdir"):
    train.train_and_evaluate(
      config, str(tmp_path), mesh, _hooks(config), checkpoint.fingerprint(config),
      allow_changes={"all"},
    )  # fmt: skip


def test_sequence_length_grows_within_the_position_table_on_resume(tmp_path):
  """BERT's recipe: short sequences first, then longer ones in the same table."""
  config = tiny_config("masked_lm")
  config.data.seq_len, config.model.max_positions = 16, 32
  config.num_train_steps = 4
  _run(config, tmp_path)
  config.data.seq_len, config.num_train_steps = 32, 8
  with pytest.raises(checkpoint.CheckpointMismatch, match="--allow_config_change=data.seq_len"):
    _run(config, tmp_path)
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  fp = checkpoint.fingerprint(config)
  train.train_and_evaluate(
    config, str(tmp_path), mesh, _hooks(config), fp, allow_changes={"data.seq_len"}
  )
  records = _records(tmp_path)
  assert records[-1]["step"] == 8 and math.isfinite(records[-1]["train_loss"])
  config.model.max_positions = 64  # the table itself is a shape: never changed on resume
  with pytest.raises(checkpoint.CheckpointMismatch, match="positions: checkpoint has 32"):
    train.train_and_evaluate(
      config, str(tmp_path), mesh, _hooks(config), checkpoint.fingerprint(config),
      allow_changes={"all"},
    )  # fmt: skip


def test_retention_keeps_newest_and_every_kth(tmp_path):
  config = tiny_config("causal_lm")
  config.num_train_steps, config.checkpoint_every_steps = 12, 2
  config.keep_checkpoints, config.keep_every_steps = 1, 4
  _run(config, tmp_path)
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints")) == [4, 8, 12]


def test_damaged_checkpoint_names_the_recovery_and_loses_nothing(tmp_path):
  config = tiny_config("causal_lm")
  _run(config, tmp_path)
  newest = tmp_path / "checkpoints" / "8"
  for root, _, files in os.walk(newest / "state"):
    for f in files:
      os.remove(os.path.join(root, f))
  config.num_train_steps = 10
  with pytest.raises(checkpoint.CheckpointError, match="Move it aside .* resume from step 4") as e:
    _run(config, tmp_path)
  message = str(e.value)
  # The step, the cause and the command first; the library's own words last, short, no reprs.
  assert message.startswith("the checkpoint at step 8 cannot be read: ")
  assert "are damaged" in message or "are missing" in message
  assert message.index(f"mv {newest} {newest}.broken") < message.index("(Detail:")
  assert "<bound method" not in message and len(message) < 500 and "\n" not in message
  assert (tmp_path / "checkpoints" / "4").exists()
  os.rename(newest, str(newest) + ".broken")
  _run(config, tmp_path)
  assert _records(tmp_path)[-1]["step"] == 10


def test_eval_summary_from_sums():
  from sslm_jax.training.step import eval_summary

  sums = {
    "loss_sum": 60.0,
    "count": 20.0,
    "byte_sum": 50.0,
    "byte_loss_sum": 55.0,
    "correct_sum": 5.0,
  }
  causal = eval_summary(sums, causal=True)
  assert causal["eval_loss"] == pytest.approx(3.0)
  assert causal["eval_perplexity"] == pytest.approx(math.exp(3.0))
  assert causal["eval_bits_per_byte"] == pytest.approx(55.0 / 50.0 / math.log(2))
  assert "eval_mlm_accuracy" not in causal
  masked = eval_summary(sums, causal=False)
  assert masked["eval_mlm_accuracy"] == pytest.approx(0.25)
  assert "eval_bits_per_byte" not in masked
  # No predicted tokens: no division by zero; a diverged loss gives a finite perplexity cap.
  assert eval_summary({"loss_sum": 0.0, "count": 0.0}, causal=True)["eval_loss"] == 0.0
  huge = eval_summary({"loss_sum": 1e6, "count": 1.0}, causal=True)
  assert math.isfinite(huge["eval_perplexity"])


def test_profiler_traces_the_chosen_steps_only_when_asked(tmp_path):
  config = tiny_config()
  config.num_train_steps, config.profile_start_step, config.profile_steps = 4, 2, 2
  _run(config, tmp_path / "profiled")
  traces = glob.glob(str(tmp_path / "profiled/tensorboard/plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
  config.profile_steps = 0
  _run(config, tmp_path / "plain")
  assert not os.path.exists(tmp_path / "plain/tensorboard/plugins")
