"""`tf.train.Example` codec for feature dicts: arrays stored with dtype and shape, no pickle.

Layout of one feature `name` in the Example:
  name          bytes_list: numeric arrays -> one value, the little-endian raw bytes (C order);
                            string arrays  -> one value per element (flattened)
  name/shape    int64_list: the array's shape
  name/dtype    bytes_list: 'int32' | 'int64' | 'float32' | ... | 'bytes'

`FEATURES` is the fixed schema of the training examples (name -> (dtype, rank)) so that tf.data can
parse records in the graph (`parse_tf_example`) with static ranks; `encode_example` checks an
example against it. The numpy codec works without TensorFlow: the Example messages are built from
their `.proto` definition in a private descriptor pool, so builder worker processes never import
TensorFlow (5 s and ~650 MB each). Serialization is deterministic (map keys sorted), so the same
example always gives the same bytes.

TFRecord files are written and read here in pure Python too (length, masked CRC32C, data, masked
CRC32C per record; optionally the whole file gzipped), byte-identical to TensorFlow's
`TFRecordWriter`. The CRC32C is vectorized with numpy over 1 KiB chunks (~250 MB/s).
"""

from __future__ import annotations

import functools
import gzip
import struct
import zlib
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

# name -> (dtype, rank). AlphaFold's raw feature names (Suppl. 1.2.9; `features.npz` layout),
# plus the training metadata of Suppl. 1.2.4-1.2.5. N = residues, S = MSA rows, T = templates.
FEATURES: dict[str, tuple[str, int]] = {
    "aatype": ("int32", 2),                       # [N, 21] one-hot (20 amino acids + X)
    "between_segment_residues": ("int32", 1),     # [N]
    "domain_name": ("bytes", 1),                  # [1] example id
    "residue_index": ("int32", 1),                # [N]
    "seq_length": ("int32", 1),                   # [N], each = N
    "sequence": ("bytes", 1),                     # [1]
    "msa": ("int32", 2),                          # [S, N] HHblits alphabet, 21 = gap
    "deletion_matrix_int": ("int32", 2),          # [S, N]
    "num_alignments": ("int32", 1),               # [N], each = S
    "msa_species_identifiers": ("bytes", 1),      # [S]
    "template_aatype": ("float32", 3),            # [T, N, 22] one-hot, HHblits alphabet
    "template_all_atom_positions": ("float32", 4),  # [T, N, 37, 3] Å
    "template_all_atom_masks": ("float32", 3),    # [T, N, 37]
    "template_sum_probs": ("float32", 2),         # [T, 1]
    "template_domain_names": ("bytes", 1),        # [T] '<pdbid>_<chain>'
    "template_sequence": ("bytes", 1),            # [T] template residue per query residue, '-'
    "all_atom_positions": ("float32", 3),         # [N, 37, 3] Å, ground truth
    "all_atom_mask": ("float32", 2),              # [N, 37]
    "resolution": ("float32", 1),                 # [1] Å, 0 = unknown
    "release_date": ("bytes", 1),                 # [1] 'YYYY-MM-DD', '' = unknown
    "chain_id": ("bytes", 1),                     # [1] '<pdbid>_<chain>'
    "cluster_id": ("int32", 1),                   # [1] sequence cluster, -1 = none given
    "cluster_size": ("int32", 1),                 # [1] members of that cluster, 0 = none given
    "is_distillation": ("float32", 1),            # [1] 0 = PDB, 1 = self-distillation
}

# The messages built by `_example_class`, from tensorflow/core/example/{example,feature}.proto:
#   message BytesList { repeated bytes value = 1; }
#   message FloatList { repeated float value = 1 [packed = true]; }
#   message Int64List { repeated int64 value = 1 [packed = true]; }
#   message Feature { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
#                                  Int64List int64_list = 3; } }
#   message Features { map<string, Feature> feature = 1; }
#   message Example { Features features = 1; }


class CodecError(ValueError):
  """A record or an example does not fit the codec/schema; the message names the feature."""


