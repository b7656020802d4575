"""AlphaFold (Haiku) parameter names <-> our Flax parameter tree.

Our Flax module and parameter names are AlphaFold's Haiku names (MODEL_CONTRACT section 1), so the
mapping is purely structural: the Haiku key `a/b/c//w` is the Flax path `['a']['b']['c']['w']`
below the Flax module that plays the role of the Haiku module at `prefix`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

HAIKU_PARAM_SEPARATOR = "//"


def haiku_to_flax(flat_params: Mapping[str, Any], prefix: str = "alphafold") -> dict[str, Any]:
  """Nests Haiku `module/path//param` arrays found under `prefix` into a Flax params tree.

  Args:
    flat_params: Haiku-style flat mapping (e.g. `np.load(params_model_1.npz)`).
    prefix: Haiku module path that the Flax module receiving the tree plays, e.g.
      "alphafold" for the full model or "alphafold/alphafold_iteration/structure_module" for the
      structure module alone. Keys outside it are ignored.

  Returns:
    Nested dict {module: {submodule: {param: array}}} (pass as `{'params': tree}`).

  Raises:
    ValueError: a key is not `path//name`, or two keys map to the same Flax path.
  """
  prefix = prefix.strip("/")
  tree: dict[str, Any] = {}
  for key, value in flat_params.items():
    if HAIKU_PARAM_SEPARATOR not in key:
      raise ValueError(f"Parameter key {key!r} is not of the form 'module/path//name'")
    module_path, param_name = key.split(HAIKU_PARAM_SEPARATOR, 1)
    if prefix:
      if module_path == prefix:
        relative = []
      elif module_path.startswith(prefix + "/"):
        relative = module_path[len(prefix) + 1:].split("/")
      else:
        continue
    else:
      relative = module_path.split("/") if module_path else []
    node = tree
    for name in relative:
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise ValueError(f"Parameter key {key!r}: {name!r} is both a parameter and a module")
    if param_name in node:
      raise ValueError(f"Parameter key {key!r} maps onto an existing Flax path")
    node[param_name] = value
  return tree


def flax_to_haiku(tree: Mapping[str, Any], prefix: str = "alphafold") -> dict[str, np.ndarray]:
  """Inverse of `haiku_to_flax`: flattens a Flax params tree into Haiku `path//name` keys."""
  flat: dict[str, np.ndarray] = {}

  def visit(node: Mapping[str, Any], path: list[str]) -> None:
    for name, value in node.items():
      if isinstance(value, Mapping):
        visit(value, path + [name])
      else:
        flat["/".join(path) + HAIKU_PARAM_SEPARATOR + name] = value

  visit(tree, [prefix.strip("/")] if prefix.strip("/") else [])
  return flat
