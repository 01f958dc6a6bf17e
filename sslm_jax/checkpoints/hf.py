"""Our parameters as Hugging Face GPT2LMHeadModel / BertForMaskedLM / LlamaForCausalLM /
ModernBertForMaskedLM files (by model.family), both ways.

A Hugging Face directory holds config.json and model.safetensors (or shards listed in
model.safetensors.index.json). Writing needs no torch: arrays go through safetensors.numpy.

Parameters here are "pure dicts" (nnx.to_pure_dict of the model's nnx.Param state) of NumPy
arrays. Hugging Face tensors have the real vocabulary (the tokenizer's ids); ours have
model.vocab_multiple padding rows after them, which export slices off and import fills with
zeros (their logits are masked, so they never train).

Layouts: GPT-2's Conv1D weights are stored [in, out] and attn.c_attn packs q, k and v on the
output axis; BERT's nn.Linear weights are [out, in]. Heads split the width as (head, head_dim),
the order of our [D, N, H] kernels. Both output embeddings are tied to the input embedding.
The Llama and ModernBERT tensor tables (nn.Linear layouts; Llama's untied lm_head; ModernBERT's
first layer without an attention norm) are checkpoints/hf_families.py's.

config.json, and how it must match our config, is checkpoints/hf_config.py's.
"""

from __future__ import annotations

import json
import math
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import hf_config as hf_config_lib
from sslm_jax.checkpoints import hf_families
from sslm_jax.models import transformer as model_lib
from sslm_jax.models.config import ModelConfig

# Hugging Face tensors that hold nothing we keep: tied copies, buffers, BERT's pooler and NSP head.
_IGNORED = (
  "lm_head.weight",
  "cls.predictions.decoder.",
  "decoder.weight",
  "position_ids",
  "pooler.",
  "cls.seq_rel",
)
# Tied output weights per family: left out on export, checked equal to the input embedding.
_TIED = {"gpt2": ("lm_head.weight",), "bert": ("cls.predictions.decoder.weight",)}
_TIED.update(hf_families.TIED)
# A checkpoint without these (BertModel, ModernBertModel) gets a new MLM head.
_HEAD_PREFIXES = {"bert": ("cls.predictions.",), "modernbert": hf_families.HEAD_PREFIXES}


# ---- parameters ------------------------------------------------------------------------------

