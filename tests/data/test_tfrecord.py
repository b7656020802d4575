"""The Example codec: lossless round trip, TensorFlow-compatible bytes, graph parsing, schema."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from af2flax.data import tfrecord


def random_example(rng: np.random.Generator, num_res: int = 7, num_seq: int = 3,
                   num_templates: int = 2) -> dict[str, np.ndarray]:
  """A feature dict of the schema's dtypes and ranks, with random content."""
  sizes = {1: (num_res,), 2: (num_res, 21), 3: (num_res, 37, 3), 4: (num_templates, num_res, 37, 3)}
  shapes = {"msa": (num_seq, num_res), "deletion_matrix_int": (num_seq, num_res),
            "template_aatype": (num_templates, num_res, 22),
            "template_all_atom_masks": (num_templates, num_res, 37),
            "template_sum_probs": (num_templates, 1), "all_atom_mask": (num_res, 37),
            "msa_species_identifiers": (num_seq,), "template_domain_names": (num_templates,),
            "template_sequence": (num_templates,)}
  example = {}
  for name, (dtype, rank) in tfrecord.FEATURES.items():
    shape = shapes.get(name, sizes[rank] if rank > 1 else (num_res,))
    if name in ("domain_name", "sequence", "resolution", "release_date", "chain_id", "cluster_id",
                "cluster_size", "is_distillation"):
      shape = (1,)
    if dtype == "bytes":
      example[name] = np.array([bytes(rng.integers(0, 256, size=rng.integers(0, 9)))
                                for _ in range(int(np.prod(shape)))], dtype=object).reshape(shape)
    elif dtype == "float32":
      example[name] = rng.normal(size=shape).astype(np.float32)
    else:
      example[name] = rng.integers(-2**31, 2**31 - 1, size=shape).astype(dtype)
  return example


def assert_same_arrays(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].dtype == want[name].dtype, name
    assert got[name].shape == want[name].shape, name
    if want[name].dtype == object:
      assert list(got[name].ravel()) == list(want[name].ravel()), name
    else:
      assert got[name].tobytes() == want[name].tobytes(), name  # bit for bit (NaN, -0.0)


@pytest.mark.parametrize("seed", range(5))
def test_numpy_round_trip_is_bit_exact(seed):
  rng = np.random.default_rng(seed)
  example = random_example(rng, num_res=int(rng.integers(1, 30)), num_seq=int(rng.integers(1, 9)),
                           num_templates=int(rng.integers(0, 3)))
  example["all_atom_positions"].flat[0] = np.nan
  example["all_atom_positions"].flat[1] = -0.0
  assert_same_arrays(tfrecord.decode_example(tfrecord.encode_example(example)), example)


def test_other_dtypes_and_big_endian_input_without_schema():
  example = {"f64": np.arange(6, dtype=">f8").reshape(2, 3), "u8": np.arange(4, dtype=np.uint8),
             "b": np.array([True, False]), "scalar": np.array(3, np.int64),
             "text": np.array(["é", "x"], dtype=object)}
  decoded = tfrecord.decode_example(tfrecord.encode_example(example, schema=None))
  np.testing.assert_array_equal(decoded["f64"], example["f64"])
  assert decoded["f64"].dtype == np.float64 and decoded["scalar"].shape == ()
  assert decoded["b"].dtype == np.bool_ and list(decoded["text"]) == ["é".encode(), b"x"]


def test_bytes_equal_tensorflows_deterministic_serialization():
  serialized = tfrecord.encode_example(random_example(np.random.default_rng(0)))
  assert tf.train.Example.FromString(serialized).SerializeToString(deterministic=True) == serialized


def test_tf_graph_parse_equals_numpy_decode(tmp_path):
  rng = np.random.default_rng(1)
  examples = [random_example(rng, num_res=n, num_templates=t) for n, t in ((5, 0), (9, 2))]
  path = str(tmp_path / "x.tfrecord")
  assert tfrecord.write_tfrecord(path, [tfrecord.encode_example(e) for e in examples]) == 2
  dataset = tf.data.TFRecordDataset(path).map(tfrecord.parse_tf_example)
  for parsed, example in zip(dataset.as_numpy_iterator(), examples):
    assert set(parsed) == set(tfrecord.FEATURES)
    for name, (dtype, rank) in tfrecord.FEATURES.items():
      if dtype == "bytes":
        assert list(parsed[name].ravel()) == list(example[name].ravel())
      else:
        assert parsed[name].dtype == example[name].dtype
        assert parsed[name].tobytes() == example[name].tobytes()
      assert parsed[name].shape == example[name].shape
  assert dataset.element_spec["template_all_atom_positions"].shape.rank == 4


