"""What a training workdir holds, read back: its config, the step to load, the tokenizer it was
trained with, and the model's parameters alone (no optimizer state) on one device.

`read_workdir` reads a workdir once for both `sslm_jax.load` paths (inference/language_model.py
for a pretraining run, finetune/task_model.py for a fine-tuning one): config.json, the step and
where its parameters are (a fine-tuning run's best eval, kept in WORKDIR/best by
finetune/keep_best.py, by default), the tokenizer file and the hash its checkpoints recorded.
`load_tokenizer` and `restore_model` then read those files. `named_tokenizer` is the one rule for
the tokenizer file a config names, which data preparation and fine-tuning follow too.

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

# A fine-tuning run's best eval: WORKDIR/best.json names its step, WORKDIR/best/STEP holds its
# parameters (finetune/keep_best.py writes them).
BEST_FILE = "best.json"
BEST_DIR = "best"


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


def workdir_path(workdir: str, *parts: str) -> epath.Path:
  """WORKDIR/parts..., absolute where it is local."""
  path = "/".join([str(workdir).rstrip("/"), *parts])
  return epath.Path(path if "://" in path else os.path.abspath(path))


def checkpoint_dir(workdir: str) -> epath.Path:
  return workdir_path(workdir, "checkpoints")


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the workdir's complete checkpoints, oldest first."""
  directory = checkpoint_dir(workdir)
  return sorted(ocp.step.checkpoint_steps(directory)) if directory.exists() else []


def read_best(workdir: str) -> dict | None:
  """best.json of `workdir` ({step, metric, value}), or None when the run kept no best yet."""
  path = workdir_path(workdir, BEST_FILE)
  return json.loads(path.read_text()) if path.exists() else None


def best_params_dir(workdir: str, step: int) -> epath.Path:
  """Where the best parameters of `step` are; they restore as a checkpoint's state/ does."""
  return workdir_path(workdir, BEST_DIR, str(step))


def choose_step(workdir: str, steps: list[int], step: int | None) -> int:
  """`step`, or the newest of `steps` (a workdir's checkpoints) when it is None."""
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


def _choose_fine_tuned(workdir: str, steps: list[int], step) -> tuple[int, str]:
  """(step, 'best' or 'checkpoint'): by default the best eval's, else the newest checkpoint."""
  best = read_best(workdir)
  if step == "best" or (step is None and best is not None):
    if best is None:
      raise UsageError(
        f"{workdir} has no best checkpoint yet ({workdir}/{BEST_FILE} is written at the first "
        "eval after step 0); wait for one, or give a step number."
      )
    return best["step"], "best"
  if best is not None and step == best["step"]:
    return step, "best"
  if step is None and not steps:
    raise UsageError(
      f"{workdir} has no checkpoints yet (none in {checkpoint_dir(workdir)}); let its "
      "fine-tuning run save one (every checkpoint_every_steps, and at the end), or pass another "
      "workdir."
    )
  step = steps[-1] if step is None else step
  if step not in steps:
    available = ", ".join(map(str, steps)) or "none"
    also = f", and 'best' (step {best['step']})" if best else ""
    raise UsageError(
      f"{workdir} has no checkpoint at step {step}; available steps: {available}{also}. "
      "Pick one of them, or leave the step out."
    )
  return step, "checkpoint"


def named_tokenizer(config: ml_collections.ConfigDict) -> str:
  """The tokenizer file a run's config names: data.tokenizer_path, else init_from_hf's
  tokenizer.json (pretrained embeddings need their own tokenizer); '' where the run trains one
  (or, fine-tuning from finetune.init_from, takes that run's)."""
  if config.data.tokenizer_path:
    return config.data.tokenizer_path
  if config.init_from_hf:
    return os.path.join(config.init_from_hf, "tokenizer.json")
  return ""


def tokenizer_file(workdir: str, config: ml_collections.ConfigDict) -> str:
  """The workdir's own tokenizer copy. A workdir written before runs kept one gives the file its
  config names (named_tokenizer), else its finetune.init_from run's, where that file still
  exists; read relative to the current directory, which is why the error names the fix."""
  own = tokenizer_files.workdir_file(workdir)
  if own is not None:
    return own
  named, init_from = named_tokenizer(config), config.finetune.init_from
  if config.data.tokenizer_path:
    where = f"data.tokenizer_path={named}"
  elif named:
    where = f"init_from_hf={config.init_from_hf}"
  elif init_from:
    try:
      return tokenizer_file(init_from, read_config(init_from))
    except UsageError:
      named, where = f"{init_from}/tokenizer.model", f"finetune.init_from={init_from}"
  else:
    raise UsageError(
      f"{workdir} has no tokenizer.model or tokenizer.json; restore the tokenizer its run was "
      "trained with into it."
    )
  if not epath.Path(named).exists():
    raise UsageError(
      f"{workdir} holds no copy of its tokenizer, and its run's tokenizer ({where}, from its "
      f"config.json) is not at {named} from here; copy the tokenizer file the run was trained "
      f"with to {workdir}/{tokenizer_files.workdir_name(named)}."
    )
  return named