# (Hugging Face name, our path, layout). Layouts: "copy"; "conv": GPT-2's Conv1D, our kernel as
# an [in, out] matrix (heads flattened); "linear": BERT's nn.Linear, that matrix transposed;
# "vocab": embedding rows or bias entries past the tokenizer's ids are padding (sliced off on
# export, zeros on import); "positions": a table of another length is cut or extended.
# "{i}" is the layer; under it our path is inside stack/blocks and takes layer i of each array.
_GPT2 = (
  ("transformer.wte.weight", "token_embed/embedding", "vocab"),
  ("transformer.wpe.weight", "position_embed/embedding", "positions"),
  ("transformer.ln_f.weight", "final_norm/scale", "copy"),
  ("transformer.ln_f.bias", "final_norm/bias", "copy"),
  ("transformer.h.{i}.ln_1.weight", "attention_norm/scale", "copy"),
  ("transformer.h.{i}.ln_1.bias", "attention_norm/bias", "copy"),
  ("transformer.h.{i}.attn.c_attn.weight", "attention/{query,key,value}/kernel", "conv"),
  ("transformer.h.{i}.attn.c_attn.bias", "attention/{query,key,value}/bias", "conv"),
  ("transformer.h.{i}.attn.c_proj.weight", "attention/out/kernel", "conv"),
  ("transformer.h.{i}.attn.c_proj.bias", "attention/out/bias", "copy"),
  ("transformer.h.{i}.ln_2.weight", "mlp_norm/scale", "copy"),
  ("transformer.h.{i}.ln_2.bias", "mlp_norm/bias", "copy"),
  ("transformer.h.{i}.mlp.c_fc.weight", "mlp/fc/kernel", "conv"),
  ("transformer.h.{i}.mlp.c_fc.bias", "mlp/fc/bias", "copy"),
  ("transformer.h.{i}.mlp.c_proj.weight", "mlp/proj/kernel", "conv"),
  ("transformer.h.{i}.mlp.c_proj.bias", "mlp/proj/bias", "copy"),
)
_BERT_LAYER = "bert.encoder.layer.{i}."
_BERT = (
  ("bert.embeddings.word_embeddings.weight", "token_embed/embedding", "vocab"),
  ("bert.embeddings.position_embeddings.weight", "position_embed/embedding", "positions"),
  ("bert.embeddings.token_type_embeddings.weight", "token_type_embed/embedding", "copy"),
  ("bert.embeddings.LayerNorm.weight", "embed_norm/scale", "copy"),
  ("bert.embeddings.LayerNorm.bias", "embed_norm/bias", "copy"),
  *(
    (f"{_BERT_LAYER}attention.self.{k}.{w}", f"attention/{k}/{p}", "linear")
    for k in ("query", "key", "value")
    for w, p in (("weight", "kernel"), ("bias", "bias"))
  ),
  (_BERT_LAYER + "attention.output.dense.weight", "attention/out/kernel", "linear"),
  (_BERT_LAYER + "attention.output.dense.bias", "attention/out/bias", "copy"),
  (_BERT_LAYER + "attention.output.LayerNorm.weight", "attention_norm/scale", "copy"),
  (_BERT_LAYER + "attention.output.LayerNorm.bias", "attention_norm/bias", "copy"),
  (_BERT_LAYER + "intermediate.dense.weight", "mlp/fc/kernel", "linear"),
  (_BERT_LAYER + "intermediate.dense.bias", "mlp/fc/bias", "copy"),
  (_BERT_LAYER + "output.dense.weight", "mlp/proj/kernel", "linear"),
  (_BERT_LAYER + "output.dense.bias", "mlp/proj/bias", "copy"),
  (_BERT_LAYER + "output.LayerNorm.weight", "mlp_norm/scale", "copy"),
  (_BERT_LAYER + "output.LayerNorm.bias", "mlp_norm/bias", "copy"),
  ("cls.predictions.transform.dense.weight", "mlm_head/transform/kernel", "linear"),
  ("cls.predictions.transform.dense.bias", "mlm_head/transform/bias", "copy"),
  ("cls.predictions.transform.LayerNorm.weight", "mlm_head/norm/scale", "copy"),
  ("cls.predictions.transform.LayerNorm.bias", "mlm_head/norm/bias", "copy"),
  ("cls.predictions.bias", "mlm_head/decoder_bias", "vocab"),
)


def _table(cfg: ModelConfig) -> tuple:
  if cfg.rotary:
    return hf_families.tensor_table(cfg)
  return _GPT2 if cfg.causal else _BERT


def _entries(cfg: ModelConfig):
  """(Hugging Face name, our paths, layout, layer or None) for every tensor of the model."""
  for name, path, layout in _table(cfg):
    head, _, rest = path.partition("{")  # "attention/{query,key,value}/kernel": three paths
    names, _, tail = rest.partition("}")
    paths = [head + part + tail for part in names.split(",")] if rest else [path]
    if "{i}" not in name:
      yield name, paths, layout, None
    else:
      first = 1 if name in hf_families.NOT_IN_FIRST_LAYER else 0
      for i in range(first, cfg.num_layers):
        yield name.format(i=i), [f"stack/blocks/{p}" for p in paths], layout, i


def _matrix_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Our array as Hugging Face's [in, out] matrix (or vector): heads flattened into the width."""
  if path.endswith("bias"):
    return (math.prod(shape),)
  if path.endswith("out/kernel"):  # [N, H, D]
    return (math.prod(shape[:-1]), shape[-1])
  return (shape[0], math.prod(shape[1:]))  # [D, N, H], [D, F], [F, D]


