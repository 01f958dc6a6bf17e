import pytest
from conftest import tiny_config
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax import model as model_lib
from sslm_jax import optim


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


def test_weight_decay_only_on_matrices():
  config = tiny_config("masked_lm")
  model = model_lib.build(config_lib.model_config(config), seed=0)
  mask = nnx.to_pure_dict(optim.decay_mask(nnx.state(model, nnx.Param)))
  blocks = mask["stack"]["blocks"]
  assert blocks["attention"]["query"]["kernel"] is True
  assert blocks["mlp"]["fc"]["kernel"] is True
  assert blocks["mlp"]["fc"]["bias"] is False
  assert blocks["attention_norm"]["scale"] is False
  assert mask["token_embed"]["embedding"] is False
  assert mask["position_embed"]["embedding"] is False
  assert mask["mlm_head"]["decoder_bias"] is False
  decayed = nnx.to_pure_dict(optim.decay_mask(nnx.state(model, nnx.Param), decay_embeddings=True))
  assert decayed["token_embed"]["embedding"] is True
