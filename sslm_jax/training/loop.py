"""Pure jitted train/eval steps and the outer loop. Consumes plain iterators of numpy dicts."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.checkpoints import hf
from sslm_jax.cluster import join as cluster
from sslm_jax.cluster import preemption
from sslm_jax.errors import SslmError
from sslm_jax.models import flops
from sslm_jax.training import losses as objectives
from sslm_jax.training import metrics, sharding
from sslm_jax.training import optimizer as optim
from sslm_jax.training import state as train_state
from sslm_jax.training.state import StateSpec, TrainState

Batch = dict[str, np.ndarray]


class NonFiniteError(SslmError, FloatingPointError):
  """Training produced a NaN/inf loss or gradient norm."""


@dataclasses.dataclass
class DataHooks:
  """What the loop needs from the input side (kept abstract so the core never imports data/)."""

  train_batches: Callable[[int], Iterator[Batch]]  # start_step -> this process's batches
  eval_batches: Callable[[], Iterable[Batch]] | None = None
  on_end: Callable[[Callable, TrainState], None] | None = None  # e.g. print samples


class Objective:
  """What the loop builds, optimises and evaluates: by default the pretraining LM objective.

  finetune.py subclasses it for task heads; the loop, checkpoints and resume stay the same.
  """

  def __init__(self, config):
    self.config = config
    self.model_cfg = config_lib.model_config(config)

  build = None  # seed -> model; None: the pretraining model of model_cfg

  def optimizer(self) -> optax.GradientTransformation:
    return optim.make(self.config.opt, self.config.num_train_steps)

  def initial_params(self) -> dict | None:
    """Parameters (a pure dict of host arrays) that replace the random ones at step 0."""
    if not self.config.init_from_hf:
      return None
    logging.info("Starting from the Hugging Face weights in %s", self.config.init_from_hf)
    return hf.load_params(self.config.init_from_hf, self.config)

  def metric_sums(self, model, batch, key=None) -> dict:
    """{"loss_sum", "count", ...} of one batch; the loss is loss_sum / count."""
    return objectives.metric_sums(model, batch, key)

  def eval_outputs(self, model, batch) -> dict:
    """What one eval batch returns to the host (here its metric sums)."""
    return objectives.metric_sums(model, batch)

  def summarize(self, outputs: list[dict]) -> dict:
    """The eval record from every eval batch's host outputs."""
    totals: dict[str, float] = {}
    for sums in outputs:
      for k, v in sums.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return eval_summary(totals, self.model_cfg.causal) if totals else {}


class Watcher:
  """Sees each eval after step 0; may stop the run early and keep its own state in the
  checkpoints' metadata (finetune/keep_best.py does for fine-tuning). This default watches
  nothing."""

  def resume(self, meta: dict | None) -> str | None:
    """Takes the resumed checkpoint's metadata (None: a fresh start); returns a message when
    the run already ended there, and then nothing is trained."""
    return None

  def after_eval(self, step: int, record: dict, params) -> str | None:
    """Returns a message when the run should stop once this step's checkpoint is saved."""
    return None

  def meta(self) -> dict:
    return {}


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


