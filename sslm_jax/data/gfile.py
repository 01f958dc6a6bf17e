"""The part of tf.io.gfile the data package uses, with local paths served by the standard
library: TensorFlow is imported only for a remote path (gs://, or any scheme tf.io.gfile knows),
so a process that prepares local data (a preparation worker) starts in a fraction of the time.
"""

from __future__ import annotations

import builtins
import glob as glob_lib
import os
import shutil
import types


def _remote(path) -> bool:
  return "://" in str(path)


def _tf_gfile():
  import tensorflow as tf  # seconds to import: only for remote paths

  return tf.io.gfile


def GFile(path: str, mode: str = "r"):  # noqa: N802 (tf.io.gfile's name)
  if _remote(path):
    return _tf_gfile().GFile(path, mode)
  return builtins.open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def exists(path: str) -> bool:
  return _tf_gfile().exists(path) if _remote(path) else os.path.exists(path)


def glob(pattern: str) -> list[str]:
  return _tf_gfile().glob(pattern) if _remote(pattern) else glob_lib.glob(pattern)


def stat(path: str):
  """An object with `length`, the file's size in bytes."""
  if _remote(path):
    return _tf_gfile().stat(path)
  return types.SimpleNamespace(length=os.stat(path).st_size)


def rename(src: str, dst: str, overwrite: bool = False) -> None:
  if _remote(src) or _remote(dst):
    _tf_gfile().rename(src, dst, overwrite=overwrite)
  elif overwrite:
    os.replace(src, dst)
  elif os.path.exists(dst):
    raise FileExistsError(dst)
  else:
    shutil.move(src, dst)


def remove(path: str) -> None:
  _tf_gfile().remove(path) if _remote(path) else os.remove(path)


def makedirs(path: str) -> None:
  _tf_gfile().makedirs(path) if _remote(path) else os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  return _tf_gfile().listdir(path) if _remote(path) else os.listdir(path)
