"""Host-side metrics: metrics.jsonl, TensorBoard event files, and a live progress line."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time

import jax
import tqdm
from absl import logging
from etils import epath

from sslm_jax.errors import SslmError


def _import_tensorboardx():
  """tensorboardX imports torch when it is installed (only to accept torch tensors, which we
  never pass): 1.7 s and a second framework in every run. Hide torch while it loads."""
  if "torch" in sys.modules:
    import tensorboardX  # costly (see above), imported when a writer starts
  else:
    sys.modules["torch"] = None  # `import torch` raises ImportError while this stands
    try:
      import tensorboardX  # costly (see above), imported when a writer starts
    finally:
      del sys.modules["torch"]
  return tensorboardX


_tbx = _import_tensorboardx()
SummaryWriter, record_writer = _tbx.SummaryWriter, _tbx.record_writer

# Object stores that etils.epath reaches (gs:// through tf.io.gfile, or gcsfs without TensorFlow).
_OBJECT_STORES = ("gs", "s3", "az")


def is_time(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


class StepProfiler:
  """A jax.profiler trace of steps [first, first + count) in workdir/tensorboard (its Profile
  tab, with tensorboard-plugin-profile installed). Each process traces its own devices."""

  def __init__(self, workdir: str, first: int, count: int):
    self.logdir, self.first, self.last = f"{workdir}/tensorboard", first, first + count - 1
    self.active = False

  def before_step(self, step: int) -> None:
    if step == self.first and self.last >= self.first:
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after_step(self, step: int, state) -> None:
    if self.active and step == self.last:
      jax.block_until_ready(state)  # the traced steps' device work, not just their dispatch
      self.close()
      logging.info("Profiled steps %d-%d into %s/plugins/profile", self.first, step, self.logdir)

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def _on_object_store(path: str) -> bool:
  return "://" in path and path.split("://", 1)[0] in _OBJECT_STORES


class _ObjectFile:
  """A growing file on an object store, which cannot append to an object.

  The content stays in memory and each flush uploads all of it again as one object, so readers
  see the previous version or the new one, never a part. It is written through etils.epath like
  the rest of the workdir: no storage client of its own, the checkpoints' credentials.
  """

  def __init__(self, path: str, initial: bytes = b""):
    self._path = epath.Path(path)
    self._data = bytearray(initial)
    self._dirty = True

  def write(self, data: bytes) -> None:
    self._data += data
    self._dirty = True

  def flush(self) -> None:
    if self._dirty:
      self._path.write_bytes(bytes(self._data))
      self._dirty = False

  def close(self) -> None:
    self.flush()


class _ObjectStoreEventFiles:
  """tensorboardX's record-writer factory for object stores: event files as _ObjectFile.

  tensorboardX's own gs:// writer needs google-cloud-storage and its s3:// one boto3; these write
  wherever the checkpoints can.
  """

  def open(self, path: str) -> _ObjectFile:
    return _ObjectFile(path)

  def directory_check(self, path: str) -> None:
    del path  # objects need no parent directories


for _scheme in _OBJECT_STORES:
  record_writer.register_writer_factory(_scheme, _ObjectStoreEventFiles())


def _kept_records(path: epath.Path, last_step: int) -> str:
  """The lines of metrics.jsonl up to `last_step`; later ones were logged after the checkpoint."""
  if not path.exists():
    return ""
  kept = [
    line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step
  ]
  return "".join(line + "\n" for line in kept)


def _open_jsonl(path: epath.Path, kept: str):
  """metrics.jsonl rewritten to `kept`, open for appending bytes (in memory on object stores)."""
  if _on_object_store(str(path)):
    f = _ObjectFile(str(path), kept.encode())
    f.flush()
    return f
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(kept)
  return path.open("ab")


class MetricsError(SslmError, RuntimeError):
  """Metrics could not be written; the message names the step, the workdir and the fix."""


class Writer:
  """Writes metrics on the primary process only; other processes get a silent writer."""

  def __init__(self, workdir: str, *, start_step: int, total_steps: int, enabled: bool):
    self.enabled = enabled
    self._workdir = workdir
    self._jsonl = None
    self._tb = None
    self._bar = None
    if not enabled:
      return
    # A resumed run keeps what was logged up to its checkpoint and writes from the step after it;
    # a fresh start (step 0) rewrites everything, its baseline eval included.
    last_kept = start_step if start_step > 0 else -1
    jsonl = epath.Path(workdir) / "metrics.jsonl"
    self._jsonl = _open_jsonl(jsonl, _kept_records(jsonl, last_kept))
    # TensorBoard hides older events at or after the purge step.
    self._tb = SummaryWriter(
      logdir=str(epath.Path(workdir) / "tensorboard"), purge_step=last_kept + 1
    )
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
    try:
      self._jsonl.write((json.dumps(record) + "\n").encode())
      self._jsonl.flush()
      for name, value in record.items():
        if name != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(name, value, step)
      self._tb.flush()
    except OSError as e:  # a full disk or lost permissions
      raise MetricsError(
        f"writing the metrics of step {step} in {self._workdir} failed ({e}); free disk space "
        "or fix permissions there, then rerun to resume from the newest checkpoint."
      ) from e
    logging.info("step %d: %s", step, _summary(record))

  def progress(self, step: int, loss: float, tokens_per_sec: float) -> None:
    if not self.enabled or self._bar.disable:
      return
    self._bar.n = step
    self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=True)

  def close(self) -> None:
    if self.enabled:
      self._bar.close()
      try:
        self._tb.close()
        self._jsonl.close()
      except OSError as e:  # the write that failed was reported already; don't mask it
        logging.warning("Closing the metrics files: %s", e)


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