class SavedRun(NamedTuple):
  """A workdir read once: what both `sslm_jax.load` paths build their model from."""

  workdir: str
  config: ml_collections.ConfigDict
  step: int
  source: str  # 'checkpoint', or 'best' (a fine-tuning run's WORKDIR/best)
  tree_dir: epath.Path  # the saved parameters: a checkpoint's state/, or WORKDIR/best/STEP
  tokenizer_file: str
  tokenizer_sha256: str | None  # what the run's checkpoints recorded, where they did
  steps: list[int]  # every checkpoint step, for the errors that name another

  @property
  def fine_tuned(self) -> bool:
    return bool(self.config.finetune.task)


def _recorded_tokenizer(workdir: str, step: int | None) -> str | None:
  """The tokenizer hash the checkpoint at `step` recorded in its metadata."""
  meta_dir = checkpoint_dir(workdir) / str(step) / "meta"
  if step is None or not meta_dir.exists():
    return None
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
    meta = checkpointer.restore(meta_dir)
  return dict(meta or {}).get("fingerprint", {}).get("tokenizer_sha256")


def read_workdir(workdir: str, step: int | str | None = None, config=None) -> SavedRun:
  """`workdir` at `step`: for a pretraining run a checkpoint step (default: the newest); for a
  fine-tuning run also 'best', its default where the run kept one. Reads config.json (unless the
  caller passes the `config` it read) and metadata only; a step typed as text ("100") is that
  step."""
  workdir = str(workdir).rstrip("/")
  if isinstance(step, str) and step.strip().isdigit():
    step = int(step)
  config = config or read_config(workdir)
  steps = checkpoint_steps(workdir)
  if config.finetune.task:
    step, source = _choose_fine_tuned(workdir, steps, step)
  elif step == "best":
    raise UsageError(
      f"{workdir} is a pretraining run, which keeps no best checkpoint (fine-tuning runs do); "
      "give a step number, or leave the step out for the newest."
    )
  else:
    step, source = choose_step(workdir, steps, step), "checkpoint"
  if source == "best":
    tree_dir, recorded = best_params_dir(workdir, step), max(steps, default=None)
  else:
    tree_dir, recorded = checkpoint_dir(workdir) / str(step) / "state", step
  file = tokenizer_file(workdir, config)
  sha256 = _recorded_tokenizer(workdir, recorded)
  return SavedRun(workdir, config, step, source, tree_dir, file, sha256, steps)


def load_tokenizer(run: SavedRun):
  """The run's tokenizer, checked against the hash its checkpoints recorded."""
  tokenizer = tokenizer_files.load(run.tokenizer_file)
  if run.tokenizer_sha256 and run.tokenizer_sha256 != tokenizer.sha256:
    raise UsageError(
      f"{tokenizer.path} is not the tokenizer {run.workdir} was trained with at step "
      f"{run.step} (its SHA-256 differs); restore the run's {os.path.basename(tokenizer.path)}."
    )
  return tokenizer


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


def restore_model(run: SavedRun, build=None):
  """The run's model at its step: `build()`'s (a fine-tuned model), by default the pretraining
  GPT or BERT of its config. Every failure is one UsageError naming the fix."""
  fix = "load another step or workdir."
  if build is None:
    model_cfg = config_lib.model_config(run.config)
    build = lambda: model_lib.build(model_cfg, 0)  # noqa: E731
    fix = (
      "the model settings in its workdir's config.json (e.g. model.num_layers, model.emb_dim) "
      "are not those the run trained with; restore the config.json the run wrote, or load "
      "another workdir."
    )
  try:
    return restore_params(run.tree_dir, build, fix)  # checks the saved tree first
  except saved_tree.TreeMismatch as e:
    raise UsageError(str(e)) from e
  except Exception as e:  # Orbax and TensorStore raise many types for missing or damaged files
    others = ", ".join(str(s) for s in run.steps if s != run.step) or "none"
    text = " ".join(str(e).split())[:300]
    raise UsageError(
      f"{run.tree_dir} cannot be read ({type(e).__name__}: {text}); load another step "
      f"(available: {others})."
    ) from e
