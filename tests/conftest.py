"""Eight simulated CPU devices for every test; set before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# CPU only, even where libtpu is installed (the test extra brings it for the --topology plans,
# which load it on their own): no TPU probing and none of libtpu's start-up lines.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# One persistent XLA compilation cache for the whole session, this process and every trainer or
# command it starts (they inherit the environment): the many tiny runs compile the same programs.
# Every compile is kept, however short. Tests of the cache itself unset it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402

  _xla_cache = tempfile.mkdtemp(prefix="sslm_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import importlib.util  # noqa: E402

# Triton (loaded by transformers' GPT-2 through torch) crashes the process when it is loaded after
# TensorFlow; loaded first, both work.
if importlib.util.find_spec("triton") is not None:
  import triton  # noqa: E402, F401

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sslm_jax import config as config_lib  # noqa: E402


def tiny_config(objective: str = "causal_lm"):
  c = config_lib.defaults()
  c.objective = objective
  c.num_train_steps = 8
  c.batch_size = 8
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.eval_steps = 1
  c.checkpoint_every_steps = 4
  c.data.seq_len = 32
  c.data.vocab_size = 256
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.emb_dim = 64
  c.model.mlp_dim = 128
  c.opt.warmup_steps = 2
  c.mesh.data = 1
  return c


def synthetic_batch(config, seed: int = 0, num_segments: int = 1) -> dict:
  """A batch in the data pipeline's format, with `num_segments` packed documents per row."""
  rng = np.random.default_rng(seed)
  b, t, v = config.batch_size, config.data.seq_len, config.data.vocab_size
  seg_len = t // num_segments
  segment_ids = (np.minimum(np.arange(t) // seg_len, num_segments - 1) + 1).astype(np.int32)
  positions = (np.arange(t) - (segment_ids - 1) * seg_len).astype(np.int32)
  tokens = rng.integers(7, v, (b, t + 1)).astype(np.int32)
  batch = {
    "inputs": tokens[:, :t],
    "positions": np.tile(positions, (b, 1)),
    "segment_ids": np.tile(segment_ids, (b, 1)),
  }
  if config.objective == "causal_lm":
    same = np.append(segment_ids[1:] == segment_ids[:-1], True)
    batch["targets"] = tokens[:, 1:]
    batch["weights"] = np.tile(same.astype(np.float32), (b, 1))
    return batch
  p = config_lib.num_predictions(config)
  masked_positions = np.sort(rng.permuted(np.tile(np.arange(t), (b, 1)), axis=1)[:, :p], axis=1)
  batch["masked_positions"] = masked_positions.astype(np.int32)
  batch["masked_targets"] = np.take_along_axis(tokens[:, :t], masked_positions, axis=1)
  batch["masked_weights"] = np.ones((b, p), np.float32)
  np.put_along_axis(batch["inputs"], masked_positions, 4, axis=1)
  return batch


@pytest.fixture(params=["causal_lm", "masked_lm"])
def objective(request):
  return request.param