def _get(tree: dict, path: str):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """Our parameters (a pure dict) as a Hugging Face state dict at the real vocabulary size.

  Tied output weights (lm_head.weight when tied, cls.predictions.decoder.weight,
  decoder.weight) are left out, as Hugging Face's own save_pretrained does.
  """
  params = jax.tree.map(np.asarray, params)  # device arrays copied to the host once
  out = {}
  for name, paths, layout, layer in _entries(cfg):
    parts = []
    for path in paths:
      x = _get(params, path)
      x = x if layer is None else x[layer]
      if layout in ("conv", "linear"):
        x = x.reshape(_matrix_shape(path, x.shape))
      parts.append(x)
    x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)  # q, k, v side by side
    x = x.T if layout == "linear" else x
    out[name] = np.ascontiguousarray(x[: cfg.num_ids] if layout == "vocab" else x)
  return out


def _canonical(name: str, cfg: ModelConfig) -> str:
  """A tensor name as the family's class (GPT2LMHeadModel, BertForMaskedLM, ...) spells it today.

  Accepts base-model checkpoints (GPT2Model, BertModel, LlamaModel, ModernBertModel: no
  'transformer.', 'bert.' or 'model.' prefix) and old BERT ones (gamma/beta).
  """
  if cfg.rotary:
    return hf_families.canonical(name)
  if name.startswith(("h.", "wte.", "wpe.", "ln_f.")):
    name = "transformer." + name
  if name.startswith(("embeddings.", "encoder.", "pooler.")):
    name = "bert." + name
  if name.endswith(".gamma"):
    name = name[: -len("gamma")] + "weight"
  if name.endswith(".beta"):
    name = name[: -len("beta")] + "bias"
  return name


def _ignored(name: str) -> bool:
  return any(part in name for part in _IGNORED) or name.endswith((".attn.bias", ".masked_bias"))


def _expected_shape(paths, layout, shapes, cfg: ModelConfig) -> tuple[int, ...]:
  """The Hugging Face shape of an entry whose (per-layer) arrays have our `shapes`."""
  if layout == "vocab":
    return (cfg.num_ids, *shapes[0][1:])
  if layout not in ("conv", "linear"):
    return tuple(shapes[0])
  matrices = [_matrix_shape(p, s) for p, s in zip(paths, shapes, strict=True)]
  joined = (*matrices[0][:-1], sum(m[-1] for m in matrices))
  return tuple(joined[::-1] if layout == "linear" else joined)


def from_hf(
  tensors: dict, cfg: ModelConfig, where: str = "the Hugging Face weights", seed: int = 0
) -> dict:
  """A Hugging Face state dict as our parameters (a pure dict of NumPy arrays).

  The vocabulary is padded to cfg.vocab_size with zero rows; rows past the tokenizer's ids
  (cfg.num_ids) in a padded Hugging Face vocabulary are padding and are not read. A position
  table of another length than cfg.max_len is cut or extended (model.fit_positions). A BERT
  or ModernBERT checkpoint without the MLM head (a saved BertModel or ModernBertModel) gets a
  new head, initialised from `seed`. ModernBERT's first layer has no attention norm: ours, which
  that layer skips, is set to ones. Raises HFError naming the missing, misshapen or unknown
  tensors.
  """
  model = nnx.eval_shape(lambda: model_lib.build(cfg, 0))
  abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  tensors = {_canonical(k, cfg): v for k, v in tensors.items()}
  head = _HEAD_PREFIXES.get(cfg.family, ())
  headless = bool(head) and not any(k.startswith(head) for k in tensors)
  if headless:
    params["mlm_head"] = _fresh_head(cfg, seed, where)
  for name in hf_families.NOT_IN_FIRST_LAYER:
    for path in [p for n, p, _ in _table(cfg) if n == name]:
      _get(params, f"stack/blocks/{path}")[0] = 1  # the norm's scale, never read
  problems = []
  for name, paths, layout, layer in _entries(cfg):
    shapes = [_get(abstract, p).shape[0 if layer is None else 1 :] for p in paths]
    expected = _expected_shape(paths, layout, shapes, cfg)
    if headless and name.startswith(head):
      continue
    if name not in tensors:
      problems.append(f"{name} is missing from {where}")
      continue
    value = np.asarray(tensors[name])
    if layout == "positions":
      value = model_lib.fit_positions(value, cfg.max_len, where)
    if layout == "vocab" and value.shape[1:] == expected[1:] and len(value) > expected[0]:
      value = value[: expected[0]]  # padding rows of a padded vocabulary (check_dir allowed it)
    if value.shape != expected:
      problems.append(f"{name} has shape {list(value.shape)} in {where}, expected {list(expected)}")
      continue
    value = value.T if layout == "linear" else value
    parts = [value]
    if layout in ("conv", "linear"):  # c_attn and Wqkv hold q, k and v side by side, Wi gate, up
      widths = [_matrix_shape(p, s)[-1] for p, s in zip(paths, shapes, strict=True)]
      parts = np.split(value, np.cumsum(widths)[:-1], axis=-1)
      parts = [x.reshape(s) for x, s in zip(parts, shapes, strict=True)]
    for path, part in zip(paths, parts, strict=True):
      target = _get(params, path) if layer is None else _get(params, path)[layer]
      target[: part.shape[0]] = part  # vocabulary padding rows stay zero
  known = {name for name, *_ in _entries(cfg)}
  unknown = sorted(k for k in tensors if k not in known and not _ignored(k))
  problems += [f"{name} in {where} has no place in our model" for name in unknown]
  if not problems:
    token_vd = _get(params, "token_embed/embedding")[: cfg.num_ids]
    problems += _untied(tensors, token_vd, _TIED[cfg.family] if cfg.tie_embeddings else (), where)
  if problems:
    more = f"; and {len(problems) - _SHOWN} more" if len(problems) > _SHOWN else ""
    raise hf_config_lib.HFError(
      f"the Hugging Face weights do not fit the model ({len(problems)} problems): "
      + "; ".join(problems[:_SHOWN])
      + more
    )
  return params


