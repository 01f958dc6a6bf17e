"""The workdir on an object store: metrics.jsonl, TensorBoard events and the write probe on gs://.

gs:// is served by an in-memory fake that behaves like a bucket where it matters here: an object
is written whole and cannot be appended to. etils.epath reaches it through fsspec, the route it
takes for gs:// wherever TensorFlow is absent (here forced with EPATH_USE_TF=false). No network.
"""

import importlib
import inspect
import json
import os
import struct
import subprocess
import sys
import time

import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from sslm_jax.cluster import lease
from sslm_jax.training import metrics

GS_WORKDIR = "gs://bucket/run"


class ObjectStore(MemoryFileSystem):
  """gs:// in memory; like a real bucket, objects cannot be appended to or updated in place."""

  protocol = ("gs", "gcs")
  store = {}
  pseudo_dirs = [""]

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode or "+" in mode:
      raise NotImplementedError(f"objects cannot be appended to ({mode=}): {path}")
    return super()._open(path, mode, **kwargs)


class Forbidden(Exception):
  """A storage client's refusal: like tf.errors.PermissionDeniedError, not an OSError."""


class ReadOnlyStore(ObjectStore):
  store = {}
  pseudo_dirs = [""]

  def _open(self, path, mode="rb", **kwargs):
    if "r" not in mode:
      raise Forbidden(f"403 Forbidden: no write access to {path}")
    return super()._open(path, mode, **kwargs)


def _forget_epath_choices():
  """etils caches whether gs:// goes through TensorFlow, and the fsspec filesystem it uses."""
  importlib.import_module("etils.epath.gpath")._is_tf_installed.cache_clear()
  backend = importlib.import_module("etils.epath.backend")
  backend._FileSystemSpecBackend._get_filesystem.cache_clear()


def _serve_gs(monkeypatch, store_cls):
  registry = importlib.import_module("fsspec.registry")  # `fsspec.registry` is a mapping
  monkeypatch.setenv("EPATH_USE_TF", "false")
  for protocol in store_cls.protocol:
    monkeypatch.setitem(registry._registry, protocol, store_cls)
  store_cls.store.clear()
  _forget_epath_choices()


@pytest.fixture
def bucket(monkeypatch):
  _serve_gs(monkeypatch, ObjectStore)
  yield ObjectStore.store
  _forget_epath_choices()


@pytest.fixture
def read_only_bucket(monkeypatch):
  _serve_gs(monkeypatch, ReadOnlyStore)
  yield ReadOnlyStore.store
  _forget_epath_choices()


def _read_events(path: epath.Path) -> list:
  """Events of one file, checking the TFRecord framing (length, masked CRC32C of both parts)."""
  data, events, pos = path.read_bytes(), [], 0
  while pos < len(data):
    header = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    payload = data[pos + 12 : pos + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
    assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload), path
    events.append(event_pb2.Event.FromString(payload))
    pos += 16 + length
  assert pos == len(data), f"{path} ends inside a record"
  return events


def _tensorboard_scalars(logdir: epath.Path) -> dict:
  """{tag: {step: value}} as TensorBoard shows it: event files in name order, where a session
  START at step s hides the earlier files' events at steps >= s."""
  scalars = {}
  for path in sorted(logdir.iterdir()):
    for event in _read_events(path):
      if event.session_log.status == event_pb2.SessionLog.START:
        for by_step in scalars.values():
          for step in [s for s in by_step if s >= event.step]:
            del by_step[step]
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = value.simple_value
  return scalars


