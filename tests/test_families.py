"""model.family llama and modernbert in training: packed documents (rotary positions restart with
each document), the layer scan, remat and unrolled layers agree, a killed run resumes exactly,
the windowed layers see only their window, and each family option is refused where it does not
belong."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from test_train import Killed, _records, _run

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.models import modern, rotary
from sslm_jax.models import transformer as model_lib
from sslm_jax.models.attention import Attention, segment_mask
from sslm_jax.models.config import ModelConfig


def family_config(family: str):
  objective = "causal_lm" if family == "llama" else "masked_lm"
  c = tiny_config(objective)
  c.model.family = family
  if family == "llama":
    c.model.num_kv_heads, c.model.qk_norm, c.model.tie_embeddings = 2, True, False
  else:
    c.model.num_layers, c.model.global_every, c.model.sliding_window = 3, 3, 8
    c.model.rope_base, c.model.rope_local_base = 160000.0, 10000.0
  return c


def _model_cfg(family, **changes) -> ModelConfig:
  return dataclasses.replace(config_lib.model_config(family_config(family)), **changes)


@nnx.jit
def _forward(model, ids_BT, positions_BT, segments_BT):
  if model.cfg.causal:
    return model(ids_BT, positions_BT, segments_BT)
  every_BP = jnp.broadcast_to(jnp.arange(ids_BT.shape[1]), ids_BT.shape)
  return model(ids_BT, positions_BT, segments_BT, every_BP)


@pytest.mark.parametrize("family", ["llama", "modernbert"])
def test_packed_documents_are_computed_as_if_alone(family):
  """Two documents packed in one row give each document's own logits: attention stays inside
  each, and the second's rotary positions start again at 0."""
  cfg = _model_cfg(family)
  model = model_lib.build(cfg, seed=0)
  rng = np.random.default_rng(0)
  a, b = rng.integers(5, 200, 20), rng.integers(5, 200, 12)
  row = np.concatenate([a, b])[None]
  positions = np.concatenate([np.arange(20), np.arange(12)])[None]
  segments = np.concatenate([np.ones(20), np.full(12, 2)]).astype(np.int32)[None]
  packed = _forward(model, row, positions, segments)
  alone_a = _forward(model, a[None], np.arange(20)[None], np.ones((1, 20), np.int32))
  alone_b = _forward(model, b[None], np.arange(12)[None], np.ones((1, 12), np.int32))
  np.testing.assert_allclose(packed[0, :20], alone_a[0], atol=1e-5)
  np.testing.assert_allclose(packed[0, 20:], alone_b[0], atol=1e-5)
  # The checks above can fail: one segment lets the second document see the first, and
  # positions out of order change its rotations.
  merged = _forward(model, row, positions, np.ones_like(segments))
  assert np.abs(merged[0, 20:] - alone_b[0]).max() > 1e-3
  shuffled = np.concatenate([np.arange(20), np.arange(12)[::-1]])[None]
  assert np.abs(_forward(model, row, shuffled, segments)[0, 20:] - alone_b[0]).max() > 5e-5


@pytest.mark.parametrize("family", ["llama", "modernbert"])
def test_scan_unrolled_and_remat_agree_in_loss_and_gradient(family):
  ids = np.random.default_rng(1).integers(5, 200, (2, 32))
  positions, segments = np.tile(np.arange(32), (2, 1)), np.ones((2, 32), np.int32)

  def loss_and_grad(**changes):
    model = model_lib.build(_model_cfg(family, **changes), seed=0)

    def loss(m):
      return jnp.mean(jax.nn.logsumexp(_forward(m, ids, positions, segments), axis=-1))

    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    return value, jax.tree.leaves(nnx.to_pure_dict(grads))

  base_value, base_grads = loss_and_grad()
  for changes in ({"scan_layers": False}, {"remat_policy": "full"}):
    value, grads = loss_and_grad(**changes)
    np.testing.assert_allclose(value, base_value, rtol=1e-6)
    for g, h in zip(grads, base_grads, strict=True):
      np.testing.assert_allclose(g, h, atol=1e-6)


