"""Dropout on attention probabilities: model.attention_dropout (BERT's
attention_probs_dropout_prob).

Its bits ignore the mesh: tests/test_dropout_sharding.py runs its BERT with attention dropout on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import synthetic_batch, tiny_config

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import hf_config
from sslm_jax.models import attention
from sslm_jax.models import transformer as model_lib


@pytest.mark.parametrize("causal", [True, False])
def test_written_out_attention_without_dropout_is_xlas(causal):
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q_BTNH, k_BSNH, v_BSNH = (jax.random.normal(k, (2, 12, 4, 8)) for k in (kq, kk, kv))
  segment_ids_BT = jnp.asarray([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], jnp.int32)
  mask_B1TS = attention.segment_mask(segment_ids_BT)
  expected = jax.nn.dot_product_attention(
    q_BTNH, k_BSNH, v_BSNH, mask=mask_B1TS, is_causal=causal, implementation="xla"
  )
  key = jax.random.key(1)
  got = attention.dropout_attention(
    q_BTNH, k_BSNH, v_BSNH, mask_B1TS, causal=causal, rate=0.0, key=key
  )
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  dropped = attention.dropout_attention(
    q_BTNH, k_BSNH, v_BSNH, mask_B1TS, causal=causal, rate=0.5, key=key
  )
  assert not np.allclose(dropped, expected, atol=1e-3)


def _outputs(config, key):
  cfg = config_lib.model_config(config)
  model = model_lib.build(cfg, seed=0)
  batch = synthetic_batch(config)
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  return np.asarray(model.hidden(*args, dropout_key=key))


def test_attention_dropout_acts_in_training_only(objective):
  config = tiny_config(objective)
  config.batch_size = 2
  plain = _outputs(config, None)
  config.model.attention_dropout = 0.3  # residual dropout stays 0: only the probabilities drop
  key = jax.random.key(7)
  trained = _outputs(config, key)
  assert not np.allclose(trained, plain, atol=1e-3)
  np.testing.assert_array_equal(_outputs(config, key), trained)  # the key decides the bits
  assert not np.allclose(_outputs(config, jax.random.key(8)), trained, atol=1e-3)
  np.testing.assert_array_equal(_outputs(config, None), plain)  # evaluation: no dropout


def test_attention_dropout_is_validated_and_keeps_off_fused_kernels():
  config = tiny_config("masked_lm")
  config.model.attention_dropout = 1.0
  with pytest.raises(config_lib.ConfigError, match=r"attention_dropout=1.0 must lie in \[0, 1\)"):
    config_lib.validate(config)
  config.model.attention_dropout, config.data.seq_len = 0.0, 128
  assert config_lib.attention_impl(config, "tpu") == "splash"
  config.model.attention_dropout = 0.1
  assert config_lib.attention_impl(config, "tpu") == "xla"  # 'auto' picks what can drop
  config.model.attention_impl = "splash"
  with pytest.raises(config_lib.ConfigError, match="attention_impl='splash'; use 'auto' or 'xla'"):
    config_lib.validate(config)


def test_attention_dropout_is_exported_to_hugging_face(objective):
  config = tiny_config(objective)
  config.model.attention_dropout = 0.1
  exported = hf_config.hf_config(config_lib.model_config(config))
  key = "attn_pdrop" if objective == "causal_lm" else "attention_probs_dropout_prob"
  assert exported[key] == 0.1
