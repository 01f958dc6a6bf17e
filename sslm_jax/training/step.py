"""The pure jitted pieces of training: one train step (with gradient accumulation), one eval
step, the eval record from summed metrics, and the XLA options the train step is compiled with."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from sslm_jax.training import losses as objectives
from sslm_jax.training.state import StateSpec, TrainState


def _summed_grads(params, batch, *, spec: StateSpec, key, sums_fn=objectives.metric_sums):
  """Gradient of the summed loss, and the metric sums, for one (micro)batch."""

  def loss_sum(params):
    sums = sums_fn(spec.merge(params), batch, key)
    return sums["loss_sum"], sums

  (_, sums), grads = jax.value_and_grad(loss_sum, has_aux=True)(params)
  return grads, sums


def _accumulated_grads(
  params, batch, *, spec: StateSpec, key, accum_steps: int, sums_fn=objectives.metric_sums
):
  """Summed gradients over `accum_steps` microbatches, run one after another in a scan.

  Microbatch j takes rows j, j+k, j+2k, ... so every data-parallel shard feeds every microbatch.
  """

  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1)

  def body(carry, inputs):
    index, micro = inputs
    micro_key = None if key is None else jax.random.fold_in(key, index)
    grads, sums = _summed_grads(params, micro, spec=spec, key=micro_key, sums_fn=sums_fn)
    return jax.tree.map(jnp.add, carry, (grads, sums)), None

  zeros = jax.tree.map(
    jnp.zeros_like,
    jax.eval_shape(lambda: _summed_grads(params, batch, spec=spec, key=key, sums_fn=sums_fn)),
  )
  micro_batches = (jnp.arange(accum_steps), jax.tree.map(split, batch))
  (grads, sums), _ = jax.lax.scan(body, zeros, micro_batches)
  return grads, sums


def train_step(
  state: TrainState,
  batch,
  *,
  spec: StateSpec,
  tx,
  lr_schedule,
  seed: int,
  dropout,
  accum_steps=1,
  sums_fn=objectives.metric_sums,
):
  """One AdamW update over the mean loss of the batch's predicted tokens.

  Dropout randomness is fold_in(seed, step): it replays after a resume. With accum_steps > 1 the
  batch is processed as that many microbatches and the update equals the whole batch's.
  `sums_fn(model, batch, key)` gives the loss sums (an Objective's metric_sums).
  """
  key = jax.random.fold_in(jax.random.key(seed), state.step) if dropout else None
  if accum_steps > 1:
    grads, sums = _accumulated_grads(
      state.params, batch, spec=spec, key=key, accum_steps=accum_steps, sums_fn=sums_fn
    )
  else:
    grads, sums = _summed_grads(state.params, batch, spec=spec, key=key, sums_fn=sums_fn)
  count = jnp.maximum(sums["count"], 1.0)
  grads = jax.tree.map(lambda g: g / count, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
  step_metrics = {
    "train_loss": sums["loss_sum"] / count,
    "grad_norm": optax.tree.norm(grads),
    "learning_rate": lr_schedule(state.step),
    "predicted_tokens": sums["count"],
  }
  if "z_loss_sum" in sums:  # opt.z_loss: train_loss stays the cross-entropy, as eval_loss is
    step_metrics["train_loss"] = (sums["loss_sum"] - sums["z_loss_sum"]) / count
    step_metrics["train_z_loss"] = sums["z_loss_sum"] / count
  return new_state, step_metrics


def eval_step(params, batch, *, spec: StateSpec, outputs_fn=objectives.metric_sums):
  return outputs_fn(spec.merge(params), batch)


def eval_summary(sums: dict, causal: bool) -> dict:
  count = max(sums["count"], 1.0)
  loss = sums["loss_sum"] / count
  out = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
  if causal and sums.get("byte_sum", 0) > 0:
    out["eval_bits_per_byte"] = sums["byte_loss_sum"] / sums["byte_sum"] / math.log(2)
  if not causal:
    out["eval_mlm_accuracy"] = sums["correct_sum"] / count
  return out


def _option_value(text: str) -> bool | int | str:
  """XLA wants real booleans and integers, not their spellings."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  try:
    return int(text)
  except ValueError:
    return text


def compiler_options(setting: str) -> dict[str, bool | int | str]:
  """'name=value,...' -> XLA compile options; a value may hold commas (a=X,Y,b=Z)."""
  options: dict[str, str] = {}
  name = None
  for item in (i.strip() for i in setting.split(",") if i.strip()):
    if "=" in item:
      name, value = (part.strip() for part in item.split("=", 1))
      options[name] = value
    elif name is not None:  # a repeated field's next value
      options[name] += "," + item
  return {name: _option_value(value) for name, value in options.items()}
