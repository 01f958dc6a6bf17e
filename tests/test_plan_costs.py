"""The plan's step-cost accounting on this CPU's devices: loop-free copies, loud failures, and the
Pallas kernels' formulas (the TPU compiles themselves are in test_plan_topology.py)."""

import dataclasses

import pytest
from conftest import tiny_config

from sslm_jax import config as config_lib
from sslm_jax.models import kernel_costs, splash
from sslm_jax.training import plan, sharding


def _compiled(config):
  config.mesh.data = -1
  mesh = sharding.make_mesh(config.mesh)
  return mesh, plan._lower(config, mesh)[1].compile()


def test_a_scanned_step_is_counted_from_loop_free_copies():
  config = tiny_config()
  config.model.num_layers = 5
  mesh, scanned = _compiled(config)
  assert plan.count_loops(scanned) >= 1  # the layer scan
  flops, bytes_, compiles = plan.step_costs(config, mesh, scanned)
  config.model.scan_layers = False
  _, unrolled = _compiled(config)
  assert plan.count_loops(unrolled) == 0
  assert compiles == 2 and plan.step_costs(config, mesh, unrolled)[2] == 0
  own_flops, own_bytes = plan._xla_costs(unrolled)
  assert flops == pytest.approx(own_flops, rel=0.02)
  assert bytes_ == pytest.approx(own_bytes, rel=0.3)
  # What the scanned program alone reports: about one layer's work, far from the step's.
  assert plan._xla_costs(scanned)[0] < 0.8 * flops


def test_a_copy_that_keeps_a_loop_stops_the_plan(monkeypatch):
  config = tiny_config()
  mesh, scanned = _compiled(config)
  monkeypatch.setattr(plan, "count_loops", lambda compiled: 2)
  with pytest.raises(plan.PlanError, match=r"still has 2 `while` loop\(s\)"):
    plan.step_costs(config, mesh, scanned)


def test_a_layer_that_costs_nothing_stops_the_plan(monkeypatch):
  config = tiny_config()
  config.model.num_layers = 4
  mesh, scanned = _compiled(config)
  counts = iter([(5e9, 2e8), (4e9, 3e8)])  # the 3-layer copy counts fewer FLOPs than 2 layers
  monkeypatch.setattr(plan, "_xla_costs", lambda compiled: next(counts))
  with pytest.raises(plan.PlanError, match="cannot cost nothing"):
    plan.step_costs(config, mesh, scanned)


@pytest.mark.parametrize(
  "seq_len, bq, bkv, causal, blocks",
  [
    (1024, 512, 512, True, 3),
    (1024, 512, 512, False, 4),
    (512, 128, 256, True, 6),
    (512, 256, 128, True, 6),
  ],
)
def test_splash_computes_the_blocks_its_mask_reaches(seq_len, bq, bkv, causal, blocks):
  assert kernel_costs.computed_blocks(seq_len, bq, bkv, causal) == blocks


def test_splash_flops_exceed_the_models_attention_count_by_the_skipped_blocks_rule():
  config = tiny_config()
  config.data.seq_len, config.model.attention_impl = 1024, "splash"
  cfg = dataclasses.replace(config_lib.model_config(config), attention_block_q=512)
  costs = kernel_costs.splash_step_costs(cfg, batch_size=8, seq_len=1024)
  # The model counts half the score matrix, forward + 2x backward (models/flops.py): 6 B L T^2 D.
  model_attention = 6 * cfg.num_layers * 8 * 1024 * 1024 * cfg.emb_dim
  # The kernel computes 3 of 4 blocks, forward 2 + backward 4 + 3 matmuls, against the model's
  # half of the blocks and 2 + 4 matmuls.
  assert costs["flops"] == pytest.approx(model_attention * (9 * 0.75) / (6 * 0.5))
  full = kernel_costs.splash_step_costs(
    dataclasses.replace(cfg, objective="masked_lm"), batch_size=8, seq_len=1024
  )
  assert full["flops"] == pytest.approx(costs["flops"] * 4 / 3)
  assert full["bytes"] > costs["bytes"] > 0


@pytest.mark.parametrize(
  "asked, seq_len, block",
  [(512, 1024, 512), (512, 768, 384), (512, 384, 384), (512, 128, 128), (256, 640, 128)],
)
def test_splash_runs_the_largest_block_of_128s_that_divides_the_length(asked, seq_len, block):
  assert splash.fit_block(asked, seq_len) == block
