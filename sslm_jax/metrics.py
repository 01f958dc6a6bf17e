"""Host-side metrics: metrics.jsonl, TensorBoard event files, and a live progress line."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time

import tqdm
from absl import logging
from etils import epath
from tensorboardX import SummaryWriter


def is_time(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def _truncate_jsonl(path: epath.Path, last_step: int) -> None:
  """Drop records past `last_step`, left by a run that died after its newest checkpoint."""
  if not path.exists():
    return
  kept = [
    line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step
  ]
  path.write_text("".join(line + "\n" for line in kept))


class Writer:
  """Writes metrics on the primary process only; other processes get a silent writer."""

  def __init__(self, workdir: str, *, start_step: int, total_steps: int, enabled: bool):
    self.enabled = enabled
    self._jsonl = epath.Path(workdir) / "metrics.jsonl"
    self._tb = None
    self._bar = None
    if not enabled:
      return
    # A fresh start (step 0) rewrites everything, its baseline eval included.
    _truncate_jsonl(self._jsonl, start_step if start_step > 0 else -1)
    self._tb = SummaryWriter(logdir=str(epath.Path(workdir) / "tensorboard"), purge_step=start_step)
    self._bar = tqdm.tqdm(
      total=total_steps,
      initial=start_step,
      desc="train",
      unit="step",
      dynamic_ncols=True,
      disable=not sys.stderr.isatty(),
    )

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: _plain(v) for k, v in scalars.items()}}
    with self._jsonl.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if name != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, step)
    self._tb.flush()
    logging.info("step %d: %s", step, _summary(record))

  def progress(self, step: int, loss: float, tokens_per_sec: float) -> None:
    if not self.enabled or self._bar.disable:
      return
    self._bar.n = step
    self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=True)

  def close(self) -> None:
    if self.enabled:
      self._bar.close()
      self._tb.close()


def _plain(v):
  if v is None:
    return None
  v = float(v) if not isinstance(v, (int, str)) else v
  return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def _summary(record: dict) -> str:
  return " ".join(
    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if k != "step"
  )


class Goodput:
  """Where the wall time of a log interval went, and training throughput over it.

  `timed(bucket)` charges a block to compile, data, eval or checkpoint; the rest of the interval
  is stepping. tokens_per_sec counts only data wait and stepping, so periodic work does not
  dilute it.
  """

  BUCKETS = ("compile", "data", "eval", "checkpoint")

  def __init__(self):
    self._start, self._tokens = time.perf_counter(), 0
    self._spent = dict.fromkeys(self.BUCKETS, 0.0)

  def add_tokens(self, tokens: int) -> None:
    self._tokens += tokens

  @contextlib.contextmanager
  def timed(self, bucket: str):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._spent[bucket] += time.perf_counter() - t0

  def lap(self) -> dict:
    """Seconds per bucket and tokens_per_sec since the last lap; starts a new interval."""
    total = time.perf_counter() - self._start
    stepping = total - sum(self._spent.values())
    training = max(stepping + self._spent["data"], 1e-9)
    out = {f"time_{k}_s": v for k, v in self._spent.items()}
    out.update(time_step_s=stepping, tokens_per_sec=self._tokens / training)
    self.__init__()
    return out
