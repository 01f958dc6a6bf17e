"""The outer training loop: compiled steps for a mesh (Trainer), fresh or resumed state, and
train_and_evaluate, which logs, evaluates and checkpoints on schedule. Consumes plain iterators of
numpy dicts (DataHooks); what it optimises is an Objective (training/hooks.py)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator

import jax
from absl import logging

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import checkpointer as checkpoint
from sslm_jax.cluster import join as cluster
from sslm_jax.cluster import preemption
from sslm_jax.models import flops
from sslm_jax.training import metrics, sharding
from sslm_jax.training import optimizer as optim
from sslm_jax.training import state as train_state
from sslm_jax.training.hooks import Batch, DataHooks, NonFiniteError, Objective, Watcher
from sslm_jax.training.state import StateSpec, TrainState
from sslm_jax.training.step import compiler_options, eval_step, train_step


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
  meta = ckpt.read_meta(latest)
  checkpoint.check_fingerprint(meta["fingerprint"], fingerprint, workdir, allow_changes)
  if meta.get("num_train_steps"):  # recorded since opt.schedule='wsd' made extending a run exact
    change = optim.schedule_change(
      config.opt, meta["num_train_steps"], config.num_train_steps, latest
    )
    if change:
      logging.warning("%s", change)
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


class _Loop:
  """What train_and_evaluate carries from step to step, and what it does at each step."""

  def __init__(self, config, workdir, trainer: Trainer, ckpt, writer, watcher, fingerprint, mfu):
    self.config, self.trainer, self.ckpt, self.writer = config, trainer, ckpt, writer
    self.watcher, self.fingerprint, self.mfu = watcher, fingerprint, mfu
    self.tokens_per_step = config.batch_size * config.data.seq_len
    self.last_good = ckpt.latest_step()
    self.record: dict = {}
    self.goodput, self.pending, self.compiled = metrics.Goodput(), None, False
    self.stopper = preemption.Preemption()
    self.profiler = metrics.StepProfiler(workdir, config.profile_start_step, config.profile_steps)

  def pull(self, step_and_metrics) -> dict:
    step, device_metrics = step_and_metrics
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    _check_finite(step, values, self.last_good)
    return values

  def train(self, step: int, state: TrainState, batches: Iterator[Batch]) -> TrainState:
    """One train step; the previous step's metrics are fetched (and checked) while it runs."""
    with self.goodput.timed("data"):
      batch = self.trainer.to_global(next(batches))
    if not self.compiled:
      with self.goodput.timed("compile"):
        logging.info("Compiled the train step in %.1f s", self.trainer.compile(state, batch))
      self.compiled = True
    self.profiler.before_step(step)
    state, step_metrics = self.trainer.train(state, batch)
    self.profiler.after_step(step, state)
    self.goodput.add_tokens(self.tokens_per_step)
    if self.pending is not None:
      self.pull(self.pending)  # step t-1's metrics, fetched while step t runs
    self.pending = (step, step_metrics)
    return state

  def log(self, step: int, params, values: dict, eval_batches, regular_log: bool) -> str | None:
    """Writes the step's record (with an eval when eval_batches is given); returns the
    watcher's message when the run should stop after this step."""
    eval_record, ended = {}, None
    if eval_batches:
      with self.goodput.timed("eval"):
        eval_record = self.trainer.evaluate(params, eval_batches())
        ended = self.watcher.after_eval(step, eval_record, params)
    times = self.goodput.lap()
    rate = times.pop("tokens_per_sec")
    if jax.process_count() > 1 and regular_log:
      times.update(cluster.slowest_data_wait(step, times["time_data_s"]))
    record = {k: values[k] for k in ("train_loss", "learning_rate", "grad_norm")}
    if "train_z_loss" in values:
      record["train_z_loss"] = values["train_z_loss"]
    record.update(tokens_per_sec=rate, mfu=self.mfu(rate), **eval_record, **times)
    self.writer.write(step, record)
    self.writer.progress(step, values["train_loss"], rate)
    self.record = record
    return ended

  def save(self, step: int, state: TrainState) -> None:
    with self.goodput.timed("checkpoint"):  # only the blocking part: the write is asynchronous
      meta = {"fingerprint": self.fingerprint, "step": step, **self.watcher.meta()}
      meta["num_train_steps"] = self.config.num_train_steps  # the schedule's end, for resuming
      self.ckpt.save(step, state, meta)
    self.last_good = step

  def run(self, state, batches, data: DataHooks, start: int, total: int) -> tuple[TrainState, bool]:
    """Steps start+1..total; returns the last state and whether the run stopped early."""
    config = self.config
    for step in range(start + 1, total + 1):
      state = self.train(step, state, batches)
      stop = self.stopper.should_stop(step)
      last = step == total
      regular_log = metrics.is_time(step, config.log_every_steps) or last  # on every process
      log_now = regular_log or stop  # a stop request may reach only some processes
      eval_now = (metrics.is_time(step, config.eval_every_steps) or last) and data.eval_batches
      save_now = metrics.is_time(step, config.checkpoint_every_steps) or last or stop
      if not (log_now or eval_now or save_now):
        continue
      values, self.pending = self.pull(self.pending), None
      ended = None
      if log_now or eval_now:
        eval_batches = data.eval_batches if eval_now else None
        ended = self.log(step, state.params, values, eval_batches, regular_log)
        save_now = save_now or bool(ended)
      # Saved after its record is written: a checkpoint never exists without its metrics line.
      if save_now:
        self.save(step, state)
      if ended:
        logging.warning("%s", ended)
        return state, True
      if stop:
        logging.warning(
          "Stopped at step %d (%s) after saving its checkpoint; rerun to resume.",
          step,
          self.stopper.requested_by,
        )
        return state, True
    return state, False

  def close(self) -> None:
    self.stopper.close()
    self.profiler.close()
    try:
      self.ckpt.wait()  # raises CheckpointError if the last asynchronous save failed
    finally:
      self.ckpt.close()
      self.writer.close()


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
  mfu = _mfu_of_rate(config)
  if start >= total:
    logging.info("Checkpoint step %d >= num_train_steps=%d: nothing to train.", start, total)
  if start == 0 and data.eval_batches and total > 0:
    writer.write(0, trainer.evaluate(state.params, data.eval_batches()))  # the untrained baseline
  batches = data.train_batches(start)
  loop = _Loop(config, workdir, trainer, ckpt, writer, watcher, fingerprint, mfu)
  try:
    state, stopped = loop.run(state, batches, data, start, total)
    if not stopped and data.on_end is not None and start < total:
      ckpt.wait()
      data.on_end(spec.merge, state)
  finally:
    loop.close()
  return loop.record
