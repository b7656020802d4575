"""Random access to the examples of TFRecord shards: the record table and a checked reader.

The input pipeline samples examples by weight (Suppl. 1.2.5), so it reads records by position
instead of streaming shards: `RecordTable` lists every record (shard, byte offset) with the
metadata the sampler needs (length, sequence cluster, source), and `RecordReader` reads one
record with TFRecord's CRC32C checks (a corrupt record raises `CorruptRecordError`).

No TensorFlow needed: files are read through fileio.py and the CRCs checked in numpy
(tfrecord.masked_crc32c); where TensorFlow is already loaded (the tf.data backend), its C++
random-access reader checks them instead.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import struct
import sys
import threading
from typing import Callable, Mapping, Sequence

import numpy as np

from af2flax.data import fileio
from af2flax.data import tfrecord

_HEADER_BYTES = 12   # uint64 length + uint32 masked CRC of the length
_FOOTER_BYTES = 4    # uint32 masked CRC of the data
OFFSETS_FILE = "record_offsets.json"


class CorruptRecordError(IOError):
  """A record whose bytes fail TFRecord's checks (truncated file, checksum mismatch)."""


def scan_record_offsets(path: str) -> np.ndarray:
  """Byte offsets of every record in a TFRecord file, from the length headers only.

  Reads 12 bytes per record and seeks over the data, so indexing a large shard costs one
  small read per record. Raises CorruptRecordError for a truncated file.
  """
  offsets = []
  size = fileio.size(path)
  with fileio.open_file(path, "rb") as handle:
    position = 0
    while position < size:
      header = handle.read(_HEADER_BYTES)
      if len(header) < _HEADER_BYTES:
        raise CorruptRecordError(f"{path}: truncated record header at byte {position}")
      (length,) = struct.unpack("<Q", header[:8])
      end = position + _HEADER_BYTES + length + _FOOTER_BYTES
      if end > size:
        raise CorruptRecordError(f"{path}: record at byte {position} runs past the end of file")
      offsets.append(position)
      position = end
      handle.seek(position)
  return np.asarray(offsets, np.int64)


@dataclasses.dataclass(frozen=True)
class RecordTable:
  """Every record of a dataset: where it is and what the sampler needs to know about it.

  Attributes (one entry per record):
    paths: the shard files; file_index: which shard; offsets: byte offset in the shard;
    ids: example ids; num_res: chain lengths; cluster_ids: sequence-cluster ids ('' = own
    cluster); is_distillation: the source.
  """
  paths: tuple[str, ...]
  file_index: np.ndarray
  offsets: np.ndarray
  ids: tuple[str, ...]
  num_res: np.ndarray
  cluster_ids: tuple[str, ...]
  is_distillation: np.ndarray

  def __len__(self) -> int:
    return len(self.offsets)

  def fingerprint(self) -> str:
    """A short digest of the table (paths, offsets, metadata): a resumed run checks it."""
    payload = json.dumps([list(self.paths), self.offsets.tolist(), list(self.ids),
                          self.num_res.tolist(), list(self.cluster_ids),
                          self.is_distillation.astype(int).tolist()])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]

  @classmethod
  def from_metadata(cls, paths: Sequence[str], file_index: np.ndarray, offsets: np.ndarray,
                    metadata: Mapping[str, Sequence]) -> "RecordTable":
    """A table from record positions plus per-record metadata columns
    ('id', 'num_res', optional 'cluster_id', optional 'is_distillation')."""
    count = len(offsets)
    for column in ("id", "num_res"):
      if column not in metadata or len(metadata[column]) != count:
        raise ValueError(f"record metadata needs column {column!r} with {count} entries")
    clusters = metadata.get("cluster_id", [""] * count)
    distillation = metadata.get("is_distillation", np.zeros(count))
    return cls(paths=tuple(str(p) for p in paths),
               file_index=np.asarray(file_index, np.int32),
               offsets=np.asarray(offsets, np.int64),
               ids=tuple(str(i) for i in metadata["id"]),
               num_res=np.asarray(metadata["num_res"], np.int64),
               cluster_ids=tuple("" if c is None else str(c) for c in clusters),
               is_distillation=np.asarray(distillation, float) > 0)

  def subset(self, indices: np.ndarray) -> "RecordTable":
    """The records at `indices` (e.g. a held-out validation split)."""
    indices = np.asarray(indices, np.int64)
    return dataclasses.replace(
        self, file_index=self.file_index[indices], offsets=self.offsets[indices],
        ids=tuple(self.ids[i] for i in indices), num_res=self.num_res[indices],
        cluster_ids=tuple(self.cluster_ids[i] for i in indices),
        is_distillation=self.is_distillation[indices])

  def concat(self, other: "RecordTable") -> "RecordTable":
    """Both tables' records (e.g. a PDB set and a self-distillation set)."""
    return RecordTable(
        paths=self.paths + other.paths,
        file_index=np.concatenate([self.file_index, other.file_index + len(self.paths)]),
        offsets=np.concatenate([self.offsets, other.offsets]),
        ids=self.ids + other.ids, num_res=np.concatenate([self.num_res, other.num_res]),
        cluster_ids=self.cluster_ids + other.cluster_ids,
        is_distillation=np.concatenate([self.is_distillation, other.is_distillation]))


