"""The seams a caller plugs into the training loop: the Objective it optimises, the DataHooks that
feed it, the Watcher that may stop it, and the error it raises on a non-finite loss."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import optax
from absl import logging

from sslm_jax import config as config_lib
from sslm_jax.checkpoints import hf
from sslm_jax.errors import SslmError
from sslm_jax.training import losses as objectives
from sslm_jax.training import optimizer as optim
from sslm_jax.training.state import TrainState
from sslm_jax.training.step import eval_summary

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

  finetune/loop.py subclasses it for task heads; the loop, checkpoints and resume stay the same.
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
    """{"loss_sum", "count", ...} of one batch; the loss is loss_sum / count. With opt.z_loss,
    loss_sum includes the z-loss and z_loss_sum is that part (evaluation leaves it out)."""
    return objectives.metric_sums(model, batch, key, z_loss=self.config.opt.z_loss)

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
