"""File access for the training input: local paths directly, remote ones (gs://...) via etils.

The input pipeline runs on hosts without TensorFlow (GPU images), so it cannot rely on
`tf.io.gfile`. Local paths use Python's own file functions; paths with a scheme (`gs://`,
`s3://`, ...) use `etils.epath`, which picks TensorFlow's gfile where TensorFlow is installed and
fsspec otherwise. Importing this module imports neither.
"""

from __future__ import annotations

import glob as glob_lib
import os
from typing import IO


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` names an object store / remote file system (it has a scheme)."""
  return "://" in str(path)


def _remote(path: str | os.PathLike):
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(str(path))


def open_file(path: str | os.PathLike, mode: str = "rb") -> IO:
  """An open file object (binary or text as `mode` says)."""
  if is_remote(path):
    return _remote(path).open(mode)
  return open(path, mode)  # noqa: SIM115 - the caller closes it


def exists(path: str | os.PathLike) -> bool:
  return _remote(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
  return _remote(path).is_dir() if is_remote(path) else os.path.isdir(path)


def size(path: str | os.PathLike) -> int:
  """The file's length in bytes."""
  if is_remote(path):
    with open_file(path, "rb") as handle:
      return handle.seek(0, os.SEEK_END)
  return os.path.getsize(path)


def glob(pattern: str) -> list[str]:
  """Paths matching a glob pattern, sorted."""
  if not is_remote(pattern):
    return sorted(glob_lib.glob(pattern))
  scheme, rest = pattern.split("://", 1)
  parts = rest.split("/")
  # epath globs relative to a directory: split at the first component with a wildcard.
  first = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
  if first == len(parts):
    return [pattern] if exists(pattern) else []
  root = _remote(f"{scheme}://{'/'.join(parts[:first])}")
  return sorted(str(path) for path in root.glob("/".join(parts[first:])))