@functools.cache
def _example_class() -> Any:
  """tf.train.Example's message class, built from its definition (above) in a private pool."""
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
  field = descriptor_pb2.FieldDescriptorProto
  file_proto = descriptor_pb2.FileDescriptorProto(name="af2flax_example.proto",
                                                  package="tensorflow", syntax="proto3")
  for list_name, kind in (("BytesList", field.TYPE_BYTES), ("FloatList", field.TYPE_FLOAT),
                          ("Int64List", field.TYPE_INT64)):
    file_proto.message_type.add(name=list_name).field.add(
        name="value", number=1, type=kind, label=field.LABEL_REPEATED)
  feature = file_proto.message_type.add(name="Feature")
  feature.oneof_decl.add(name="kind")
  for number, (field_name, list_name) in enumerate(
      (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), 1):
    feature.field.add(name=field_name, number=number, type=field.TYPE_MESSAGE,
                      label=field.LABEL_OPTIONAL, type_name=f".tensorflow.{list_name}",
                      oneof_index=0)
  features = file_proto.message_type.add(name="Features")
  entry = features.nested_type.add(name="FeatureEntry")
  entry.options.map_entry = True
  entry.field.add(name="key", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
  entry.field.add(name="value", number=2, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
                  type_name=".tensorflow.Feature")
  features.field.add(name="feature", number=1, type=field.TYPE_MESSAGE,
                     label=field.LABEL_REPEATED, type_name=".tensorflow.Features.FeatureEntry")
  file_proto.message_type.add(name="Example").field.add(
      name="features", number=1, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL,
      type_name=".tensorflow.Features")
  pool = descriptor_pool.DescriptorPool()
  pool.Add(file_proto)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def _dtype_name(array: np.ndarray) -> str:
  if array.dtype.kind in "OSU":
    return "bytes"
  if array.dtype.kind not in "biuf":
    raise CodecError(f"unsupported dtype {array.dtype}")
  return array.dtype.name


def _as_bytes(value: Any) -> bytes:
  return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def encode_example(features: Mapping[str, Any],
                   schema: Mapping[str, tuple[str, int]] | None = FEATURES) -> bytes:
  """Serializes a feature dict; with a schema, every schema feature must be present and match it."""
  if schema is not None:
    missing = sorted(set(schema) - set(features))
    if missing:
      raise CodecError(f"example lacks schema features {missing}")
  example = _example_class()()
  feature_map = example.features.feature
  for name in sorted(features):
    array = np.asarray(features[name])
    dtype = _dtype_name(array)
    if schema is not None and name in schema and (dtype, array.ndim) != schema[name]:
      raise CodecError(f"feature {name!r}: got {dtype} rank {array.ndim}, schema says "
                       f"{schema[name][0]} rank {schema[name][1]}")
    if dtype == "bytes":
      feature_map[name].bytes_list.value.extend(_as_bytes(v) for v in array.ravel())
    else:
      little_endian = array.astype(array.dtype.newbyteorder("<"), copy=False)
      feature_map[name].bytes_list.value.append(np.ascontiguousarray(little_endian).tobytes())
    feature_map[f"{name}/shape"].int64_list.value.extend(array.shape)
    feature_map[f"{name}/dtype"].bytes_list.value.append(dtype.encode())
  return example.SerializeToString(deterministic=True)


def decode_example(serialized: bytes) -> dict[str, np.ndarray]:
  """Inverse of `encode_example` (numpy, no TensorFlow): the same arrays, bit for bit."""
  example = _example_class()()
  try:
    example.ParseFromString(serialized)
  except Exception as e:  # protobuf's DecodeError and friends
    raise CodecError(f"not a serialized tf.train.Example ({e})") from e
  feature_map = example.features.feature
  out = {}
  for key in feature_map:
    if key.endswith(("/shape", "/dtype")):
      continue
    if f"{key}/shape" not in feature_map or f"{key}/dtype" not in feature_map:
      raise CodecError(f"feature {key!r} has no shape/dtype entry")
    shape = tuple(feature_map[f"{key}/shape"].int64_list.value)
    dtype = feature_map[f"{key}/dtype"].bytes_list.value[0].decode()
    values = feature_map[key].bytes_list.value
    try:
      if dtype == "bytes":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        out[key] = array.reshape(shape)
      else:
        if len(values) != 1:
          raise CodecError(f"feature {key!r}: expected one raw value, got {len(values)}")
        array = np.frombuffer(values[0], dtype=np.dtype(dtype).newbyteorder("<"))
        out[key] = array.astype(np.dtype(dtype), copy=True).reshape(shape)
    except (TypeError, ValueError) as e:
      raise CodecError(f"feature {key!r}: {e}") from e
  return out


def tf_dtype(name: str):
  import tensorflow as tf
  return tf.string if name == "bytes" else tf.as_dtype(name)


def parse_tf_example(serialized, feature_names: Sequence[str] | None = None,
                     schema: Mapping[str, tuple[str, int]] = FEATURES) -> dict:
  """tf-graph parser for tf.data: scalar string tensor -> {name: tensor of the schema's dtype}.

  Each tensor has the schema's rank (static) and the record's shape. A record whose stored dtype
  differs from the schema fails with InvalidArgumentError (use `ignore_errors` to skip it).
  """
  import tensorflow as tf
  names = list(feature_names or schema)
  spec = {}
  for name in names:
    dtype, rank = schema[name]
    spec[name] = (tf.io.VarLenFeature(tf.string) if dtype == "bytes"
                  else tf.io.FixedLenFeature([], tf.string))
    spec[f"{name}/shape"] = tf.io.FixedLenFeature([rank], tf.int64)
    spec[f"{name}/dtype"] = tf.io.FixedLenFeature([], tf.string)
  parsed = tf.io.parse_single_example(serialized, spec)
  out = {}
  for name in names:
    dtype, rank = schema[name]
    shape = parsed[f"{name}/shape"]
    stored = parsed[f"{name}/dtype"]
    check = tf.debugging.Assert(tf.equal(stored, dtype),
                                [f"stored dtype of {name} differs from the schema:", stored])
    with tf.control_dependencies([check]):
      if dtype == "bytes":
        values = tf.sparse.to_dense(parsed[name], default_value=b"")
      else:
        values = tf.io.decode_raw(parsed[name], tf_dtype(dtype), little_endian=True)
      tensor = tf.reshape(values, shape)
    tensor.set_shape([None] * rank)
    out[name] = tensor
  return out


# --- TFRecord files without TensorFlow -----------------------------------------------------------

_CRC32C_POLY = 0x82F63B78  # Castagnoli, reflected
_CRC_CHUNK = 1024


@functools.cache
def _crc_table() -> np.ndarray:
  table = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC32C_POLY), table >> 1)
    table = table.astype(np.uint32)
  return table


