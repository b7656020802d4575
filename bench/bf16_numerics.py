"""bf16 against float32 on AlphaFold's reference batch: every loss term, relative difference.

    python bench/bf16_numerics.py --reference ../shared/reference/af2_tiny [--gradients]

Runs the parity tool's setup (DeepMind's parameters imported, the reference batch with its
recycling, deterministic) twice: activations in float32 and in bfloat16 (parameters float32;
softmax, layer-norm statistics and structure geometry in float32, as the model does in bf16),
and prints each loss term of both and their relative difference. The performance issue's
criterion: every term within 1e-2 of float32. With `--gradients`, also the total loss's
gradient in both dtypes: the relative L2 difference of bfloat16's from float32's, biases and
the other parameters apart. With `--sums VARIANTS` (no reference needed), instead: every sum
that JAX's trace of the presets' train step (`bench/train_step.py`'s variants, at `--shapes`)
accumulates in 16 bits over more than one term (`af2flax.tools.low_precision_sums`), and exit
status 1 if there is any:

    JAX_PLATFORMS=cpu python bench/bf16_numerics.py --sums bf16-auto --shapes initial

Needs jax, flax, numpy, ml_collections.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from af2flax.tools import parity  # pylint: disable=wrong-import-position


def losses(params_haiku, batch, alphafold_config, dtype: str) -> dict[str, float]:
  params, loss_fn = parity.imported_loss_fn(params_haiku, batch, alphafold_config, dtype)

  def scalar_losses(p, features):
    total, (_, aux) = loss_fn(p, features)
    values = {k: v for k, v in aux.items() if k.endswith("loss") and jnp.ndim(v) == 0}
    values["total_loss"] = total
    return values

  with jax.default_matmul_precision("float32" if dtype == "float32" else "default"):
    values = jax.jit(scalar_losses)(params, batch)
  return {k: float(v) for k, v in jax.device_get(values).items()}


def gradients(params_haiku, batch, alphafold_config, dtype: str) -> dict[str, jax.Array]:
  """The total loss's gradient, {parameter path: array} (float32 parameters either way)."""
  params, loss_fn = parity.imported_loss_fn(params_haiku, batch, alphafold_config, dtype)
  with jax.default_matmul_precision("float32" if dtype == "float32" else "default"):
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch)[0]))(params)
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(grads))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def print_gradient_differences(fp32: dict, bf16: dict) -> None:
  """Relative L2 difference of the bfloat16 gradient from float32's, biases (names ending in
  'bias' or '_b') and the other parameters apart."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  groups = {"biases": [], "other parameters": []}
  for name, g32 in fp32.items():
    is_bias = name.endswith("bias") or name.endswith("_b")
    groups["biases" if is_bias else "other parameters"].append(
        (np.asarray(g32, np.float64), np.asarray(bf16[name], np.float64)))
  print(f"\n{'gradient':20s} {'arrays':>7s} {'relative L2 difference':>24s}")
  for label, pairs in groups.items():
    diff = np.sqrt(sum(np.sum((b - a) ** 2) for a, b in pairs))
    norm = np.sqrt(sum(np.sum(a ** 2) for a, _ in pairs))
    print(f"{label:20s} {len(pairs):7d} {diff / norm:24.2e}")


def train_step_sums(variant: str, shape_name: str, smoke: bool = False) -> list:
  """The 16-bit sums of `bench/train_step.py`'s train step for `variant` at `shape_name`
  (its `SHAPES`; `smoke`: its smoke-sized network), traced on abstract values. Off a GPU,
  our attention kernels are traced where the variant would run them on one (Pallas's
  interpreter), and XLA's attention where it would run cuDNN (whose accumulators are its
  own)."""
  if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))
  import train_step  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from af2flax.tools import low_precision_sums  # pylint: disable=g-import-not-at-top

  settings = train_step.VARIANTS[variant]
  if jax.default_backend() != "gpu":  # what traces here: our kernels interpreted, XLA for cuDNN
    traced = {k: "auto_cudnn" if v == "cudnn" else v for k, v in settings.items()}
    if traced.get("attention_impl", "auto") == "auto":
      traced["attention_impl"] = "pallas"
    train_step.VARIANTS[variant] = traced
  try:
    config, step, state, batch = train_step.abstract_step(variant, shape_name, smoke)
  finally:
    train_step.VARIANTS[variant] = settings
  if config.step_programs == "split":
    raise ValueError(f"--sums: {variant} runs the step as separate programs; trace a "
                     "variant with step_programs='one'")
  closed = jax.make_jaxpr(step)(state, batch)
  return low_precision_sums.low_precision_sums(closed)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--reference")
  parser.add_argument("--tolerance", type=float, default=1e-2)
  parser.add_argument("--gradients", action="store_true",
                      help="also compare the total loss's gradient in both dtypes")
  parser.add_argument("--sums", metavar="VARIANTS",
                      help="list the 16-bit sums of these train-step variants instead")
  parser.add_argument("--shapes", default="initial", help="with --sums: initial, finetune")
  args = parser.parse_args()
  if args.sums:
    from af2flax.tools import low_precision_sums  # pylint: disable=g-import-not-at-top
    found = 0
    for variant in args.sums.split(","):
      sums = train_step_sums(variant, args.shapes)
      print(f"{variant} at {args.shapes} shapes:\n{low_precision_sums.format_sums(sums)}\n")
      found += len(sums)
    return 1 if found else 0
  if not args.reference:
    parser.error("--reference is required (unless --sums)")
  params_haiku, batch, _, config = parity.load_reference(args.reference)
  if args.gradients:
    print_gradient_differences(gradients(params_haiku, batch, config, "float32"),
                               gradients(params_haiku, batch, config, "bfloat16"))
  fp32 = losses(params_haiku, batch, config, "float32")
  bf16 = losses(params_haiku, batch, config, "bfloat16")
  print(f"{'loss term':60s} {'float32':>12s} {'bfloat16':>12s} {'rel diff':>10s}")
  worst = 0.0
  for key in sorted(fp32):
    rel = abs(bf16[key] - fp32[key]) / max(abs(fp32[key]), 1e-12)
    if abs(fp32[key]) > 1e-6:
      worst = max(worst, rel)
    print(f"{key:60s} {fp32[key]:12.6f} {bf16[key]:12.6f} {rel:10.2e}")
  print(f"\nlargest relative difference (terms > 1e-6): {worst:.2e} "
        f"({'within' if worst <= args.tolerance else 'OUTSIDE'} {args.tolerance:g})")
  return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
  sys.exit(main())
