"""Optax: global-norm clipping + AdamW with a decay mask (or Muon for the weight matrices,
training/muon.py), warmup then cosine/linear decay."""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

from sslm_jax.training import muon

# Weight decay by parameter role (the last name of its path), as in GPT-2 and BERT: matrices
# decay; biases and LayerNorm parameters never do; embedding tables only when asked. A new
# parameter name must be placed here, so no parameter is decayed (or spared) by accident.
_DECAYS_BY_ROLE = {"kernel": True, "bias": False, "scale": False, "decoder_bias": False}
_EMBEDDING_ROLE = "embedding"


def warmup_steps(opt, num_train_steps: int) -> int:
  """opt.warmup_fraction of the run (BERT fine-tuning's 10%) when set, else opt.warmup_steps."""
  if opt.warmup_fraction:
    return round(opt.warmup_fraction * num_train_steps)
  return opt.warmup_steps


def _decay(opt, peak: float, steps: int) -> optax.Schedule:
  """opt.decay's shape over `steps`, from `peak` to final_lr_fraction of it."""
  if opt.decay == "cosine":
    return optax.cosine_decay_schedule(peak, steps, alpha=opt.final_lr_fraction)
  if opt.decay == "linear":
    return optax.linear_schedule(peak, peak * opt.final_lr_fraction, steps)
  return optax.constant_schedule(peak)


def decay_start(opt, num_train_steps: int) -> int:
  """The first step of the decay: right after the warmup, or for 'wsd' the start of the last
  decay_fraction of the run."""
  warmup = min(warmup_steps(opt, num_train_steps), num_train_steps)
  if opt.schedule != "wsd":
    return warmup
  return max(warmup, num_train_steps - round(opt.decay_fraction * num_train_steps))


def schedule(opt, num_train_steps: int, peak: float | None = None) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then decay to `final_lr_fraction` of it.

  The warmup is `warmup_fraction` of the run when that is set, else `warmup_steps`; a warmup
  longer than the run is cut to the run (config.validate warns about it). With
  opt.schedule='wsd' (warmup-stable-decay) the rate stays at its peak until the last
  opt.decay_fraction of the run: a longer run has the same rates up to the shorter one's decay,
  so a run can be extended from a checkpoint of its stable phase. `peak` replaces
  opt.learning_rate (Muon's own rate).
  """
  peak = opt.learning_rate if peak is None else peak
  warmup = min(warmup_steps(opt, num_train_steps), num_train_steps)
  start = decay_start(opt, num_train_steps)
  decay = _decay(opt, peak, max(1, num_train_steps - start))
  if start == warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])
  stable = optax.constant_schedule(peak)
  return optax.join_schedules(
    [optax.linear_schedule(0.0, peak, warmup), stable, decay], [warmup, start]
  )


def schedule_change(opt, saved_steps: int, num_train_steps: int, step: int) -> str | None:
  """Why resuming at `step` a run scheduled for `saved_steps` with `num_train_steps` changes its
  learning rates (None when it does not): steps already taken would have had other rates, or
  the old schedule had already begun to decay."""
  if saved_steps == num_train_steps or step <= 0:
    return None
  old, new = schedule(opt, saved_steps), schedule(opt, num_train_steps)
  taken = np.arange(step)
  changed = np.flatnonzero(~np.isclose(old(taken), new(taken), rtol=1e-6, atol=0.0))
  notes = []
  if changed.size:
    first = int(changed[0])
    notes.append(
      f"the steps already taken had other learning rates under it (step {first}: "
      f"{float(old(first)):.6g} then, {float(new(first)):.6g} now)"
    )
  start = decay_start(opt, saved_steps)
  if opt.schedule == "wsd" and step > start:
    notes.append(f"step {step} lies in the old schedule's decay phase (from step {start})")
  if not notes:
    return None
  return (
    f"Resuming at step {step} a run scheduled for num_train_steps={saved_steps} with "
    f"num_train_steps={num_train_steps} changes its learning-rate schedule: "
    + "; ".join(notes)
    + ". Extend a run from a checkpoint before its decay (opt.schedule='wsd') to keep them."
  )


def _decays(path, decay_embeddings: bool) -> bool:
  role = str(getattr(path[-1], "key", path[-1]))
  if role == _EMBEDDING_ROLE:
    return decay_embeddings
  if role not in _DECAYS_BY_ROLE:
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    raise ValueError(
      f"parameter {name}: no weight-decay rule for {role!r} in training/optimizer.py."
    )
  return _DECAYS_BY_ROLE[role]


def decay_mask(params: nnx.State, decay_embeddings: bool = False) -> nnx.State:
  """True for weight matrices (kernels); False for biases, LayerNorm and, by default, embeddings."""
  return jax.tree_util.tree_map_with_path(
    lambda path, v: v.replace(_decays(path, decay_embeddings)),
    params,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def _masked_decay_mask(params, decay_embeddings: bool):
  """decay_mask of a tree in which optax.partition has masked out another part's leaves."""
  return jax.tree_util.tree_map_with_path(
    lambda path, v: v if muon.is_masked(v) else v.replace(_decays(path, decay_embeddings)),
    params,
    is_leaf=lambda x: isinstance(x, (nnx.Variable, optax.MaskedNode)),
  )


def make(opt, num_train_steps: int) -> optax.GradientTransformation:
  """Clipping, then AdamW (opt.name='adamw') or Muon on the matrices and AdamW on the rest."""
  mask = decay_mask if opt.name == "adamw" else _masked_decay_mask
  adamw = optax.adamw(
    schedule(opt, num_train_steps),
    b1=opt.b1,
    b2=opt.b2,
    eps=opt.eps,
    weight_decay=opt.weight_decay,
    mask=lambda p: mask(p, opt.decay_embeddings),
  )
  if opt.name == "muon":
    peak = opt.muon_learning_rate or opt.learning_rate
    adamw = muon.make(opt, schedule(opt, num_train_steps, peak), adamw)
  return optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), adamw)
