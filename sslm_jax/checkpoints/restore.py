"""What a training workdir holds, read back: its config, a checkpoint step, the tokenizer it was
trained with, and the model's parameters alone (no optimizer state) on one device.

Nothing here writes to the workdir, and TensorFlow is never imported.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import saved_tree
from sslm_jax.errors import UsageError
from sslm_jax.models import transformer as model_lib
from sslm_jax.tokenizer import files as tokenizer_files
from sslm_jax.tokenizer import sentencepiece as tok


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run wrote to WORKDIR/config.json."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise UsageError(
      f"{workdir} has no config.json, so it is not the workdir of a sslm_jax run; pass the "
      "--workdir a `python -m sslm_jax.main` run trained in."
    )
  written = json.loads(path.read_text())
  if "objective" not in written and ("model_type" in written or "architectures" in written):
    raise UsageError(
      f"{workdir} is a Hugging Face model directory (its config.json has model_type "
      f"{written.get('model_type')!r}), not the workdir of a sslm_jax run: start a run from it "
      f"with --config.init_from_hf={workdir} (pretraining or fine-tuning), then pass that run's "
      "--workdir."
    )
  config = config_lib.defaults()  # fields added since the run started keep their defaults
  config.update(written)
  return config


def checkpoint_dir(workdir: str) -> epath.Path:
  directory = f"{workdir}/checkpoints"
  return epath.Path(directory if "://" in directory else os.path.abspath(directory))


def _choose_step(workdir: str, steps: list[int], step: int | None) -> int:
  if not steps:
    raise UsageError(
      f"{workdir} has no checkpoints yet (none in {workdir}/checkpoints); let its training run "
      "save one (every checkpoint_every_steps, and at the end), or pass another --workdir."
    )
  if step is None:
    return max(steps)
  if step not in steps:
    raise UsageError(
      f"{workdir} has no checkpoint at step {step}; available steps: "
      f"{', '.join(map(str, sorted(steps)))}. Pick one of them, or leave the step out for the "
      "newest."
    )
  return step


def _restore_params(step_dir: epath.Path, model_cfg: model_lib.ModelConfig):
  fix = (
    "the model settings in its workdir's config.json (e.g. model.num_layers, model.emb_dim) are "
    "not those the run trained with; restore the config.json the run wrote, or load another "
    "workdir."
  )
  return restore_params(step_dir / "state", lambda: model_lib.build(model_cfg, 0), fix)


def restore_params(tree_dir: epath.Path, build, fix: str = "load another step or workdir."):
  """The model `build()` makes, with the `params` subtree saved in `tree_dir` (a checkpoint's
  state/ directory, or a params-only save of the same tree), each array whole on the first
  local device.

  Orbax's partial restore reads only the leaves named in the target tree: the optimizer state
  (twice the parameters' bytes) is never read, and shards from any mesh are reassembled. It
  would also fill a leaf the save lacks with an empty placeholder, so the saved tree is first
  compared with the model's: saved_tree.TreeMismatch (one line naming the differing paths, then
  `fix`) when they differ.
  """
  abstract_model = nnx.eval_shape(build)
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  saved_tree.check(tree_dir, abstract_params, str(tree_dir), fix)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params
  )
  item = {"params": target}
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
      tree_dir,
      args=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True),
    )
  return nnx.merge(graphdef, restored["params"])


def tokenizer_file(workdir: str, config: ml_collections.ConfigDict) -> str:
  """The workdir's own tokenizer copy; for a workdir written before runs kept one, the
  data.tokenizer_path its config.json names, where that file still exists."""
  own = tokenizer_files.workdir_file(workdir)
  if own is not None:
    return own
  named = config.data.tokenizer_path
  if not named:
    raise UsageError(
      f"{workdir} has no tokenizer.model or tokenizer.json; restore the tokenizer its run was "
      "trained with into it."
    )
  if not epath.Path(named).exists():
    raise UsageError(
      f"{workdir} has no copy of its tokenizer and data.tokenizer_path={named} (from its "
      "config.json) does not exist here; copy the tokenizer file the run was trained with to "
      f"{workdir}/{tokenizer_files.workdir_name(named)}."
    )
  return named


class Restored(NamedTuple):
  """A workdir's checkpoint, as `api.load` builds a LanguageModel from it."""

  config: ml_collections.ConfigDict
  model_cfg: model_lib.ModelConfig
  model: model_lib.GPT | model_lib.BERT
  tokenizer: tok.Tokenizer  # or an hf_tokenizer.HFTokenizer
  step: int


def from_workdir(workdir: str, step: int | None = None) -> Restored:
  """The config, parameters and tokenizer of `workdir` at `step` (default: its newest)."""
  workdir = str(workdir).rstrip("/")
  config = read_config(workdir)
  directory = checkpoint_dir(workdir)
  steps = ocp.step.checkpoint_steps(directory) if directory.exists() else []
  step = _choose_step(workdir, steps, step)
  tokenizer = tokenizer_files.load(tokenizer_file(workdir, config))
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    meta = checkpointer.restore(directory / str(step) / "meta")
  recorded = dict(meta or {}).get("fingerprint", {}).get("tokenizer_sha256")
  if recorded and recorded != tokenizer.sha256:
    raise UsageError(
      f"{tokenizer.path} is not the tokenizer the checkpoint at step {step} was trained with "
      f"(its SHA-256 differs); restore the run's {os.path.basename(tokenizer.path)}."
    )
  model_cfg = config_lib.model_config(config)
  try:
    model = _restore_params(directory / str(step), model_cfg)
  except saved_tree.TreeMismatch as e:
    raise UsageError(str(e)) from e
  except Exception as e:  # Orbax and TensorStore raise many types for missing or damaged files
    others = ", ".join(str(s) for s in sorted(steps) if s != step) or "none"
    text = " ".join(str(e).split())[:300]
    raise UsageError(
      f"checkpoint {directory / str(step)} cannot be read ({type(e).__name__}: {text}); "
      f"load another step (available: {others})."
    ) from e
  return Restored(config, model_cfg, model, tokenizer, step)