@functools.cache
def _chunk_shift_tables() -> tuple[list[int], ...]:
  """The register after _CRC_CHUNK zero bytes, as 4 byte-wise lookup tables (GF(2)-linear)."""
  table = _crc_table()
  state = (np.arange(256, dtype=np.uint32)[None, :]
           << (8 * np.arange(4, dtype=np.uint32)[:, None])).astype(np.uint32)
  for _ in range(_CRC_CHUNK):
    state = table[state & 0xFF] ^ (state >> 8)
  return tuple(row.tolist() for row in state)


@functools.cache
def _position_tables() -> np.ndarray:
  """[_CRC_CHUNK * 256] uint32: entry p * 256 + b is the register contribution of byte b at
  position p of a chunk (from a zero register), so that the CRC register after a chunk is the
  XOR of its bytes' entries (the CRC is GF(2)-linear)."""
  table = _crc_table()
  out = np.zeros((_CRC_CHUNK, 256), np.uint32)
  state = table.copy()                    # the chunk's last byte: one table step
  out[-1] = state
  for position in range(_CRC_CHUNK - 2, -1, -1):
    state = table[state & 0xFF] ^ (state >> 8)   # followed by one more zero byte
    out[position] = state
  return out.reshape(-1)


def crc32c(data: bytes) -> int:
  """CRC-32C of `data` (TFRecord's checksum).

  CRC registers are GF(2)-linear: each 1 KiB chunk's register is the XOR of per-(position, byte)
  table entries (one gather and one XOR-reduction over all chunks, ~300 MB/s), then the chunks
  are chained by the 'advance 1 KiB of zeros' map. The initial value 0xFFFFFFFF is folded into
  the first four bytes, which is the same for a reflected CRC.
  """
  table = _crc_table()
  if len(data) < 64:
    state = 0xFFFFFFFF
    for byte in data:
      state = int(table[(state ^ byte) & 0xFF]) ^ (state >> 8)
    return state ^ 0xFFFFFFFF
  pad = -len(data) % _CRC_CHUNK
  padded = np.zeros(pad + len(data), np.uint8)  # leading zeros leave a zero register unchanged
  padded[pad:] = np.frombuffer(data, np.uint8)
  padded[pad:pad + 4] ^= 0xFF
  chunks = padded.reshape(-1, _CRC_CHUNK)
  positions = _position_tables()
  offsets = np.arange(_CRC_CHUNK, dtype=np.uint32) * 256
  chunk_crcs = np.empty(chunks.shape[0], np.uint32)
  for start in range(0, chunks.shape[0], 2048):  # 2 MiB of data (8 MiB of indices) at a time
    block = chunks[start:start + 2048]
    chunk_crcs[start:start + block.shape[0]] = np.bitwise_xor.reduce(
        positions[block + offsets], axis=1)
  shift0, shift1, shift2, shift3 = _chunk_shift_tables()
  crc = 0
  for chunk_crc in chunk_crcs.tolist():
    crc = (shift0[crc & 255] ^ shift1[(crc >> 8) & 255] ^ shift2[(crc >> 16) & 255]
           ^ shift3[crc >> 24] ^ chunk_crc)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(serialized: bytes) -> bytes:
  """One TFRecord entry: uint64 length, masked CRC of it, the data, masked CRC of the data."""
  length = struct.pack("<Q", len(serialized))
  return (length + struct.pack("<I", masked_crc32c(length)) + serialized
          + struct.pack("<I", masked_crc32c(serialized)))


