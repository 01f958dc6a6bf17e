"""Hugging Face config.json files and our config, both ways: the config.json of our model
(GPT2LMHeadModel, BertForMaskedLM, LlamaForCausalLM or ModernBertForMaskedLM), the config fields a
Hugging Face directory fixes, and each way the two disagree.

Reads and checks files only (no tensors, no torch), so a run can refuse a directory that does not
fit before it writes anything; checkpoints/hf.py converts the weights. The Llama and ModernBERT
keys are checkpoints/hf_families.py's.
"""

from __future__ import annotations

import json
import os

import ml_collections

from sslm_jax.checkpoints import hf_families
from sslm_jax.config import derived as config_derived
from sslm_jax.config.checks import ConfigError
from sslm_jax.models.config import ModelConfig
from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib

# Hugging Face activation names for our two GELU forms (one table for all four families).
HF_ACTIVATION, _GELU_OF = hf_families.HF_ACTIVATION, hf_families.GELU_OF
_ARCHITECTURE = {
  "gpt2": "GPT2LMHeadModel",
  "bert": "BertForMaskedLM",
  **hf_families.ARCHITECTURE,
}
# The layer-norm epsilon transformers uses where a GPT-2 or BERT config.json names none.
_EPSILON = {"gpt2": 1e-5, "bert": 1e-12}


class HFError(ConfigError):
  """A Hugging Face directory that cannot be read, or does not fit the config; names each issue."""


# ---- config.json -----------------------------------------------------------------------------


def special_ids(cfg: ModelConfig, tok=None) -> dict:
  """The token ids a Hugging Face config names, from the run's tokenizer `tok` (our
  SentencePiece ids when None): pad, bos/eos for a causal model, and for ModernBERT cls/sep (also
  its bos/eos, as ModernBERT's own config has them)."""
  tok = tokenizer_lib.Tokenizer if tok is None else tok
  ids = {"pad_token_id": tok.pad_id}
  if cfg.causal:
    ids.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
  if cfg.family == "modernbert":
    ids.update(cls_token_id=tok.cls_id, sep_token_id=tok.sep_id)
    ids.update(bos_token_id=tok.cls_id, eos_token_id=tok.sep_id)
  return ids


def check_exportable(cfg: ModelConfig) -> None:
  """HFError naming each part of our model that its Hugging Face class cannot express."""
  problems = hf_families.export_problems(cfg)
  if problems:
    raise HFError("cannot export to Hugging Face: " + "; ".join(problems))


def hf_config(cfg: ModelConfig, tok=None) -> dict:
  """The config.json of Hugging Face's class for our model's family (GPT2LMHeadModel,
  BertForMaskedLM, LlamaForCausalLM, ModernBertForMaskedLM), with the special ids of the run's
  tokenizer `tok` (see `special_ids`). HFError where the class cannot express the model."""
  check_exportable(cfg)
  common = {
    "vocab_size": cfg.num_ids,
    **special_ids(cfg, tok),
    "dtype": cfg.param_dtype,
    "initializer_range": cfg.init_std,
  }
  if cfg.rotary:
    return hf_families.hf_config(cfg, common)
  common = {
    "architectures": [_ARCHITECTURE[cfg.family]],
    "model_type": cfg.family,
    **common,
    "tie_word_embeddings": True,
  }
  if cfg.causal:
    return {
      **common,
      "n_positions": cfg.max_len,
      "n_embd": cfg.emb_dim,
      "n_layer": cfg.num_layers,
      "n_head": cfg.num_heads,
      "n_inner": cfg.mlp_dim,
      "activation_function": HF_ACTIVATION[cfg.gelu],
      "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "resid_pdrop": cfg.dropout_rate,
      "embd_pdrop": cfg.dropout_rate,
      "attn_pdrop": cfg.attention_dropout,
      "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False,
    }
  return {
    **common,
    "hidden_size": cfg.emb_dim,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "intermediate_size": cfg.mlp_dim,
    "max_position_embeddings": cfg.max_len,
    "type_vocab_size": cfg.num_token_types,
    "layer_norm_eps": cfg.layer_norm_epsilon,
    "hidden_act": HF_ACTIVATION[cfg.gelu],
    "hidden_dropout_prob": cfg.dropout_rate,
    "attention_probs_dropout_prob": cfg.attention_dropout,
    "position_embedding_type": "absolute",
  }


