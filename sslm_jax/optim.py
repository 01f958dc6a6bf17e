"""Optax: global-norm clipping + AdamW with a decay mask, warmup then cosine/linear decay."""

from __future__ import annotations

import jax
import optax
from flax import nnx

# Parameters whose logical names include one of these are embedding tables.
_EMBEDDING_AXES = {"vocab", "position", "token_type"}


def schedule(opt, num_train_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then decay to `final_lr_fraction` of it."""
  peak, warmup = opt.learning_rate, opt.warmup_steps
  end = peak * opt.final_lr_fraction
  decay_steps = max(1, num_train_steps - warmup)
  if opt.decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.final_lr_fraction)
  elif opt.decay == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params: nnx.State, decay_embeddings: bool = False) -> nnx.State:
  """True for matrices (kernels); False for biases, LayerNorm scales and, by default, embeddings."""

  def decays(v: nnx.Variable) -> bool:
    names = set(v.get_metadata().get("out_sharding") or ())
    is_embedding = bool(names & _EMBEDDING_AXES)
    # Stacked layers add a leading `layers` axis; count only the per-layer rank.
    rank = v.ndim - ("layers" in names)
    return rank >= 2 and (decay_embeddings or not is_embedding)

  return jax.tree.map(
    lambda v: v.replace(decays(v)), params, is_leaf=lambda x: isinstance(x, nnx.Variable)
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