def test_tf_parse_rejects_a_record_of_the_wrong_dtype():
  example = random_example(np.random.default_rng(2))
  example["msa"] = example["msa"].astype(np.int64)
  serialized = tfrecord.encode_example(example, schema=None)
  with pytest.raises(tf.errors.InvalidArgumentError, match="stored dtype of msa"):
    tfrecord.parse_tf_example(tf.constant(serialized))


def test_schema_and_corrupt_records_raise_codec_errors():
  example = random_example(np.random.default_rng(3))
  with pytest.raises(tfrecord.CodecError, match="feature 'msa': got int64 rank 2"):
    tfrecord.encode_example(dict(example, msa=example["msa"].astype(np.int64)))
  with pytest.raises(tfrecord.CodecError, match="lacks schema features \\['aatype'\\]"):
    tfrecord.encode_example({k: v for k, v in example.items() if k != "aatype"})
  serialized = tfrecord.encode_example(example)
  with pytest.raises(tfrecord.CodecError, match="not a serialized tf.train.Example"):
    tfrecord.decode_example(serialized[:-7])


def test_crc32c_known_values_and_chunked_path():
  assert tfrecord.crc32c(b"") == 0
  assert tfrecord.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
  assert tfrecord.crc32c(bytes(32)) == 0x8A9136AA     # RFC 3720 B.4 test vectors
  assert tfrecord.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert tfrecord.crc32c(bytes(range(32))) == 0x46DD794E
  rng = np.random.default_rng(0)
  for size in (63, 64, 1023, 1024, 1025, 5000):  # both code paths agree (byte loop vs lanes)
    data = rng.integers(0, 256, size).astype(np.uint8).tobytes()
    state = 0xFFFFFFFF
    for byte in data:
      state = int(tfrecord._crc_table()[(state ^ byte) & 0xFF]) ^ (state >> 8)
    assert tfrecord.crc32c(data) == state ^ 0xFFFFFFFF, size


def test_tfrecord_files_match_tensorflows(tmp_path):
  rng = np.random.default_rng(4)
  records = [rng.integers(0, 256, n).astype(np.uint8).tobytes() for n in (0, 5, 70, 3000, 70000)]
  ours, theirs = str(tmp_path / "ours.tfrecord"), str(tmp_path / "theirs.tfrecord")
  tfrecord.write_tfrecord(ours, records)
  with tf.io.TFRecordWriter(theirs) as writer:
    for record in records:
      writer.write(record)
  assert open(ours, "rb").read() == open(theirs, "rb").read()
  assert list(tfrecord.read_tfrecord(theirs)) == records
  gzipped = str(tmp_path / "ours.tfrecord.gz")
  tfrecord.write_tfrecord(gzipped, records, "GZIP")
  read_by_tf = [r.numpy() for r in tf.data.TFRecordDataset(gzipped, compression_type="GZIP")]
  assert read_by_tf == records == list(tfrecord.read_tfrecord(gzipped, "GZIP"))


def test_damaged_tfrecord_files_raise(tmp_path):
  path = tmp_path / "x.tfrecord"
  tfrecord.write_tfrecord(str(path), [b"a" * 100, b"b" * 100])
  data = bytearray(path.read_bytes())
  path.write_bytes(bytes(data[:150]))
  with pytest.raises(tfrecord.CodecError, match="record 1: truncated"):
    list(tfrecord.read_tfrecord(str(path)))
  data[30] ^= 1
  path.write_bytes(bytes(data))
  with pytest.raises(tfrecord.CodecError, match="record 0: data checksum mismatch"):
    list(tfrecord.read_tfrecord(str(path)))
  path.write_bytes(b"\x1f\x8b garbage")
  with pytest.raises(tfrecord.CodecError, match="unreadable"):
    list(tfrecord.read_tfrecord(str(path), "GZIP"))
