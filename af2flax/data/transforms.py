"""Per-example training transforms (numpy): canonical layout, MSA block deletion, crop, templates.

These run once per example (AlphaFold's "non-ensembled" transforms) and draw their randomness
from a `numpy.random.Generator` seeded from the example's stateless seed, so the same seed gives
the same example. They are cheap (index draws and O(N_res) work) and run in numpy; the transforms
that run once per recycling iteration over the whole MSA (cluster sampling, masking, nearest-
neighbour clustering: O(N_seq * N_res * N_clust)) are TensorFlow graph ops in
`msa_transforms.py`, where tf.data runs them on many threads without the GIL.

The residue crop (Suppl. 1.2.8) is decided here and applied to every per-residue array; the MSA
stays full length (with the crop window passed on) because AlphaFold assigns extra sequences to
cluster centres by their Hamming similarity over the whole alignment before cropping.
"""

from __future__ import annotations

from typing import Mapping

import ml_collections
import numpy as np

from af2flax.common import residue_constants as rc

_HHBLITS_TO_OURS = np.asarray(rc.MAP_HHBLITS_AATYPE_TO_OUR_AATYPE, np.int32)
GAP_INDEX = 21


class BadExampleError(ValueError):
  """A record whose arrays are missing or inconsistent; the input pipeline skips and counts it."""


def _first_scalar(value: np.ndarray | float | int, name: str) -> float:
  array = np.asarray(value).reshape(-1)
  if array.size == 0:
    raise BadExampleError(f"feature {name!r} is empty")
  return float(array[0])


def _require(features: Mapping[str, np.ndarray], name: str) -> np.ndarray:
  if name not in features:
    raise BadExampleError(f"feature {name!r} is missing")
  return np.asarray(features[name])


def _expect_shape(name: str, array: np.ndarray, shape: tuple[int | None, ...]) -> None:
  ok = array.ndim == len(shape) and all(s is None or s == d for s, d in zip(shape, array.shape))
  if not ok:
    raise BadExampleError(f"feature {name!r} has shape {array.shape}, expected {shape}")


