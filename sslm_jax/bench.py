"""Train-step throughput and MFU of one config, with the training code's own step.

  python -m sslm_jax.bench --config=configs/gpt_base.py --steps=20 [--data=synthetic|real]
  python -m sslm_jax.bench --mode=generate [--gen_shape=gpt2_small|tiny] [--gen_batch_sizes=1,8]
      [--gen_family=gpt2|llama --gen_kv_heads=4]

Compiles the step, runs --warmup_steps untimed and --steps timed steps (each waited for), and
prints as its last stdout line one JSON object: tokens_per_sec and step_time_s (from the median
step), compile_time_s, model FLOPs (sslm_jax/models/flops.py), mfu against a peak FLOP/s figure per
device (a vendor table; on CPU a GEMM measured in this run, per host) and where that figure came
from, the devices, compute dtype and peak memory per device. Synthetic
data never imports TensorFlow; --data=real reads the training pipeline (needs --workdir) and
also reports input_wait_fraction, the share of loop time spent waiting for the next batch;
with --read_latency_ms=50 it then times the input pipeline alone with 50 ms added to every
read of the cache (a remote object store) and reports input_batches_per_sec and
input_over_step, how many times the step's consumption it delivers.

--mode=generate times greedy KV-cache generation (sslm_jax/inference/decode.py) of exactly
--gen_new_tokens after a --gen_prompt_len prompt, with random weights, against Hugging Face's
GPT2LMHeadModel (or LlamaForCausalLM) .generate of the same shape in the same run (needs torch and
transformers, the test extra). --gen_family=llama times a Llama of the shape's width and depth,
with --gen_kv_heads key/value heads (0: as many as the query heads) and 2/3 of the shape's MLP
width (SwiGLU's three matrices then hold GPT-2's two's parameters); kv_cache_bytes reports the
cache each batch size holds. Our weights are copied into decoding layout once
(decoder.to_decode_layout, reported as prepare_s), as sslm_jax.load's model does at its first
generate. Compiling and one warm-up run per batch size are untimed; it reports the median of
--gen_repeats alternating runs as new tokens/s for both and the ratio ours/HF per batch size.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from collections.abc import Iterator

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from sslm_jax import config as config_lib
from sslm_jax.cluster import join as cluster
from sslm_jax.errors import SslmError, UsageError
from sslm_jax.inference import decode, decoder
from sslm_jax.models import flops
from sslm_jax.models import transformer as model_lib
from sslm_jax.models.config import ModelConfig
from sslm_jax.models.transformer import count_params
from sslm_jax.training import loop as train
from sslm_jax.training import optimizer as optim
from sslm_jax.training import plan, sharding
from sslm_jax.training import state as train_state

config_flags.DEFINE_config_file("config", None, "Experiment config file (ml_collections).")
flags.DEFINE_integer("steps", 10, "Timed train steps.", lower_bound=1)
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps run after compiling.", lower_bound=0)
flags.DEFINE_enum("data", "synthetic", ["synthetic", "real"], "Random batches or the pipeline.")
flags.DEFINE_string("workdir", None, "Run directory holding the data cache (for --data=real).")
flags.DEFINE_float(
  "read_latency_ms",
  0.0,
  "With --data=real: also time the input pipeline alone with this much delay added to every "
  "read of the data cache (as from a remote object store) and compare it with the step.",
)
flags.DEFINE_enum("mode", "train", ["train", "generate"], "Time the train step or generation.")
flags.DEFINE_enum("gen_shape", "gpt2_small", ["gpt2_small", "tiny"], "Model for --mode=generate.")
flags.DEFINE_enum("gen_family", "gpt2", ["gpt2", "llama"], "Model family for --mode=generate.")
flags.DEFINE_integer("gen_kv_heads", 0, "Llama's key/value heads for --mode=generate (0: all).")
flags.DEFINE_list("gen_batch_sizes", ["1", "8"], "Batch sizes timed by --mode=generate.")
flags.DEFINE_integer("gen_prompt_len", 64, "Prompt tokens per row for --mode=generate.")
flags.DEFINE_integer("gen_new_tokens", 128, "New tokens per row for --mode=generate.")
flags.DEFINE_integer("gen_repeats", 3, "Timed runs per batch size (median reported).")
flags.register_multi_flags_validator(
  ["config", "mode"],
  lambda f: f["config"] is not None or f["mode"] != "train",
  "--config is required unless --mode=generate.",
)
FLAGS = flags.FLAGS


def synthetic_batch(config, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Random `rows` of a batch with the keys, trailing shapes and dtypes of plan.abstract_batch."""
  v, t = config.data.vocab_size, config.data.seq_len
  batch = {}
  for key, spec in plan.abstract_batch(config).items():
    shape = (rows, *spec.shape[1:])
    if key in ("inputs", "targets", "masked_targets"):
      value = rng.integers(0, v, shape)
    elif key == "positions":
      value = np.broadcast_to(np.arange(t), shape)
    elif key == "masked_positions":
      # The first P of a random order of [0, T): distinct, then sorted like the pipeline's.
      value = np.sort(np.argsort(rng.random((rows, t)), axis=1)[:, : shape[1]], axis=1)
    elif key in ("segment_ids", "weights", "masked_weights"):
      value = np.ones(shape)
    else:
      raise UsageError(f"bench.py cannot make synthetic values for batch field {key!r}.")
    batch[key] = np.ascontiguousarray(value, dtype=spec.dtype)
  return batch


