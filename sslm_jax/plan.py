"""`--plan`: per-device memory of a config on this mesh, from XLA's analysis of the train step."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sslm_jax import config as config_lib
from sslm_jax import optim, sharding, train, train_state


def abstract_batch(config, local: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of one global batch as the input pipeline produces it."""
  b, t = config.batch_size, config.data.seq_len
  i32, f32 = jnp.int32, jnp.float32
  shapes = {"inputs": ((b, t), i32), "positions": ((b, t), i32), "segment_ids": ((b, t), i32)}
  if config.objective == "causal_lm":
    shapes.update(targets=((b, t), i32), weights=((b, t), f32))
  else:
    p = config_lib.num_predictions(config)
    shapes.update(
      masked_positions=((b, p), i32), masked_targets=((b, p), i32), masked_weights=((b, p), f32)
    )
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def _gib(n: float) -> str:
  return f"{n / 2**30:8.3f} GiB"


def device_memory_limit(device) -> int | None:
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return (stats or {}).get("bytes_limit")


def step_bytes(analysis) -> int:
  """Device bytes a compiled step needs: inputs + outputs (less donated aliases) + scratch."""
  return (
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    - analysis.alias_size_in_bytes
    + analysis.temp_size_in_bytes
  )


def memory_plan(config, mesh) -> dict:
  """Bytes per device: parameters, optimizer state, and the compiled step's total."""
  rules = sharding.rules_from_config(config.mesh.rules)
  tx = optim.make(config.opt, config.num_train_steps)
  spec = train_state.state_spec(config_lib.model_config(config), config.seed, tx, mesh, rules)
  trainer = train.Trainer(config, mesh, spec, tx)
  batch = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
    for k, v in abstract_batch(config).items()
  }
  analysis = trainer.lower(spec.abstract, batch).compile().memory_analysis()
  return {
    "mesh": dict(mesh.shape),
    "params_bytes": train_state.bytes_per_device(spec.abstract.params),
    "opt_state_bytes": train_state.bytes_per_device(spec.abstract.opt_state),
    "step_argument_bytes": analysis.argument_size_in_bytes,
    "step_temp_bytes": analysis.temp_size_in_bytes,
    "step_total_bytes": step_bytes(analysis),
    "device_limit_bytes": device_memory_limit(mesh.devices.flat[0]),
  }


def format_plan(plan: dict) -> str:
  limit = plan["device_limit_bytes"]
  if limit:
    verdict = "fits" if plan["step_total_bytes"] <= limit else "DOES NOT FIT"
    fit = f"{verdict} in {_gib(limit).strip()} per device"
  else:
    fit = "this device reports no memory limit (CPU): compare with your accelerator's memory"
  return "\n".join(
    [
      f"memory plan per device on mesh {plan['mesh']}:",
      f"  parameters        {_gib(plan['params_bytes'])}",
      f"  optimizer state   {_gib(plan['opt_state_bytes'])}",
      f"  train step total  {_gib(plan['step_total_bytes'])}"
      f"  (arguments {_gib(plan['step_argument_bytes']).strip()},"
      f" temporaries {_gib(plan['step_temp_bytes']).strip()})",
      f"  verdict: {fit}",
    ]
  )
