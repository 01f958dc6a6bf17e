"""`--plan`: per-device memory of a config from XLA's analysis of the train step, compiled for
this machine's mesh or, with `--topology`, for a TPU slice described by name (no TPU needed)."""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp

from sslm_jax import config as config_lib
from sslm_jax.cluster import topology as topology_lib
from sslm_jax.errors import SslmError
from sslm_jax.models import flops, kernel_costs
from sslm_jax.training import loop as train
from sslm_jax.training import optimizer as optim
from sslm_jax.training import sharding
from sslm_jax.training import state as train_state


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


def _lower(config, mesh):
  """(state spec, the train step lowered for `mesh` from shapes alone: nothing is allocated)."""
  rules = sharding.rules_from_config(config.mesh.rules)
  tx = optim.make(config.opt, config.num_train_steps)
  spec = train_state.state_spec(config_lib.model_config(config), config.seed, tx, mesh, rules)
  trainer = train.Trainer(config, mesh, spec, tx)
  batch = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=trainer.batch_sharding)
    for k, v in abstract_batch(config).items()
  }
  return spec, trainer.lower(spec.abstract, batch)


def _memory_fields(mesh, spec, analysis) -> dict:
  return {
    "mesh": dict(mesh.shape),
    "params_bytes": train_state.bytes_per_device(spec.abstract.params),
    "opt_state_bytes": train_state.bytes_per_device(spec.abstract.opt_state),
    "step_argument_bytes": analysis.argument_size_in_bytes,
    "step_temp_bytes": analysis.temp_size_in_bytes,
    "step_total_bytes": step_bytes(analysis),
  }


def memory_plan(config, mesh) -> dict:
  """Bytes per device: parameters, optimizer state, and the compiled step's total."""
  spec, lowered = _lower(config, mesh)
  plan = _memory_fields(mesh, spec, lowered.compile().memory_analysis())
  plan["device_limit_bytes"] = device_memory_limit(mesh.devices.flat[0])
  return plan


class PlanError(SslmError, RuntimeError):
  """XLA's counts cannot be turned into a step cost; the message says why."""


