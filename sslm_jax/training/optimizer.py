"""Optax: global-norm clipping + AdamW with a decay mask, warmup then cosine/linear decay."""

from __future__ import annotations

import jax
import optax
from flax import nnx

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


def schedule(opt, num_train_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then decay to `final_lr_fraction` of it.

  The warmup is `warmup_fraction` of the run when that is set, else `warmup_steps`; a warmup
  longer than the run is cut to the run (config.validate warns about it).
  """
  peak, warmup = opt.learning_rate, min(warmup_steps(opt, num_train_steps), num_train_steps)
  end = peak * opt.final_lr_fraction
  decay_steps = max(1, num_train_steps - warmup)
  if opt.decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.final_lr_fraction)
  elif opt.decay == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


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


def make(opt, num_train_steps: int) -> optax.GradientTransformation:
  return optax.chain(
    optax.clip_by_global_norm(opt.grad_clip_norm),
    optax.adamw(
      schedule(opt, num_train_steps),
      b1=opt.b1,
      b2=opt.b2,
      eps=opt.eps,
      weight_decay=opt.weight_decay,
      mask=lambda p: decay_mask(p, opt.decay_embeddings),
    ),
  )
