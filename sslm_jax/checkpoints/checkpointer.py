"""Orbax checkpoints of the train state plus a JSON record of what produced them."""

from __future__ import annotations

import json
import os
import re

import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from sslm_jax import config as config_lib
from sslm_jax.errors import SslmError


class CheckpointMismatch(SslmError, ValueError):
  """The workdir holds a checkpoint of a different run; the message names each difference."""


class CheckpointError(SslmError, RuntimeError):
  """A checkpoint that cannot be read; the message says how to recover without losing others."""


# Fields that fix the shapes of the saved arrays: a checkpoint can never resume with others.
SHAPE_FIELDS = (
  "objective",
  "positions",  # rows of the position table (config.positions: model.max_positions or seq_len)
  "data.vocab_size",
  "model.num_layers",
  "model.num_heads",
  "model.emb_dim",
  "model.mlp_dim",
  "model.vocab_multiple",
  "model.param_dtype",
  "opt.name",  # AdamW and Muon keep differently shaped optimizer states
  "model.family",  # resolved (config.family): 'auto' is recorded as the family it meant
  "model.num_kv_heads",
  "model.qk_norm",
  "model.tie_embeddings",
)
# Recorded keys that fix array shapes beside the config fields: a fine-tuning head has one output
# per label.
SHAPE_KEYS = ("finetune_labels",)
# Fields that change what the run computes or which examples a step sees;
# --allow_config_change=NAME,... (or all) accepts them.
RUN_FIELDS = (
  "seed",
  "batch_size",
  "data.seq_len",  # any length up to the position table's
  "data.source",
  "data.text_files",
  "data.eval_text_files",
  "data.text_key",
  "data.eval_fraction",
  "data.tfds_name",
  "data.tfds_text_key",
  "data.tfds_train_split",
  "data.tfds_eval_split",
  "data.tfds_data_dir",
  "data.mixture",  # sources and weights
  "data.mlm_probability",
  "model.dropout_rate",
  "model.gelu",
  "model.rope_base",
  "model.rope_local_base",
  "model.global_every",
  "model.sliding_window",
  "model.norm_epsilon",
  "opt.learning_rate",
  "opt.warmup_steps",
  "opt.warmup_fraction",
  "opt.decay",
  "opt.schedule",
  "opt.decay_fraction",
  "opt.z_loss",
  "opt.muon_learning_rate",
  "opt.final_lr_fraction",
  "opt.b1",
  "opt.b2",
  "opt.eps",
  "opt.weight_decay",
  "opt.decay_embeddings",
  "opt.grad_clip_norm",
)
# Facts about the data recorded beside the config fields, and allowed to change by these names:
# the tokenizer's hash, the files (names and sizes) or tfds dataset version, the version of the
# data order, and (compared with the workdir's data cache, never recorded) what the cache holds.
DATA_KEYS = ("tokenizer_sha256", "data_listing", "data_order", "data_cache")
CHANGEABLE = RUN_FIELDS + DATA_KEYS
# Recorded keys (besides data.* fields) the data cache is built from: when one of them differs, a
# rebuilt cache is expected; otherwise a cache that would be rebuilt is itself a difference.
_CACHE_INPUTS = ("objective", "tokenizer_sha256", "data_listing")
# What a checkpoint written before a key was recorded implicitly had.
_BEFORE_RECORDED = {
  "data_order": 1,
  "model.num_kv_heads": 0,
  "model.qk_norm": False,
  "model.tie_embeddings": True,
  "model.rope_base": 10000.0,
  "model.rope_local_base": 10000.0,
  "model.global_every": 1,
  "model.sliding_window": 0,
  "model.norm_epsilon": 0.0,
}
_NOTES = {
  "data_order": "order 1 is NumPy's generator, whose stream may change with NumPy; order 2 is "
  "sslm_jax's own keyed permutation. Resuming reorders the rest of the data",
  "data_cache": "the cached token rows would be rebuilt from different inputs",
  "tokenizer_sha256": "the workdir's tokenizer.model, or data.tokenizer_path; restore the file, "
  "or allow the change to train one anew (identical when the data and its settings are)",
}


def fingerprint(config, data_record: dict | None = None) -> dict:
  """What must match for a checkpoint to be resumed by this config.

  `data_record` (tokenizer_sha256, data_listing, data_order) comes from the data pipeline.
  """
  fp = {name: config[name] for name in SHAPE_FIELDS + RUN_FIELDS if name != "positions"}
  if "data.mixture" in fp:
    fp["data.mixture"] = config.data.mixture.to_dict()
  fp["positions"] = config_lib.positions(config)
  fp["model.family"] = config_lib.family(config)
  fp.update(data_record or {})
  return fp