# XLA's TPU compiler turns matmuls whose operand is gathered or whose result is scattered over a
# large fsdp axis into windowed-einsum `while` loops (seen at fsdp=32 on v5p-64), and its cost
# analysis counts a loop body once. The cost copies are compiled without them: the same FLOPs,
# and the same HBM traffic up to the overlap of collectives that the loops buy.
LOOP_FREE_TPU_OPTIONS = {
  "xla_tpu_enable_windowed_einsum_for_all_gather": False,
  "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


def _xla_costs(compiled) -> tuple[float, float]:
  """(FLOPs, HBM bytes accessed) of one device's program, as XLA's cost analysis counts them."""
  costs = compiled.cost_analysis()
  costs = costs[0] if isinstance(costs, (list, tuple)) else costs  # a list in older JAX
  return float(costs.get("flops", 0.0)), float(costs.get("bytes accessed", 0.0))


def count_loops(compiled) -> int:
  """`while` instructions in a compiled program's HLO: 0 means XLA counted every op."""
  return len(re.findall(r"\bwhile\(", compiled.as_text()))


def step_costs(config, mesh, compiled) -> tuple[float, float, int]:
  """(FLOPs, HBM bytes) per device of one whole step as XLA counts them, and how many extra
  compiles that took. Pallas kernels are not in these counts (see models/kernel_costs.py).

  XLA's cost analysis counts the body of a loop once, so a step with loops (scanned layers,
  microbatches, windowed einsums, a chunked loss) under-reports. Then loop-free copies of the
  step are compiled, with unrolled layers, no accumulation and the loss in one chunk (the same
  FLOPs, a little fewer bytes than several chunks): up to 3 layers, one copy of the model
  itself; deeper, copies with 2 and 3 layers, and the step costs the first plus (layers - 2)
  times the difference. A middle layer is what repeats: the first and last fuse with the
  embedding and the head (a 1- and 2-layer difference overstated gpt_base's layer by 40% in
  bytes). A copy that still has a loop, or a layer that costs nothing, stops the plan rather
  than print a count known to be wrong.
  """
  if not count_loops(compiled):
    return (*_xla_costs(compiled), 0)
  layers = config.model.num_layers
  on_tpu = mesh.devices.flat[0].platform == "tpu"

  def loop_free(num_layers):
    copy = config.copy_and_resolve_references()
    copy.model.num_layers, copy.model.scan_layers = num_layers, False
    copy.opt.grad_accum_steps = 1
    copy.model.loss_chunk_len = 0  # the same FLOPs; chunks add ~2 embedding reads each
    program = _lower(copy, mesh)[1].compile(
      compiler_options=LOOP_FREE_TPU_OPTIONS if on_tpu else None
    )
    loops = count_loops(program)
    if loops:
      raise PlanError(
        f"the {num_layers}-layer cost copy of the step still has {loops} `while` loop(s) in "
        "its compiled HLO, whose bodies XLA's cost analysis counts once: the step's FLOPs and "
        "bytes cannot be counted for this mesh. Plan with --plan alone (memory) or on a mesh "
        "with a smaller fsdp axis."
      )
    return _xla_costs(program)

  if layers <= 3:
    return (*loop_free(layers), 1)
  two, three = loop_free(2), loop_free(3)
  layer = [b - a for a, b in zip(two, three, strict=True)]
  if min(layer) <= 0:
    raise PlanError(
      f"XLA counts a third layer as {layer[0]:.3e} FLOPs and {layer[1]:.3e} bytes (2 layers: "
      f"{two[0]:.3e}, {two[1]:.3e}; 3 layers: {three[0]:.3e}, {three[1]:.3e}): a layer cannot "
      "cost nothing, so these counts are wrong and no step time is printed."
    )
  flops_, bytes_ = (a + (layers - 2) * d for a, d in zip(two, layer, strict=True))
  return flops_, bytes_, 2


def _check_slices(mesh_cfg, topology) -> None:
  dcn = mesh_cfg.get("dcn_data", 1) * mesh_cfg.get("dcn_fsdp", 1)
  if dcn != topology.num_slices:
    raise sharding.MeshError(
      f"{topology.name} is {topology.num_slices} slice(s) but mesh.dcn_data*dcn_fsdp = {dcn}; "
      f"set --config.mesh.dcn_data={topology.num_slices} (or dcn_fsdp) so the mesh spans "
      "every slice over the data-center network, one slice per step along it."
    )


def _topology_mesh(config, topology, devices) -> jax.sharding.Mesh:
  """The mesh a run on the slice(s) would build, refused for the same reasons it would be."""
  _check_slices(config.mesh, topology)
  try:
    mesh = sharding.make_mesh(config.mesh, devices)
  except NotImplementedError as e:  # jax.make_mesh cannot lay these axis sizes onto the torus
    raise sharding.MeshError(
      f"mesh data={config.mesh.data}, fsdp={config.mesh.fsdp}, tensor={config.mesh.tensor} does "
      f"not map onto the {topology.libtpu_name} torus: each axis must be a product of torus "
      f"sides ({e})."
    ) from e
  rules = sharding.rules_from_config(config.mesh.rules)
  sharding.check_batch(mesh, config.batch_size, rules)
  sharding.check_heads(mesh, rules, config.model.num_heads, config.model.num_kv_heads)
  return mesh


def topology_plan(config, topology: topology_lib.Topology, costs: bool = True) -> dict:
  """Memory and (with `costs`) a roofline step time per chip, compiled for named TPU slice(s).

  'auto' fields are resolved as a run on the slice would resolve them (bf16, splash attention).
  """
  config = config_lib.resolved(config, "tpu")
  devices = topology_lib.devices(topology)
  mesh = _topology_mesh(config, topology, devices)
  start = time.perf_counter()
  spec, lowered = _lower(config, mesh)
  plan = dict(
    mesh=dict(mesh.shape),
    params_bytes=train_state.bytes_per_device(spec.abstract.params),
    opt_state_bytes=train_state.bytes_per_device(spec.abstract.opt_state),
    topology=topology.name,
    generation=topology.chip.generation,
    dtype=config.model.dtype,
    attention_impl=config.model.attention_impl,
    libtpu_name=topology.libtpu_name,
    num_slices=topology.num_slices,
    num_chips=len(devices),
    num_hosts=len({d.process_index for d in devices}),
    device_limit_bytes=topology.chip.hbm_bytes,
  )
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # XLA refuses a program larger than the chip's HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    plan.update(
      xla_refusal=str(e).strip().splitlines()[0], compile_seconds=time.perf_counter() - start
    )
    return plan
  compile_seconds = time.perf_counter() - start
  plan.update(
    _memory_fields(mesh, spec, compiled.memory_analysis()), compile_seconds=compile_seconds
  )
  if not costs:
    return plan
  flops_per_chip, bytes_per_chip, extra = step_costs(config, mesh, compiled)
  peak, peak_source = flops.table_peak(devices[0].device_kind, config.model.dtype)
  model_cfg = config_lib.model_config(config, platform="tpu")
  num_predictions = None if model_cfg.causal else config_lib.num_predictions(config)
  kernels = {"flops": 0.0, "bytes": 0.0}
  if model_cfg.attention_impl == "splash":
    kernels = kernel_costs.splash_step_costs(model_cfg, config.batch_size, config.data.seq_len)
  plan.update(
    hbm_bytes_per_s=topology.chip.hbm_bytes_per_s,
    peak_flops=peak,
    peak_source=peak_source,
    xla_flops=flops_per_chip,
    xla_bytes=bytes_per_chip,
    kernel_flops=kernels["flops"] / len(devices),
    kernel_bytes=kernels["bytes"] / len(devices),
    model_flops=flops.step_flops(
      model_cfg, config.batch_size, config.data.seq_len, num_predictions
    ),
    tokens_per_step=config.batch_size * config.data.seq_len,
    cost_compile_seconds=time.perf_counter() - start - compile_seconds,
    cost_compiles=extra,
  )
  return plan


