"""Orbax checkpoints of the train state plus a JSON record of what produced them."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class CheckpointMismatch(ValueError):
  """The workdir holds a checkpoint of a different run; the message names each difference."""


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be read; the message says how to recover without losing others."""


# Fields that fix the shapes of the saved arrays: a checkpoint can never resume with others.
SHAPE_FIELDS = (
  "objective",
  "data.seq_len",
  "data.vocab_size",
  "model.num_layers",
  "model.num_heads",
  "model.emb_dim",
  "model.mlp_dim",
  "model.vocab_multiple",
  "model.param_dtype",
)
# Fields that change what the run computes; --allow_config_change=NAME,... (or all) accepts them.
RUN_FIELDS = (
  "seed",
  "data.source",
  "data.text_files",
  "data.eval_text_files",
  "data.tfds_name",
  "data.tfds_text_key",
  "data.mlm_probability",
  "model.dropout_rate",
  "opt.learning_rate",
  "opt.warmup_steps",
  "opt.decay",
  "opt.final_lr_fraction",
  "opt.b1",
  "opt.b2",
  "opt.eps",
  "opt.weight_decay",
  "opt.decay_embeddings",
  "opt.grad_clip_norm",
)


def fingerprint(config, tokenizer_sha256: str | None = None) -> dict:
  """What must match for a checkpoint to be resumed by this config."""
  fp = {name: config[name] for name in SHAPE_FIELDS + RUN_FIELDS}
  if tokenizer_sha256:
    fp["tokenizer_sha256"] = tokenizer_sha256
  return fp


def check_fingerprint(saved: dict, current: dict, where: str, allowed=frozenset()) -> None:
  """Refuse to resume when a recorded field differs, unless it is allowed and not a shape."""
  differing = [k for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]
  refused = [k for k in differing if k in SHAPE_FIELDS or not ({k, "all"} & set(allowed))]
  if refused:
    lines = [f"{k}: checkpoint has {saved[k]!r}, config asks for {current[k]!r}" for k in refused]
    shapes = any(k in SHAPE_FIELDS for k in refused)
    fix = (
      "Use a new --workdir, or change the config back to match."
      if shapes
      else "Change the config back, or pass --allow_config_change="
      + ",".join(refused)
      + " if the change is intended."
    )
    raise CheckpointMismatch(
      f"{where} holds a checkpoint of a different run:\n  " + "\n  ".join(lines) + "\n" + fix
    )


def _excerpt(error: Exception) -> str:
  """One line of an error from deep inside Orbax or TensorStore."""
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text[:300]}"


class Checkpointer:
  """Asynchronous, atomic Orbax saves of {state, meta}.

  Keeps the newest `keep` steps plus every `keep_every`-th. A save is written to a temporary
  directory and renamed when complete, so one killed half way never becomes the newest.
  """

  def __init__(self, directory: str, keep: int, keep_every: int = 0):
    # Orbax needs absolute paths; remote ones (gs://...) already are.
    self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
    unfinished = (
      sorted(p.name for p in self.directory.glob("*") if "orbax-checkpoint-tmp" in p.name)
      if self.directory.exists()
      else []
    )
    if unfinished:
      logging.warning(
        "Ignoring unfinished checkpoint save(s) %s in %s (the run was stopped while saving).",
        unfinished,
        self.directory,
      )
    # Uncompressed: zstd saved 8% of the bytes of a GPT-2-small state, and its CPU time competes
    # with training while the asynchronous write runs (on 2 CPU cores a save cost 1.0 step with
    # it, 0.65 without).
    state_handler = ocp.PyTreeCheckpointHandler(use_compression=False)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.PyTreeSave, state_handler)
    registry.add("state", ocp.args.PyTreeRestore, state_handler)
    registry.add("meta", ocp.args.JsonSave)
    registry.add("meta", ocp.args.JsonRestore)
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_every or None,
        create=True,
        enable_async_checkpointing=True,
        enable_background_delete=True,  # old steps are removed off the training thread
        # The manager never reuses a step number and writes through a temporary directory, so
        # the per-save existence check (a thread round trip on the training thread) is skipped.
        file_options=ocp.options.FileOptions(skip_sync_file_validations=True),
      ),
      handler_registry=registry,
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    try:
      self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
      )
    except Exception as e:  # a full disk or lost permissions, raised here or by an earlier save
      raise self._save_failed(e) from e

  def _save_failed(self, error: Exception) -> CheckpointError:
    steps = self._manager.all_steps(read=True)
    newest = f"step {max(steps)}" if steps else "none"
    return CheckpointError(
      f"saving a checkpoint in {self.directory} failed ({_excerpt(error)}). The newest "
      f"complete checkpoint ({newest}) is intact; free disk "
      "space or fix permissions there, then rerun to resume from it."
    )

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore(self, step: int, abstract_state):
    """The state at `step`, laid out as `abstract_state`'s shardings say (any mesh)."""
    try:
      restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
      restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args)
        ),
      )
    except Exception as e:  # Orbax/TensorStore raise many types for missing or damaged files
      others = [s for s in self._manager.all_steps() if s != step]
      fallback = f"resume from step {max(others)}" if others else "start from scratch"
      raise CheckpointError(
        f"checkpoint {self.directory / str(step)} cannot be read ({_excerpt(e)}). "
        f"Move it aside (mv {self.directory / str(step)} "
        f"{self.directory / str(step)}.broken) and rerun to {fallback}."
      ) from e
    return restored["state"]

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # the asynchronous part of a save failed
      raise self._save_failed(e) from e

  def close(self) -> None:
    try:
      self._manager.close()
    except Exception as e:  # a failed save was already reported by wait(); don't mask it
      logging.warning("Closing the checkpoint manager: %s", _excerpt(e))


def saved_fingerprint(directory: str) -> tuple[int, dict] | None:
  """(step, fingerprint) of the newest checkpoint in `directory`, or None if there is none."""
  if not epath.Path(directory).exists():
    return None
  ckpt = Checkpointer(directory, keep=1_000_000)
  try:
    step = ckpt.latest_step()
    if step is None:
      return None
    return step, ckpt.read_meta(step).get("fingerprint", {})
  finally:
    ckpt.close()