def synthetic_batches(config, pool: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows, cycling over a few batches made up front: the loop times the step."""
  rows = config.batch_size // jax.process_count()
  rng = np.random.default_rng(config.seed)
  return itertools.cycle([synthetic_batch(config, rows, rng) for _ in range(pool)])


def real_batches(config, workdir: str | None) -> Iterator[dict[str, np.ndarray]]:
  """The training pipeline's batches; the only path here that imports TensorFlow."""
  if not workdir:
    raise UsageError("--data=real needs --workdir=DIR (where the data cache is, or will be).")
  from etils import epath
  from jax.experimental import multihost_utils

  from sslm_jax.data import pipeline, preparation  # TensorFlow

  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    preparation.build_cache(config, workdir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("bench data prepared")
  data = pipeline.build(config, workdir, jax.process_index(), jax.process_count())
  pipeline.size_packing(config, data)
  return data.train_batches(0)


def input_throughput(config, workdir: str, latency_ms: float, batches: int) -> dict:
  """Batches/s the input pipeline delivers when every read of the cache waits latency_ms."""
  from sslm_jax.data import pipeline, shards  # TensorFlow

  opener = shards.LatencyOpener(latency_ms / 1000)
  data = pipeline.build(config, workdir, jax.process_index(), jax.process_count(), opener=opener)
  it = data.train_batches(0)
  next(it)  # the pipeline's start-up
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - t0
  return {
    "input_read_latency_ms": latency_ms,
    "input_batches_per_sec": batches / seconds,
    "input_reads_per_batch": len(opener.reads) / (batches + 1),
  }


def timed_steps(trainer, state, batches, steps: int):
  """(state, last metrics, per-step seconds, seconds waiting on next(batches), loop seconds)."""
  step_s, wait_s, step_metrics = [], 0.0, None
  start = time.perf_counter()
  for _ in range(steps):
    t0 = time.perf_counter()
    host_batch = next(batches)
    wait_s += time.perf_counter() - t0
    state, step_metrics = trainer.train(state, trainer.to_global(host_batch))
    jax.block_until_ready((state, step_metrics))
    step_s.append(time.perf_counter() - t0)
  return state, step_metrics, step_s, wait_s, time.perf_counter() - start


def per_device_memory(trainer) -> tuple[int, str]:
  """Peak bytes in use on the busiest local device, else XLA's analysis of the compiled step."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
  if peaks and None not in peaks:
    return max(peaks), "memory_stats peak_bytes_in_use"
  return plan.step_bytes(trainer.memory_analysis), "XLA memory analysis of the step"


def run(
  config, steps: int, warmup_steps: int, data: str, workdir: str | None, read_latency_ms=0.0
) -> dict:
  """Benchmark the train step of `config`; returns the JSON record."""
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(mesh, config.batch_size, sharding.rules_from_config(config.mesh.rules))
  # Real data first: it sizes cuDNN's packed attention (model.max_segments_per_row).
  batches = real_batches(config, workdir) if data == "real" else synthetic_batches(config)
  model_cfg = config_lib.model_config(config)
  tx = optim.make(config.opt, config.num_train_steps)
  rules = sharding.rules_from_config(config.mesh.rules)
  state, spec = train_state.create(model_cfg, config.seed, tx, mesh, rules)
  trainer = train.Trainer(config, mesh, spec, tx)
  compile_s = trainer.compile(state, trainer.to_global(next(batches)))
  state, _, _, _, _ = timed_steps(trainer, state, batches, warmup_steps)
  state, step_metrics, step_s, wait_s, loop_s = timed_steps(trainer, state, batches, steps)

  step_time = statistics.median(step_s)
  tokens_per_sec = config.batch_size * config.data.seq_len / step_time
  num_predictions = None if model_cfg.causal else config_lib.num_predictions(config)
  per_token = flops.model_flops_per_token(model_cfg, num_predictions)
  peak, peak_source, units = flops.peak_and_units(config_lib.compute_dtype(config))
  memory, memory_source = per_device_memory(trainer)
  record = {
    "tokens_per_sec": tokens_per_sec,
    "step_time_s": step_time,
    "compile_time_s": compile_s,
    "model_flops_per_token": per_token,
    "model_flops_per_sec": per_token * tokens_per_sec,
    "mfu": None if peak is None else per_token * tokens_per_sec / (peak * units),
    "peak_flops_per_sec": peak,
    "peak_source": peak_source,
    "devices": {"count": jax.device_count(), "kind": jax.devices()[0].device_kind},
    "dtype": config_lib.compute_dtype(config),
    "attention_impl": model_cfg.attention_impl,
    "per_device_memory_bytes": memory,
    "memory_source": memory_source,
    "num_params": count_params(spec.abstract.params),
    "steps": steps,
    "step_time_s_min_max": [min(step_s), max(step_s)],
    "train_loss": float(jax.device_get(step_metrics["train_loss"])),
  }
  if data == "real":
    record["input_wait_fraction"] = wait_s / loop_s
    if read_latency_ms > 0:
      record.update(input_throughput(config, workdir, read_latency_ms, max(50, 5 * steps)))
      record["input_over_step"] = record["input_batches_per_sec"] * step_time
  return record


# (layers, width, heads, MLP width, vocabulary): GPT-2 small with an 8k vocabulary, and a toy.
GEN_SHAPES = {"gpt2_small": (12, 768, 12, 3072, 8192), "tiny": (2, 32, 2, 64, 128)}


def _median_seconds(fns, repeats: int) -> list[float]:
  """Median wall time of each of `fns`, run alternately (on a shared machine the load drifts;
  alternating exposes both to it alike). One untimed run each first: compiling, warming up."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, fn_times in zip(fns, times, strict=True):
      t0 = time.perf_counter()
      fn()
      fn_times.append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


def run_generate(shape: str, batch_sizes: list[int], prompt_len: int, new_tokens: int,
                 repeats: int, family: str = "gpt2", kv_heads: int = 0) -> dict:  # fmt: skip
  """Greedy generation tokens/s, ours (decode.generate) against Hugging Face's, same shape."""
  try:  # optional and heavy: only this mode compares with Hugging Face
    import torch  # optional, heavy
    import transformers  # optional, heavy
  except ImportError as e:
    raise UsageError(f"--mode=generate compares with Hugging Face and needs torch and "
                     f"transformers (pip install -e '.[test]'): {e}") from e  # fmt: skip
  layers, width, heads, mlp, vocab = GEN_SHAPES[shape]
  max_len = decode.bucket(prompt_len + new_tokens)
  llama = dict(family="llama", num_kv_heads=kv_heads) if family == "llama" else {}
  if family == "llama":
    mlp = mlp * 2 // 3
  elif kv_heads:
    raise UsageError("--gen_kv_heads is an option of --gen_family=llama; GPT-2 has none.")
  if heads % (kv_heads or heads):
    raise UsageError(f"--gen_kv_heads={kv_heads} must divide the shape's {heads} heads.")
  cfg = ModelConfig(
    objective="causal_lm", vocab_size=vocab, max_len=max_len, num_layers=layers,
    num_heads=heads, emb_dim=width, mlp_dim=mlp, gelu="tanh", scan_layers=False, **llama,
  )  # fmt: skip
  ours = model_lib.build(cfg, seed=0)
  t0 = time.perf_counter()
  ours = decoder.to_decode_layout(ours)  # weights in decoding layout, once (compiles on first use)
  jax.block_until_ready(ours.weights)
  prepare_s = time.perf_counter() - t0
  torch.manual_seed(0)
  hf = _hf_model(transformers, cfg).eval()
  rng = np.random.default_rng(0)
  record = {"shape": dict(zip(("layers", "width", "heads", "mlp", "vocab"),
                              (layers, width, heads, mlp, vocab), strict=True)),
            "family": family, "kv_heads": cfg.kv_heads,
            "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats,
            "torch_threads": torch.get_num_threads(), "devices": jax.device_count(),
            "prepare_s": prepare_s}  # fmt: skip
  cache_len = decode.bucket(decode.bucket(prompt_len) + new_tokens)  # as decode.generate sizes it
  for b in batch_sizes:
    prompts = rng.integers(1, vocab, (b, prompt_len))

    def ours_run(prompts=prompts):
      out = decode.generate(ours, prompts.tolist(), max_new_tokens=new_tokens, temperature=0,
                            eos_id=-1)  # fmt: skip
      assert all(len(row) == new_tokens for row in out)

    def hf_run(prompts=prompts, b=b):
      with torch.no_grad():
        out = hf.generate(
          torch.as_tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
          use_cache=True, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        )  # fmt: skip
      assert out.shape == (b, prompt_len + new_tokens)

    ours_s, hf_s = _median_seconds([ours_run, hf_run], repeats)
    ours_tps, hf_tps = b * new_tokens / ours_s, b * new_tokens / hf_s
    rows = decode.rows_bucket(b)  # the batch decode.generate runs
    cache = jax.eval_shape(lambda rows=rows: decoder.init_cache(ours, rows, cache_len, [0] * rows))
    record[f"batch_{b}"] = {"ours_tokens_per_sec": ours_tps, "hf_tokens_per_sec": hf_tps,
                            "ratio_ours_over_hf": ours_tps / hf_tps,
                            "kv_cache_bytes": sum(x.size * x.dtype.itemsize
                                                  for x in jax.tree.leaves(cache[:2]))}  # fmt: skip
  return record


def _hf_model(transformers, cfg: ModelConfig):
  """Hugging Face's model of `cfg`'s shape and family, random weights (ids 0 as BOS/EOS/pad)."""
  ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
  if cfg.family == "llama":
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_len, hidden_size=cfg.emb_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.mlp_dim,
      tie_word_embeddings=cfg.tie_embeddings, **ids,
    ))  # fmt: skip
  return transformers.GPT2LMHeadModel(transformers.GPT2Config(
    vocab_size=cfg.vocab_size, n_positions=cfg.max_len, n_embd=cfg.emb_dim,
    n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.mlp_dim, **ids,
  ))  # fmt: skip


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cluster.skip_tpu_without_chips()
  try:
    if FLAGS.mode == "generate":
      record = run_generate(
        FLAGS.gen_shape, [int(b) for b in FLAGS.gen_batch_sizes], FLAGS.gen_prompt_len,
        FLAGS.gen_new_tokens, FLAGS.gen_repeats, FLAGS.gen_family, FLAGS.gen_kv_heads,
      )  # fmt: skip
    else:
      record = run(
        FLAGS.config, FLAGS.steps, FLAGS.warmup_steps, FLAGS.data, FLAGS.workdir,
        FLAGS.read_latency_ms,
      )  # fmt: skip
  except SslmError as e:
    print(f"sslm_jax.bench: error: {e}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
  app.run(main)
