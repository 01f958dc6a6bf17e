"""Where a fine-tuning run's encoder and tokenizer come from, all checked before anything in the
workdir is written.

- `finetune.init_from`: a pretraining workdir of ours. Its config, the checkpoint step
  (`finetune.init_step`, else the newest), the saved parameter tree and its tokenizer are read and
  checked here; the parameters themselves only when the run starts from step 0.
- `init_from_hf`: a Hugging Face directory, with its tokenizer.json.
- `data.tokenizer_path`, else the workdir's own copy, else none yet: process 0 trains one on the
  training texts (into a scratch directory, so a failure leaves the workdir as it was).

Whatever the tokenizer's source, the run keeps a copy in the workdir (tokenizer.files.adopt), so a
fine-tuned workdir needs nothing outside itself.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import restore, saved_tree
from sslm_jax.errors import UsageError
from sslm_jax.models import transformer as model_lib
from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import sentencepiece as tokenizer_lib

# Model fields that fix the encoder's array shapes (and its parameter tree), with the config field
# that sets each. The position table is not one of them: model.fit_positions cuts or extends it.
_SHAPES = {
  "objective": "objective",
  "family": "model.family",
  "vocab_size": "data.vocab_size",
  "num_layers": "model.num_layers",
  "num_heads": "model.num_heads",
  "kv_heads": "model.num_kv_heads",
  "emb_dim": "model.emb_dim",
  "mlp_dim": "model.mlp_dim",
  "qk_norm": "model.qk_norm",
  "tie_embeddings": "model.tie_embeddings",
}


def absolute(path: str) -> str:
  """A local path made absolute (a fine-tuned workdir's config.json must not depend on the
  directory the run started in); gs:// and other URLs as given."""
  return path if not path or "://" in path else os.path.abspath(path)


def _check_shapes(config, pretrained, where: str) -> None:
  ours, theirs = config_lib.model_config(config), config_lib.model_config(pretrained)
  for field, name in _SHAPES.items():
    if getattr(ours, field) != getattr(theirs, field):
      value = _named(pretrained, name)
      raise config_lib.ConfigError(
        f"finetune.init_from={where} has {name}={value} but this config has "
        f"{_named(config, name)}; set --config.{name}={value} (the encoder keeps its shapes)."
      )


def _named(config, name: str):
  """A config field's value, model.family's 'auto' named as the family it stands for."""
  return config_lib.family(config) if name == "model.family" else config[name]


def _init_step(workdir: str, init_step: int) -> int:
  steps = restore.checkpoint_steps(workdir)
  try:
    return restore.choose_step(workdir, steps, init_step or None)
  except UsageError as e:
    field = "finetune.init_step" if steps else "finetune.init_from"
    raise config_lib.ConfigError(f"{field}: {e}") from e


