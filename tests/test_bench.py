import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from sslm_jax import bench
from sslm_jax.models import flops
from sslm_jax.models.config import ModelConfig
from sslm_jax.training import plan

ROOT = pathlib.Path(__file__).resolve().parents[1]

L, D, F, V, T, P, N = 2, 8, 32, 128, 16, 3, 2


def tiny(objective, max_len=T):
  return ModelConfig(
    objective=objective,
    vocab_size=V,
    max_len=max_len,
    num_layers=L,
    num_heads=N,
    emb_dim=D,
    mlp_dim=F,
  )


def training_flops_per_token(matmuls_mnk):
  """Forward 2*M*N*K per matmul; backward twice that; spread over the T tokens of a sequence."""
  return sum(3 * 2 * m * n * k for m, n, k in matmuls_mnk) / T


def one_layer(causal):
  h = D // N
  s = T // 2 if causal else T  # keys a query attends to, counting half the causal triangle
  projections = [(T, D, D)] * 4 + [(T, F, D), (T, D, F)]  # q, k, v, out; fc, proj
  scores = [(T, s, h)] * N  # QK^T per head: [T, H] x [H, S]
  mixes = [(T, h, s)] * N  # AV per head: [T, S] x [S, H]
  return projections + scores + mixes


def test_causal_flops_match_a_hand_count():
  matmuls = one_layer(causal=True) * L + [(T, V, D)]  # tied logits on every token
  assert training_flops_per_token(matmuls) == 16896
  assert flops.model_flops_per_token(tiny("causal_lm"), None) == 16896


def test_masked_lm_flops_match_a_hand_count():
  head = [(P, D, D), (P, V, D)]  # transform and tied logits on the P gathered positions only
  matmuls = one_layer(causal=False) * L + head
  assert training_flops_per_token(matmuls) == 13512
  assert flops.model_flops_per_token(tiny("masked_lm"), P) == 13512


def test_causal_attention_is_half_of_bidirectional():
  # Doubling T adds only attention work (the MLM head keeps P/T fixed when P doubles too).
  def growth(objective, p, p_long):
    short = flops.model_flops_per_token(tiny(objective), p)
    return flops.model_flops_per_token(tiny(objective, 2 * T), p_long) - short

  causal = growth("causal_lm", None, None)
  assert causal > 0
  assert growth("masked_lm", P, 2 * P) == 2 * causal


def test_step_flops_and_missing_predictions():
  per_token = flops.model_flops_per_token(tiny("causal_lm", 64), None)
  assert flops.step_flops(tiny("causal_lm"), 4, 64, None) == 4 * 64 * per_token
  with pytest.raises(ValueError, match="num_predictions"):
    flops.model_flops_per_token(tiny("masked_lm"), None)


def test_peak_table_matches_device_kinds():
  assert flops.table_peak("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989e12
  assert flops.table_peak("NVIDIA H100 PCIe", "bfloat16")[0] == 756e12
  # fp32 on NVIDIA: TF32 tensor cores by default, the plain fp32 rate only at "highest".
  assert flops.table_peak("NVIDIA H200", "float32", None)[0] == 494.5e12
  assert flops.table_peak("NVIDIA H200", "float32", "highest")[0] == 67e12
  assert flops.table_peak("NVIDIA A100-SXM4-80GB", "float32", "default")[0] == 156e12
  with jax.default_matmul_precision("float32"):
    assert flops.table_peak("NVIDIA H100 PCIe", "float32")[0] == 51e12
  assert flops.table_peak("NVIDIA H100 PCIe", "float32")[0] == 378e12
  assert flops.table_peak("TPU v5 lite", "bfloat16")[0] == 197e12
  assert flops.table_peak("TPU v5p", "float32") == (
    459e12,
    "table: TPU v5p bf16 dense (fp32 matmuls run as bf16 passes on TPU)",
  )
  assert flops.table_peak("TPU v6 lite", "bfloat16")[0] == 918e12
  peak, source = flops.table_peak("Mystery Accelerator 9000", "bfloat16")
  assert peak is None and "unknown" in source


def test_synthetic_batch_is_well_formed(objective):
  from conftest import tiny_config

  config = tiny_config(objective)
  batch = bench.synthetic_batch(config, config.batch_size, np.random.default_rng(0))
  expected = plan.abstract_batch(config)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
    k: (v.shape, v.dtype) for k, v in expected.items()
  }
  if objective == "masked_lm":
    positions = batch["masked_positions"]
    assert (np.diff(positions, axis=1) > 0).all()  # sorted and distinct
    assert positions.min() >= 0 and positions.max() < config.data.seq_len


