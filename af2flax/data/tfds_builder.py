"""A `tensorflow-datasets` builder over a dataset made by `af2flax.data.build_dataset`.

    import tensorflow_datasets as tfds
    from af2flax.data.tfds_builder import Af2flaxProteins
    builder = Af2flaxProteins(data_dir="~/tfds")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir="OUT"))          # OUT: the build_dataset --out directory
    ds = builder.as_dataset(split="train")

The builder never touches the network: its only source is the manual directory. Each example
has every feature of `af2flax.data.tfrecord.FEATURES` with the same dtype and shape as the
builder's TFRecords, in the dataset's order (shuffling disabled). Do not call
`tfds.list_builders()` or `tfds.load` by name: both reach the network.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from af2flax.data import build_dataset, tfrecord

_NUMPY_DTYPES = {"int32": np.int32, "int64": np.int64, "float32": np.float32}


def _feature(dtype: str, rank: int) -> tfds.features.Tensor:
  if dtype == "bytes":
    return tfds.features.Tensor(shape=(None,) * rank, dtype=np.object_)
  # BYTES encoding stores the raw array with its shape, so every axis may be dynamic.
  return tfds.features.Tensor(shape=(None,) * rank, dtype=_NUMPY_DTYPES[dtype],
                              encoding=tfds.features.Encoding.BYTES)


class Af2flaxProteins(tfds.core.GeneratorBasedBuilder):
  """AlphaFold training examples (Jumper et al. 2021, Suppl. 1.2.4) from build_dataset's output."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Features of af2flax.data.tfrecord.FEATURES."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Build the records with `python -m af2flax.data.build_dataset --out OUT ...` and pass OUT as "
      "the manual_dir (tfds.download.DownloadConfig(manual_dir=OUT)).")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict(
            {name: _feature(dtype, rank) for name, (dtype, rank) in tfrecord.FEATURES.items()}),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, directory: str) -> Iterator[tuple[str, dict[str, Any]]]:
    info_path = os.path.join(directory, "dataset_info.json")
    if not os.path.exists(info_path):
      raise FileNotFoundError(f"{directory}: no dataset_info.json; is it a build_dataset --out "
                              "directory of a finished build?")
    with open(info_path) as f:
      info = json.load(f)
    if info.get("format") != build_dataset.FORMAT:
      raise ValueError(f"{info_path}: format {info.get('format')!r}, expected "
                       f"{build_dataset.FORMAT}")
    for shard_index, shard in enumerate(info["shards"]):
      records = tfrecord.read_tfrecord(os.path.join(directory, shard),
                                       info.get("compression") or None)
      for position, record in enumerate(records):
        example = tfrecord.decode_example(record)
        # Keyed by position: ids can repeat if two input files hold the same chain.
        yield f"{shard_index:05d}:{position:06d}", {name: example[name]
                                                  for name in tfrecord.FEATURES}
