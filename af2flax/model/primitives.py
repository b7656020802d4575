"""Basic layers with AlphaFold's initialisers and parameter names.

Parameter names and shapes are those of AlphaFold's Haiku modules (`weights`/`bias` for
linear layers, `scale`/`offset` for layer norms), so that a published parameter file maps onto
our parameter tree path by path (see `import_af2.py`).

Dtype policy (STYLE rule 5): `param_dtype` is float32; `dtype` is the compute dtype (float32 or
bfloat16). Layer-norm statistics are always computed in float32: bf16 variance of pair
activations loses too much precision.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from af2flax.model import pallas_attention

Dtype = Any

# Standard deviation of a unit normal truncated to [-2, 2] (scipy.stats.truncnorm.std(-2, 2)).
TRUNCATED_NORMAL_STDDEV_FACTOR = 0.87962566103423978
LAYER_NORM_EPSILON = 1e-5


def af2_initializer(name: str, fan_in: int) -> nn.initializers.Initializer:
  """AlphaFold's named initialisers (Suppl. 1.11.4).

  'linear': LeCun (fan-in) truncated normal; 'relu': He truncated normal; 'zeros': zeros
  (used for 'final' output layers and gating weights when `zero_init` is on).
  """
  if name == "zeros":
    return nn.initializers.zeros
  if name not in ("linear", "relu"):
    raise ValueError(f"Unknown initializer {name!r}; expected 'linear', 'relu' or 'zeros'")
  scale = (2.0 if name == "relu" else 1.0) / max(fan_in, 1)
  stddev = math.sqrt(scale) / TRUNCATED_NORMAL_STDDEV_FACTOR

  def init(key, shape, dtype=jnp.float32):
    return stddev * jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype)

  return init


def module_param(module: nn.Module, name: str, init_fn: Callable[..., jax.Array],
                 shape: tuple[int, ...], dtype: Dtype) -> jax.Array:
  """`module.param(name, init_fn, shape, dtype)` (from `module`'s compact method), checking
  an existing parameter's shape against `shape` itself.

  Flax's `param` checks it by tracing `init_fn` again (`jax.eval_shape`) every time a
  parameter is read, ~670 traces of initialisers per trace of the train step (~7% of the
  initial-training step's tracing, XLA:CPU, 2026-12-05), which the first compile waits for."""
  if module.is_initializing() or not module.has_variable("params", name):
    return module.param(name, init_fn, shape, dtype)
  value = module.get_variable("params", name)
  if tuple(np.shape(value)) != tuple(shape):
    raise ValueError(f"parameter {name!r} of {'/'.join(module.scope.path)} has shape "
                     f"{tuple(np.shape(value))}, but the module's config asks for {tuple(shape)}")
  return value


def linear_params(module: nn.Module, in_shape: tuple[int, ...], output_shape: tuple[int, ...],
                  initializer: str, use_bias: bool, bias_init: float, param_dtype: Dtype
                  ) -> tuple[jax.Array, jax.Array | None]:
  """A linear layer's `weights` [*in_shape, *output_shape] and `bias` [*output_shape] in
  `module`'s scope (called from its compact method)."""
  fan_in = int(np.prod(in_shape)) if in_shape else 1
  weights = module_param(module, "weights", af2_initializer(initializer, fan_in),
                         in_shape + output_shape, param_dtype)
  bias = (module_param(module, "bias", nn.initializers.constant(bias_init), output_shape,
                       param_dtype) if use_bias else None)
  return weights, bias


@jax.custom_vjp
def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
  """`x + bias.astype(x.dtype)`, `bias` broadcast along x's axes (numpy rules), whose
  gradient for `bias` is summed in float32 and returned in bias's own dtype.

  The same values as the expression. Differentiated by JAX, a 16-bit x's bias gradient is
  a `reduce_sum` in 16 bits over every broadcast axis (the transpose of the broadcast): in
  bfloat16, over the 33,792 MSA positions of crop 256 on the CPU, 52% off the float32 sum
  (2026-12-04). Here the sum runs in float32 and a float32 parameter gets it unrounded."""
  return x + bias.astype(x.dtype)


def _add_bias_forward(x, bias):
  return add_bias(x, bias), bias


def _add_bias_backward(bias, d_out):
  return d_out, _sum_to_shape_in_float32(d_out, bias.shape).astype(bias.dtype)


add_bias.defvjp(_add_bias_forward, _add_bias_backward)


def _sum_to_shape_in_float32(d_out: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """`d_out` summed in float32 over the axes that broadcasting an array of `shape` to
  d_out's shape adds (leading axes, and size-1 axes of `shape`): the float32 transpose of
  that broadcast."""
  lead = d_out.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
      lead + i for i, size in enumerate(shape) if size == 1 and d_out.shape[lead + i] != 1)
  return jnp.sum(d_out.astype(jnp.float32), axis=axes).reshape(shape)


def expand(x: jax.Array, shape: Sequence[int]) -> jax.Array:
  """`jnp.broadcast_to(x, shape)` (numpy rules) whose gradient is summed over the broadcast
  axes in float32, then rounded once to x's dtype.

  For a 16-bit x broadcast along many rows before an elementwise op: JAX's own transpose of
  the broadcast sums the cotangent in 16 bits (see `add_bias`). Used where an activation,
  not a parameter, is broadcast: the input embedder's per-residue terms over the MSA rows
  and over the pair (Suppl. Alg. 3), the global column attention's output over the extra
  MSA's rows before its gate (Alg. 19)."""
  return _expand(x, tuple(x.shape), tuple(shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _expand(x, x_shape, shape):  # pylint: disable=unused-argument
  return jnp.broadcast_to(x, shape)


def _expand_forward(x, x_shape, shape):
  return _expand(x, x_shape, shape), None


def _expand_backward(x_shape, shape, _, d_out):  # pylint: disable=unused-argument
  return (_sum_to_shape_in_float32(d_out, x_shape).astype(d_out.dtype),)


_expand.defvjp(_expand_forward, _expand_backward)


class Linear(nn.Module):
  """Linear layer over the last `num_input_dims` axes to an output of shape `num_output`.

  Parameters are `weights` [*in_shape, *out_shape] and `bias` [*out_shape] (AlphaFold's
  `common_modules.Linear`).
  """

  num_output: int | Sequence[int]
  initializer: str = "linear"
  num_input_dims: int = 1
  use_bias: bool = True
  bias_init: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    output_shape = (tuple(self.num_output) if isinstance(self.num_output, Sequence)
                    else (self.num_output,))
    in_shape = tuple(inputs.shape[inputs.ndim - self.num_input_dims:]) if self.num_input_dims else ()
    weights, bias = linear_params(self, in_shape, output_shape, self.initializer, self.use_bias,
                                  self.bias_init, self.param_dtype)
    in_letters = "abcde"[:self.num_input_dims]
    out_letters = "hijkl"[:len(output_shape)]
    output = jnp.einsum(f"...{in_letters},{in_letters}{out_letters}->...{out_letters}",
                        inputs.astype(self.dtype), weights.astype(self.dtype),
                        precision=self.precision)
    if bias is not None:
      output = add_bias(output, bias)
    return output


class LinearParams(nn.Module):
  """The parameters of a one-axis `Linear` (same names, shapes and initialisers), returned
  unapplied: `fused_linear` runs several of them on one input as one matrix product."""

  num_output: int
  initializer: str = "linear"
  use_bias: bool = True
  bias_init: float = 0.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, num_input: int) -> tuple[jax.Array, jax.Array | None]:
    return linear_params(self, (num_input,), (self.num_output,), self.initializer,
                         self.use_bias, self.bias_init, self.param_dtype)


def fused_linear(inputs: jax.Array, layers: Sequence[LinearParams], dtype: Dtype,
                 channels_first: bool = False) -> list[jax.Array]:
  """`[Linear(...)(inputs) for each layer]` as ONE matrix product over concatenated weights.

  The same values as separate layers (each output column is the same dot product), with the
  input read once and one wide product instead of several narrow ones; the parameters keep
  each layer's own path. Every layer needs a bias, or none does. `channels_first`: each
  output has its channels as the FIRST axis ([c, ...] for inputs [..., a]), written so by
  the matrix product itself rather than by a transpose afterwards.
  """
  params = [layer(inputs.shape[-1]) for layer in layers]
  sizes = [w.shape[-1] for w, _ in params]
  weights = jnp.concatenate([w for w, _ in params], axis=-1).astype(dtype)
  axis = 0 if channels_first else -1
  output = jnp.einsum("ah,...a->h..." if channels_first else "...a,ah->...h", *(
      (weights, inputs.astype(dtype)) if channels_first else (inputs.astype(dtype), weights)))
  biases = [b for _, b in params]
  if any(b is not None for b in biases):
    if any(b is None for b in biases):
      raise ValueError("fused_linear: every layer needs a bias, or none does")
    bias = jnp.concatenate(biases)
    output = add_bias(output, bias.reshape(bias.shape + (1,) * (output.ndim - 1))
                      if channels_first else bias)
  return jnp.split(output, np.cumsum(sizes)[:-1].tolist(), axis=axis)


class LayerNorm(nn.Module):
  """Layer normalisation over `axis` (the last by default) with `scale` and `offset` vectors.

  Statistics in float32 whatever the input dtype; the output has `dtype` (default: the
  input's dtype). The gradient is `layer_norm`'s (see there): only the input and two
  statistics per row are kept for the backward pass.
  """

  eps: float = LAYER_NORM_EPSILON
  use_scale: bool = True
  use_offset: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  axis: int = -1  # the channel axis (0 for channels-first activations)

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    channels = inputs.shape[self.axis]
    scale = (module_param(self, "scale", nn.initializers.ones, (channels,), self.param_dtype)
             if self.use_scale else None)
    offset = (module_param(self, "offset", nn.initializers.zeros, (channels,),
                           self.param_dtype) if self.use_offset else None)
    norm = layer_norm if _RECOMPUTE_LAYER_NORM.get() else layer_norm_autodiff
    return norm(inputs, scale, offset, self.axis % inputs.ndim, self.eps,
                jnp.dtype(self.dtype or inputs.dtype))


def _normalised(x: jax.Array, axis: int, eps: float):
  """(x - mean) / sqrt(var + eps) over `axis` in float32, with mean and 1/sqrt(var + eps)
  (kept dims)."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=axis, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=axis, keepdims=True) + eps)
  return (x - mean) * rstd, mean, rstd


def _along(vector: jax.Array, ndim: int, axis: int) -> jax.Array:
  """A [C] vector shaped to broadcast along `axis` of an `ndim`-axis array."""
  shape = [1] * ndim
  shape[axis] = vector.shape[0]
  return vector.reshape(shape)


def _scale_and_offset(y: jax.Array, scale, offset, axis: int, out_dtype) -> jax.Array:
  """y * scale + offset (each None: left out) along `axis`, in `out_dtype`."""
  if scale is not None:
    y = y * _along(scale, y.ndim, axis)
  if offset is not None:
    y = y + _along(offset, y.ndim, axis)
  return y.astype(out_dtype)


def layer_norm_autodiff(x, scale, offset, axis: int, eps: float, out_dtype) -> jax.Array:
  """Layer norm differentiated by JAX (the model until 2026-12-04): its backward pass keeps
  the float32 normalised input, a full-size float32 array per layer norm (e.g. 480 MiB for
  the extra MSA at fine-tuning shapes, seen in the H200's compiled step)."""
  return _scale_and_offset(_normalised(x, axis, eps)[0], scale, offset, axis, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def layer_norm(x, scale, offset, axis: int, eps: float, out_dtype) -> jax.Array:
  """Layer normalisation over `axis` (statistics in float32), `scale` and `offset` [C] or None,
  output in `out_dtype`. The same values as `layer_norm_autodiff`; its backward pass keeps
  only x (in its own dtype) and the per-row mean and 1/std, and recomputes the normalised
  input from them, so no float32 copy of the activations is written for the backward pass
  (or kept across it, where the layer norm is not rematerialised). The gradient, with
  x̂ = (x - mean) / std and g = dy * scale: dx = (g - mean(g) - x̂ mean(g x̂)) / std,
  dscale = sum(dy x̂), doffset = sum(dy), sums over every axis but `axis`."""
  return layer_norm_autodiff(x, scale, offset, axis, eps, out_dtype)


def _layer_norm_forward(x, scale, offset, axis, eps, out_dtype):
  """`layer_norm` and what its backward pass keeps: x, the mean and 1/std, the parameters."""
  xhat, mean, rstd = _normalised(x, axis, eps)
  return (_scale_and_offset(xhat, scale, offset, axis, out_dtype),
          (x, mean, rstd, scale, offset))


def _layer_norm_backward(axis, eps, out_dtype, residuals, dy):
  """(dx, dscale, doffset) from the normalised input recomputed in float32."""
  del eps, out_dtype
  x, mean, rstd, scale, offset = residuals
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dy = dy.astype(jnp.float32)
  others = tuple(i for i in range(x.ndim) if i != axis)
  g = dy * _along(scale.astype(jnp.float32), x.ndim, axis) if scale is not None else dy
  dx = rstd * (g - jnp.mean(g, axis=axis, keepdims=True)
               - xhat * jnp.mean(g * xhat, axis=axis, keepdims=True))
  dscale = (jnp.sum(dy * xhat, axis=others).astype(scale.dtype) if scale is not None
            else None)
  doffset = jnp.sum(dy, axis=others).astype(offset.dtype) if offset is not None else None
  return dx.astype(x.dtype), dscale, doffset


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)

# Whether `LayerNorm` uses `layer_norm` (True, the default) or `layer_norm_autodiff`: set for
# a model by `global_config.layer_norm_recompute` through `layer_norm_recompute(...)`.
_RECOMPUTE_LAYER_NORM: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "af2flax_recompute_layer_norm", default=True)


@contextlib.contextmanager
def layer_norm_recompute(enabled: bool):
  """Within this context, `LayerNorm`s traced use `layer_norm` (enabled) or
  `layer_norm_autodiff` (for A/B measurements: `global_config.layer_norm_recompute`)."""
  token = _RECOMPUTE_LAYER_NORM.set(bool(enabled))
  try:
    yield
  finally:
    _RECOMPUTE_LAYER_NORM.reset(token)


# --- Shared helpers -------------------------------------------------------------------------

# AlphaFold masks attention logits by replacing them with this value (`modules._SOFTMAX_MASK`).
SOFTMAX_MASK_VALUE = -1e9


def compute_dtype(global_config: Any) -> Dtype:
  """The activation dtype named by `global_config.dtype` ('float32' or 'bfloat16')."""
  name = global_config.get("dtype", "float32")
  if name not in ("float32", "bfloat16"):
    raise ValueError(f"global_config.dtype={name!r}; expected 'float32' or 'bfloat16'")
  return jnp.dtype(name)


def final_init(zero_init: bool) -> str:
  """Initialiser of layers whose output enters a residual (Suppl. 1.11.4: 'final' = zeros)."""
  return "zeros" if zero_init else "linear"


def glorot_uniform() -> nn.initializers.Initializer:
  """Haiku's VarianceScaling(1.0, 'fan_avg', 'uniform'), AlphaFold's attention initialiser."""
  return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def softmax_fp32(logits: jax.Array) -> jax.Array:
  """Softmax over the last axis computed in float32, returned in the logits' dtype.

  bf16 has 8 mantissa bits: exp of logits near the -1e9 mask or spread over tens of units
  loses the small weights entirely, so the normalisation runs in float32 (AlphaFold's
  `utils.stable_softmax`).
  """
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(logits.dtype)


def scan_trace_options(initializing: bool) -> dict[str, bool]:
  """`nn.scan`'s options for a scan traced `initializing` or not. Flax traces a scan's body
  twice by default: once more to check that its broadcast values are loop invariants and to
  collect the variables made inside it (its `check_constancy_invariants`). Past
  initialisation no variable is made, and the scans here return no broadcast outputs, so that
  trace is skipped: a scan nested in another (a stack's blocks per template) was traced four
  times. On XLA:CPU the initial-training step's trace took 6.7 against 8.0 s as one program,
  8.1 against 10.0 s as the split step's 16 programs (docs/benchmarks.md, twentieth
  session)."""
  return {"check_constancy_invariants": bool(initializing)}


def chunked_apply(module: nn.Module, chunk_size: int | None, batched_args: Sequence[jax.Array],
                  nonbatched_args: Sequence[Any] = (), axis: int = 0) -> jax.Array:
  """Applies `module(*batched_args, *nonbatched_args)` in chunks of `chunk_size` along `axis`.

  The memory-bounded evaluation of AlphaFold's `mapping.inference_subbatch` (Suppl. 1.11.8):
  the batched arguments are cut into chunks along `axis` (padded to a multiple of the chunk
  size; the padding rows are computed and dropped), the module runs once per chunk inside an
  `nn.scan` whose parameters are broadcast, and the results are put back together. The
  module's parameters keep the paths they have without chunking. The module must treat rows
  along `axis` independently. `chunk_size=None` or a short axis runs the module once.
  """
  size = batched_args[0].shape[axis]
  if chunk_size is None or chunk_size <= 0 or size <= chunk_size:
    return module(*batched_args, *nonbatched_args)
  num_chunks = -(-size // chunk_size)
  padding = num_chunks * chunk_size - size

  def to_chunks(array: jax.Array) -> jax.Array:
    array = jnp.moveaxis(array, axis, 0)
    array = jnp.pad(array, [(0, padding)] + [(0, 0)] * (array.ndim - 1))
    return array.reshape((num_chunks, chunk_size) + array.shape[1:])

  def body(mdl, carry, chunk):
    chunk = tuple(jnp.moveaxis(array, 0, axis) for array in chunk)
    return carry, mdl(*chunk, *nonbatched_args)

  scan = nn.scan(body, variable_broadcast="params",
                 split_rngs={"params": False, "dropout": True}, length=num_chunks,
                 **scan_trace_options(module.is_initializing()))
  _, outputs = scan(module, None, tuple(to_chunks(array) for array in batched_args))
  # outputs: [num_chunks, ..., chunk_size (at axis + 1), ...]
  outputs = jnp.moveaxis(outputs, axis + 1, 1)
  outputs = outputs.reshape((num_chunks * chunk_size,) + outputs.shape[2:])[:size]
  return jnp.moveaxis(outputs, 0, axis)


def shared_dropout(inputs: jax.Array, rate: float, broadcast_dim: int | None,
                   rng: jax.Array) -> jax.Array:
  """Dropout whose mask is shared along `broadcast_dim` (Suppl. 1.11.6).

  AlphaFold drops whole columns of the MSA/pair update for row-wise modules (mask shared
  along the rows, `broadcast_dim=0`) and whole rows for column-wise ones
  (`broadcast_dim=1`). Kept entries are scaled by 1/(1-rate).
  """
  keep_rate = 1.0 - rate
  shape = list(inputs.shape)
  if broadcast_dim is not None:
    shape[broadcast_dim] = 1
  keep = jax.random.bernoulli(rng, keep_rate, shape=shape)
  return (keep * inputs / keep_rate).astype(inputs.dtype)


class ResidualDropout(nn.Module):
  """Residual update with AlphaFold's shared dropout: `act + dropout(update)`.

  Jumper et al. (2021) Suppl. 1.11.6 (dropout shared across rows or columns). `config` is
  the sub-config of the module that produced `update` (`dropout_rate`, `shared_dropout`,
  `orientation`); no dropout when `deterministic`, when `global_config.deterministic` is on
  or when the rate is zero. `global_config.eval_dropout` turns dropout on even when
  `deterministic` (AlphaFold's Monte-Carlo dropout at evaluation).
  """

  config: Any
  global_config: Any

  @nn.compact
  def __call__(self, act: jax.Array, update: jax.Array, deterministic: bool) -> jax.Array:
    rate = 0.0 if self.global_config.deterministic else float(self.config.dropout_rate)
    apply = (not deterministic) or bool(self.global_config.get("eval_dropout", False))
    if apply and rate > 0.0:
      broadcast_dim = None
      if self.config.shared_dropout:
        broadcast_dim = 0 if self.config.orientation == "per_row" else 1
      update = shared_dropout(update, rate, broadcast_dim, self.make_rng("dropout"))
    return act + update.astype(act.dtype)



# --- Fused attention ----------------------------------------------------------------------

ATTENTION_IMPLS = ("xla", "cudnn", "auto", "pallas", "auto_cudnn")


def attention_impl(global_config: Any, module_key: str | None = None) -> str:
  """`global_config.attention_impl` ('xla' when unset), validated; `module_key` names a
  per-module override (e.g. 'triangle_attention_impl') that wins when set (not "")."""
  key = module_key if module_key and global_config.get(module_key, "") else "attention_impl"
  impl = global_config.get(key, "xla")
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"global_config.{key}={impl!r}; expected one of {ATTENTION_IMPLS}")
  return impl


def pallas_max_queries(global_config: Any) -> int:
  """`global_config.pallas_attention_max_queries` (`pallas_attention.BACKWARD_MAX_QUERIES`
  when unset or 0): the longest query axis the training step differentiates through our
  Pallas kernels."""
  value = int(global_config.get("pallas_attention_max_queries", 0) or
              pallas_attention.BACKWARD_MAX_QUERIES)
  if value < pallas_attention.MIN_BLOCK:
    raise ValueError(f"global_config.pallas_attention_max_queries={value}; expected 0 (the "
                     f"default, {pallas_attention.BACKWARD_MAX_QUERIES}) or at least "
                     f"{pallas_attention.MIN_BLOCK}")
  return value


def pallas_backward(global_config: Any) -> str:
  """`global_config.pallas_backward`: how our kernels' backward pass gets dK, dV and the
  bias gradient (`pallas_attention.Tiling.backward`; its default when unset)."""
  value = global_config.get("pallas_backward", "") or pallas_attention.DEFAULT_TILING.backward
  if value not in pallas_attention.BACKWARDS:
    raise ValueError(f"global_config.pallas_backward={value!r}; expected one of "
                     f"{pallas_attention.BACKWARDS}")
  return value


def attention_settings(global_config: Any, module_key: str | None = None) -> dict[str, Any]:
  """The `Attention` fields that `global_config` sets, for a module whose own override of
  `attention_impl` is `module_key` (e.g. 'triangle_attention_impl'): its core's path, the
  query length our kernels take, and the fused projection and its reading in place."""
  return {"impl": attention_impl(global_config, module_key),
          "pallas_max_queries": pallas_max_queries(global_config),
          "fuse_projections": global_config.get("fuse_projections", False),
          "pallas_reads_projection": global_config.get("pallas_reads_projection", False),
          "pallas_backward": pallas_backward(global_config),
          "pallas_pad_lengths": global_config.get("pallas_pad_lengths", False),
          "pallas_tiling": pallas_tiling_text(global_config),
          "examples_vmapped": bool(global_config.get("examples_vmapped", False))}


def pallas_tiling_text(global_config: Any) -> str:
  """`global_config.pallas_tiling` ("" when unset), checked by parsing it once here so that
  a bad value is named before any module runs."""
  text = global_config.get("pallas_tiling", "") or ""
  pallas_attention.tiling_from_text(text)
  return text


def attention_path(impl: str, q: jax.Array, k: jax.Array, mask: jax.Array, has_bias: bool,
                   pallas_max_queries: int = pallas_attention.BACKWARD_MAX_QUERIES,
                   pallas_tiling: pallas_attention.Tiling = pallas_attention.DEFAULT_TILING,
                   pallas_pad_lengths: bool = False, examples_vmapped: bool = False) -> str:
  """Which attention core runs for these (static) shapes: 'pallas', 'fused' or 'xla'.

  Our Pallas kernels (`pallas_attention.attention`) take a key mask [B, 1, 1, K] and the
  shapes `pallas_attention.unsupported_reason` accepts (at crop 256: every attention with a
  key mask, the extra MSA's 8-channel heads padded to 16; up to `pallas_max_queries`
  queries, so not fine-tuning's crop 384 by default; lengths that are not multiples of 16
  only with `pallas_pad_lengths`, e.g. the MSA column attention's 132 = 128 sequences + 4
  template rows, which otherwise runs cuDNN). 'auto' runs them on a
  GPU with 16-bit activations (a 7% faster expected training step than cuDNN's on an H200,
  docs/benchmarks.md), else cuDNN where `use_fused_attention` allows, else XLA. 'pallas'
  runs them on a GPU, and on the CPU through Pallas's interpreter (slow: tests), else as
  'auto'. 'auto_cudnn' is 'auto' without our kernels: cuDNN where 'auto' would take it, else
  XLA (so a preset that prefers cuDNN for one attention still runs on a TPU or a CPU).
  'cudnn' and 'xla' run what they name. With `examples_vmapped` (the train step vmaps
  examples), 'auto' and 'auto_cudnn' never hand an attention with a bias to cuDNN (jax's
  batching rule cannot batch a bias shared over the attention batch): XLA runs it.
  """
  cudnn_ok = not (examples_vmapped and has_bias and impl in ("auto", "auto_cudnn", "pallas"))
  if impl == "auto_cudnn":
    return "fused" if cudnn_ok and use_fused_attention("auto", q, k, has_bias) else "xla"
  pallas_fits = (mask.ndim == 4 and mask.shape[1:3] == (1, 1)
                 and pallas_attention.unsupported_reason(
                     q.shape, k.shape, max_queries=pallas_max_queries, tiling=pallas_tiling,
                     pad_lengths=pallas_pad_lengths) is None)
  backend = jax.default_backend()
  if impl == "pallas" and backend in ("gpu", "cpu") and pallas_fits:
    return "pallas"
  if (impl == "auto" and backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
      and pallas_fits):
    return "pallas"
  if impl == "pallas":
    impl = "auto"
  return "fused" if cudnn_ok and use_fused_attention(impl, q, k, has_bias) else "xla"


def use_fused_attention(impl: str, q: jax.Array, k: jax.Array, has_bias: bool) -> bool:
  """Whether `fused_attention` runs for these (static) shapes.

  'xla' never; 'cudnn' always (cuDNN raises on shapes it cannot take); 'auto' when the
  backend is a GPU, the compute dtype is 16-bit and the shapes are ones cuDNN's flash
  attention takes (head dim a multiple of 8 up to 256; even query and key lengths with a
  bias, which its backward pass needs).
  """
  if impl == "xla":
    return False
  if impl == "cudnn":
    return True
  head_dim, q_len, k_len = q.shape[-1], q.shape[-3], k.shape[-3]
  return (jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 256
          and not (has_bias and (q_len % 2 or k_len % 2)))


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                    nonbatched_bias: jax.Array | None,
                    implementation: str = "cudnn", broadcast_bias: bool = False) -> jax.Array:
  """softmax(q k^T + bias) v without materialising the logits (cuDNN flash attention).

  q [B, Q, H, d] (already scaled), k, v [B, K, H, d], mask broadcastable to [B, 1, 1, K],
  nonbatched_bias [H, Q, K] or None. Returns [B, Q, H, d].

  The key mask is passed as per-row key lengths, which assumes every masked key comes after
  every valid one (a padding mask). That holds for every mask of the model: the MSA, extra
  MSA, pair and template masks all mark padding added at the end of the residue and
  sequence axes. A row with no valid key attends to its first key instead of uniformly to
  all (AlphaFold's -1e9 bias); such rows are padding and never reach a valid output.
  `implementation='xla'` runs the same masking through XLA (tests on CPU).
  `broadcast_bias` hands cuDNN the bias broadcast over the batch (its bias-gradient reduction
  over a broadcast batch is a separate, poorly parallel kernel; see docs/benchmarks.md).
  """
  batch, k_len = q.shape[0], k.shape[-3]
  key_mask = jnp.broadcast_to(mask != 0, (batch, 1, 1, k_len))[:, 0, 0, :]
  lengths = jnp.maximum(jnp.sum(key_mask, axis=-1), 1).astype(jnp.int32)
  bias = None if nonbatched_bias is None else nonbatched_bias.astype(q.dtype)[None]
  if bias is not None and broadcast_bias:
    bias = jnp.broadcast_to(bias, (batch,) + bias.shape[1:])
  return jax.nn.dot_product_attention(q, k, v, bias=bias, key_value_seq_lengths=lengths,
                                      scale=1.0, implementation=implementation)


# --- Attention (Suppl. Alg. 7, 8, 13, 14, 17, 19) ---------------------------------------------

class _AttentionParams:
  """Parameter access shared by `Attention` and `GlobalAttention` (modules with `dtype` and
  `param_dtype` fields)."""

  def _param(self, name: str, init: nn.initializers.Initializer, shape: tuple[int, ...]):
    """A weight, cast to the activations' dtype."""
    return module_param(self, name, init, shape, self.param_dtype).astype(self.dtype)

  def _bias(self, name: str, init: nn.initializers.Initializer, shape: tuple[int, ...]):
    """A bias in its parameter dtype: `add_bias` casts it and sums its gradient in float32."""
    return module_param(self, name, init, shape, self.param_dtype)


class Attention(_AttentionParams, nn.Module):
  """Gated multi-head attention with an optional bias shared over the batch axis.

  Jumper et al. (2021) Suppl. Alg. 7 lines 2-7 / Alg. 8 / Alg. 13-14 / Alg. 17 (the attention
  core they share). Queries are scaled by `(key_dim / num_head) ** -0.5` after projection;
  masked keys get logit -1e9; the softmax runs in float32; gating is
  `sigmoid(q_data @ gating_w + gating_b)` per head and channel. Parameters (AlphaFold's
  names): `query_w` [c_q, H, d_k], `key_w`, `value_w` [c_m, H, d], `gating_w` [c_q, H, d_v],
  `gating_b` [H, d_v], `output_w` [H, d_v, c_out], `output_b` [c_out].

  Shapes: q_data [B, Q, c_q], m_data [B, K, c_m], mask broadcastable to [B, H, Q, K]
  (non-zero = attend), nonbatched_bias [H, Q, K] or None. Returns [B, Q, output_dim].
  """

  num_head: int
  output_dim: int
  key_dim: int | None = None     # total over heads; default c_q
  value_dim: int | None = None   # total over heads; default c_m
  gating: bool = True
  zero_init: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  impl: str = "xla"              # 'xla' | 'cudnn' | 'auto' | 'pallas' (`attention_path`)
  pallas_max_queries: int = pallas_attention.BACKWARD_MAX_QUERIES   # `attention_path`
  # The caller passes the same array as q_data and m_data: q, k, v and the gate come from one
  # matrix product over concatenated weights (same values and parameters).
  fuse_projections: bool = False
  # With fuse_projections, where our Pallas kernels run: they read q, k and v in place from
  # the fused projection (`pallas_attention.fused_self_attention`), not from slices of it
  # copied out (and q scaled) in memory.
  pallas_reads_projection: bool = False
  # `pallas_attention.Tiling.backward` of our kernels (global_config.pallas_backward).
  pallas_backward: str = pallas_attention.DEFAULT_TILING.backward
  # Our kernels take lengths that are not multiples of 16, padded (global_config
  # .pallas_pad_lengths; `pallas_attention.attention`).
  pallas_pad_lengths: bool = False
  # `pallas_attention.Tiling` fields over its defaults (global_config.pallas_tiling).
  pallas_tiling: str = ""
  # The train step vmaps examples (global_config.examples_vmapped): no cuDNN with a bias.
  examples_vmapped: bool = False

  @nn.compact
  def __call__(self, q_data: jax.Array, m_data: jax.Array, mask: jax.Array,
               nonbatched_bias: jax.Array | None = None) -> jax.Array:
    key_dim = self.key_dim or q_data.shape[-1]
    value_dim = self.value_dim or m_data.shape[-1]
    if key_dim % self.num_head or value_dim % self.num_head:
      raise ValueError(f"key_dim={key_dim} and value_dim={value_dim} must be multiples of "
                       f"num_head={self.num_head}")
    key_dim //= self.num_head
    value_dim //= self.num_head
    q_ch, m_ch, heads = q_data.shape[-1], m_data.shape[-1], self.num_head
    param = self._param
    query_w = param("query_w", glorot_uniform(), (q_ch, heads, key_dim))
    key_w = param("key_w", glorot_uniform(), (m_ch, heads, key_dim))
    value_w = param("value_w", glorot_uniform(), (m_ch, heads, value_dim))

    q_data = q_data.astype(self.dtype)
    m_data = m_data.astype(self.dtype)
    gating_w = (param("gating_w", nn.initializers.zeros, (q_ch, heads, value_dim))
                if self.gating else None)
    weighted_avg = None
    if self.fuse_projections and gating_w is not None and key_dim == value_dim:
      if q_data.shape != m_data.shape:
        raise ValueError(f"fuse_projections: q_data {q_data.shape} and m_data {m_data.shape} "
                         "must be the same array")
      weights = jnp.concatenate([query_w, key_w, value_w, gating_w], axis=1)
      projection = jnp.einsum("bqa,ahc->bqhc", q_data, weights)      # [B, Q, 4H, d]
      from_projection = self._pallas_from_projection(projection, heads, key_dim, mask,
                                                     nonbatched_bias)
      if from_projection is not None:
        weighted_avg, gate_values = from_projection
      else:
        q, k, v, gate_values = jnp.split(projection, 4, axis=2)
        q = q * key_dim ** (-0.5)
    else:
      q = jnp.einsum("bqa,ahc->bqhc", q_data, query_w) * key_dim ** (-0.5)
      k = jnp.einsum("bka,ahc->bkhc", m_data, key_w)
      v = jnp.einsum("bka,ahc->bkhc", m_data, value_w)
      gate_values = (jnp.einsum("bqc,chv->bqhv", q_data, gating_w) if gating_w is not None
                     else None)
    if weighted_avg is None:
      weighted_avg = self._core(q, k, v, mask, nonbatched_bias)

    if gate_values is not None:
      gating_b = self._bias("gating_b", nn.initializers.ones, (heads, value_dim))
      weighted_avg = weighted_avg * jax.nn.sigmoid(add_bias(gate_values, gating_b))

    output_init = nn.initializers.zeros if self.zero_init else glorot_uniform()
    output_w = param("output_w", output_init, (heads, value_dim, self.output_dim))
    output_b = self._bias("output_b", nn.initializers.zeros, (self.output_dim,))
    return add_bias(jnp.einsum("bqhc,hco->bqo", weighted_avg, output_w), output_b)

  def _core(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
            bias: jax.Array | None) -> jax.Array:
    """softmax(q k^T + bias, masked keys) v through the path `attention_path` picks."""
    tiling = self._pallas_tiling()
    path = attention_path(self.impl, q, k, mask, bias is not None, self.pallas_max_queries,
                          tiling, self.pallas_pad_lengths, self.examples_vmapped)
    if path == "pallas":
      return pallas_attention.attention(
          q, k, v, bias, mask[:, 0, 0, :], interpret=jax.default_backend() != "gpu",
          tiling=tiling, max_queries=self.pallas_max_queries,
          pad_lengths=self.pallas_pad_lengths)
    if path == "fused":
      return fused_attention(q, k, v, mask, bias)
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k)
    if bias is not None:  # shared over the batch: its gradient summed over rows in float32
      logits = add_bias(logits, bias)
    logits = jnp.where(mask != 0, logits.astype(jnp.float32), SOFTMAX_MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    return jnp.einsum("bhqk,bkhc->bqhc", weights, v)

  def _pallas_from_projection(self, projection: jax.Array, heads: int, head_dim: int,
                              mask: jax.Array, bias: jax.Array | None
                              ) -> tuple[jax.Array, jax.Array] | None:
    """(attention, gate) read from the fused projection [B, Q, 4H, d] by our kernels, or
    None when `pallas_reads_projection` is off or the kernels would not run on the sliced
    q, k, v either (`attention_path`, `pallas_attention.fused_projection_reason`)."""
    if not self.pallas_reads_projection:
      return None
    q_like = jax.ShapeDtypeStruct(projection.shape[:2] + (heads, head_dim), projection.dtype)
    if (attention_path(self.impl, q_like, q_like, mask, bias is not None,
                       self.pallas_max_queries, self._pallas_tiling()) != "pallas"
        or pallas_attention.fused_projection_reason(projection.shape, heads,
                                                    self.pallas_max_queries) is not None):
      return None
    return pallas_attention.fused_self_attention(
        projection, heads, head_dim ** (-0.5), bias, mask[:, 0, 0, :],
        interpret=jax.default_backend() != "gpu", tiling=self._pallas_tiling(),
        max_queries=self.pallas_max_queries)

  def _pallas_tiling(self) -> pallas_attention.Tiling:
    tiling = pallas_attention.tiling_from_text(self.pallas_tiling)
    if self.pallas_backward == tiling.backward:
      return tiling
    return dataclasses.replace(tiling, backward=self.pallas_backward)


class GlobalAttention(_AttentionParams, nn.Module):
  """Global (mean-query) gated attention, the core of MSAColumnGlobalAttention.

  Jumper et al. (2021) Suppl. Alg. 19 lines 2-7. One query per row: the masked mean of the
  rows' queries, projected to `num_head` heads; keys and values have a single head
  (`key_w` [c, d_k], `value_w` [c, d_v]); the gate is per query row.

  Shapes: q_data, m_data [B, K, c]; q_mask [B, K, 1] (non-zero = valid). Returns
  [B, K, output_dim].
  """

  num_head: int
  output_dim: int
  key_dim: int | None = None
  value_dim: int | None = None
  gating: bool = True
  zero_init: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_data: jax.Array, m_data: jax.Array, q_mask: jax.Array) -> jax.Array:
    key_dim = (self.key_dim or q_data.shape[-1]) // self.num_head
    value_dim = (self.value_dim or m_data.shape[-1]) // self.num_head
    q_ch, m_ch, heads = q_data.shape[-1], m_data.shape[-1], self.num_head
    param = self._param
    query_w = param("query_w", glorot_uniform(), (q_ch, heads, key_dim))
    key_w = param("key_w", glorot_uniform(), (m_ch, key_dim))
    value_w = param("value_w", glorot_uniform(), (m_ch, value_dim))

    q_data = q_data.astype(self.dtype)
    m_data = m_data.astype(self.dtype)
    q_mask = q_mask.astype(self.dtype)
    v = jnp.einsum("bka,ac->bkc", m_data, value_w)
    # Masked mean of the queries over the rows (AlphaFold's `utils.mask_mean`, eps 1e-10).
    q_avg = (jnp.sum(q_mask * q_data, axis=1)
             / (jnp.sum(q_mask, axis=1) + 1e-10).astype(self.dtype))
    q = jnp.einsum("ba,ahc->bhc", q_avg, query_w) * key_dim ** (-0.5)
    k = jnp.einsum("bka,ac->bkc", m_data, key_w)
    logits = jnp.einsum("bhc,bkc->bhk", q, k)
    logits = jnp.where(q_mask[:, None, :, 0] != 0, logits.astype(jnp.float32),
                       SOFTMAX_MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weighted_avg = jnp.einsum("bhk,bkc->bhc", weights, v)

    output_init = nn.initializers.zeros if self.zero_init else glorot_uniform()
    output_w = param("output_w", output_init, (heads, value_dim, self.output_dim))
    output_b = self._bias("output_b", nn.initializers.zeros, (self.output_dim,))
    if self.gating:
      gating_w = param("gating_w", nn.initializers.zeros, (q_ch, heads, value_dim))
      gating_b = self._bias("gating_b", nn.initializers.ones, (heads, value_dim))
      gate_values = jax.nn.sigmoid(add_bias(jnp.einsum("bqc,chv->bqhv", q_data, gating_w),
                                            gating_b))
      weighted_avg = expand(weighted_avg[:, None], gate_values.shape) * gate_values
      return add_bias(jnp.einsum("bqhc,hco->bqo", weighted_avg, output_w), output_b)
    output = add_bias(jnp.einsum("bhc,hco->bo", weighted_avg, output_w), output_b)
    return jnp.broadcast_to(output[:, None], q_data.shape[:2] + (self.output_dim,))


# --- Transition (Suppl. Alg. 9, 15) -----------------------------------------------------------

KERNEL_IMPLS = ("xla", "auto", "pallas")


def transition_path(global_config: Any, act: jax.Array, dtype: Dtype, hidden: int) -> str:
  """Which transition runs for this (static) input: 'pallas' or 'xla'.

  `global_config.transition_impl`: 'xla' (layer norm and two `Linear`s, the hidden layer
  in memory, chunked with `chunk_size`), 'auto' (our kernel, `pallas_transition`, on a GPU
  when the activations are 16-bit and in the compute dtype, and the widths are powers of two
  >= 16; else XLA), 'pallas' (our kernel wherever the widths allow, through Pallas's
  interpreter off GPUs: tests). A `Transition` given chunks (`low_memory`, the fine-tuning
  preset's `extra_msa_subbatch_size`) runs XLA's chunks whatever this says: the kernel's
  forward pass never writes the hidden layer, but its backward pass (XLA's) would write it
  for all rows at once.
  """
  # pylint: disable-next=import-outside-toplevel
  from af2flax.model import pallas_transition  # it imports this module
  return kernel_path(global_config, "transition_impl", act, dtype,
                     pallas_transition.unsupported_reason(act.shape[-1], hidden) is None)


def kernel_path(global_config: Any, key: str, act: jax.Array, dtype: Dtype,
                widths_fit: bool) -> str:
  """'pallas' or 'xla' for a layer whose Pallas kernel `global_config[key]` chooses
  (`KERNEL_IMPLS`; unset: 'xla'): 'auto' takes the kernel on a GPU when `act` is 16-bit
  and in the compute dtype `dtype`; 'pallas' wherever the backend is a GPU or the CPU
  (Pallas's interpreter: tests); either only when `widths_fit`."""
  impl = global_config.get(key, "xla") or "xla"
  if impl not in KERNEL_IMPLS:
    raise ValueError(f"global_config.{key}={impl!r}; expected one of {KERNEL_IMPLS}")
  if impl == "xla" or not widths_fit:
    return "xla"
  if impl == "pallas":
    return "pallas" if jax.default_backend() in ("gpu", "cpu") else "xla"
  return ("pallas" if jax.default_backend() == "gpu" and act.dtype == dtype
          and jnp.dtype(dtype).itemsize == 2 else "xla")


class LayerNormParams(nn.Module):
  """A `LayerNorm`'s `scale` and `offset` [c] (same names and initialisers), unapplied."""

  @nn.compact
  def __call__(self, channels: int) -> tuple[jax.Array, jax.Array]:
    return (module_param(self, "scale", nn.initializers.ones, (channels,), jnp.float32),
            module_param(self, "offset", nn.initializers.zeros, (channels,), jnp.float32))


class _TransitionMLP(nn.Module):
  """The two linear layers of a transition; shares its parent's parameter scope."""

  num_intermediate: int
  num_output: int
  zero_init: bool
  dtype: Dtype

  @nn.compact
  def __call__(self, act: jax.Array) -> jax.Array:
    act = Linear(self.num_intermediate, initializer="relu", dtype=self.dtype,
                 name="transition1")(act)
    act = jax.nn.relu(act)
    return Linear(self.num_output, initializer=final_init(self.zero_init), dtype=self.dtype,
                  name="transition2")(act)


class Transition(nn.Module):
  """Transition layer: LayerNorm, Linear(n*c) + ReLU, Linear(c).

  Jumper et al. (2021) Suppl. Alg. 9 "MSATransition" / Alg. 15 "PairTransition". Rows along
  axis 0 are independent, so the layer runs in chunks of `chunk_size` rows when given
  (AlphaFold's inference subbatching). As in AlphaFold the mask is not applied. With
  `global_config.transition_impl` 'auto' on a GPU (`transition_path`) the whole layer runs
  as one Pallas kernel that keeps the hidden layer on chip (`pallas_transition`), with the
  same parameters.
  """

  config: Any           # num_intermediate_factor
  global_config: Any
  chunk_size: int | None = None

  @nn.compact
  def __call__(self, act: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    del mask  # AlphaFold's transition ignores the mask; padded rows are masked downstream.
    dtype = compute_dtype(self.global_config)
    channels = act.shape[-1]
    hidden = int(channels * self.config.num_intermediate_factor)
    chunked = self.chunk_size is not None and 0 < self.chunk_size < act.shape[0]
    if not chunked and transition_path(self.global_config, act, dtype, hidden) == "pallas":
      # pylint: disable-next=import-outside-toplevel
      from af2flax.model import pallas_transition  # it imports this module
      scale, offset = LayerNormParams(name="input_layer_norm")(channels)
      w1, b1 = LinearParams(hidden, initializer="relu", name="transition1")(channels)
      w2, b2 = LinearParams(channels, initializer=final_init(self.global_config.zero_init),
                            name="transition2")(hidden)
      return pallas_transition.transition(
          act, scale, offset, w1, b1, w2, b2, LAYER_NORM_EPSILON,
          tiling=pallas_transition.tiling_from_text(
              self.global_config.get("transition_tiling", "") or ""),
          interpret=jax.default_backend() != "gpu",
          backward=self.global_config.get("transition_backward", "xla") or "xla")
    act = LayerNorm(name="input_layer_norm")(act)
    mlp = _TransitionMLP(hidden, channels, self.global_config.zero_init, dtype)
    nn.share_scope(self, mlp)
    return chunked_apply(mlp, self.chunk_size, [act], axis=0)
