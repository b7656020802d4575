"""Forward+backward time of AlphaFold's attention modules with each attention implementation.

    python bench/attention.py [--steps 10] [--smoke]

For the attention-bearing modules of one Evoformer / extra-MSA block at initial-training shapes
(MSA row attention with pair bias [128, 256, c_m=256], MSA column attention, triangle attention
[256, 256, c_z=128], extra-MSA row attention [1024, 256, c_e=64]) in bf16, times jit(grad) of
the module (layer norms, projections, gating included) with the attention core as
  xla            logits materialised, float32 softmax (AlphaFold's arithmetic)
  cudnn          cuDNN flash attention, bias [1, H, Q, K] shared over the batch
  cudnn-bcast    cuDNN flash attention with the bias broadcast to [B, H, Q, K]
  cudnn-xlabwd   cuDNN flash attention forward, XLA's backward pass (logits materialised)
  cudnn-chunkN   cuDNN flash attention over chunks of N rows of the batch (`low_memory`)
and prints a table: median ms per call and the compiled program's scratch memory (GiB,
XLA's `memory_analysis().temp_size_in_bytes`: what the call needs beyond its inputs and
outputs). `--shapes finetune`: fine-tuning's [512, 384] MSA, [5120, 384] extra MSA,
[384, 384] pair. Needs jax, flax, ml_collections (no TensorFlow).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--impls", default="xla,cudnn,cudnn-bcast,cudnn-xlabwd")
  parser.add_argument("--shapes", default="initial", choices=("initial", "finetune"))
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from af2flax.model import evoformer, primitives, triangle
  from af2flax.model.config import model_config

  config = model_config("model_1")
  gc = config.global_config
  gc.dtype = "bfloat16"
  ec = config.embeddings_and_evoformer.evoformer
  n, s, e = {"initial": (256, 128, 1024), "finetune": (384, 512, 5120)}[args.shapes]
  if args.smoke:
    n, s, e = 16, 4, 8
  key = jax.random.PRNGKey(0)
  bf16 = jnp.bfloat16
  msa = jax.random.normal(key, (s, n, 256), bf16)
  extra = jax.random.normal(key, (e, n, 64), bf16)
  pair = jax.random.normal(key, (n, n, 128), bf16)
  cases = [
      (f"msa_row_attention [{s},{n},256]", evoformer.MSARowAttentionWithPairBias,
       ec.msa_row_attention_with_pair_bias, (msa, jnp.ones((s, n)), pair)),
      ("msa_column_attention", evoformer.MSAColumnAttention, ec.msa_column_attention,
       (msa, jnp.ones((s, n)))),
      (f"triangle_attention [{n},{n},128]", triangle.TriangleAttention,
       ec.triangle_attention_starting_node, (pair, jnp.ones((n, n)))),
      (f"extra_msa_row_attention [{e},{n},64]", evoformer.MSARowAttentionWithPairBias,
       ec.msa_row_attention_with_pair_bias, (extra, jnp.ones((e, n)), pair)),
  ]
  original = primitives.fused_attention
  impls = args.impls.split(",")
  print(f"{'module':40s} " + " ".join(f"{impl:>17s}" for impl in impls)
        + "   (ms fwd+bwd / scratch GiB)", flush=True)
  for name, cls, module_config, inputs in cases:
    row = []
    for impl in impls:
      gc.attention_impl = "xla" if impl == "xla" else "cudnn"
      gc.low_memory = impl.startswith("cudnn-chunk")
      if gc.low_memory:
        gc.subbatch_size = int(impl[len("cudnn-chunk"):])
      gc.fused_attention_backward = "xla" if impl == "cudnn-xlabwd" else "fused"
      primitives.fused_attention = (
          (lambda *a, **k: original(*a, broadcast_bias=True, **k)) if impl == "cudnn-bcast"
          else original)
      module = cls(module_config, gc)
      try:
        params = jax.jit(module.init)(key, *inputs)

        def loss(p, x, module=module):
          out = module.apply(p, x, *inputs[1:])
          return jnp.sum(jnp.square(out.astype(jnp.float32)))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, inputs[0]).compile()
        memory = grad.memory_analysis()
        scratch = memory.temp_size_in_bytes / 2 ** 30 if memory is not None else float("nan")
        jax.block_until_ready(grad(params, inputs[0]))
        times = []
        for _ in range(args.steps):
          start = time.perf_counter()
          jax.block_until_ready(grad(params, inputs[0]))
          times.append(time.perf_counter() - start)
        row.append(f"{1e3 * statistics.median(times):9.3f} / {scratch:5.2f}")
      except Exception as error:  # pylint: disable=broad-except
        row.append(f"{'failed':>17s}")
        print(f"  {name} {impl}: {type(error).__name__}: {str(error)[:200]}", flush=True)
    print(f"{name:40s} " + " ".join(row), flush=True)
  primitives.fused_attention = original
  return 0


if __name__ == "__main__":
  sys.exit(main())