# Our config fields and the Hugging Face config.json keys that fix them, per model_type.
_FIELDS = {
  "gpt2": {
    "data.vocab_size": "vocab_size",
    "model.max_positions": "n_positions",
    "model.num_layers": "n_layer",
    "model.num_heads": "n_head",
    "model.emb_dim": "n_embd",
    "model.mlp_dim": "n_inner",
    "model.norm_epsilon": "layer_norm_epsilon",
    "model.gelu": "activation_function",
  },
  "bert": {
    "data.vocab_size": "vocab_size",
    "model.max_positions": "max_position_embeddings",
    "model.num_layers": "num_hidden_layers",
    "model.num_heads": "num_attention_heads",
    "model.emb_dim": "hidden_size",
    "model.mlp_dim": "intermediate_size",
    "model.norm_epsilon": "layer_norm_eps",
    "model.gelu": "hidden_act",
  },
  **hf_families.FIELDS,
}
_OBJECTIVE_OF = {
  "gpt2": "causal_lm",
  "bert": "masked_lm",
  "llama": "causal_lm",
  "modernbert": "masked_lm",
}


def config_fields(hf: dict) -> dict:
  """Our config fields (dotted names) that a Hugging Face config.json fixes, and model.family.

  model.max_positions is the HF position table's length (GPT-2, BERT) or max_position_embeddings
  (Llama, ModernBERT): the longest sequence the model takes. model.gelu is None for an
  activation our model does not have.
  """
  model_type = hf.get("model_type")
  if model_type not in _FIELDS:
    raise HFError(
      f"model_type={model_type!r}: sslm_jax reads {', '.join(map(repr, _FIELDS))} models only."
    )
  fields = {"objective": _OBJECTIVE_OF[model_type], "model.family": model_type}
  if model_type in hf_families.FIELDS:
    return {**fields, **hf_families.config_fields(hf)}
  fields.update({name: hf.get(key) for name, key in _FIELDS[model_type].items()})
  if fields["model.mlp_dim"] is None:  # GPT-2's n_inner=None means 4 * n_embd
    fields["model.mlp_dim"] = 4 * fields["model.emb_dim"]
  fields["model.norm_epsilon"] = float(fields["model.norm_epsilon"] or _EPSILON[model_type])
  fields["model.gelu"] = _GELU_OF.get(
    fields["model.gelu"] or HF_ACTIVATION["tanh" if model_type == "gpt2" else "erf"]
  )
  return fields


def _ours(config: ml_collections.ConfigDict, fields: dict) -> dict:
  """Our values of `fields`, with the config's defaults resolved as the model resolves them."""
  ours = {name: config[name] for name in fields if name != "model.family"}
  ours["model.family"] = config_derived.family(config)
  ours["model.gelu"] = config_derived.gelu_form(config)
  ours["model.norm_epsilon"] = config_derived.norm_epsilon(config)
  ours["model.num_kv_heads"] = config.model.num_kv_heads or config.model.num_heads
  return ours


def mismatches(hf: dict, config: ml_collections.ConfigDict, where: str) -> list[str]:
  """Each way the Hugging Face config.json at `where` and our config disagree, with the fix.

  The GELU form is checked, not adopted: model.gelu stays the single record of it (checkpoints
  keep it), so a differing form asks for --config.model.gelu. The position table may have any
  length: model.fit_positions cuts or extends it; rotary positions have none.
  """
  fields = config_fields(hf)
  keys = {"objective": "model_type", "model.family": "model_type", **_FIELDS[hf["model_type"]]}
  problems = []
  if fields["objective"] != config.objective:
    return [
      f"model_type={hf['model_type']!r} in {where} is a {fields['objective']} model but "
      f"objective={config.objective!r} in the config; pass "
      f"--config.objective={fields['objective']}"
    ]
  ours = _ours(config, fields)
  for name, value in fields.items():
    theirs = value if hf.get(keys[name]) is None else hf[keys[name]]
    if name == "model.gelu" and value is None:
      problems.append(
        f"{keys[name]}={theirs!r} in {where}: sslm_jax has {', '.join(sorted(_GELU_OF))} only"
      )
    elif name in ("model.max_positions", "model.global_every", "model.sliding_window"):
      continue  # any length fits; ModernBERT's layers are compared below, all at once
    elif name == "data.vocab_size":
      problems += _vocab_mismatch(value, config, where)
    elif not hf_families.same(ours[name], value):
      problems.append(
        f"{keys[name]}={theirs!r} in {where} but {name}={ours[name]!r} in the "
        f"config; pass --config.{name}={value}"
      )
  if hf["model_type"] == "modernbert":
    problems += hf_families.layer_mismatch(hf, config.model, where)
  problems += _unsupported(hf, where)
  return problems