def test_a_local_layer_sees_only_its_window_and_the_first_layer_is_global():
  """In a local layer, position 20 attends to 16..24 (window 8: 4 each way) and nothing else;
  a global layer sees every position."""
  cfg = _model_cfg("modernbert")
  with nnx.use_eager_sharding(False):
    attention = Attention(cfg, rngs=nnx.Rngs(params=0))
  x_BTD = jnp.asarray(np.random.default_rng(2).normal(size=(1, 32, cfg.emb_dim)), jnp.float32)
  mask = segment_mask(jnp.ones((1, 32), jnp.int32))
  rot = rotary.rotation(jnp.arange(32)[None], cfg.head_dim, cfg.rope_local_base)

  def reach(local):
    """Which inputs change the output at position 20."""
    grads_TD = jax.grad(lambda x: attention(x, mask, None, rot, jnp.asarray(local))[0, 20].sum())(
      x_BTD
    )[0]
    return np.flatnonzero(np.abs(grads_TD).max(-1) > 0)

  assert list(reach(True)) == list(range(16, 25))
  assert list(reach(False)) == list(range(32))
  assert [bool(modern.is_local(cfg, i)) for i in range(4)] == [False, True, True, False]


@pytest.mark.parametrize("family", ["llama", "modernbert"])
def test_killed_run_resumes_exactly(tmp_path, family):
  config = family_config(family)
  config.num_train_steps, config.log_every_steps = 8, 1
  _run(config, tmp_path / "straight")
  with pytest.raises(Killed):
    _run(config, tmp_path / "resumed", kill_at=6)
  _run(config, tmp_path / "resumed")
  straight = [r.get("train_loss") for r in _records(tmp_path / "straight")]
  resumed = [r.get("train_loss") for r in _records(tmp_path / "resumed")]
  assert straight == resumed and len(straight) == 9


def test_a_checkpoint_of_another_family_is_refused():
  gpt2 = checkpoint.fingerprint(tiny_config("causal_lm"))  # family 'auto': recorded as gpt2
  llama = tiny_config("causal_lm")
  llama.model.family = "llama"
  with pytest.raises(checkpoint.CheckpointMismatch, match="model.family: checkpoint has 'gpt2'"):
    checkpoint.check_fingerprint(gpt2, checkpoint.fingerprint(llama), "workdir")
  explicit = tiny_config("causal_lm")
  explicit.model.family = "gpt2"  # what 'auto' meant: the same run
  checkpoint.check_fingerprint(gpt2, checkpoint.fingerprint(explicit), "workdir")
  # A checkpoint written before families were recorded was a gpt2 (causal_lm) or bert.
  older = {k: v for k, v in gpt2.items() if k != "model.family"}
  with pytest.raises(checkpoint.CheckpointMismatch, match="model.family"):
    checkpoint.check_fingerprint(older, checkpoint.fingerprint(llama), "workdir")


@pytest.mark.parametrize(
  "objective, changes, message",
  [
    ("masked_lm", {"family": "llama"}, "model.family='llama' is a causal_lm model"),
    ("causal_lm", {"family": "modernbert"}, "model.family='modernbert' is a masked_lm model"),
    ("causal_lm", {"family": "mistral"}, "model.family='mistral': use one of"),
    ("causal_lm", {"num_kv_heads": 2}, "model.num_kv_heads=2 is not an option of model.family='gp"),
    ("masked_lm", {"sliding_window": 8}, "model.sliding_window=8 is not an option of model.fam"),
    ("causal_lm", {"family": "llama", "num_kv_heads": 3}, "must divide model.num_heads=4"),
    ("masked_lm", {"family": "modernbert", "qk_norm": True}, "model.qk_norm=True is not an option"),
    ("causal_lm", {"family": "llama", "num_heads": 8, "emb_dim": 8}, "even head width"),
  ],
)  # fmt: skip
def test_family_options_are_checked_by_name(objective, changes, message):
  c = tiny_config(objective)
  for name, value in changes.items():
    c.model[name] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate(c)
