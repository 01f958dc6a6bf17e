"""The rotary families on the Hugging Face side: LlamaForCausalLM (model.family='llama') and
ModernBertForMaskedLM (model.family='modernbert'), their tensor names and their config.json both
ways, and the GELU names all four families share.

checkpoints/hf.py converts the tensors with these tables and checkpoints/hf_config.py checks a
config.json with these fields; this module reads no files.

Llama: q_proj, k_proj and v_proj are nn.Linear weights [heads * head width, width] (our [D, N, H]
and [D, K, H] kernels transposed); o_proj [width, heads * head width]; gate_proj, up_proj and
down_proj our gate, up and down kernels transposed; lm_head only when the output embedding is
untied (tie_word_embeddings=False, our model.tie_embeddings=False).

ModernBERT: attn.Wqkv holds q, k and v on its output axis; mlp.Wi the activated half first, then
the half it is multiplied by (`input, gate = Wi(x).chunk(2)`; `Wo(act(input) * gate)`), which are
our gate and up kernels; the first layer has no attn_norm (nn.Identity), whose place our stacked
parameters keep (exported: dropped; imported: ones, which our first layer never reads). The
decoder weight is tied to the token embedding; its bias is our mlm_head/decoder_bias.

Config: transformers 5 writes rope_parameters ({"rope_type", "rope_theta"} for Llama, one such dict
per layer type for ModernBERT) and ModernBERT's layer_types; transformers 4 wrote rope_theta /
rope_scaling and global_rope_theta, local_rope_theta and global_attn_every_n_layers. Both are read,
and an export writes both. ModernBERT's local layers attend to keys at most local_attention // 2
positions away, as ours do with model.sliding_window.
"""

from __future__ import annotations

import numpy as np

from sslm_jax.models.config import ModelConfig

# Hugging Face activation names for our two GELU forms; on import gelu_pytorch_tanh is tanh too.
HF_ACTIVATION = {"tanh": "gelu_new", "erf": "gelu"}
GELU_OF = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "erf"}
ARCHITECTURE = {"llama": "LlamaForCausalLM", "modernbert": "ModernBertForMaskedLM"}
FULL, SLIDING = "full_attention", "sliding_attention"
# transformers' defaults where a config.json leaves a key out.
_LLAMA_THETA = 10000.0
_MODERNBERT_THETA = {FULL: 160000.0, SLIDING: 10000.0}
_LEGACY_THETA = {FULL: "global_rope_theta", SLIDING: "local_rope_theta"}


# ---- tensors ---------------------------------------------------------------------------------

# (Hugging Face name, our path, layout) as in checkpoints/hf.py.
_LLAMA_LAYER = "model.layers.{i}."
_LLAMA = (
  ("model.embed_tokens.weight", "token_embed/embedding", "vocab"),
  ("model.norm.weight", "final_norm/scale", "copy"),
  (_LLAMA_LAYER + "input_layernorm.weight", "attention_norm/scale", "copy"),
  *(
    (f"{_LLAMA_LAYER}self_attn.{p}_proj.weight", f"attention/{ours}/kernel", "linear")
    for p, ours in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))
  ),
  (_LLAMA_LAYER + "post_attention_layernorm.weight", "mlp_norm/scale", "copy"),
  *(
    (f"{_LLAMA_LAYER}mlp.{p}_proj.weight", f"mlp/{p}/kernel", "linear")
    for p in ("gate", "up", "down")
  ),
)
_LLAMA_UNTIED = (("lm_head.weight", "lm_head/embedding", "vocab"),)
_MODERNBERT_LAYER = "model.layers.{i}."
_MODERNBERT = (
  ("model.embeddings.tok_embeddings.weight", "token_embed/embedding", "vocab"),
  ("model.embeddings.norm.weight", "embed_norm/scale", "copy"),
  (_MODERNBERT_LAYER + "attn_norm.weight", "attention_norm/scale", "copy"),
  (_MODERNBERT_LAYER + "attn.Wqkv.weight", "attention/{query,key,value}/kernel", "linear"),
  (_MODERNBERT_LAYER + "attn.Wo.weight", "attention/out/kernel", "linear"),
  (_MODERNBERT_LAYER + "mlp_norm.weight", "mlp_norm/scale", "copy"),
  (_MODERNBERT_LAYER + "mlp.Wi.weight", "mlp/{gate,up}/kernel", "linear"),
  (_MODERNBERT_LAYER + "mlp.Wo.weight", "mlp/down/kernel", "linear"),
  ("model.final_norm.weight", "final_norm/scale", "copy"),
  ("head.dense.weight", "mlm_head/transform/kernel", "linear"),
  ("head.norm.weight", "mlm_head/norm/scale", "copy"),
  ("decoder.bias", "mlm_head/decoder_bias", "vocab"),
)
# Per-layer tensors that layer 0 does not have (ModernBERT's first attention norm).
NOT_IN_FIRST_LAYER = (_MODERNBERT_LAYER + "attn_norm.weight",)
# The MLM head's tensors: a checkpoint without them (a saved ModernBertModel) gets a new head.
HEAD_PREFIXES = ("head.", "decoder.")
# Tied output weights, written once (as the input embedding) and checked equal on import.
TIED = {"llama": ("lm_head.weight",), "modernbert": ("decoder.weight",)}


