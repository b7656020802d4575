"""The attention core alone: our Pallas kernels (each tiling choice) against cuDNN and XLA.

    python bench/pallas_attention.py [--steps 20] [--smoke] [--sweep] [--shapes finetune]

At the attention shapes of an initial-training step (crop 256, 128 MSA rows; bf16), times
`softmax(q k^T + bias, masked keys) v` and its gradient with respect to q, k, v and the
shared bias:
  xla     the logits materialised, float32 softmax (AlphaFold's arithmetic)
  cudnn   `jax.nn.dot_product_attention(implementation='cudnn')`, bias [1, H, Q, K]
  pallas  `af2flax.model.pallas_attention.attention` with its default tiling, then with each
          other backward pass (`Tiling.backward`: 'grouped', the bias gradient summed in
          registers; 'logit_grads', dQ from our query kernel)
and with `--sweep` (at the first shape, the triangle attention, or at the shapes `--sweep_at`
names) each tiling that changes one field of the default (or a few, listed in `SWEEP`).
Prints median ms of the forward pass and of forward + backward, and the gradient's
difference from XLA's (norm of the difference over the norm, all four gradients together).
Masks: the last 10% of keys are padding in every row. `--shapes finetune`: crop 384 and 512
MSA rows (our backward kernel then walks 384 or 512 queries in blocks:
`global_config.pallas_attention_max_queries=512`).
Needs a GPU for cudnn and pallas (`--smoke`: tiny shapes on the CPU, Pallas interpreted).

`--compare A --compare B ...` times only our kernels under the named tilings
(`global_config.pallas_tiling` texts over the defaults; 'default' is the defaults), at every
shape, interleaved: `--rounds` rounds, each timing every tiling's forward pass and then its
gradient `--steps` times back to back (one wait at the end, so host round trips do not
count). It prints the median ms per call over the rounds and their range, which shows
whether a difference is larger than the card's drift (the one-at-a-time `--sweep` was too
noisy to tell 10% apart on an H200, docs/benchmarks.md):

    python bench/pallas_attention.py --compare forward_stages=2,lg_stages=2 --compare default
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# (name, rows B, queries = keys N, heads H, head dim d, bias)
SHAPES = {
    "initial": (
        ("triangle attention", 256, 256, 4, 32, True),
        ("MSA row attention", 128, 256, 8, 32, True),
        ("MSA column attention", 256, 128, 8, 32, False),
        ("template triangle attention", 256, 256, 4, 16, True),
        ("extra MSA row attention (d=8: ours padded to 16)", 1024, 256, 8, 8, True),
    ),
    "finetune": (
        ("triangle attention", 384, 384, 4, 32, True),
        ("MSA row attention", 512, 384, 8, 32, True),
        ("MSA column attention", 384, 512, 8, 32, False),
        ("template triangle attention", 384, 384, 4, 16, True),
        ("extra MSA row attention, a chunk of 1,024 rows", 1024, 384, 8, 8, True),
    ),
}
SWEEP = (
    {"forward_block_q": 128}, {"forward_block_k": 32}, {"forward_block_k": 128},
    {"forward_warps": 8}, {"forward_stages": 3},
    {"lg_block_q": 32}, {"lg_block_q": 128}, {"lg_block_k": 32}, {"lg_block_k": 128},
    {"lg_warps": 8}, {"lg_stages": 1}, {"lg_stages": 3},
    {"query_block_q": 32}, {"query_block_q": 128}, {"query_block_k": 32},
    {"query_block_k": 128}, {"query_warps": 8},
    # Larger tiles with more warps together (the longer crops of fine-tuning).
    {"forward_block_q": 128, "forward_warps": 8}, {"forward_block_k": 128, "forward_warps": 8},
    {"lg_block_q": 128, "lg_warps": 8}, {"lg_block_k": 128, "lg_warps": 8},
)
# Beside the default tiling, every shape times the other backward passes (`Tiling.backward`).
OTHER_BACKWARDS = ("grouped", "logit_grads")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--sweep", action="store_true")
  parser.add_argument("--shapes", default="initial", choices=tuple(SHAPES))
  parser.add_argument("--sweep_at", default="0",
                      help="with --sweep: the shapes (indices into the table, comma-separated) "
                      "that time every tiling")
  parser.add_argument("--compare", action="append", default=[], metavar="TILING",
                      help="time our kernels under these tilings interleaved (repeatable; "
                      "'default' or FIELD=VALUE,...)")
  parser.add_argument("--rounds", type=int, default=5, help="with --compare: rounds")
  args = parser.parse_args(argv)
  if args.compare:
    return compare(args, parser)

  import jax
  import jax.numpy as jnp

  from af2flax.model import pallas_attention
  from attention import median_ms, relative_error  # bench/attention.py, beside this script

  interpret = jax.default_backend() != "gpu"
  f32 = jnp.float32

  def xla_attention(q, k, v, bias, key_mask):
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k, preferred_element_type=f32)
    if bias is not None:
      logits = logits + bias.astype(f32)[None]
    logits = jnp.where(key_mask[:, None, None, :] != 0, logits, pallas_attention.MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhc->bqhc", probs, v)

  def cudnn_attention(q, k, v, bias, key_mask):
    lengths = jnp.sum(key_mask != 0, axis=-1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias[None],
                                        key_value_seq_lengths=lengths, scale=1.0,
                                        implementation="cudnn")

  def pallas_with(tiling):
    return lambda q, k, v, bias, key_mask: pallas_attention.attention(
        q, k, v, bias, key_mask, interpret=interpret, tiling=tiling, max_queries=512)

  impls = [("xla", xla_attention)]
  if not interpret:
    impls.append(("cudnn", cudnn_attention))
  impls.append(("pallas", pallas_with(pallas_attention.DEFAULT_TILING)))
  for backward in OTHER_BACKWARDS:
    impls.append((f"pallas/{backward}", pallas_with(dataclasses.replace(
        pallas_attention.DEFAULT_TILING, backward=backward))))
  sweep = []
  if args.sweep:
    for change in SWEEP:
      label = ",".join(f"{k}={v}" for k, v in change.items())
      sweep.append((label, pallas_with(dataclasses.replace(pallas_attention.DEFAULT_TILING,
                                                           **change))))

  shapes = SHAPES[args.shapes] if not args.smoke else (("smoke", 4, 32, 2, 16, True),
                                          ("smoke no bias", 4, 32, 2, 16, False))
  print(f"{'shape':58s} {'impl':36s} {'fwd ms':>8s} {'grad ms':>8s} {'grad err':>9s}",
        flush=True)
  try:
    sweep_at = {int(i) for i in args.sweep_at.split(",")}
  except ValueError:
    parser.error(f"--sweep_at {args.sweep_at!r}: expected comma-separated shape indices")
  if not sweep_at <= set(range(len(shapes))):
    parser.error(f"--sweep_at {args.sweep_at!r}: the table has shapes 0 to {len(shapes) - 1}")
  for index, (name, rows, length, heads, head_dim, has_bias) in enumerate(shapes):
    q, k, v, bias, key_mask, d_out = _operands(rows, length, heads, head_dim, has_bias)
    operands = (q, k, v, bias)
    argnums = (0, 1, 2, 3) if has_bias else (0, 1, 2)
    reference = None
    label = f"{name} [B={rows}, N={length}, H={heads}, d={head_dim}]"
    for impl_name, impl in impls + (sweep if index in sweep_at else []):
      def loss(q, k, v, bias, impl=impl):
        return jnp.sum(impl(q, k, v, bias, key_mask).astype(f32) * d_out)
      forward = jax.jit(lambda *ops, impl=impl: impl(*ops, key_mask))
      grad = jax.jit(jax.grad(loss, argnums=argnums))
      try:
        grads = grad(*operands)
        if reference is None:
          reference = grads
        error = relative_error(grads, reference)
        forward_ms = median_ms(lambda: forward(*operands), args.steps)
        grad_ms = median_ms(lambda: grad(*operands), args.steps)
        print(f"{label:58s} {impl_name:36s} {forward_ms:8.3f} {grad_ms:8.3f} {error:9.2e}",
              flush=True)
      except Exception as error:  # pylint: disable=broad-except
        print(f"{label:58s} {impl_name:36s} failed: {type(error).__name__}: "
              f"{str(error)[:300]}", flush=True)
  return 0


def _operands(rows, length, heads, head_dim, has_bias):
  """bf16 q (scaled), k, v, a bias or None, a key mask (last 10% padding) and a float32
  output cotangent, from a fixed seed."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  bf16, f32 = jnp.bfloat16, jnp.float32
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  q = (jax.random.normal(keys[0], (rows, length, heads, head_dim), f32)
       * head_dim ** -0.5).astype(bf16)
  k = jax.random.normal(keys[1], (rows, length, heads, head_dim), bf16)
  v = jax.random.normal(keys[2], (rows, length, heads, head_dim), bf16)
  bias = jax.random.normal(keys[3], (heads, length, length), bf16) if has_bias else None
  key_mask = jnp.broadcast_to(jnp.arange(length) < length - length // 10, (rows, length))
  return q, k, v, bias, key_mask.astype(jnp.int32), jax.random.normal(keys[4], q.shape, f32)


def compare(args, parser) -> int:
  """`--compare`: our kernels under each named tiling, timed interleaved (module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from af2flax.model import pallas_attention

  if args.rounds < 1 or args.steps < 1:
    parser.error("--rounds and --steps: expected at least 1")
  tilings = {}
  for text in args.compare:
    try:
      tilings[text] = pallas_attention.tiling_from_text("" if text == "default" else text)
    except ValueError as error:
      parser.error(f"--compare: {error}")
  interpret = jax.default_backend() != "gpu"
  shapes = SHAPES[args.shapes] if not args.smoke else (("smoke", 4, 32, 2, 16, True),)
  print(f"{'shape':58s} {'tiling':36s} {'fwd ms':>8s} {'(range)':>15s} {'grad ms':>8s} "
        f"{'(range)':>15s}", flush=True)
  for name, rows, length, heads, head_dim, has_bias in shapes:
    q, k, v, bias, key_mask, d_out = _operands(rows, length, heads, head_dim, has_bias)
    argnums = (0, 1, 2, 3) if has_bias else (0, 1, 2)
    calls = {}
    for text, tiling in tilings.items():
      def attend(q, k, v, bias, tiling=tiling):
        return pallas_attention.attention(q, k, v, bias, key_mask, interpret=interpret,
                                          tiling=tiling, max_queries=512)
      grad = jax.grad(lambda q, k, v, bias, attend=attend: jnp.sum(
          attend(q, k, v, bias).astype(jnp.float32) * d_out), argnums=argnums)
      calls[text] = (jax.jit(attend), jax.jit(grad))
      for call in calls[text]:
        jax.block_until_ready(call(q, k, v, bias))   # compile and warm up
    times = {text: ([], []) for text in tilings}
    for _ in range(args.rounds):
      for text, pair in calls.items():
        for slot, call in enumerate(pair):
          jax.block_until_ready(call(q, k, v, bias))
          start = time.perf_counter()
          for _ in range(args.steps):
            out = call(q, k, v, bias)
          jax.block_until_ready(out)
          times[text][slot].append(1e3 * (time.perf_counter() - start) / args.steps)
    label = f"{name} [B={rows}, N={length}, H={heads}, d={head_dim}]"
    for text, (forward, gradient) in times.items():
      cells = " ".join(f"{statistics.median(ms):8.3f} {f'({min(ms):.3f}-{max(ms):.3f})':>15s}"
                       for ms in (forward, gradient))
      print(f"{label:58s} {text:36s} {cells}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
