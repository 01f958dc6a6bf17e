import pytest
from conftest import tiny_config
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.models import transformer as model_lib
from sslm_jax.training import optimizer as optim


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_warmup_peak_and_final_value(decay):
  config = tiny_config()
  opt = config.opt
  opt.learning_rate, opt.warmup_steps, opt.decay, opt.final_lr_fraction = 1e-3, 10, decay, 0.1
  lr = optim.schedule(opt, 100)
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(5e-4)
  assert float(lr(10)) == pytest.approx(1e-3)
  assert float(lr(100)) == pytest.approx(1e-4)
  assert 1e-4 < float(lr(55)) < 1e-3


def test_warmup_longer_than_the_run_is_cut_to_the_run(caplog):
  config = tiny_config()
  config.num_train_steps, config.opt.warmup_steps = 10, 2000
  config_lib.validate(config)  # a smoke run of a big config is not an error
  assert "warming up over all 10 steps" in caplog.text
  lr = optim.schedule(config.opt, config.num_train_steps)
  assert float(lr(5)) == pytest.approx(0.5 * config.opt.learning_rate)
  assert float(lr(10)) == pytest.approx(config.opt.learning_rate)
  config.opt.warmup_steps = -1
  with pytest.raises(config_lib.ConfigError, match="warmup_steps"):
    config_lib.validate(config)


_KERNELS = [
  f"stack/blocks/{name}/kernel"
  for name in ("attention/query", "attention/key", "attention/value", "attention/out")
  + ("mlp/fc", "mlp/proj")
]
_EMBEDDINGS = {
  "causal_lm": ["token_embed/embedding", "position_embed/embedding"],
  "masked_lm": [
    "token_embed/embedding",
    "position_embed/embedding",
    "token_type_embed/embedding",
  ],
}
_DECAYED = {
  "causal_lm": set(_KERNELS),
  "masked_lm": set(_KERNELS) | {"mlm_head/transform/kernel"},
}


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = value
  return out


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_by_parameter_role_on_every_parameter(objective, decay_embeddings):
  """GPT-2/BERT practice: kernels decay; q/k/v/out and MLP biases, LayerNorm never do."""
  model = model_lib.build(config_lib.model_config(tiny_config(objective)), seed=0)
  params = nnx.state(model, nnx.Param)
  mask = _flat(nnx.to_pure_dict(optim.decay_mask(params, decay_embeddings)))
  expected = _DECAYED[objective] | (set(_EMBEDDINGS[objective]) if decay_embeddings else set())
  assert {path for path, decays in mask.items() if decays} == expected
  assert len(mask) == len(_flat(nnx.to_pure_dict(params)))
  # The rank-2 attention biases [heads, head_dim] are exactly the case a rank rule gets wrong.
  assert mask["stack/blocks/attention/query/bias"] is False


def test_a_parameter_without_a_decay_rule_is_refused():
  model = model_lib.build(config_lib.model_config(tiny_config()), seed=0)
  params = nnx.state(model, nnx.Param)
  params["stack"]["blocks"]["mlp"]["fc"]["gate"] = params["stack"]["blocks"]["mlp"]["fc"]["kernel"]
  with pytest.raises(ValueError, match="gate"):
    optim.decay_mask(params)
