"""A pytree of arrays packed into one array along its last axis, and unpacked again.

Used where many small arrays cost more as separate arrays than as one: a layer stack's
parameters scanned as one [num_layers, P] array (`model.evoformer`, `scan_flat_params`) and
the optimizer update on one vector (`train.step.FlatView`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class Packing:
  """The layout of a pytree of arrays packed into one: after `batch_dims` leading axes that
  every leaf shares, each leaf's remaining axes flattened, the leaves concatenated along the
  last axis in tree order.

  `unpack` splits any array whose last axis has that layout (with any leading axes, e.g. one
  layer's row of a [num_layers, P] packing) back into the tree, in each leaf's dtype.
  """

  def __init__(self, tree: Any, batch_dims: int = 0):
    leaves, self.treedef = jax.tree.flatten(tree)
    self.batch_dims = batch_dims
    self.shapes = [tuple(leaf.shape[batch_dims:]) for leaf in leaves]
    self.dtypes = [leaf.dtype for leaf in leaves]
    self._offsets = np.cumsum([math.prod(shape) for shape in self.shapes])[:-1].tolist()

  def pack(self, tree: Any, dtype: Any = None) -> jax.Array:
    """`tree` (this layout's structure and shapes) as one array, in `dtype` if given."""
    return jnp.concatenate([
        leaf.reshape(leaf.shape[:self.batch_dims] + (-1,)).astype(dtype or leaf.dtype)
        for leaf in jax.tree.leaves(tree)], axis=-1)

  def unpack(self, packed: jax.Array) -> Any:
    parts = jnp.split(packed, self._offsets, axis=-1)
    return jax.tree.unflatten(self.treedef, [
        part.reshape(part.shape[:-1] + shape).astype(dtype)
        for part, shape, dtype in zip(parts, self.shapes, self.dtypes)])