def _listing_changes(old: dict, new: dict, limit: int = 8) -> list[str]:
  """Files added, removed or resized between two data listings, group by group."""
  changes = []
  for group in sorted(set(old) | set(new)):
    before, after = old.get(group), new.get(group)
    if before == after:
      continue
    if not (isinstance(before, list) and isinstance(after, list)):
      changes.append(f"{group}: {before!r} -> {after!r}")
      continue
    sizes_before, sizes_after = dict(before), dict(after)
    found = {
      "added": [n for n in sizes_after if n not in sizes_before],
      "removed": [n for n in sizes_before if n not in sizes_after],
      "resized": [
        f"{n} ({sizes_before[n]} -> {sizes_after[n]} bytes)"
        for n in sizes_after
        if n in sizes_before and sizes_before[n] != sizes_after[n]
      ],
    }
    for what, names in found.items():
      if names:
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        where = "" if group == "files" else f"{group} "  # 'train'/'eval' with eval_text_files
        changes.append(f"{where}files {what}: {', '.join(names[:limit])}{more}")
  return changes or ["(the listing differs in order only)"]


def _difference(key: str, old, new) -> str:
  if key == "data_listing" and isinstance(old, dict) and isinstance(new, dict):
    return "data_listing: the data files changed since the checkpoint was written:\n    " + (
      "\n    ".join(_listing_changes(old, new))
    )
  if key == "data_cache" and isinstance(old, dict) and isinstance(new, dict):
    parts = [
      f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
      for k in sorted(set(old) | set(new))
      if old.get(k) != new.get(k)
    ]
    return f"data_cache: {_NOTES[key]} ({'; '.join(parts)})"
  if key.startswith("finetune_files.") and key.count(".") >= 2:  # .SPLIT.PATH: a file's digest
    _, split, path = key.split(".", 2)
    what = "is new" if old is None else "is gone" if new is None else "changed"
    return f"{split} file {path} {what} since the checkpoint was written"
  if isinstance(old, dict) and isinstance(new, dict):  # e.g. a fine-tuning run's finetune.*
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "\n  ".join(_difference(f"{key}.{k}", old.get(k), new.get(k)) for k in keys)
  note = f" ({_NOTES[key]})" if key in _NOTES else ""
  return f"{key}: checkpoint has {old!r}, config asks for {new!r}{note}"


def check_fingerprint(
  saved: dict, current: dict, where: str, allowed=frozenset(), cache=None
) -> list[str]:
  """Refuse to resume when a recorded field differs, unless it is allowed and not a shape.

  `cache` is (what the workdir's data cache was built from, what it would be rebuilt from): a
  rebuild that no recorded difference explains is refused as `data_cache`. Returns the keys the
  checkpoint does not record (it predates them), which therefore could not be compared.
  """
  saved = {**_BEFORE_RECORDED, **saved}
  if "positions" not in saved and "data.seq_len" in saved:  # written when seq_len sized the table
    saved["positions"] = saved["data.seq_len"]
  if "model.family" not in saved and "objective" in saved:  # written before the rotary families
    saved["model.family"] = "gpt2" if saved["objective"] == "causal_lm" else "bert"
  saved = _absolute_init_from(saved)
  differing = [k for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]
  explained = any(k.startswith("data.") or k in _CACHE_INPUTS for k in differing)
  if cache is not None and cache[0] != cache[1] and not explained:
    saved, current = {**saved, "data_cache": cache[0]}, {**current, "data_cache": cache[1]}
    differing.append("data_cache")
  fixed = SHAPE_FIELDS + SHAPE_KEYS
  refused = [k for k in differing if k in fixed or not ({k, "all"} & set(allowed))]
  if refused:
    lines = [_difference(k, saved[k], current[k]) for k in refused]
    # Recorded keys without a field name of their own (a fine-tuning run's task and data) are
    # allowed only by 'all'.
    names = list(dict.fromkeys(k if k in CHANGEABLE else "all" for k in refused))
    fix = (
      "Use a new --workdir, or change the config back to match."
      if any(k in fixed for k in refused)
      else "Change the config (or the data) back, or pass --allow_config_change="
      + ("all" if "all" in names else ",".join(names))
      + " if the change is intended."
    )
    raise CheckpointMismatch(
      f"{where} holds a checkpoint of a different run:\n  " + "\n  ".join(lines) + "\n" + fix
    )
  return sorted(set(current) - set(saved))


def _absolute_init_from(saved: dict) -> dict:
  """Runs record finetune.init_from as an absolute path; older ones recorded it as typed, which
  is read relative to this directory."""
  finetune = saved.get("finetune")
  if not isinstance(finetune, dict):
    return saved
  typed = finetune.get("init_from")
  if not typed or "://" in typed or os.path.isabs(typed):
    return saved
  return {**saved, "finetune": {**finetune, "init_from": os.path.abspath(typed)}}