def tensor_table(cfg: ModelConfig) -> tuple:
  """The (Hugging Face name, our path, layout) table of a llama or modernbert model."""
  if cfg.family == "llama":
    return _LLAMA if cfg.tie_embeddings else _LLAMA + _LLAMA_UNTIED
  return _MODERNBERT


def canonical(name: str) -> str:
  """A tensor name as the ...ForCausalLM / ...ForMaskedLM class spells it: the base model's
  (LlamaModel, ModernBertModel) names gain their 'model.' prefix."""
  if name.startswith(("model.", "lm_head.", "head.", "decoder.")):
    return name
  return "model." + name


# ---- config.json -----------------------------------------------------------------------------


def layer_types(num_layers: int, global_every: int, sliding_window: int) -> list[str]:
  """ModernBERT's layer_types for our model.global_every and model.sliding_window."""
  windowed = sliding_window > 0 and global_every != 1
  return [SLIDING if windowed and i % global_every else FULL for i in range(num_layers)]


def hf_config(cfg: ModelConfig, common: dict) -> dict:
  """The config.json of LlamaForCausalLM or ModernBertForMaskedLM for our model; `common` holds
  the keys every family writes (vocab_size, special ids, dtype, initializer_range)."""
  shape = {
    "architectures": [ARCHITECTURE[cfg.family]],
    "model_type": cfg.family,
    **common,
    "hidden_size": cfg.emb_dim,
    "intermediate_size": cfg.mlp_dim,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "max_position_embeddings": cfg.max_len,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": cfg.tie_embeddings,
  }
  if cfg.family == "llama":
    return {
      **shape,
      "num_key_value_heads": cfg.kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.layer_norm_epsilon,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
      "rope_theta": cfg.rope_base,  # transformers 4
      "attention_dropout": cfg.attention_dropout,
    }
  return {
    **shape,
    "hidden_activation": HF_ACTIVATION[cfg.gelu],
    "classifier_activation": HF_ACTIVATION[cfg.gelu],
    "norm_eps": cfg.layer_norm_epsilon,
    "norm_bias": False,
    "classifier_bias": False,
    "decoder_bias": True,
    "layer_types": layer_types(cfg.num_layers, cfg.global_every, cfg.sliding_window),
    # With no windowed layer the window is never used; transformers still wants a positive one.
    "local_attention": cfg.sliding_window if cfg.windowed else 128,
    "rope_parameters": {
      FULL: {"rope_type": "default", "rope_theta": cfg.rope_base},
      SLIDING: {"rope_type": "default", "rope_theta": cfg.rope_local_base},
    },
    # transformers 4 reads these three instead.
    "global_attn_every_n_layers": cfg.global_every,
    "global_rope_theta": cfg.rope_base,
    "local_rope_theta": cfg.rope_local_base,
    "embedding_dropout": cfg.dropout_rate,
  }


def export_problems(cfg: ModelConfig) -> list[str]:
  """What the Hugging Face class of cfg.family cannot express."""
  if cfg.family == "llama" and cfg.qk_norm:
    return [
      "model.qk_norm=True: LlamaForCausalLM has no QK-norm (RMSNorm on queries and keys), so "
      "this model has no Hugging Face Llama form; export supports llama with qk_norm=False only"
    ]
  return []