def record_positions(paths: Sequence[str], cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """(file_index, offsets) of every record of the shards, cached in OFFSETS_FILE beside them.

  The cache is keyed by file name and size; a changed shard is re-scanned.
  """
  file_index, offsets = [], []
  caches: dict[str, dict] = {}
  for index, path in enumerate(paths):
    directory = os.path.dirname(str(path))
    cache_path = os.path.join(directory, OFFSETS_FILE)
    if directory not in caches:
      caches[directory] = {}
      if cache and fileio.exists(cache_path):
        with fileio.open_file(cache_path, "r") as handle:
          caches[directory] = json.load(handle)
    size = fileio.size(str(path))
    entry = caches[directory].get(os.path.basename(str(path)))
    if entry is not None and entry["size"] == size:
      shard_offsets = np.asarray(entry["offsets"], np.int64)
    else:
      shard_offsets = scan_record_offsets(str(path))
      caches[directory][os.path.basename(str(path))] = {"size": size,
                                                         "offsets": shard_offsets.tolist()}
      if cache:
        try:
          with fileio.open_file(cache_path, "w") as handle:
            json.dump(caches[directory], handle)
        except Exception:  # noqa: BLE001 - OSError, or the remote file system's own errors
          pass  # read-only dataset directory: keep the offsets in memory
    file_index.append(np.full(len(shard_offsets), index, np.int32))
    offsets.append(shard_offsets)
  return np.concatenate(file_index), np.concatenate(offsets)


DATASET_INFO_FILE = "dataset_info.json"
INDEX_FILE = "index.tsv"


def table_from_dataset(directory: str | os.PathLike) -> RecordTable:
  """The RecordTable of a dataset written by `python -m af2flax.data.build_dataset`.

  Reads `dataset_info.json` (shard list) and `index.tsv` (one row per record, in shard order:
  id, length, cluster_id (-1: none), is_distillation, ...) and scans the shards' record offsets
  (cached). Raises ValueError naming the file if the index and the shards disagree, or if the
  shards are compressed (records cannot then be read at random).
  """
  directory = str(directory)
  info_path = os.path.join(directory, DATASET_INFO_FILE)
  with fileio.open_file(info_path, "r") as handle:
    info = json.load(handle)
  if info.get("compression"):
    raise ValueError(f"{info_path}: shards are {info['compression']}-compressed; the input "
                     "pipeline reads records at random positions and needs uncompressed shards "
                     "(rebuild without --compression)")
  paths = [os.path.join(directory, shard) for shard in info["shards"]]
  file_index, offsets = record_positions(paths)
  index_path = os.path.join(directory, INDEX_FILE)
  with fileio.open_file(index_path, "r") as handle:
    rows = list(csv.DictReader(handle, delimiter="\t"))
  shards_of_rows = np.asarray([int(row["shard"]) for row in rows], np.int32)
  if len(rows) != len(offsets) or not np.array_equal(shards_of_rows, file_index):
    raise ValueError(f"{index_path}: {len(rows)} rows do not match the {len(offsets)} records of "
                     f"the shards listed in {info_path} (per shard: "
                     f"{np.bincount(file_index, minlength=len(paths)).tolist()})")
  metadata = {
      "id": [row["id"] for row in rows],
      "num_res": [int(row["length"]) for row in rows],
      "cluster_id": ["" if int(row["cluster_id"]) < 0 else row["cluster_id"] for row in rows],
      "is_distillation": [float(row["is_distillation"]) for row in rows],
  }
  return RecordTable.from_metadata(paths, file_index, offsets, metadata)


def table_by_decoding(paths: Sequence[str], decode_fn: Callable[[bytes], Mapping[str, np.ndarray]],
                      verify_checksums: bool = True) -> RecordTable:
  """A RecordTable whose metadata is read from the records themselves (small datasets, tests).

  Corrupt records are left in the table (the pipeline skips them when drawn) with length 0.
  """
  file_index, offsets = record_positions(paths)
  reader = RecordReader(paths, verify_checksums)
  metadata: dict[str, list] = {"id": [], "num_res": [], "cluster_id": [], "is_distillation": []}
  for position, (shard, offset) in enumerate(zip(file_index, offsets)):
    try:
      features = decode_fn(reader.read(int(shard), int(offset)))
      aatype = np.asarray(features["aatype"])
      num_res = aatype.shape[0]
      example_id = features.get("chain_id", features.get("domain_name", f"record_{position}"))
      cluster = _cluster_text(features.get("cluster_id"))
      distillation = float(np.asarray(features.get("is_distillation", 0)).reshape(-1)[0])
    except Exception:  # noqa: BLE001 - any unreadable record is recorded as empty
      num_res, example_id, cluster, distillation = 0, f"record_{position}", "", 0.0
    metadata["id"].append(_as_text(example_id))
    metadata["num_res"].append(num_res)
    metadata["cluster_id"].append(_as_text(cluster))
    metadata["is_distillation"].append(distillation)
  return RecordTable.from_metadata(paths, file_index, offsets, metadata)


def _cluster_text(value) -> str:
  """The builder stores cluster ids as int32 [1] with -1 for 'no cluster given'."""
  if value is None:
    return ""
  array = np.asarray(value).reshape(-1)
  if array.size == 0 or (array.dtype.kind in "iu" and array[0] < 0):
    return ""
  return _as_text(array)


def _as_text(value) -> str:
  array = np.asarray(value).reshape(-1)
  if array.size == 0:
    return ""
  item = array[0]
  return item.decode() if isinstance(item, bytes) else str(item)


def _tensorflow_random_reader():
  """TensorFlow's random-access TFRecord reader class (checks both CRC32Cs), or None."""
  try:
    from tensorflow.python.lib.io import tf_record  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return getattr(tf_record, "tf_record_random_reader", None)


class RecordReader:
  """Reads one record by (shard, offset); thread-safe (one reader per thread and shard).

  With `verify_checksums` both CRC32Cs of the record are checked: by TensorFlow's C++ random
  reader when `use_tensorflow` (default: when TensorFlow is already imported, i.e. by the tf.data
  backend), else in numpy (~150 MB/s). Without, a plain positional read (trusted local copies).
  """

  def __init__(self, paths: Sequence[str], verify_checksums: bool = True,
               use_tensorflow: bool | None = None):
    explicit = use_tensorflow is not None
    if not explicit:
      use_tensorflow = sys.modules.get("tensorflow") is not None
    self._tf_reader = _tensorflow_random_reader() if use_tensorflow and verify_checksums else None
    if explicit and use_tensorflow and verify_checksums and self._tf_reader is None:
      raise RuntimeError("this TensorFlow has no tf_record_random_reader: use "
                         "use_tensorflow=False (numpy checksums) or verify_checksums=False")
    self.paths = tuple(str(p) for p in paths)
    self.verify_checksums = verify_checksums
    self._local = threading.local()

  def _handles(self) -> dict:
    if not hasattr(self._local, "handles"):
      self._local.handles = {}
    return self._local.handles

  def read(self, shard: int, offset: int) -> bytes:
    path = self.paths[shard]
    handles = self._handles()
    if self._tf_reader is not None:
      return self._read_with_tensorflow(handles, shard, offset)
    try:
      if shard not in handles:
        handles[shard] = fileio.open_file(path, "rb")
      handle = handles[shard]
      handle.seek(offset)
      header = handle.read(_HEADER_BYTES)
      if len(header) < _HEADER_BYTES:
        raise CorruptRecordError(f"{path}: unreadable record at byte {offset}: truncated header")
      (length,) = struct.unpack("<Q", header[:8])
      if self.verify_checksums and struct.unpack(
          "<I", header[8:])[0] != tfrecord.masked_crc32c(header[:8]):
        raise CorruptRecordError(f"{path}: unreadable record at byte {offset}: "
                                 "length checksum mismatch")
      record = handle.read(length)
      if len(record) != length:
        raise CorruptRecordError(f"{path}: truncated record at byte {offset}")
      if self.verify_checksums:
        footer = handle.read(_FOOTER_BYTES)
        if len(footer) < _FOOTER_BYTES or (struct.unpack("<I", footer)[0]
                                           != tfrecord.masked_crc32c(record)):
          raise CorruptRecordError(f"{path}: unreadable record at byte {offset}: "
                                   "data checksum mismatch (corrupt file)")
      return record
    except (IndexError, struct.error, OverflowError, MemoryError) as error:
      raise CorruptRecordError(f"{path}: unreadable record at byte {offset}: {error}") from error

  def _read_with_tensorflow(self, handles: dict, shard: int, offset: int) -> bytes:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    path = self.paths[shard]
    try:
      if shard not in handles:
        handles[shard] = self._tf_reader(path)
      record, _ = handles[shard].read(offset)
      return record
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError, IndexError) as error:
      raise CorruptRecordError(f"{path}: unreadable record at byte {offset}: {error}") from error


def shard_paths(pattern_or_dir: str | os.PathLike) -> list[str]:
  """The TFRecord shards of a directory (*.tfrecord*) or a glob pattern, sorted."""
  pattern = str(pattern_or_dir)
  if fileio.isdir(pattern):
    pattern = pattern.rstrip("/") + "/*.tfrecord*"
  paths = fileio.glob(pattern)
  if not paths:
    raise FileNotFoundError(f"no TFRecord shards match {pattern}")
  return paths