def canonicalize_features(features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """AlphaFold's raw feature dict (pipeline output + structure) -> canonical training arrays.

  Accepts the layout of AlphaFold's data pipeline and of our dataset builder (`aatype` one-hot
  [L, 21] or indices, `msa` in HHblits order, `deletion_matrix_int`, `template_aatype` one-hot
  [T, L, 22] in HHblits order or indices in ours) like AlphaFold's `correct_msa_restypes`,
  `squeeze_features` and `fix_templates_aatype`. Returns
  aatype [L] (our order), msa [N, L] (our order; 21 = gap), deletion_matrix [N, L] float32,
  residue_index, between_segment_residues [L], template_* [T, ...], all_atom_positions
  [L, 37, 3], all_atom_mask [L, 37], resolution and is_distillation scalars.
  Raises BadExampleError naming the feature when arrays are missing or inconsistent.
  """
  aatype = _require(features, "aatype")
  if aatype.ndim == 2:
    aatype = np.argmax(aatype, axis=-1)
  _expect_shape("aatype", aatype, (None,))
  num_res = aatype.shape[0]
  if num_res == 0:
    raise BadExampleError("feature 'aatype' has no residues")
  msa = _require(features, "msa").astype(np.int32)
  _expect_shape("msa", msa, (None, num_res))
  if msa.shape[0] == 0:
    raise BadExampleError("feature 'msa' has no sequences (the query must be row 0)")
  if msa.min() < 0 or msa.max() > GAP_INDEX:
    raise BadExampleError(f"feature 'msa' has values outside 0..{GAP_INDEX}")
  msa = _HHBLITS_TO_OURS[msa]  # AlphaFold's pipeline writes the MSA in HHblits order
  deletion_key = "deletion_matrix_int" if "deletion_matrix_int" in features else "deletion_matrix"
  deletion_matrix = _require(features, deletion_key).astype(np.float32)
  _expect_shape(deletion_key, deletion_matrix, msa.shape)
  out = {
      "aatype": aatype.astype(np.int32),
      "msa": msa,
      "deletion_matrix": deletion_matrix,
      "residue_index": np.asarray(features.get("residue_index", np.arange(num_res)), np.int32),
      "between_segment_residues": np.asarray(
          features.get("between_segment_residues", np.zeros(num_res)), np.int32),
  }
  _expect_shape("residue_index", out["residue_index"], (num_res,))
  _expect_shape("between_segment_residues", out["between_segment_residues"], (num_res,))
  out.update(_canonical_templates(features, num_res))
  positions = _require(features, "all_atom_positions").astype(np.float32)
  _expect_shape("all_atom_positions", positions, (num_res, rc.atom_type_num, 3))
  mask = _require(features, "all_atom_mask").astype(np.float32)
  _expect_shape("all_atom_mask", mask, (num_res, rc.atom_type_num))
  if not np.all(np.isfinite(positions)):
    raise BadExampleError("feature 'all_atom_positions' has non-finite values")
  out["all_atom_positions"] = positions
  out["all_atom_mask"] = mask
  out["resolution"] = np.float32(_first_scalar(features.get("resolution", 0.0), "resolution"))
  out["is_distillation"] = np.float32(
      _first_scalar(features.get("is_distillation", 0.0), "is_distillation"))
  return out


def _canonical_templates(features: Mapping[str, np.ndarray], num_res: int) -> dict[str, np.ndarray]:
  """Template arrays in canonical layout; zero templates when the record has none."""
  if "template_aatype" not in features or np.asarray(features["template_aatype"]).size == 0:
    return {
        "template_aatype": np.zeros((0, num_res), np.int32),
        "template_all_atom_masks": np.zeros((0, num_res, rc.atom_type_num), np.float32),
        "template_all_atom_positions": np.zeros((0, num_res, rc.atom_type_num, 3), np.float32),
        "template_sum_probs": np.zeros((0, 1), np.float32),
    }
  template_aatype = np.asarray(features["template_aatype"])
  if template_aatype.ndim == 3:  # one-hot in HHblits order, as AlphaFold's pipeline writes it
    template_aatype = _HHBLITS_TO_OURS[np.argmax(template_aatype, axis=-1)]
  _expect_shape("template_aatype", template_aatype, (None, num_res))
  num_templates = template_aatype.shape[0]
  mask_key = ("template_all_atom_masks" if "template_all_atom_masks" in features
              else "template_all_atom_mask")
  masks = _require(features, mask_key).astype(np.float32)
  _expect_shape(mask_key, masks, (num_templates, num_res, rc.atom_type_num))
  positions = _require(features, "template_all_atom_positions").astype(np.float32)
  _expect_shape("template_all_atom_positions", positions,
                (num_templates, num_res, rc.atom_type_num, 3))
  sum_probs = np.asarray(features.get("template_sum_probs", np.zeros((num_templates, 1))),
                         np.float32).reshape(num_templates, 1)
  return {"template_aatype": template_aatype.astype(np.int32), "template_all_atom_masks": masks,
          "template_all_atom_positions": positions, "template_sum_probs": sum_probs}


def subsample_msa_rows(num_seq: int, max_seqs: int, rng: np.random.Generator) -> np.ndarray:
  """Indices of a uniform random subset of at most `max_seqs` MSA rows, the query (row 0) first.

  Self-distillation examples use a random subset of their MSA (Jumper et al. (2021) Suppl. 1.3).
  """
  if max_seqs <= 0 or num_seq <= max_seqs:
    return np.arange(num_seq)
  others = rng.permutation(np.arange(1, num_seq))[:max_seqs - 1]
  return np.concatenate([[0], np.sort(others)])


def block_delete_msa_rows(num_seq: int, config: ml_collections.ConfigDict,
                          rng: np.random.Generator) -> np.ndarray:
  """Indices of the MSA rows kept by MSA block deletion, in their original order.

  Jumper et al. (2021) Suppl. Alg. 1 "MSABlockDeletion": `num_blocks` blocks of
  floor(msa_fraction_per_block * N_seq) consecutive rows (the MSA is ordered by tool and
  e-value, so a block is a set of related hits) start at uniform random rows and are removed;
  the query (row 0) is always kept.
  """
  block_size = int(np.floor(num_seq * config.msa_fraction_per_block))
  num_blocks = config.num_blocks
  if config.randomize_num_blocks:
    num_blocks = int(rng.integers(0, config.num_blocks + 1))
  if block_size == 0 or num_blocks == 0:
    return np.arange(num_seq)
  starts = rng.integers(0, num_seq, size=num_blocks)
  deleted = np.zeros(num_seq, bool)
  for start in starts:
    deleted[start:start + block_size] = True
  deleted[0] = False
  return np.flatnonzero(~deleted)


def sample_crop(num_res: int, crop_size: int, rng: np.random.Generator) -> tuple[int, int]:
  """(start, size) of a contiguous residue crop, start uniform (Jumper et al. (2021) Suppl. 1.2.8).

  Chains no longer than `crop_size` are kept whole.
  """
  size = min(num_res, crop_size)
  start = int(rng.integers(0, num_res - size + 1))
  return start, size


def sample_templates(num_templates: int, config: ml_collections.ConfigDict,
                     rng: np.random.Generator) -> np.ndarray:
  """Indices of the templates used for one training example (Jumper et al. (2021) Suppl. 1.2.3).

  With `subsample_templates`, the number of templates is min(Uniform{0..N}, max_templates) for
  the N = min(num_templates, max_template_hits) top hits, chosen at random among them; otherwise
  the first `max_templates` hits (inference behaviour).
  """
  available = min(num_templates, config.max_template_hits)
  if not config.subsample_templates:
    return np.arange(min(available, config.max_templates))
  count = min(int(rng.integers(0, available + 1)), config.max_templates)
  return rng.permutation(available)[:count]


def pseudo_beta(aatype: np.ndarray, all_atom_positions: np.ndarray,
                all_atom_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """C-beta position (C-alpha for glycine) and its mask (Jumper et al. (2021) Suppl. 1.2.9).

  Works on any leading shape: aatype [..., L], positions [..., L, 37, 3], mask [..., L, 37].
  """
  is_gly = aatype == rc.restype_order["G"]
  ca, cb = rc.atom_order["CA"], rc.atom_order["CB"]
  position = np.where(is_gly[..., None], all_atom_positions[..., ca, :],
                      all_atom_positions[..., cb, :])
  mask = np.where(is_gly, all_atom_mask[..., ca], all_atom_mask[..., cb])
  return position.astype(np.float32), mask.astype(np.float32)


def msa_profile(msa: np.ndarray, num_classes: int = 22) -> np.ndarray:
  """Per-column amino-acid frequencies of the MSA [L, num_classes] (AlphaFold's HHblits profile).

  Used by the masked-MSA corruption to draw replacement residues (Suppl. 1.2.7).
  """
  num_seq, num_res = msa.shape
  flat = (np.arange(num_res)[None, :] * num_classes + msa).reshape(-1)
  counts = np.bincount(flat, minlength=num_res * num_classes).reshape(num_res, num_classes)
  return (counts / num_seq).astype(np.float32)


def crop_residues(features: Mapping[str, np.ndarray], start: int, size: int,
                  template_indices: np.ndarray) -> dict[str, np.ndarray]:
  """Applies one residue crop to every per-residue array and selects the chosen templates.

  The MSA keeps its full length (see module docstring); everything else is cut to
  [start, start + size) so that sequence, structure and templates stay aligned (Suppl. 1.2.8).
  """
  window = slice(start, start + size)
  out = {}
  for key, value in features.items():
    if key in ("msa", "deletion_matrix", "resolution", "is_distillation"):
      out[key] = value
    elif key.startswith("template_"):
      selected = value[template_indices]
      out[key] = selected if key == "template_sum_probs" else selected[:, window]
    else:
      out[key] = value[window]
  return out