_SHOWN = 4  # problems named in one error line


def _fresh_head(cfg: ModelConfig, seed: int, where: str) -> dict:
  """A newly initialised MLM head, for BERT weights saved without one."""
  logging.info(
    "%s has no MLM head (cls.predictions.*, e.g. a saved BertModel): starting a new one", where
  )
  model = model_lib.build(cfg, seed)
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.mlm_head, nnx.Param)))


def _untied(tensors: dict, token_vd: np.ndarray, tied: tuple, where: str) -> list[str]:
  """A tied output embedding is the input one: a stored output matrix (a name in `tied`) that
  differs cannot load."""
  for name in tied:
    stored = tensors.get(name)
    stored = None if stored is None else np.asarray(stored, token_vd.dtype)[: len(token_vd)]
    if stored is not None and not np.array_equal(stored, token_vd):
      return [f"{name} in {where} differs from the input embedding; sslm_jax ties them"]
  return []


# ---- directories -----------------------------------------------------------------------------


def save(out_dir: str, params: dict, cfg: ModelConfig, tok=None) -> None:
  """Write config.json and model.safetensors (real vocabulary, tied weights once) to out_dir,
  and for a causal model generation_config.json; special ids from the run's tokenizer `tok`."""
  from safetensors.numpy import save_file

  config_json = hf_config_lib.hf_config(cfg, tok)  # refuses what the class cannot express
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_json, f, indent=2, sort_keys=True)
  if cfg.causal:  # what transformers' generate stops at and pads with
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(hf_config_lib.special_ids(cfg, tok), f, indent=2, sort_keys=True)
  save_file(to_hf(params, cfg), os.path.join(out_dir, "model.safetensors"), {"format": "pt"})


def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
  """All tensors of model.safetensors, or of the shards its index file lists."""
  from safetensors.numpy import load_file

  return {k: v for path in hf_config_lib.weight_files(hf_dir) for k, v in load_file(path).items()}


def load_params(hf_dir: str, config: ml_collections.ConfigDict) -> dict:
  """Our parameters (pure dict of NumPy arrays, padded vocabulary) from a Hugging Face directory."""
  hf_config_lib.check_dir(hf_dir, config)
  cfg = config_lib.model_config(config)
  return from_hf(read_tensors(hf_dir), cfg, where=hf_dir, seed=config.seed)
