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


def _blocks_of_the_kernels_mask(seq_len, bq, bkv, causal, radius):
  """Blocks with any True entry in the static mask splash is built with (models/splash.py)."""
  dense = splash.head_mask(seq_len, causal, radius)[0:seq_len, 0:seq_len]
  return sum(
    bool(dense[i : i + bq, j : j + bkv].any())
    for i in range(0, seq_len, bq)
    for j in range(0, seq_len, bkv)
  )


@pytest.mark.parametrize(
  "seq_len, bq, bkv, causal, radius, blocks",
  [
    (512, 128, 128, False, 32, 10),  # the diagonal and its two neighbours
    (512, 128, 128, True, 32, 7),  # the diagonal and its left neighbour
    (1024, 512, 512, False, 64, 4),  # ModernBERT's window at 512-blocks: every block
    (512, 128, 256, False, 200, 8),
    (1024, 256, 128, True, 300, 16),  # 2, 4, 5 and 5 key blocks per query block
    (512, 128, 128, True, None, 10),
    (512, 256, 128, False, None, 8),
  ],
)
def test_splash_computes_the_blocks_its_window_reaches(seq_len, bq, bkv, causal, radius, blocks):
  assert _blocks_of_the_kernels_mask(seq_len, bq, bkv, causal, radius) == blocks
  assert kernel_costs.computed_blocks(seq_len, bq, bkv, causal, radius) == blocks


def _family_model_cfg(family, **model):
  config = tiny_config("causal_lm" if family == "llama" else "masked_lm")
  config.data.seq_len, config.model.family = 512, family
  config.model.attention_impl = "splash"
  config.model.attention_block_q = config.model.attention_block_kv = 128
  for key, value in model.items():
    config.model[key] = value
  return config_lib.model_config(config)


def test_splash_costs_of_windowed_layers_count_their_own_blocks():
  # Layer 0 global (16 blocks of 128 at T=512), layers 1 and 2 windowed (10 blocks each).
  cfg = _family_model_cfg("modernbert", num_layers=3, global_every=3, sliding_window=64)
  windowed = kernel_costs.splash_step_costs(cfg, batch_size=8, seq_len=512)
  full = kernel_costs.splash_step_costs(
    dataclasses.replace(cfg, sliding_window=0), batch_size=8, seq_len=512
  )
  assert windowed["flops"] == pytest.approx(full["flops"] * (16 + 2 * 10) / (3 * 16))
  assert full["bytes"] > windowed["bytes"] > 0


def test_splash_costs_of_grouped_heads_read_and_write_each_key_value_head_once():
  grouped = _family_model_cfg("llama", num_kv_heads=2)
  costs = kernel_costs.splash_step_costs(grouped, batch_size=8, seq_len=512)
  ungrouped = kernel_costs.splash_step_costs(
    dataclasses.replace(grouped, num_kv_heads=0), batch_size=8, seq_len=512
  )
  assert costs["flops"] == ungrouped["flops"]  # every query head computes all its blocks
  # The dK/dV kernel reads K and V and writes dK and dV ([T, H] each) for 2 heads, not 4.
  per_head = 4 * 512 * grouped.head_dim * 4  # float32
  missing = grouped.num_layers * 8 * (grouped.num_heads - grouped.kv_heads) * per_head
  assert ungrouped["bytes"] - costs["bytes"] == pytest.approx(missing)