class Trainer:
  """Compiled steps for one mesh, and the evaluation loop."""

  def __init__(self, config, mesh, spec: StateSpec, tx, objective: Objective | None = None):
    self.config, self.mesh, self.spec = config, mesh, spec
    self.objective = objective or Objective(config)
    self.rules = sharding.rules_from_config(config.mesh.rules)
    self.batch_sharding = sharding.batch_sharding(mesh, self.rules)
    self.causal = config.objective == "causal_lm"
    self.memory_analysis = None  # XLA's memory analysis of the train step, once compiled
    step = functools.partial(
      train_step,
      spec=spec,
      tx=tx,
      lr_schedule=optim.schedule(config.opt, config.num_train_steps),
      seed=config.seed,
      dropout=config.model.dropout_rate > 0,
      accum_steps=config.opt.grad_accum_steps,
      sums_fn=self.objective.metric_sums,
    )
    self._train = jax.jit(
      step,
      in_shardings=(spec.shardings, self.batch_sharding),
      out_shardings=(spec.shardings, None),
      donate_argnums=0,
    )
    self._eval = jax.jit(
      functools.partial(eval_step, spec=spec, outputs_fn=self.objective.eval_outputs),
      in_shardings=(spec.shardings.params, self.batch_sharding),
      # Replicated, so every process reads whole outputs (a fine-tuning eval returns per-row
      # predictions, which would otherwise stay split over the processes holding the rows).
      out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
    )

  def to_global(self, batch: Batch) -> dict:
    return sharding.global_batch(batch, self.batch_sharding)

  def train(self, state, batch):
    with sharding.activate(self.mesh, self.rules):
      return self._train(state, batch)

  def lower(self, state, batch):
    """The train step lowered for these (real or abstract) arguments."""
    with sharding.activate(self.mesh, self.rules):
      return self._train.lower(state, batch)

  def compile(self, state, batch) -> float:
    """Compile the train step ahead of the loop; returns seconds spent."""
    t0 = time.perf_counter()
    options = compiler_options(self.config.compiler_options)
    try:
      self._train = self.lower(state, batch).compile(compiler_options=options or None)
    except jax.errors.JaxRuntimeError as e:
      if not options or "option" not in str(e):
        raise
      raise config_lib.ConfigError(
        f"compiler_options={self.config.compiler_options!r} was refused by XLA ({e}). "
        "Fix or remove --config.compiler_options."
      ) from e
    self.memory_analysis = self._train.memory_analysis()
    return time.perf_counter() - t0

  def evaluate(self, params, batches: Iterable[Batch] | dict[str, Iterable[Batch]]) -> dict:
    """Eval metrics over `batches`; for named sets (a data mixture's sources), over all of them
    together and, as `eval_loss/NAME` etc., over each."""
    named = batches if isinstance(batches, dict) else {"": batches}
    with sharding.activate(self.mesh, self.rules):
      outputs = {
        name: [jax.device_get(self._eval(params, self.to_global(b))) for b in sets]
        for name, sets in named.items()
      }
    record = self.objective.summarize([o for sets in outputs.values() for o in sets])
    for name, sets in outputs.items():
      if name:
        record.update({f"{k}/{name}": v for k, v in self.objective.summarize(sets).items()})
    return record


def _check_finite(step: int, values: dict, last_good: int | None) -> None:
  bad = [k for k in ("train_loss", "grad_norm") if not math.isfinite(values[k])]
  if bad:
    where = f"step {last_good}" if last_good is not None else "none yet"
    raise NonFiniteError(
      f"non-finite {' and '.join(bad)} at step {step} "
      f"({', '.join(f'{k}={values[k]}' for k in bad)}). Last good checkpoint: {where}. "
      "Lower opt.learning_rate or raise opt.warmup_steps, then rerun to resume from it."
    )


def init_or_restore(
  config, mesh, workdir: str, fingerprint: dict, allow_changes=frozenset(), objective=None
):
  """(state, spec, tx, checkpointer): the newest checkpoint if the workdir has one, else fresh."""
  rules = sharding.rules_from_config(config.mesh.rules)
  objective = objective or Objective(config)
  model_cfg, build = objective.model_cfg, objective.build
  tx = objective.optimizer()
  ckpt = checkpoint.Checkpointer(
    f"{workdir}/checkpoints", keep=config.keep_checkpoints, keep_every=config.keep_every_steps
  )
  latest = ckpt.latest_step()
  if latest is None:
    initial = objective.initial_params()
    state, spec = train_state.create(model_cfg, config.seed, tx, mesh, rules, initial, build)
    return state, spec, tx, ckpt
  if config.init_from_hf:
    logging.info("init_from_hf=%s ignored: resuming from a checkpoint.", config.init_from_hf)
  saved = ckpt.read_meta(latest)["fingerprint"]
  checkpoint.check_fingerprint(saved, fingerprint, workdir, allow_changes)
  spec = train_state.state_spec(model_cfg, config.seed, tx, mesh, rules, build)
  state = ckpt.restore(latest, spec.abstract)
  logging.info("Resuming from the checkpoint at step %d in %s", latest, workdir)
  return state, spec, tx, ckpt


def _mfu_of_rate(config) -> Callable[[float], float | None]:
  """tokens/s -> model FLOPs utilization (None where the hardware peak is unknown)."""
  model_cfg = config_lib.model_config(config)
  per_token = flops.model_flops_per_token(
    model_cfg, None if model_cfg.causal else config_lib.num_predictions(config)
  )
  # A small GEMM on CPU (~0.1 s) is enough for a live MFU; the bench measures more carefully.
  peak, source, units = flops.peak_and_units(config_lib.compute_dtype(config), gemm_size=1024)
  logging.info("MFU peak: %s", source)
  return lambda rate: None if peak is None else rate * per_token / (peak * units)


