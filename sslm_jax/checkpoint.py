"""Orbax checkpoints of the train state plus a JSON record of what produced them."""

from __future__ import annotations

import os

import orbax.checkpoint as ocp
from etils import epath


class CheckpointMismatch(ValueError):
  """The workdir holds a checkpoint of a different run; the message names each difference."""


def fingerprint(config, model_cfg, tokenizer_sha256: str | None = None) -> dict:
  """What must match for a checkpoint to be resumed by this config."""
  fp = {
    "objective": config.objective,
    "data.seq_len": config.data.seq_len,
    "data.vocab_size": config.data.vocab_size,
    "model.vocab_size_padded": model_cfg.vocab_size,
    "model.num_layers": model_cfg.num_layers,
    "model.num_heads": model_cfg.num_heads,
    "model.emb_dim": model_cfg.emb_dim,
    "model.mlp_dim": model_cfg.mlp_dim,
    "model.param_dtype": model_cfg.param_dtype,
  }
  if tokenizer_sha256:
    fp["tokenizer_sha256"] = tokenizer_sha256
  return fp


def check_fingerprint(saved: dict, current: dict, where: str) -> None:
  """Refuse to resume when any shared field differs; name every difference."""
  diffs = [
    f"{k}: checkpoint has {saved[k]!r}, config asks for {current[k]!r}"
    for k in sorted(set(saved) & set(current))
    if saved[k] != current[k]
  ]
  if diffs:
    raise CheckpointMismatch(
      f"{where} holds a checkpoint of a different run:\n  "
      + "\n  ".join(diffs)
      + "\nUse a new --workdir, or change the config back to match."
    )


class Checkpointer:
  """Asynchronous Orbax saves of {state, meta}; keeps the newest `keep` steps."""

  def __init__(self, directory: str, keep: int):
    # Orbax needs absolute paths; remote ones (gs://...) already are.
    self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True
      ),
      item_names=("state", "meta"),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def read_meta(self, step: int) -> dict:
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def restore(self, step: int, abstract_state):
    """The state at `step`, laid out as `abstract_state`'s shardings say (any mesh)."""
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    )
    return restored["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


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