def _excerpt(error: Exception, limit: int = 300) -> str:
  """One line of an error from deep inside Orbax or TensorStore, without object reprs."""
  text = re.sub(r"<bound method [^>]*>|<[\w.]+ object at 0x[0-9a-f]+>", "", str(error))
  text = " ".join(text.split())
  return f"{type(error).__name__}: {text[:limit]}"


def _read_failure(error: Exception) -> str:
  """The cause of a failed restore in a few words."""
  text = str(error)
  if isinstance(error, FileNotFoundError) or "NOT_FOUND" in text or "No such file" in text:
    return "files of it are missing"
  return "its files are damaged or unreadable"


def _on_gcs(path) -> bool:
  return str(path).startswith("gs://")


def move_command(source, target) -> str:
  """The shell command that moves a checkpoint directory aside on its filesystem."""
  if _on_gcs(source):
    return f"gcloud storage mv {source} {target}"
  return f"mv {source} {target}"


def unfinished_saves(directory: epath.Path) -> list[str]:
  """Step directories whose save never completed, as Orbax judges them on this filesystem.

  Locally a save is written under a temporary name and renamed when complete; on gs:// it is
  written in place and completed by a commit_success.txt file, so there an unfinished save has
  the step's own name and no such file.
  """
  if not directory.exists():
    return []
  return sorted(p.get().name for p in ocp.step.all_temporary_paths(directory))


class Checkpointer:
  """Asynchronous, atomic Orbax saves of {state, meta}.

  Keeps the newest `keep` steps plus every `keep_every`-th. A save killed half way never becomes
  the newest: it is written under a temporary name and renamed when complete, or on gs:// marked
  complete by a commit file written last.
  """

  def __init__(self, directory: str, keep: int, keep_every: int = 0):
    # Orbax needs absolute paths; remote ones (gs://...) already are.
    self.directory = epath.Path(directory if "://" in directory else os.path.abspath(directory))
    unfinished = unfinished_saves(self.directory)
    if unfinished:
      logging.warning(
        "Ignoring unfinished checkpoint save(s) %s in %s (the run was stopped while saving); "
        "resuming from the newest finished one. A step saved again replaces its unfinished save.",
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
      path = self.directory / str(step)
      raise CheckpointError(
        f"the checkpoint at step {step} cannot be read: {_read_failure(e)}. Move it aside "
        f"first, `{move_command(path, f'{path}.broken')}`, then rerun to {fallback}. "
        f"(Detail: {_excerpt(e, 160)})"
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


def check_resumable(workdir: str, current: dict, allowed=frozenset(), cache=None) -> None:
  """Refuse (CheckpointMismatch) when the newest checkpoint of `workdir` is of another run; call
  it before writing anything, so a refused run leaves the workdir as it was. `cache`: a function
  returning check_fingerprint's `cache`, called only when there is a checkpoint. Recorded keys
  the checkpoint predates are logged and resumed as they were."""
  saved = saved_fingerprint(f"{workdir}/checkpoints")
  check_kind(workdir, fine_tuning="finetune" in current, saved=saved)
  if saved is None:
    return
  step, recorded = saved
  requests = cache() if cache is not None else None
  unrecorded = check_fingerprint(recorded, current, workdir, allowed, requests)
  if unrecorded:
    logging.warning(
      "The checkpoint at step %d predates recording %s, so they could not be compared; "
      "resume with them as they were.",
      step,
      ", ".join(unrecorded),
    )


def _workdir_task(workdir: str, saved: tuple[int, dict] | None) -> str | None:
  """The finetune.task of the run that wrote `workdir` ('' for pretraining), from its
  config.json or else its newest checkpoint; None when neither says (a new workdir)."""
  path = epath.Path(workdir) / "config.json"
  if path.exists():
    try:
      written = json.loads(path.read_text())
    except ValueError:
      written = None
    if isinstance(written, dict) and "objective" in written:  # ours, not a Hugging Face one
      return (written.get("finetune") or {}).get("task") or ""
  if saved is not None:
    return (saved[1].get("finetune") or {}).get("task") or ""
  return None


def check_kind(workdir: str, fine_tuning: bool, saved=None) -> None:
  """Refuse (CheckpointMismatch) a fine-tuning run in a pretraining run's workdir, or the
  reverse, before anything is written: its config.json and checkpoints would be overwritten or
  left unreadable."""
  task = _workdir_task(workdir, saved)
  if task is None or bool(task) == fine_tuning:
    return
  if fine_tuning:
    raise CheckpointMismatch(
      f"{workdir} is the workdir of a pretraining run, and fine-tuning in it would overwrite "
      "its config.json and leave its checkpoints unreadable; fine-tune in a new --workdir with "
      f"--config.finetune.init_from={workdir}."
    )
  raise CheckpointMismatch(
    f"{workdir} is the workdir of a fine-tuning run (finetune.task={task!r}), and pretraining "
    "in it would overwrite its config.json and leave its checkpoints unreadable; pretrain in a "
    "new --workdir."
  )


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