def _vocab_mismatch(rows: int, config: ml_collections.ConfigDict, where: str) -> list[str]:
  """data.vocab_size is the tokenizer's number of ids; an embedding may have padding rows past
  them (a vocabulary padded to a round number), never fewer rows."""
  ours = config.data.vocab_size
  if rows is None or ours <= rows:
    return []
  path = config.data.tokenizer_path or (
    os.path.join(config.init_from_hf, "tokenizer.json") if config.init_from_hf else ""
  )
  size = _tokenizer_size(path) if path else None
  if size is None:
    fix = (
      f"pass --config.data.vocab_size={rows} (or the number of ids of the tokenizer saved with "
      "these weights, where the embedding has padding rows past them)"
    )
  elif size <= rows:
    fix = f"pass --config.data.vocab_size={size} (the ids of {path}; rows past them are padding)"
  else:
    fix = (
      f"the tokenizer {path} has {size} ids, more than the embedding has rows, so it is not the "
      "tokenizer of these weights; pass theirs as --config.data.tokenizer_path"
    )
  return [f"vocab_size={rows} in {where} but data.vocab_size={ours} in the config; {fix}"]


def _tokenizer_size(path: str) -> int | None:
  """The number of ids of the tokenizer file at `path`, None where there is none to read."""
  try:
    return tokenizer_files.load(path).vocab_size
  except (tokenizer_lib.TokenizerError, OSError):
    return None


def _unsupported(hf: dict, where: str) -> list[str]:
  """Hugging Face options our model does not implement."""
  if hf["model_type"] in hf_families.FIELDS:
    return hf_families.unsupported(hf, where)
  causal = hf["model_type"] == "gpt2"
  required = {
    "tie_word_embeddings": True,
    "add_cross_attention": False,
    **(
      {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False}
      if causal
      else {"type_vocab_size": 2, "position_embedding_type": "absolute", "is_decoder": False}
    ),
  }
  return [
    f"{key}={hf[key]!r} in {where}: sslm_jax supports {key}={value!r} only"
    for key, value in required.items()
    if key in hf and hf[key] != value
  ]


# ---- directories -----------------------------------------------------------------------------


def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise HFError(
      f"init_from_hf={hf_dir} does not exist; pass a Hugging Face model directory (config.json "
      "and model.safetensors)."
    )
  if not os.path.isfile(path):
    raise HFError(f"{path} does not exist; init_from_hf takes a Hugging Face model directory.")
  with open(path) as f:
    return json.load(f)


def check_readable(hf_dir: str) -> None:
  """HFError unless hf_dir holds a config.json and weights sslm_jax reads (reads no tensor)."""
  read_config(hf_dir)
  weight_files(hf_dir)


def weight_files(hf_dir: str) -> list[str]:
  """model.safetensors, or the shards its index file lists; HFError naming what is there."""
  single = os.path.join(hf_dir, "model.safetensors")
  index = single + ".index.json"
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(hf_dir, shard) for shard in shards]
  found = sorted(os.listdir(hf_dir))
  torch_only = any(name.startswith("pytorch_model") for name in found)
  hint = (
    " It holds PyTorch weights (pytorch_model.bin), which sslm_jax does not read: convert them "
    "with transformers (from_pretrained, then save_pretrained(DIR, safe_serialization=True))."
    if torch_only
    else f" It holds: {', '.join(found) or 'nothing'}."
  )
  raise HFError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json.{hint}")


def check_dir(hf_dir: str, config: ml_collections.ConfigDict) -> dict:
  """The HF config.json of hf_dir, after checking it against our config (HFError if it differs)."""
  where = os.path.join(hf_dir, "config.json")
  hf = read_config(hf_dir)
  problems = mismatches(hf, config, where)
  if problems:
    raise HFError(f"{hf_dir} does not match the config: " + "; ".join(problems))
  return hf


def check_init_from_hf(config: ml_collections.ConfigDict) -> None:
  """HFError where the config's init_from_hf directory does not fit the config.

  Run by the commands that start a run, after config validation and before anything is written.
  A directory that is not there is not checked here: a resumed run never reads it, and a fresh
  one is refused by `check_readable` before its workdir is written.
  """
  if config.init_from_hf and os.path.isdir(config.init_from_hf):
    check_dir(config.init_from_hf, config)