def from_workdir(config) -> tuple[object, Callable[[], dict]]:
  """(tokenizer, () -> the encoder's parameters) of finetune.init_from, checked against config:
  a pretraining run, a checkpoint at the step asked for, holding a pretraining model's
  parameters of this config's shapes. Reads metadata only; the parameters when called."""
  f = config.finetune
  if "://" not in f.init_from and not os.path.isdir(f.init_from):
    raise config_lib.ConfigError(
      f"finetune.init_from={f.init_from!r} is not a directory; pass the --workdir of a "
      "pretraining run."
    )
  try:
    pretrained = restore.read_config(f.init_from)
  except UsageError as e:
    raise config_lib.ConfigError(f"finetune.init_from: {e}") from e
  if pretrained.finetune.task:
    started = pretrained.finetune.init_from or "random initialisation"
    raise config_lib.ConfigError(
      f"finetune.init_from={f.init_from} is a fine-tuning run (finetune.task="
      f"{pretrained.finetune.task!r}, started from {started}); pass the --workdir of a "
      "pretraining run."
    )
  _check_shapes(config, pretrained, f.init_from)
  step = _init_step(f.init_from, f.init_step)
  tree_dir = restore.checkpoint_dir(f.init_from) / str(step) / "state"
  model_cfg = config_lib.model_config(pretrained)
  abstract = nnx.split(nnx.eval_shape(lambda: model_lib.build(model_cfg, 0)), nnx.Param)[1]
  try:
    saved_tree.check(
      tree_dir,
      abstract,
      f"finetune.init_from={f.init_from} (step {step})",
      "pass the --workdir of a pretraining run.",
    )
  except (OSError, ValueError) as e:  # unreadable metadata: the restore would fail too
    if isinstance(e, saved_tree.TreeMismatch):
      raise config_lib.ConfigError(str(e)) from e
    raise config_lib.ConfigError(
      f"finetune.init_from: the checkpoint {tree_dir.parent} cannot be read "
      f"({type(e).__name__}); pick another with finetune.init_step."
    ) from e
  try:
    tok = tokenizer_files.load(restore.tokenizer_file(f.init_from, pretrained))
  except UsageError as e:
    raise config_lib.ConfigError(f"finetune.init_from: {e}") from e

  def encoder() -> dict:
    try:
      saved = restore.read_workdir(f.init_from, step)
      restore.load_tokenizer(saved)  # the tokenizer its checkpoint recorded
      model = restore.restore_model(saved)
    except UsageError as e:
      raise config_lib.ConfigError(f"finetune.init_from: {e}") from e
    logging.info("Starting the encoder from %s at step %d", f.init_from, saved.step)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if "position_embed" in params:  # gpt2 and bert; the rotary families have no position table
      table = np.asarray(params["position_embed"]["embedding"])
      rows = config_lib.positions(config)
      params["position_embed"]["embedding"] = model_lib.fit_positions(table, rows, f.init_from)
    return params

  return tok, encoder


def tokenizer(config, workdir: str, given=None, resuming=False):
  """The init_from run's tokenizer, else the one the config names (restore.named_tokenizer:
  data.tokenizer_path, else init_from_hf's tokenizer.json, which is not read when `resuming`),
  else the workdir's own copy; None when there is none yet (train() makes it). A workdir that
  already holds a different tokenizer is refused. Writes nothing."""
  path = config.data.tokenizer_path
  if given is None and not resuming:
    path = restore.named_tokenizer(config)
    if path != config.data.tokenizer_path and not epath.Path(path).exists():  # init_from_hf's
      raise config_lib.ConfigError(
        f"init_from_hf={config.init_from_hf} has no tokenizer.json; pass the tokenizer its "
        "weights were trained with as --config.data.tokenizer_path=FILE."
      )
  if given is not None and path and tokenizer_files.load(path).sha256 != given.sha256:
    raise config_lib.ConfigError(
      f"data.tokenizer_path={path} is not the tokenizer finetune.init_from was trained with; "
      "leave data.tokenizer_path empty to use that one."
    )
  tok = given if given is not None else tokenizer_files.load(path) if path else None
  own = tokenizer_files.workdir_file(workdir)
  if own is not None:
    kept = tokenizer_files.load(own)
    if tok is not None and kept.sha256 != tok.sha256:
      raise config_lib.ConfigError(
        f"{workdir} already holds another tokenizer ({own}) than this run's ({tok.path}); use "
        "a new --workdir, or the tokenizer it holds."
      )
    tok = kept
  return None if tok is None else checked_size(config, tok)


def train(config, train_examples) -> str | None:
  """Process 0 trains a tokenizer on the training texts into a scratch directory and returns
  its path (the caller adopts it into the workdir); None on the other processes."""
  if jax.process_index() != 0:
    return None
  path = os.path.join(tempfile.mkdtemp(prefix="sslm_jax_tokenizer_"), "tokenizer.model")
  texts = [t for e in train_examples for t in (e.text, e.text_pair) if t]
  tok = tokenizer_lib.train(texts, config.data.vocab_size, path)
  logging.info("Trained the tokenizer %s on %d training texts", path, len(texts))
  checked_size(config, tok)
  return path


def checked_size(config, tok):
  if tok.vocab_size != config.data.vocab_size:
    raise config_lib.ConfigError(
      f"the tokenizer {tok.path} has {tok.vocab_size} pieces but data.vocab_size="
      f"{config.data.vocab_size}; set --config.data.vocab_size={tok.vocab_size}."
    )
  return tok
