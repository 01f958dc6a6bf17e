import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import synthetic_batch, tiny_config
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.models import layers
from sslm_jax.models import transformer as model_lib
from sslm_jax.training import losses as objectives
from sslm_jax.training import optimizer as optim
from sslm_jax.training import sharding
from sslm_jax.training import state as train_state


def _model(config):
  return model_lib.build(config_lib.model_config(config), seed=0)


def _loss(model, batch, key=None):
  return objectives.mean_loss(objectives.metric_sums(model, batch, key))


def test_output_shapes_and_finite(objective):
  config = tiny_config(objective)
  model, batch = _model(config), synthetic_batch(config)
  v = config_lib.padded_vocab_size(config)
  if objective == "causal_lm":
    logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    assert logits.shape == (config.batch_size, config.data.seq_len, v)
  else:
    logits = model(
      batch["inputs"], batch["positions"], batch["segment_ids"], batch["masked_positions"]
    )
    assert logits.shape == (config.batch_size, config_lib.num_predictions(config), v)
  assert logits.dtype == jnp.float32
  assert bool(jnp.isfinite(logits).all())


def test_initial_loss_close_to_log_vocab(objective):
  config = tiny_config(objective)
  loss = float(_loss(_model(config), synthetic_batch(config)))
  assert abs(loss - math.log(config_lib.padded_vocab_size(config))) < 0.15


def test_loss_falls_on_a_repeated_batch(objective):
  config = tiny_config(objective)
  config.opt.learning_rate, config.opt.warmup_steps = 3e-3, 0
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  tx = optim.make(config.opt, 100)
  state, spec = train_state.create(
    config_lib.model_config(config), 0, tx, mesh, sharding.DEFAULT_RULES
  )
  batch = synthetic_batch(config)

  @jax.jit
  def step(state):
    from sslm_jax.training.step import train_step

    return train_step(
      state, batch, spec=spec, tx=tx, lr_schedule=lambda s: 0.0, seed=0, dropout=False
    )

  losses = []
  for _ in range(30):
    state, m = step(state)
    losses.append(float(m["train_loss"]))
  assert losses[-1] < 0.5 * losses[0], losses


def _position_grad_norms(config, t: int):
  """|d loss_at_t / d position_embedding[j]| for every position j."""
  model, batch = _model(config), synthetic_batch(config)
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_at_t(params):
    m = nnx.merge(graphdef, params)
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    if config.objective == "causal_lm":
      logits = m(*args)[:, t]
      targets = batch["targets"][:, t]
    else:
      logits = m(*args, jnp.full((config.batch_size, 1), t, jnp.int32))[:, 0]
      targets = batch["inputs"][:, t]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], 1))

  grads = jax.grad(loss_at_t)(params)
  return np.linalg.norm(np.asarray(grads["position_embed"]["embedding"][...]), axis=-1)


def test_gpt_is_causal():
  config, t = tiny_config("causal_lm"), 10
  norms = _position_grad_norms(config, t)
  assert np.all(norms[t + 1 :] == 0.0)
  assert np.all(norms[: t + 1] > 0.0)


def test_bert_is_bidirectional():
  config, t = tiny_config("masked_lm"), 10
  norms = _position_grad_norms(config, t)
  assert np.all(norms > 0.0)


@pytest.mark.parametrize("changed_segment", [1, 2])
def test_packed_segments_never_attend_across(objective, changed_segment):
  """Changing one packed document leaves the other's hidden states exactly as they were.

  Changing the first document and watching the second is the direction causality alone does not
  cover, so for GPT only the segment mask can pass it.
  """
  config = tiny_config(objective)
  model = _model(config)
  batch = synthetic_batch(config, num_segments=2)
  changed = {k: v.copy() for k, v in batch.items()}
  where = batch["segment_ids"] == changed_segment
  changed["inputs"][where] = (changed["inputs"][where] - 6) % (config.data.vocab_size - 7) + 7
  hidden = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
  hidden2 = model.hidden(changed["inputs"], changed["positions"], changed["segment_ids"])
  same = batch["segment_ids"][0] != changed_segment
  np.testing.assert_array_equal(hidden[:, same], hidden2[:, same])
  assert not np.allclose(hidden[:, ~same], hidden2[:, ~same])


def test_dropout_depends_on_key_only():
  config = tiny_config("causal_lm")
  config.model.dropout_rate = 0.1
  model, batch = _model(config), synthetic_batch(config)
  a = _loss(model, batch, jax.random.key(1))
  b = _loss(model, batch, jax.random.key(1))
  c = _loss(model, batch, jax.random.key(2))
  assert float(a) == float(b) and float(a) != float(c)
  assert float(_loss(model, batch)) != float(a)


def test_padding_rows_of_the_vocabulary_take_no_part_in_the_softmax(objective):
  """vocab 200 padded to 256 rows: the loss is the 200-way loss, padding ids get no mass."""
  config = tiny_config(objective)
  config.data.vocab_size = 200
  model_cfg = config_lib.model_config(config)
  assert model_cfg.vocab_size == 256 and model_cfg.num_ids == 200
  model = model_lib.build(model_cfg, seed=0)
  # Make the padding rows attractive: unmasked, they would take most of the probability.
  emb = model.token_embed.embedding
  emb[...] = emb[...].at[200:].set(emb[...][:200].mean(0) * 50.0)
  batch = synthetic_batch(config)
  batch["targets" if objective == "causal_lm" else "masked_targets"] %= 200
  args = [batch["inputs"] % 200, batch["positions"], batch["segment_ids"]]
  if objective == "masked_lm":
    args.append(batch["masked_positions"])
  logits = np.asarray(model(*args))
  assert np.all(logits[..., 200:] == layers.PADDING_LOGIT)
  targets = batch["targets"] if objective == "causal_lm" else batch["masked_targets"]
  real = logits[..., :200].astype(np.float64)
  log_z = np.log(np.exp(real - real.max(-1, keepdims=True)).sum(-1)) + real.max(-1)
  nll = log_z - np.take_along_axis(real, targets[..., None], -1)[..., 0]
  weights = batch["weights"] if objective == "causal_lm" else batch["masked_weights"]
  want = float((nll * weights).sum() / weights.sum())
  got = float(_loss(model, {**batch, "inputs": args[0]}))
  assert got == pytest.approx(want, rel=1e-5)


def test_bert_takes_token_types():
  config = tiny_config("masked_lm")
  model = model_lib.build(config_lib.model_config(config), seed=0)
  batch = synthetic_batch(config)
  args = (batch["inputs"], batch["positions"], batch["segment_ids"], batch["masked_positions"])
  default = np.asarray(model(*args))
  zeros = np.asarray(model(*args, token_types_BT=np.zeros_like(batch["inputs"])))
  np.testing.assert_array_equal(default, zeros)
  pair = np.zeros_like(batch["inputs"])
  pair[:, batch["inputs"].shape[1] // 2 :] = 1
  assert not np.allclose(np.asarray(model(*args, token_types_BT=pair)), default, atol=1e-4)


@pytest.mark.parametrize("form", ["erf", "tanh"])
def test_gelu_forms(form):
  x = np.linspace(-4, 4, 81, dtype=np.float32)
  got = np.asarray(layers.gelu(jnp.asarray(x), form))
  from math import erf, sqrt

  if form == "erf":
    want = 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2.0)))
  else:
    want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert config_lib.gelu_form(tiny_config("causal_lm")) == "tanh"
  assert config_lib.gelu_form(tiny_config("masked_lm")) == "erf"
