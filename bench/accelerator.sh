#!/usr/bin/env bash
# Train-step throughput and MFU of GPT at ~355M and ~1.3B parameters on one GPU or TPU host.
#
#   bash bench/accelerator.sh            # runs both; one JSON line per model on stdout
#   bash bench/accelerator.sh --dry-run  # prints the commands only
#
# Both models: seq 2048, vocab 50257, the shipped defaults for the accelerator (model.dtype=auto:
# bf16 compute with fp32 parameters; attention_impl=auto: splash on TPU, cuDNN flash attention on
# Hopper+ GPUs; the chunked cross-entropy that never stores [tokens, vocab] logits in fp32),
# synthetic batches (no TensorFlow needed), data parallel over every device, 20 timed steps after
# 2 warmup steps.
# Global batch = per-device batch x devices (DEVICES=N overrides the count JAX reports).
# Expect a few minutes in all; most of it is starting Python and compiling.
#
# Needs the repo importable (this script sets PYTHONPATH to the repo root) and jax with the
# accelerator's plugin, flax, optax, orbax-checkpoint and sentencepiece. If the bench fails to
# import something, install the rest of the pure-Python dependencies:
#   pip install ml-collections absl-py etils tensorboardX tqdm
#
# Remat: even with flash attention (no stored scores), activations at seq 2048 are large. Planned
# for TPU v5p (`--plan --topology=v5p-8`, splash attention, bf16): the 355M step at 16 sequences
# per chip takes 79 GiB without remat and 26 GiB with `dots_no_batch` (which keeps the projection
# and MLP matmul outputs and recomputes the rest); 1.3B at 8 per chip 74 vs 23 GiB. An 80 GB GPU
# needs the remat; the GPU figures differ somewhat.
#
# On Hopper or later GPUs, model.attention_impl=auto runs cuDNN flash attention, fed the packed
# documents as per-row lengths and offsets (never a T x S mask); on TPU it runs Pallas splash
# attention with segment ids; neither stores the scores. Older GPUs run XLA's attention. The JSON
# line's attention_impl and dtype say what ran.
set -euo pipefail

dry_run=false
case "${1:-}" in
  "") ;;
  --dry-run) dry_run=true ;;
  *)
    echo "usage: bash bench/accelerator.sh [--dry-run]" >&2
    exit 2
    ;;
esac

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "${DEVICES:-}" ]]; then
  devices="$DEVICES"
elif $dry_run; then
  devices=1
else
  devices="$(python -c 'import jax; print(jax.device_count())')"
fi

common=(
  --config=configs/gpt_base.py
  --data=synthetic
  --steps=20
  --warmup_steps=2
  --config.model.param_dtype=float32
  --config.data.seq_len=2048
  --config.data.vocab_size=50257
  --config.mesh.data=-1
  --config.model.remat_policy=dots_no_batch
)
gpt_355m=(
  --config.model.num_layers=24
  --config.model.emb_dim=1024
  --config.model.num_heads=16
  --config.model.mlp_dim=4096
  "--config.batch_size=$((16 * devices))"
)
gpt_1_3b=(
  --config.model.num_layers=24
  --config.model.emb_dim=2048
  --config.model.num_heads=16
  --config.model.mlp_dim=8192
  "--config.batch_size=$((8 * devices))"
)

bench() {
  local name="$1"
  shift
  echo "# $name" >&2
  if $dry_run; then
    echo "python -m sslm_jax.bench $*"
  else
    # The bench's JSON is its last stdout line; its logs go to stderr.
    python -m sslm_jax.bench "$@" | tail -n 1
  fi
}

bench "GPT 355M (24 x 1024), batch $((16 * devices))" "${common[@]}" "${gpt_355m[@]}"
bench "GPT 1.3B (24 x 2048), batch $((8 * devices))" "${common[@]}" "${gpt_1_3b[@]}"