def format_plan(plan: dict) -> str:
  unit = "chip" if "topology" in plan else "device"
  limit = plan["device_limit_bytes"]
  if "xla_refusal" in plan:
    fit = f"DOES NOT FIT in {_gib(limit).strip()} per {unit}"
  elif limit:
    verdict = "fits" if plan["step_total_bytes"] <= limit else "DOES NOT FIT"
    used = plan["step_total_bytes"] / limit
    fit = f"{verdict} in {_gib(limit).strip()} per {unit} ({used:.0%} used)"
  else:
    fit = "this device reports no memory limit (CPU): compare with your accelerator's memory"
  if "topology" in plan:
    slices = f"{plan['num_slices']} slices of " if plan["num_slices"] > 1 else ""
    header = [
      f"plan for {plan['topology']}: {plan['num_chips']} TPU {plan['generation']} chips on "
      f"{plan['num_hosts']} host{'s' if plan['num_hosts'] > 1 else ''} ({slices}libtpu "
      f"topology {plan['libtpu_name']}), "
      "compiled ahead of time",
      f"computing in {plan['dtype']} (float32 parameters and optimizer state), attention: "
      f"{plan['attention_impl']}",
      f"memory plan per chip on mesh {plan['mesh']}:",
    ]
  else:
    header = [f"memory plan per device on mesh {plan['mesh']}:"]
  lines = [
    *header,
    f"  parameters        {_gib(plan['params_bytes'])}",
    f"  optimizer state   {_gib(plan['opt_state_bytes'])}",
    _step_line(plan),
    f"  verdict: {fit}",
  ]
  if "xla_flops" in plan:
    lines += _roofline_lines(plan)
  elif "topology" in plan and "xla_refusal" not in plan:
    lines.append(f"compiled in {plan['compile_seconds']:.1f} s (step costs not asked for)")
  return "\n".join(lines)