def train_and_evaluate(
  config,
  workdir: str,
  mesh,
  data: DataHooks,
  fingerprint: dict,
  allow_changes=frozenset(),
  objective: Objective | None = None,
  watcher: Watcher | None = None,
) -> dict:
  """Train to `num_train_steps`, resuming from `workdir`; returns the last logged record."""
  objective, watcher = objective or Objective(config), watcher or Watcher()
  state, spec, tx, ckpt = init_or_restore(
    config, mesh, workdir, fingerprint, allow_changes, objective
  )
  last_good = ckpt.latest_step()
  ended = watcher.resume(None if last_good is None else ckpt.read_meta(last_good))
  if ended:
    logging.warning("%s", ended)
    ckpt.close()
    return {}
  trainer = Trainer(config, mesh, spec, tx, objective)
  start, total = int(jax.device_get(state.step)), config.num_train_steps
  primary = jax.process_index() == 0
  writer = metrics.Writer(workdir, start_step=start, total_steps=total, enabled=primary)
  tokens_per_step = config.batch_size * config.data.seq_len
  mfu = _mfu_of_rate(config)
  record: dict = {}
  if start >= total:
    logging.info("Checkpoint step %d >= num_train_steps=%d: nothing to train.", start, total)
  if start == 0 and data.eval_batches and total > 0:
    writer.write(0, trainer.evaluate(state.params, data.eval_batches()))  # the untrained baseline
  batches = data.train_batches(start)
  goodput, pending, compiled = metrics.Goodput(), None, False
  stopper = preemption.Preemption()
  profiler = metrics.StepProfiler(workdir, config.profile_start_step, config.profile_steps)

  def pull(step_and_metrics) -> dict:
    step, device_metrics = step_and_metrics
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    _check_finite(step, values, last_good)
    return values

  try:
    for step in range(start + 1, total + 1):
      with goodput.timed("data"):
        batch = trainer.to_global(next(batches))
      if not compiled:
        with goodput.timed("compile"):
          logging.info("Compiled the train step in %.1f s", trainer.compile(state, batch))
        compiled = True
      profiler.before_step(step)
      state, step_metrics = trainer.train(state, batch)
      profiler.after_step(step, state)
      goodput.add_tokens(tokens_per_step)
      if pending is not None:
        pull(pending)  # step t-1's metrics, fetched while step t runs
      pending = (step, step_metrics)
      stop = stopper.should_stop(step)
      last = step == total
      regular_log = metrics.is_time(step, config.log_every_steps) or last  # on every process
      log_now = regular_log or stop  # a stop request may reach only some processes
      eval_now = (metrics.is_time(step, config.eval_every_steps) or last) and data.eval_batches
      save_now = metrics.is_time(step, config.checkpoint_every_steps) or last or stop
      if not (log_now or eval_now or save_now):
        continue
      values, pending = pull(pending), None
      if log_now or eval_now:
        eval_record = {}
        if eval_now:
          with goodput.timed("eval"):
            eval_record = trainer.evaluate(state.params, data.eval_batches())
            ended = watcher.after_eval(step, eval_record, state.params)
          save_now = save_now or bool(ended)
        times = goodput.lap()
        rate = times.pop("tokens_per_sec")
        if jax.process_count() > 1 and regular_log:
          times.update(cluster.slowest_data_wait(step, times["time_data_s"]))
        record = {k: values[k] for k in ("train_loss", "learning_rate", "grad_norm")}
        record.update(tokens_per_sec=rate, mfu=mfu(rate), **eval_record, **times)
        writer.write(step, record)
        writer.progress(step, values["train_loss"], rate)
      # Saved after its record is written: a checkpoint never exists without its metrics line.
      if save_now:
        with goodput.timed("checkpoint"):  # only the blocking part: the write is asynchronous
          ckpt.save(step, state, {"fingerprint": fingerprint, "step": step, **watcher.meta()})
        last_good = step
      if ended:
        logging.warning("%s", ended)
        return record
      if stop:
        logging.warning(
          "Stopped at step %d (%s) after saving its checkpoint; rerun to resume.",
          step,
          stopper.requested_by,
        )
        return record
    if data.on_end is not None and start < total:
      ckpt.wait()
      data.on_end(spec.merge, state)
  finally:
    stopper.close()
    profiler.close()
    try:
      ckpt.wait()  # raises CheckpointError if the last asynchronous save failed
    finally:
      ckpt.close()
      writer.close()
  return record