# Runs the bench as `python -m` would, then reports on stderr (stdout's last line stays the
# bench's JSON) whether anything imported TensorFlow, and fails the process if so.
RUNNER = """
import runpy, sys
sys.argv = ["sslm_jax.bench", *sys.argv[1:]]
code = 0
try:
  runpy.run_module("sslm_jax.bench", run_name="__main__", alter_sys=True)
except SystemExit as e:
  code = e.code or 0
tf = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
print("tensorflow modules:", tf, file=sys.stderr)
sys.exit(code or (3 if tf else 0))
"""

KEYS = {
  "tokens_per_sec",
  "step_time_s",
  "compile_time_s",
  "model_flops_per_token",
  "model_flops_per_sec",
  "mfu",
  "peak_flops_per_sec",
  "peak_source",
  "devices",
  "dtype",
  "per_device_memory_bytes",
}


@pytest.mark.slow
@pytest.mark.parametrize("config_file", ["gpt_tiny.py", "bert_tiny.py"])
def test_bench_runs_without_tensorflow(config_file):
  args = [
    f"--config={ROOT / 'configs' / config_file}",
    "--steps=3",
    "--warmup_steps=1",
    "--data=synthetic",
    "--config.mesh.data=1",
    "--config.batch_size=4",
    "--config.data.seq_len=32",
    "--config.data.vocab_size=256",
    "--config.model.num_layers=2",
    "--config.model.emb_dim=64",
    "--config.model.mlp_dim=128",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(
    [sys.executable, "-c", RUNNER, *args],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
    env=env,
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  assert "tensorflow modules: []" in result.stderr
  record = json.loads(result.stdout.strip().splitlines()[-1])
  assert KEYS <= set(record), KEYS - set(record)
  assert 0 < record["mfu"] < 1
  assert record["peak_source"].startswith("measured: fp32 GEMM 2048^3 on cpu")
  assert record["devices"] == {"count": 1, "kind": "cpu"}
  assert record["attention_impl"] == "xla"  # auto picks cuDNN on GPUs only
  assert record["per_device_memory_bytes"] > 0
  assert "input_wait_fraction" not in record


@pytest.mark.slow
def test_generate_mode_reports_ours_and_hugging_face_tokens_per_sec():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  args = [
    "--mode=generate",
    "--gen_shape=tiny",
    "--gen_batch_sizes=1,2",
    "--gen_prompt_len=5",
    "--gen_new_tokens=6",
    "--gen_repeats=1",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(
    [sys.executable, "-c", RUNNER, *args],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
    env=env,
  )
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
  assert "tensorflow modules: []" in result.stderr
  record = json.loads(result.stdout.strip().splitlines()[-1])
  assert record["new_tokens"] == 6 and record["shape"]["layers"] == 2
  assert record["prepare_s"] > 0
  for b in (1, 2):
    row = record[f"batch_{b}"]
    assert row["ours_tokens_per_sec"] > 0 and row["hf_tokens_per_sec"] > 0
    assert row["ratio_ours_over_hf"] == pytest.approx(
      row["ours_tokens_per_sec"] / row["hf_tokens_per_sec"]
    )


def test_train_mode_still_requires_a_config():
  result = subprocess.run(
    [sys.executable, "-m", "sslm_jax.bench"],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert result.returncode != 0
  assert "--config is required unless --mode=generate" in result.stderr
