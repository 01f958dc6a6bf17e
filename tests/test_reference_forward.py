"""Our GPT-2 and BERT forward passes against NumPy written from the published formulas.

The reference reads the same parameter tree by name, so a transposed kernel, a head split the
wrong way, a LayerNorm in the wrong place or a mask that leaks across segments shows up as a
logit difference. Parameters are redrawn at a larger scale than the initializer's so attention
is far from uniform and such mistakes cannot hide.
"""

import jax
import numpy as np
import pytest
from conftest import synthetic_batch, tiny_config
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.models import transformer as model_lib


def _randomized(config, seed=0):
  model = model_lib.build(config_lib.model_config(config), seed=0)
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  new = []
  for path_leaf, leaf in zip(jax.tree_util.tree_flatten_with_path(params)[0], leaves, strict=True):
    name = str(path_leaf[0][-1])
    scale = 0.3 if "kernel" in name or "embedding" in name else 0.2
    value = rng.normal(0.0, scale, leaf.shape)
    if "scale" in name:
      value = 1.0 + value
    new.append(value.astype(np.float32))
  nnx.update(model, jax.tree.unflatten(treedef, new))
  return model, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _ln(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
  """BERT's exact GELU: x Phi(x)."""
  from math import erf, sqrt

  return 0.5 * x * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


def _gelu_tanh(x):
  """GPT-2's approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _attention(x, p, segments, causal):
  """Multi-head attention: softmax(q k^T / sqrt(H)) v per head, heads concatenated, projected."""
  q = np.einsum("btd,dnh->bnth", x, p["query"]["kernel"]) + p["query"]["bias"][None, :, None]
  k = np.einsum("btd,dnh->bnth", x, p["key"]["kernel"]) + p["key"]["bias"][None, :, None]
  v = np.einsum("btd,dnh->bnth", x, p["value"]["kernel"]) + p["value"]["bias"][None, :, None]
  scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])
  t = x.shape[1]
  allowed = segments[:, None, :, None] == segments[:, None, None, :]
  if causal:
    allowed = allowed & np.tril(np.ones((t, t), bool))
  scores = np.where(allowed, scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  heads = weights @ v  # [B, N, T, H]
  return np.einsum("bnth,nhd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]


def _mlp(x, p, act=_gelu):
  return act(x @ p["fc"]["kernel"] + p["fc"]["bias"]) @ p["proj"]["kernel"] + p["proj"]["bias"]


def _layer(blocks, i):
  return jax.tree.map(lambda a: np.asarray(a, np.float64)[i], blocks)


def gpt2_logits(p, tokens, positions, segments, num_layers, eps=1e-5):
  """GPT-2: x = wte + wpe; per layer x += attn(ln_1(x)); x += mlp(ln_2(x)); ln_f; x wte^T.
  The MLP's GELU is the tanh approximation, as in GPT-2."""
  wte = np.asarray(p["token_embed"]["embedding"], np.float64)
  x = wte[tokens] + np.asarray(p["position_embed"]["embedding"], np.float64)[positions]
  for i in range(num_layers):
    b = _layer(p["stack"]["blocks"], i)
    x = x + _attention(_ln(x, b["attention_norm"], eps), b["attention"], segments, True)
    x = x + _mlp(_ln(x, b["mlp_norm"], eps), b["mlp"], _gelu_tanh)
  final = jax.tree.map(lambda a: np.asarray(a, np.float64), p["final_norm"])
  return _ln(x, final, eps) @ wte.T


def bert_mlm_logits(p, tokens, positions, segments, masked, num_layers, eps=1e-12):
  """BERT: LN(word + position + type 0); per layer x = LN(x + attn(x)); x = LN(x + mlp(x));
  MLM head at the masked positions: LN(gelu(x W + b)) E^T + decoder bias."""
  f64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)  # noqa: E731
  word = np.asarray(p["token_embed"]["embedding"], np.float64)
  x = word[tokens] + f64(p["position_embed"]["embedding"])[positions]
  x = _ln(x + f64(p["token_type_embed"]["embedding"])[0], f64(p["embed_norm"]), eps)
  for i in range(num_layers):
    b = _layer(p["stack"]["blocks"], i)
    x = _ln(x + _attention(x, b["attention"], segments, False), b["attention_norm"], eps)
    x = _ln(x + _mlp(x, b["mlp"]), b["mlp_norm"], eps)
  head = f64(p["mlm_head"])
  x = np.take_along_axis(x, masked[..., None], axis=1)
  h = _ln(_gelu(x @ head["transform"]["kernel"] + head["transform"]["bias"]), head["norm"], eps)
  return h @ word.T + head["decoder_bias"]


@pytest.mark.parametrize("scan_layers", [True, False])
def test_forward_matches_the_published_formulas(objective, scan_layers):
  config = tiny_config(objective)
  config.batch_size = 2
  config.model.scan_layers = scan_layers
  model, p = _randomized(config)
  batch = synthetic_batch(config, num_segments=2)
  args = (batch["inputs"], batch["positions"], batch["segment_ids"])
  layers = config.model.num_layers
  if objective == "causal_lm":
    ours = np.asarray(model(*args))
    ref = gpt2_logits(p, *args, layers)
  else:
    ours = np.asarray(model(*args, batch["masked_positions"]))
    ref = bert_mlm_logits(p, *args, batch["masked_positions"], layers)
  assert ours.shape == ref.shape
  assert np.abs(ref).max() > 1.0  # logits of a useful size, not all near zero
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
