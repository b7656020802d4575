"""AlphaFold (Haiku) parameter files <-> af2flax parameter trees, and params checkpoints.

Our Flax tree mirrors AlphaFold's Haiku names (MODEL_CONTRACT section 1), so the mapping is
mechanical: the Haiku key
    alphafold/alphafold_iteration/evoformer/evoformer_iteration/msa_transition/transition1//bias
is the Flax path
    ('alphafold_iteration', 'evoformer', 'evoformer_iteration', 'msa_transition', 'transition1',
     'bias')
under `{'params': ...}` (the top-level `AlphaFold` module plays Haiku's `alphafold`). Stacked
layers keep their leading layer axis on both sides. `haiku_to_flax`/`flax_to_haiku` do this
below any module prefix; `flax_from_haiku`/`haiku_from_flax` for the full model (the latter
names gradients). Checks against an expected tree (from `jax.eval_shape` of the model's init)
fail with the offending path.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterable, Mapping

import jax
import numpy as np

ROOT_MODULE = "alphafold"
PARAM_SEPARATOR = "//"


class ParameterMismatchError(ValueError):
  """A parameter file does not fit the model: names or shapes differ."""


def haiku_to_flax(flat_params: Mapping[str, Any], prefix: str = ROOT_MODULE) -> dict[str, Any]:
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
    if PARAM_SEPARATOR not in key:
      raise ParameterMismatchError(
          f"Parameter key {key!r} is not of the form 'module/path{PARAM_SEPARATOR}name'")
    module_path, param_name = key.split(PARAM_SEPARATOR, 1)
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
        raise ParameterMismatchError(f"Parameter key {key!r}: {name!r} is both a parameter and "
                                     "a module")
    if param_name in node:
      raise ParameterMismatchError(f"Parameter key {key!r} maps onto an existing Flax path")
    node[param_name] = value
  return tree


def flax_to_haiku(tree: Mapping[str, Any], prefix: str = ROOT_MODULE) -> dict[str, Any]:
  """Inverse of `haiku_to_flax`: flattens a Flax params tree into Haiku `path//name` keys."""
  flat: dict[str, Any] = {}

  def visit(node: Mapping[str, Any], path: list[str]) -> None:
    for name, value in node.items():
      if isinstance(value, Mapping):
        visit(value, path + [name])
      else:
        flat["/".join(path) + PARAM_SEPARATOR + name] = value

  visit(tree, [prefix.strip("/")] if prefix.strip("/") else [])
  return flat


def haiku_from_flax(params: Mapping[str, Any]) -> dict[str, Any]:
  """The full model's parameter (or gradient) tree -> {Haiku key: leaf}.

  Accepts the tree with or without its {'params': ...} level.
  """
  if set(params) == {"params"}:
    params = params["params"]
  return flax_to_haiku(params, ROOT_MODULE)


def _shape(leaf: Any) -> tuple[int, ...]:
  """Shape of an array or ShapeDtypeStruct."""
  return tuple(int(d) for d in leaf.shape)


def check_against(flat_haiku: Mapping[str, Any], expected: Mapping[str, Any],
                  source: str = "parameters") -> None:
  """Raises ParameterMismatchError naming every missing, unexpected or mis-shaped path.

  `expected` is our tree (arrays or ShapeDtypeStructs, with or without the 'params' level).
  """
  expected_flat = haiku_from_flax(expected)
  problems = []
  for name in sorted(set(expected_flat) - set(flat_haiku)):
    problems.append(f"missing in {source}: {name} (model expects {_shape(expected_flat[name])})")
  for name in sorted(set(flat_haiku) - set(expected_flat)):
    problems.append(f"not in the model: {name} ({source} has {_shape(flat_haiku[name])})")
  for name in sorted(set(flat_haiku) & set(expected_flat)):
    got, want = _shape(flat_haiku[name]), _shape(expected_flat[name])
    if got != want:
      problems.append(f"shape mismatch: {name}: {source} has {got}, model expects {want}")
  if problems:
    shown = "\n  ".join(problems[:40])
    more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
    raise ParameterMismatchError(f"{len(problems)} parameter mismatch(es) between {source} and "
                                 f"the model:\n  {shown}{more}")


def flax_from_haiku(flat_haiku: Mapping[str, Any], expected: Mapping[str, Any] | None = None,
                    source: str = "parameters", dtype: Any = np.float32) -> dict[str, Any]:
  """{Haiku key: array} of the full model -> {'params': our tree}.

  With `expected` (our tree, e.g. `jax.eval_shape` of the model's init), every name and shape
  is checked first; keys outside 'alphafold/' are then an error too.
  """
  if expected is not None:
    check_against(flat_haiku, expected, source)
  outside = [key for key in flat_haiku if not key.startswith(ROOT_MODULE + "/")]
  if outside:
    raise ParameterMismatchError(f"{source}: key {outside[0]!r} is not under '{ROOT_MODULE}/'")
  arrays = {key: np.asarray(value, dtype=dtype) for key, value in flat_haiku.items()}
  return {"params": haiku_to_flax(arrays, ROOT_MODULE)}


def load_alphafold_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a DeepMind `params_model_*.npz` (or a reference dump's params.npz)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such AlphaFold parameter file")
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {key: data[key] for key in data.files}
  except (ValueError, OSError) as error:
    raise ParameterMismatchError(f"{path}: not a readable .npz parameter file ({error})") from error
  if not flat:
    raise ParameterMismatchError(f"{path}: the file holds no arrays")
  bad = [key for key in flat if PARAM_SEPARATOR not in key]
  if bad:
    raise ParameterMismatchError(f"{path}: keys are not Haiku parameter names, e.g. {bad[0]!r}")
  return flat


def group_norms(flat_haiku: Mapping[str, Any], prefixes: Iterable[str]) -> dict[str, float]:
  """L2 norm over all arrays whose Haiku key starts with each `prefix` + '/'."""
  norms = {}
  for prefix in prefixes:
    squares = [float(np.sum(np.square(np.asarray(value, np.float64))))
               for name, value in flat_haiku.items()
               if name.startswith(prefix + "/") or name.startswith(prefix + PARAM_SEPARATOR)]
    if not squares:
      raise KeyError(f"no parameter under {prefix!r}")
    norms[prefix] = float(np.sqrt(sum(squares)))
  return norms


# --- Orbax params checkpoints -------------------------------------------------------------

def save_params(directory: str | os.PathLike, params: Mapping[str, Any]) -> pathlib.Path:
  """Saves {'params': tree} as an Orbax checkpoint at `directory` (must not exist)."""
  import orbax.checkpoint as ocp  # Imported here: only the tools and training need Orbax.

  directory = pathlib.Path(directory).absolute()
  if directory.exists():
    raise FileExistsError(f"{directory}: already exists; choose a new output directory")
  if set(params) != {"params"}:
    params = {"params": params}
  params = jax.tree.map(np.asarray, params)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, params)
  checkpointer.wait_until_finished()
  return directory


def restore_params(directory: str | os.PathLike,
                   target: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Restores {'params': tree} saved by `save_params` (optionally onto `target`'s
  shapes/shardings, e.g. a `jax.eval_shape` of the model's init)."""
  import orbax.checkpoint as ocp

  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: no params checkpoint here")
  checkpointer = ocp.StandardCheckpointer()
  if target is None:
    return checkpointer.restore(directory)
  return checkpointer.restore(directory, target)
