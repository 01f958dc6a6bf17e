"""finetune.freeze_encoder and freeze_encoder_steps: the head trains, the encoder does not.

Always frozen (`freeze_encoder`), the step differentiates the head alone: the encoder's parameters
sit behind stop_gradient, so no backward pass runs through the encoder and its gradient is zero.
Frozen for the first N steps (`freeze_encoder_steps`), the gradient is computed but zeroed before
the optimizer (so it takes no part in gradient clipping) and the update after it (weight decay):
either way the encoder's parameters stay bit-identical while frozen.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx


def _in_encoder(path) -> bool:
  return str(getattr(path[0], "key", path[0])) == "encoder"


def _zero_encoder(tree, keep):
  return jax.tree_util.tree_map_with_path(
    lambda p, x: jax.numpy.where(keep, x, jax.numpy.zeros_like(x)) if _in_encoder(p) else x, tree
  )


def freeze_encoder(
  tx: optax.GradientTransformation, until_step: int | None
) -> optax.GradientTransformation:
  """`tx` with the encoder frozen while fewer than `until_step` updates were made (None:
  always): its gradients are zeroed before `tx` (so they take no part in gradient clipping) and
  its updates after (weight decay), so its parameters stay bit-identical; the head trains from the
  first step. The state is laid out as optax.chain(tx, a step counter)'s."""

  def init(params):
    return tx.init(params), optax.ScaleByScheduleState(count=jax.numpy.zeros([], jax.numpy.int32))

  def update(grads, state, params=None):
    inner, counter = state
    keep = jax.numpy.asarray(False if until_step is None else counter.count >= until_step)
    updates, inner = tx.update(_zero_encoder(grads, keep), inner, params)
    counter = optax.ScaleByScheduleState(count=counter.count + 1)
    return _zero_encoder(updates, keep), (inner, counter)

  return optax.GradientTransformation(init, update)


def without_encoder_gradients(model):
  """The same model, its encoder's parameters behind stop_gradient: the step differentiates the
  head alone (no backward pass through the encoder at all)."""
  graphdef, state = nnx.split(model)
  state = jax.tree_util.tree_map_with_path(
    lambda p, x: jax.lax.stop_gradient(x) if _in_encoder(p) else x, state
  )
  return nnx.merge(graphdef, state)
