"""Basic layers with AlphaFold's initialisers and parameter names.

Parameter names and shapes are those of AlphaFold's Haiku modules (`weights`/`bias` for
linear layers, `scale`/`offset` for layer norms), so that a published parameter file maps onto
our parameter tree path by path (see `import_af2.py`).

Dtype policy (STYLE rule 5): `param_dtype` is float32; `dtype` is the compute dtype (float32 or
bfloat16). Layer-norm statistics are always computed in float32: bf16 variance of pair
activations loses too much precision.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
    fan_in = int(np.prod(in_shape)) if in_shape else 1
    weights = self.param("weights", af2_initializer(self.initializer, fan_in),
                         in_shape + output_shape, self.param_dtype)
    in_letters = "abcde"[:self.num_input_dims]
    out_letters = "hijkl"[:len(output_shape)]
    output = jnp.einsum(f"...{in_letters},{in_letters}{out_letters}->...{out_letters}",
                        inputs.astype(self.dtype), weights.astype(self.dtype),
                        precision=self.precision)
    if self.use_bias:
      bias = self.param("bias", nn.initializers.constant(self.bias_init), output_shape,
                        self.param_dtype)
      output = output + bias.astype(self.dtype)
    return output


class LayerNorm(nn.Module):
  """Layer normalisation over the last axis with `scale` and `offset` vectors.

  Statistics in float32 whatever the input dtype; the output has `dtype` (default: the
  input's dtype).
  """

  eps: float = LAYER_NORM_EPSILON
  use_scale: bool = True
  use_offset: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    out_dtype = self.dtype or inputs.dtype
    x = inputs.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    channels = inputs.shape[-1]
    if self.use_scale:
      y = y * self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
    if self.use_offset:
      y = y + self.param("offset", nn.initializers.zeros, (channels,), self.param_dtype)
    return y.astype(out_dtype)