def _step_line(plan: dict) -> str:
  if "xla_refusal" in plan:
    return f"  train step total  too large to compile: {plan['xla_refusal']}"
  return (
    f"  train step total  {_gib(plan['step_total_bytes'])}"
    f"  (arguments {_gib(plan['step_argument_bytes']).strip()},"
    f" temporaries {_gib(plan['step_temp_bytes']).strip()})"
  )


def roofline(plan: dict) -> dict:
  """Seconds per step if a chip ran at its peak FLOP/s or its HBM bandwidth, whichever binds.

  FLOPs and bytes are XLA's counts plus the Pallas kernels' (models/kernel_costs.py). The FLOPs are
  that or the model's share per chip (models/flops.py), whichever is larger. A ceiling, not a
  measurement: communication and imperfect overlap only slow a real step.
  """
  counted = max(plan["xla_flops"] + plan["kernel_flops"], plan["model_flops"] / plan["num_chips"])
  compute = counted / plan["peak_flops"]
  memory = (plan["xla_bytes"] + plan["kernel_bytes"]) / plan["hbm_bytes_per_s"]
  seconds = max(compute, memory)
  return {
    "compute_flops": counted,
    "hbm_bytes": plan["xla_bytes"] + plan["kernel_bytes"],
    "compute_seconds": compute,
    "memory_seconds": memory,
    "step_seconds": seconds,
    "bound": "compute" if compute >= memory else "HBM bandwidth",
    "tokens_per_second": plan["tokens_per_step"] / seconds,
    "mfu": plan["model_flops"] / (plan["num_chips"] * plan["peak_flops"] * seconds),
  }


def _roofline_lines(plan: dict) -> list[str]:
  r = roofline(plan)
  counted = {
    0: "every layer counted",
    1: "every layer counted in a loop-free copy",
    2: "layers counted from loop-free 2- and 3-layer copies",
  }[plan["cost_compiles"]]
  kernels = ""
  if plan["kernel_flops"]:
    kernels = (
      f" + Pallas kernels {plan['kernel_flops']:.3e} (from their formulas: XLA does not see them)"
    )
  return [
    f"step time per chip, roofline lower bound from XLA's cost analysis ({counted}):",
    f"  compute  {r['compute_flops']:.3e} FLOP  at {plan['peak_flops'] / 1e12:.0f} TFLOP/s"
    f" ({plan['peak_source']})  -> {r['compute_seconds'] * 1e3:8.2f} ms",
    f"           (XLA counts {plan['xla_flops']:.3e}{kernels}; the model"
    f" {plan['model_flops'] / plan['num_chips']:.3e} per chip; the larger is used)",
    f"  memory   {r['hbm_bytes']:.3e} bytes at {plan['hbm_bytes_per_s'] / 1e9:.0f} GB/s HBM"
    f"  -> {r['memory_seconds'] * 1e3:8.2f} ms"
    + (f" (Pallas kernels {plan['kernel_bytes']:.3e} of them)" if plan["kernel_bytes"] else ""),
    f"  bound    {r['step_seconds'] * 1e3:.2f} ms/step ({r['bound']}): at most"
    f" {r['tokens_per_second']:,.0f} tokens/s; model FLOPs {plan['model_flops']:.3e} per step"
    f" -> MFU ceiling {r['mfu']:.0%}",
    "  (a ceiling from XLA's counts, not a measured MFU: ICI/DCN communication and imperfect"
    " overlap only add to the step time)",
    f"compiled in {plan['compile_seconds']:.1f} s"
    + (
      f", plus {plan['cost_compile_seconds']:.1f} s for the cost copies"
      if plan["cost_compiles"]
      else ""
    ),
  ]