def _records(workdir: str) -> list[dict]:
  text = (epath.Path(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path):
  if request.param == "gs":
    request.getfixturevalue("bucket")
    return GS_WORKDIR
  return str(tmp_path / "run")


def test_writer_resumes_and_truncates(workdir):
  first = metrics.Writer(workdir, start_step=0, total_steps=8, enabled=True)
  for step in (0, 2, 4, 6):
    first.write(step, {"train_loss": 10.0 - step, "learning_rate": 0.5})
  first.close()
  assert [r["step"] for r in _records(workdir)] == [0, 2, 4, 6]

  time.sleep(1.1)  # event files are named by the second; a real restart never comes this fast
  # Resumed from a checkpoint at step 4: step 6 was logged after it and is written again.
  resumed = metrics.Writer(workdir, start_step=4, total_steps=8, enabled=True)
  assert [r["step"] for r in _records(workdir)] == [0, 2, 4]
  for step in (6, 8):
    resumed.write(step, {"train_loss": 100.0 + step, "learning_rate": 0.25})
  resumed.close()

  records = _records(workdir)
  assert [(r["step"], r["train_loss"]) for r in records] == [
    (0, 10.0),
    (2, 8.0),
    (4, 6.0),
    (6, 106.0),
    (8, 108.0),
  ]
  logdir = epath.Path(workdir) / "tensorboard"
  assert len(list(logdir.iterdir())) == 2  # one event file per run
  assert _tensorboard_scalars(logdir) == {
    "train_loss": {0: 10.0, 2: 8.0, 4: 6.0, 6: 106.0, 8: 108.0},
    "learning_rate": {0: 0.5, 2: 0.5, 4: 0.5, 6: 0.25, 8: 0.25},
  }


def test_each_record_reaches_the_bucket_when_written(bucket):
  writer = metrics.Writer(GS_WORKDIR, start_step=0, total_steps=4, enabled=True)
  try:
    # A run killed between two writes keeps every record it logged.
    writer.write(1, {"train_loss": 3.0})
    assert _records(GS_WORKDIR) == [{"step": 1, "train_loss": 3.0}]
    writer.write(2, {"train_loss": 2.0})
    assert [r["step"] for r in _records(GS_WORKDIR)] == [1, 2]
  finally:
    writer.close()


def test_write_probe_on_object_store(bucket):
  lease.check_writable(GS_WORKDIR)
  assert not [key for key in bucket if "probe" in key]


def test_write_probe_refused_by_object_store(read_only_bucket):
  # A storage client's refusal is no OSError (tf.io.gfile raises tf.errors.PermissionDeniedError).
  with pytest.raises(lease.WorkdirError, match=r"not writable \(Forbidden: 403"):
    lease.check_writable(GS_WORKDIR)


def test_object_store_workdir_needs_no_tensorflow():
  """metrics.Writer, the write probe and config.json on gs:// leave TensorFlow unimported."""
  code = "\n".join(
    [
      "import json, sys",
      "from fsspec.implementations.memory import MemoryFileSystem",
      "import fsspec",
      inspect.getsource(ObjectStore),
      "for p in ObjectStore.protocol: fsspec.register_implementation(p, ObjectStore)",
      "from etils import epath",
      "from sslm_jax.cluster import lease",
      "from sslm_jax.training import metrics",
      f"lease.check_writable({GS_WORKDIR!r})",
      f"(epath.Path({GS_WORKDIR!r}) / 'config.json').write_text(json.dumps({{'seed': 0}}))",
      f"w = metrics.Writer({GS_WORKDIR!r}, start_step=0, total_steps=2, enabled=True)",
      "w.write(1, {'train_loss': 2.0}); w.write(2, {'train_loss': 1.0}); w.close()",
      f"text = (epath.Path({GS_WORKDIR!r}) / 'metrics.jsonl').read_text()",
      "assert [json.loads(line)['step'] for line in text.splitlines()] == [1, 2], text",
      "tf = ('tensorflow', 'tensorflow_datasets')",
      "bad = sorted(m for m in sys.modules if m.split('.')[0] in tf)",
      "print(bad)",
      "sys.exit(1 if bad else 0)",
    ]
  )
  env = {**os.environ, "EPATH_USE_TF": "false"}
  result = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
  )
  assert result.returncode == 0, result.stdout + result.stderr


def test_a_metrics_write_that_fails_is_one_clear_error(tmp_path, monkeypatch):
  writer = metrics.Writer(str(tmp_path), start_step=0, total_steps=4, enabled=True)
  writer.write(1, {"train_loss": 2.0})

  def full(data):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(writer._jsonl, "write", full)
  with pytest.raises(metrics.MetricsError, match=r"metrics of step 2 .*No space left.*rerun"):
    writer.write(2, {"train_loss": 1.0})
  writer.close()  # closing after the failure does not raise over it
