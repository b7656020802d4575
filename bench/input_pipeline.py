"""Training-input throughput per host CPU core, and cores per accelerator at a given step time.

    python bench/input_pipeline.py --step_time 0.4                      # tf.data backend
    python bench/input_pipeline.py --backend numpy --stages initial_training
    python bench/input_pipeline.py --stages finetuning --num_res 384 --num_msa 5000 \\
        --matmul_dtype bfloat16

For every (stage, chain length, MSA depth) it writes a few synthetic records (AlphaFold's raw
layout, 20 template hits, random coordinates: content does not change the cost) and measures,
with the backend restricted to ONE thread (TensorFlow and tf.data: intra/inter-op and private
pool 1; numpy: one worker thread and BLAS with --blas_threads, default 1):
  * the stages of one example: record read (+CRC), decode, per-example numpy transforms
    (prepare), per-iteration MSA features + padding (featurize: TF graph or numpy);
  * the end-to-end pipeline (InputIterator, batch size 1) in CPU seconds per example (process
    time, so other load on the machine does not inflate it) and in wall-clock examples/s;
  * numpy backend: wall-clock examples/s with --parallel worker pools (e.g. 2 threads, 2
    processes), the throughput of a host that gives the input that many cores.
Cores needed per accelerator = CPU seconds per example / step time (one example per accelerator
per step, AlphaFold's per-device batch). With --backend numpy TensorFlow is never imported.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def _early_flag(name: str, default: str) -> str:
  """A flag needed before numpy is imported (BLAS threads are fixed at import)."""
  for index, arg in enumerate(sys.argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and index + 1 < len(sys.argv):
      return sys.argv[index + 1]
  return default


if _early_flag("blas_threads", "1") != "0":
  for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = _early_flag("blas_threads", "1")

import numpy as np  # noqa: E402

if _early_flag("backend", "tf") == "tf":
  import tensorflow as tf  # noqa: E402
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)

from af2flax.common import residue_constants as rc  # noqa: E402
from af2flax.data import config as data_config  # noqa: E402
from af2flax.data import input_pipeline, records, sampling, tfrecord, training_example  # noqa: E402

NUM_TEMPLATE_HITS = 20


def synthetic_record(num_res: int, num_msa: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """A record with every schema feature at the given size (MSA: mutants of the query)."""
  aatype = rng.integers(0, 20, num_res)
  msa = np.where(rng.random((num_msa, num_res)) < 0.4, rng.integers(0, 22, (num_msa, num_res)),
                 aatype[None])
  msa[0] = aatype
  deletions = np.where(rng.random(msa.shape) < 0.05, rng.integers(1, 9, msa.shape), 0)
  positions = rng.normal(scale=10, size=(num_res, 37, 3)).astype(np.float32)
  mask = rc.STANDARD_ATOM_MASK[aatype].astype(np.float32)
  hhblits = np.argsort(np.asarray(rc.MAP_HHBLITS_AATYPE_TO_OUR_AATYPE))
  template_aatype = np.zeros((NUM_TEMPLATE_HITS, num_res, 22), np.float32)
  template_aatype[:, np.arange(num_res), hhblits[aatype]] = 1
  return {
      "aatype": np.eye(21, dtype=np.int32)[aatype],
      "between_segment_residues": np.zeros(num_res, np.int32),
      "domain_name": np.asarray([b"bench"], object),
      "residue_index": np.arange(num_res, dtype=np.int32),
      "seq_length": np.full(num_res, num_res, np.int32),
      "sequence": np.asarray([b"A" * num_res], object),
      "msa": hhblits[msa].astype(np.int32),
      "deletion_matrix_int": deletions.astype(np.int32),
      "num_alignments": np.full(num_res, num_msa, np.int32),
      "msa_species_identifiers": np.asarray([b""] * num_msa, object),
      "template_aatype": template_aatype,
      "template_all_atom_positions": np.repeat(positions[None], NUM_TEMPLATE_HITS, 0),
      "template_all_atom_masks": np.repeat(mask[None], NUM_TEMPLATE_HITS, 0),
      "template_sum_probs": np.ones((NUM_TEMPLATE_HITS, 1), np.float32),
      "template_domain_names": np.asarray([b"t"] * NUM_TEMPLATE_HITS, object),
      "template_sequence": np.asarray([b"A" * num_res] * NUM_TEMPLATE_HITS, object),
      "all_atom_positions": positions,
      "all_atom_mask": mask,
      "resolution": np.asarray([2.0], np.float32),
      "release_date": np.asarray([b"2000-01-01"], object),
      "chain_id": np.asarray([b"bench"], object),
      "cluster_id": np.asarray([-1], np.int32),
      "cluster_size": np.asarray([0], np.int32),
      "is_distillation": np.asarray([0.0], np.float32),
  }


def _timed(function, repeats: int) -> tuple[float, object]:
  start = time.process_time()
  for _ in range(repeats):
    result = function()
  return (time.process_time() - start) / repeats, result


def bench_case(stage: str, num_res: int, num_msa: int, args, directory: pathlib.Path) -> dict:
  config = data_config.get_config(stage)
  config.backend = args.backend
  config.common.cluster_matmul_dtype = args.matmul_dtype
  config.pipeline.workers = 1
  config.pipeline.threads = 1
  config.pipeline.max_intra_op_parallelism = 1
  config.pipeline.prefetch_batches = 1
  rng = np.random.default_rng(0)
  path = directory / f"{stage}_{num_res}_{num_msa}.tfrecord"
  tfrecord.write_tfrecord(str(path), [tfrecord.encode_example(synthetic_record(num_res, num_msa, rng))
                                      for _ in range(2)])
  table = records.table_by_decoding([str(path)], tfrecord.decode_example)
  reader = records.RecordReader(table.paths, verify_checksums=True,
                                use_tensorflow=args.backend == "tf")
  repeats = args.examples
  read_s, payload = _timed(lambda: reader.read(0, int(table.offsets[0])), repeats)
  decode_s, raw = _timed(lambda: tfrecord.decode_example(payload), repeats)
  prepare_s, prepared = _timed(
      lambda: training_example.prepare_example(raw, config, np.random.default_rng(1)), repeats)
  if args.backend == "tf":
    featurize = input_pipeline._featurize_function(config)  # pylint: disable=protected-access
    inputs = {key: tf.constant(value) for key, value in prepared.items()}
    seed, recycles = tf.constant([1, 2], tf.int64), tf.constant(3)
    featurize(inputs, seed, recycles)  # trace
    featurize_s, _ = _timed(
        lambda: {k: v.numpy() for k, v in featurize(inputs, seed, recycles).items()}, repeats)
  else:
    seed = np.array([1, 2], np.int64)
    featurize_s, _ = _timed(
        lambda: training_example.featurize_numpy(prepared, seed, 3, config), repeats)
  cpu_per_example, wall_per_example = _pipeline_time(table, config, repeats, workers=1)
  row = {"stage": stage, "num_res": num_res, "num_msa": num_msa,
         "record_mb": len(payload) / 1e6, "read": read_s, "decode": decode_s,
         "prepare": prepare_s, "featurize": featurize_s, "cpu": cpu_per_example,
         "wall": wall_per_example, "parallel": {}}
  if args.backend == "numpy":
    for pool in filter(None, args.parallel.split(",")):
      worker_type, workers = pool.split(":")
      config.pipeline.worker_type = worker_type
      _, wall = _pipeline_time(table, config, 2 * repeats, workers=int(workers))
      row["parallel"][pool] = 1 / wall
  return row


def _pipeline_time(table, config, repeats: int, workers: int) -> tuple[float, float]:
  """(CPU s, wall s) per example of the InputIterator at batch size 1 in steady state: the cost
  between the 3rd and the (3 + repeats)-th batch, so that tracing, start-up and the examples
  already buffered ahead cancel out. CPU time is this process's (not worker processes')."""
  iterator = input_pipeline.InputIterator(table, config, batch_size=1, seed=0, process_index=0,
                                          process_count=1, num_parallel_calls=workers)
  for _ in range(3):
    next(iterator)
  cpu_start, wall_start = time.process_time(), time.perf_counter()
  for _ in range(repeats):
    next(iterator)
  cpu_per_example = (time.process_time() - cpu_start) / repeats
  wall_per_example = (time.perf_counter() - wall_start) / repeats
  iterator.close()
  return cpu_per_example, wall_per_example


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--stages", default="initial_training,finetuning")
  parser.add_argument("--num_res", default="256,400", help="chain lengths (before cropping)")
  parser.add_argument("--num_msa", default="1000,5000", help="MSA depths of the records")
  parser.add_argument("--examples", type=int, default=6, help="timed examples per case")
  parser.add_argument("--step_time", type=float, default=0.4,
                      help="training step time in seconds (one example per accelerator)")
  parser.add_argument("--matmul_dtype", default="float32", choices=["float32", "bfloat16"],
                      help="tf backend only (numpy computes the agreement in float32)")
  parser.add_argument("--backend", default="tf", choices=["tf", "numpy"])
  parser.add_argument("--blas_threads", default="1",
                      help="numpy backend: BLAS threads per process (0: the library's default)")
  parser.add_argument("--parallel", default="thread:2,process:2",
                      help="numpy backend: worker pools to time (type:count, comma-separated)")
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as directory:
    for stage in args.stages.split(","):
      for num_res in map(int, args.num_res.split(",")):
        for num_msa in map(int, args.num_msa.split(",")):
          rows.append(bench_case(stage, num_res, num_msa, args, pathlib.Path(directory)))
          print(f"done {stage} L={num_res} N={num_msa}", file=sys.stderr, flush=True)
  matmul = args.matmul_dtype if args.backend == "tf" else "float32"
  print(f"\nInput pipeline, {args.backend} backend, 1 CPU thread, cluster matmul {matmul}, "
        f"{os.cpu_count()} host cores; times per example (ms); step time {args.step_time} s")
  header = (f"{'stage':<17}{'N_res':>6}{'N_msa':>7}{'rec MB':>8}{'read':>7}{'decode':>8}"
            f"{'prepare':>9}{'featurize':>10}{'CPU/ex':>8}{'ex/s/core':>10}{'cores':>7}")
  print(header)
  print("-" * len(header))
  for row in rows:
    print(f"{row['stage']:<17}{row['num_res']:>6}{row['num_msa']:>7}{row['record_mb']:>8.1f}"
          f"{row['read'] * 1e3:>7.0f}{row['decode'] * 1e3:>8.0f}{row['prepare'] * 1e3:>9.0f}"
          f"{row['featurize'] * 1e3:>10.0f}{row['cpu'] * 1e3:>8.0f}{1 / row['cpu']:>10.2f}"
          f"{row['cpu'] / args.step_time:>7.2f}")
  print("CPU/ex: end-to-end pipeline CPU time per example (all threads); ex/s/core = 1 / CPU/ex; "
        "cores = CPU/ex / step time (per accelerator, batch 1 per accelerator).")
  print("wall-clock ex/s (shared machine, indicative): "
        + ", ".join(f"{r['stage'][:4]} L{r['num_res']} N{r['num_msa']}: {1 / r['wall']:.2f}"
                    for r in rows))
  for row in rows:
    if row["parallel"]:
      print(f"{row['stage'][:4]} L{row['num_res']} N{row['num_msa']} wall-clock ex/s by pool: "
            + ", ".join(f"{pool}: {rate:.2f}" for pool, rate in row["parallel"].items()))


if __name__ == "__main__":
  main()