# Our config fields and the config.json keys that fix them (shown in messages).
FIELDS = {
  "llama": {
    "data.vocab_size": "vocab_size",
    "model.max_positions": "max_position_embeddings",
    "model.num_layers": "num_hidden_layers",
    "model.num_heads": "num_attention_heads",
    "model.num_kv_heads": "num_key_value_heads",
    "model.emb_dim": "hidden_size",
    "model.mlp_dim": "intermediate_size",
    "model.rope_base": "rope_parameters.rope_theta",
    "model.norm_epsilon": "rms_norm_eps",
    "model.tie_embeddings": "tie_word_embeddings",
    "model.qk_norm": "model_type",  # LlamaForCausalLM has none
  },
  "modernbert": {
    "data.vocab_size": "vocab_size",
    "model.max_positions": "max_position_embeddings",
    "model.num_layers": "num_hidden_layers",
    "model.num_heads": "num_attention_heads",
    "model.emb_dim": "hidden_size",
    "model.mlp_dim": "intermediate_size",
    "model.rope_base": f"rope_parameters.{FULL}.rope_theta",
    "model.rope_local_base": f"rope_parameters.{SLIDING}.rope_theta",
    "model.global_every": "layer_types",
    "model.sliding_window": "local_attention",
    "model.norm_epsilon": "norm_eps",
    "model.gelu": "hidden_activation",
  },
}


def config_fields(hf: dict) -> dict:
  """Our config fields (dotted) that a Llama or ModernBERT config.json fixes, with transformers'
  defaults for keys it leaves out. model.global_every is None for layer_types that no
  global_every gives (`unsupported` names them)."""
  family = hf["model_type"]
  fields = {
    "data.vocab_size": hf.get("vocab_size"),
    "model.max_positions": hf.get("max_position_embeddings"),
    "model.num_layers": hf.get("num_hidden_layers"),
    "model.num_heads": hf.get("num_attention_heads"),
    "model.emb_dim": hf.get("hidden_size"),
    "model.mlp_dim": hf.get("intermediate_size"),
  }
  if family == "llama":
    return {
      **fields,
      "model.num_kv_heads": hf.get("num_key_value_heads") or fields["model.num_heads"],
      "model.rope_base": float(_llama_rope(hf).get("rope_theta", _LLAMA_THETA)),
      "model.norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
      "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
      "model.qk_norm": False,
    }
  types = hf_layer_types(hf)
  every = _global_every(types)
  windowed = SLIDING in types
  return {
    **fields,
    "model.rope_base": _modernbert_theta(hf, FULL),
    "model.rope_local_base": _modernbert_theta(hf, SLIDING),
    "model.global_every": every,
    "model.sliding_window": int(hf.get("local_attention", 128)) if windowed else 0,
    "model.norm_epsilon": float(hf.get("norm_eps", 1e-5)),
    "model.gelu": GELU_OF.get(hf.get("hidden_activation", "gelu")),
  }


def hf_layer_types(hf: dict) -> list[str]:
  """ModernBERT's attention per layer: layer_types, else transformers 4's every-n pattern."""
  if hf.get("layer_types"):
    return list(hf["layer_types"])
  every = hf.get("global_attn_every_n_layers", 3)
  return [SLIDING if i % every else FULL for i in range(hf.get("num_hidden_layers", 0))]


def _global_every(types: list[str]) -> int | None:
  """The global_every whose pattern (global where i % global_every == 0) gives `types`."""
  if SLIDING not in types:
    return 1
  later_full = [i for i, t in enumerate(types) if t == FULL and i > 0]
  every = later_full[0] if later_full else len(types)
  pattern = [SLIDING if i % every else FULL for i in range(len(types))]
  return every if pattern == types else None