class TFRecordWriter:
  """Appends framed records to a file; 'GZIP' compresses the whole file (mtime 0: reproducible)."""

  def __init__(self, path: str, compression: str | None = None):
    self._file = open(path, "wb")
    self._stream = (gzip.GzipFile(fileobj=self._file, mode="wb", mtime=0, filename="")
                    if compression == "GZIP" else self._file)
    if compression not in (None, "", "GZIP"):
      raise ValueError(f"compression must be None or 'GZIP', got {compression!r}")

  def write_framed(self, framed: bytes) -> None:
    self._stream.write(framed)

  def write(self, serialized: bytes) -> None:
    self._stream.write(frame_record(serialized))

  def close(self) -> None:
    if self._stream is not self._file:
      self._stream.close()
    self._file.close()


def write_tfrecord(path: str, records: Iterable[bytes], compression: str | None = None) -> int:
  """Writes serialized examples to a TFRecord file; returns the count."""
  writer = TFRecordWriter(path, compression)
  count = 0
  try:
    for record in records:
      writer.write(record)
      count += 1
  finally:
    writer.close()
  return count


def read_tfrecord(path: str, compression: str | None = None, verify: bool = True
                  ) -> Iterator[bytes]:
  """The serialized records of a TFRecord file, in order; a damaged file raises CodecError."""
  opener = gzip.open if compression == "GZIP" else open
  try:
    with opener(path, "rb") as f:
      yield from _records(f, path, verify)
  except (EOFError, OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    raise CodecError(f"{path}: unreadable ({e})") from e


def _records(f, path: str, verify: bool) -> Iterator[bytes]:
  index = 0
  while header := f.read(12):
    if len(header) < 12:
      raise CodecError(f"{path}: record {index}: truncated length header")
    (length,) = struct.unpack("<Q", header[:8])
    if verify and struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
      raise CodecError(f"{path}: record {index}: length checksum mismatch (corrupt file)")
    data, footer = f.read(length), f.read(4)
    if len(data) < length or len(footer) < 4:
      raise CodecError(f"{path}: record {index}: truncated (file cut short)")
    if verify and struct.unpack("<I", footer)[0] != masked_crc32c(data):
      raise CodecError(f"{path}: record {index}: data checksum mismatch (corrupt file)")
    yield data
    index += 1
