"""Forward+backward time of AlphaFold's attention modules with each attention implementation.

    python bench/attention.py [--steps 10] [--smoke]

For the attention-bearing modules of one Evoformer / extra-MSA block at initial-training shapes
(MSA row attention with pair bias [128, 256, c_m=256], MSA column attention, triangle attention
[256, 256, c_z=128], extra-MSA row attention [1024, 256, c_e=64]) in bf16, times jit(grad) of
the module (layer norms, projections, gating included) with the attention core as
  xla            logits materialised, float32 softmax (AlphaFold's arithmetic)
  cudnn          cuDNN flash attention, bias [1, H, Q, K] shared over the batch
  cudnn-bcast    cuDNN flash attention with the bias broadcast to [B, H, Q, K]
  cudnn-chunkN   cuDNN flash attention over chunks of N rows of the batch (`low_memory`)
  pallas         our Pallas kernels (`af2flax/model/pallas_attention.py`), cuDNN where they
                 do not take the shapes
and prints a table: median ms per call of the gradient and of the forward pass alone, and
the gradient program's scratch memory (GiB, XLA's `memory_analysis().temp_size_in_bytes`:
what the call needs beyond its inputs and outputs). With `xla` listed first, each other
implementation's gradients are checked against it: the norm of the difference relative to
the norm of the gradient (all parameters and the input) is printed under the table.
`--shapes finetune`: fine-tuning's [512, 384] MSA, [5120, 384] extra MSA,
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
  parser.add_argument("--impls", default="xla,cudnn,cudnn-bcast,pallas")
  parser.add_argument("--shapes", default="initial", choices=("initial", "finetune"))
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp

  from af2flax.model import evoformer, primitives, triangle
  from af2flax.model.config import model_config

  config = model_config("model_1")
  gc = config.global_config
  gc.dtype = "bfloat16"
  gc.zero_init = False   # zero output projections would make every gradient zero
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
  errors = []
  print(f"{'module':40s} " + " ".join(f"{impl:>25s}" for impl in impls)
        + "   (ms grad / ms forward / scratch GiB)", flush=True)
  for name, cls, module_config, inputs in cases:
    row = []
    for impl in impls:
      gc.attention_impl = impl if impl in ("xla", "pallas") else "cudnn"
      gc.low_memory = impl.startswith("cudnn-chunk")
      if gc.low_memory:
        gc.subbatch_size = int(impl[len("cudnn-chunk"):])
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
        forward = jax.jit(loss)
        memory = grad.memory_analysis()
        scratch = memory.temp_size_in_bytes / 2 ** 30 if memory is not None else float("nan")
        grads = grad(params, inputs[0])
        if impl == impls[0]:
          reference = grads
        else:
          errors.append(f"  {name} {impl}: |grad - {impls[0]} grad| / |{impls[0]} grad| = "
                        f"{relative_error(grads, reference):.2e}")
        grad_ms = median_ms(lambda: grad(params, inputs[0]), args.steps)
        forward_ms = median_ms(lambda: forward(params, inputs[0]), args.steps)
        row.append(f"{grad_ms:8.3f} /{forward_ms:7.3f} / {scratch:5.2f}")
      except Exception as error:  # pylint: disable=broad-except
        row.append(f"{'failed':>25s}")
        print(f"  {name} {impl}: {type(error).__name__}: {str(error)[:200]}", flush=True)
    print(f"{name:40s} " + " ".join(row), flush=True)
  primitives.fused_attention = original
  print("\n".join(errors))
  return 0


def median_ms(call, steps: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(call())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def relative_error(grads, reference) -> float:
  """|grads - reference| / |reference|, L2 norms over every gradient array together (a leaf
  whose true gradient is zero, e.g. a layer-norm offset feeding only a softmax, would make a
  per-leaf ratio meaningless)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  squared_error = squared_norm = 0.0
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    squared_error += float(np.sum(np.square(a - b)))
    squared_norm += float(np.sum(np.square(b)))
  return (squared_error / max(squared_norm, 1e-300)) ** 0.5


if __name__ == "__main__":
  sys.exit(main())