def _llama_rope(hf: dict) -> dict:
  """Llama's rotary parameters: rope_parameters, else transformers 4's rope_scaling."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  if "rope_theta" in hf and "rope_theta" not in params:
    params["rope_theta"] = hf["rope_theta"]
  return params


def _modernbert_rope(hf: dict, layer_type: str) -> dict:
  return dict((hf.get("rope_parameters") or {}).get(layer_type) or hf.get("rope_scaling") or {})


def _modernbert_theta(hf: dict, layer_type: str) -> float:
  theta = _modernbert_rope(hf, layer_type).get("rope_theta")
  if theta is None:
    legacy = _LEGACY_THETA[layer_type]
    theta = hf.get(legacy, _MODERNBERT_THETA[layer_type])
    if theta is None:  # transformers 4: local_rope_theta=None means the global base
      theta = hf.get("global_rope_theta", _MODERNBERT_THETA[FULL])
  return float(theta)


def _rope_type(params: dict) -> str:
  return params.get("rope_type", params.get("type", "default"))


def unsupported(hf: dict, where: str) -> list[str]:
  """Llama and ModernBERT options our model does not implement, each with what it has."""
  family = hf["model_type"]
  off = ("attention_bias", "mlp_bias")
  if family == "modernbert":
    off += ("norm_bias", "classifier_bias")
  problems = [
    f"{key}={hf[key]!r} in {where}: sslm_jax's {family} has no such biases ({key}=False only)"
    for key in off
    if hf.get(key)
  ]
  required = {"tie_word_embeddings": True, "decoder_bias": True} if family == "modernbert" else {}
  problems += [
    f"{key}={hf[key]!r} in {where}: sslm_jax's modernbert supports {key}={value!r} only"
    for key, value in required.items()
    if key in hf and hf[key] != value
  ]
  rope = {"rope_parameters": _llama_rope(hf)} if family == "llama" else {}
  if family == "modernbert":
    rope = {f"rope_parameters.{t}": _modernbert_rope(hf, t) for t in (FULL, SLIDING)}
  problems += [
    f"{key}.rope_type={_rope_type(params)!r} in {where}: sslm_jax has the default rotary "
    "positions only (rope_type='default', no scaling)"
    for key, params in rope.items()
    if _rope_type(params) != "default"
  ]
  if family == "llama":
    return problems + _llama_unsupported(hf, where)
  return problems + _modernbert_unsupported(hf, where)


def _llama_unsupported(hf: dict, where: str) -> list[str]:
  problems = []
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    problems.append(f"hidden_act={act!r} in {where}: sslm_jax's llama uses silu (SwiGLU) only")
  heads, width, head_dim = hf.get("num_attention_heads"), hf.get("hidden_size"), hf.get("head_dim")
  if head_dim is not None and heads and width and head_dim * heads != width:
    problems.append(
      f"head_dim={head_dim} in {where}: sslm_jax's heads split the width, so head_dim must be "
      f"hidden_size / num_attention_heads = {width // heads}"
    )
  return problems


def _modernbert_unsupported(hf: dict, where: str) -> list[str]:
  problems = []
  act = hf.get("hidden_activation", "gelu")
  head_act = hf.get("classifier_activation", "gelu")
  if act in GELU_OF and GELU_OF.get(head_act) != GELU_OF[act]:
    problems.append(
      f"classifier_activation={head_act!r} in {where}: sslm_jax's MLM head uses the MLP's "
      f"activation, hidden_activation={act!r}"
    )
  types = hf_layer_types(hf)
  if _global_every(types) is None:
    problems.append(
      f"layer_types={types} in {where}: sslm_jax attends globally in the layers i with "
      "i % model.global_every == 0 and within the window in the others, not in this pattern"
    )
  return problems


def layer_mismatch(hf: dict, model, where: str) -> list[str]:
  """Where our model.global_every / model.sliding_window (of the config's `model` section) attend
  otherwise than the config.json's layers, with the fix."""
  theirs = hf_layer_types(hf)
  every = _global_every(theirs)
  if every is None:
    return []  # unsupported() names it
  window = int(hf.get("local_attention", 128))
  ours = layer_types(len(theirs), model.global_every, model.sliding_window)
  if ours != theirs:
    fix = f"--config.model.global_every={every}"
    if SLIDING in theirs:
      fix += f" --config.model.sliding_window={window}"
    return [
      f"layer_types={theirs} in {where} but model.global_every={model.global_every} and "
      f"model.sliding_window={model.sliding_window} in the config give {ours}; pass {fix}"
    ]
  if SLIDING in theirs and model.sliding_window != window:
    return [
      f"local_attention={window} in {where} but model.sliding_window={model.sliding_window} in "
      f"the config; pass --config.model.sliding_window={window}"
    ]
  return []


def same(ours, theirs) -> bool:
  """Config values equal, floats (rotary bases, epsilons) up to their printed precision."""
  if isinstance(theirs, float) and isinstance(ours, int | float):
    return bool(np.isclose(ours, theirs, rtol=1e-6, atol=0.0))
  return ours == theirs
