"""The AlphaFold training loss: weighted sum of the structure-module and head losses.

Jumper et al. (2021) Suppl. 1.9 and eq. 7 (Suppl. 1.11.5):
  L = 0.5 L_FAPE + 0.5 L_aux + 0.3 L_dist + 2.0 L_msa + 0.01 L_conf            (initial training)
    + 0.01 L_exp_resolved + 1.0 L_viol                                          (fine-tuning)
and 0.1 L_pAE for the pTM models. Here every weight is read from the heads config
(`heads.<name>.weight`, `heads.structure_module.{sidechain.weight_frac, chi_weight,
angle_norm_weight, structural_violation_loss_weight}`); `apply_training_stage` sets the paper's
values of a training stage on a heads config. As in AlphaFold, a head whose weight is 0 (or
whose outputs are absent) adds nothing and is not evaluated.

`alphafold_loss` returns the terms under the keys of AlphaFold's outputs (`distogram/loss`,
`structure_module/fape`, `structure_module/violations/...`, `total_loss`, ...), so the parity
tool compares them with `af2_tiny/outputs.npz` key by key.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections

from af2flax.losses import fape as fape_lib
from af2flax.losses import heads as heads_lib
from af2flax.losses import torsion as torsion_lib
from af2flax.losses import violations as violations_lib

Array = jax.Array

# Loss weights of the training stages (Suppl. 1.11.5 eq. 7, Suppl. Table 4, Suppl. 1.9.7).
TRAINING_STAGE_LOSS_WEIGHTS: dict[str, dict[str, float]] = {
    "initial_training": {"structure_module.structural_violation_loss_weight": 0.0,
                         "experimentally_resolved.weight": 0.0},
    "finetuning": {"structure_module.structural_violation_loss_weight": 1.0,
                   "experimentally_resolved.weight": 0.01},
}
PAE_LOSS_WEIGHT = 0.1  # pTM models: pAE head trained with weight 0.1 (Suppl. 1.9.7).


def apply_training_stage(heads_config: ml_collections.ConfigDict, stage: str,
                         train_pae: bool = False) -> ml_collections.ConfigDict:
  """A copy of `heads_config` with the loss weights of `stage` ('initial_training' or
  'finetuning'); `train_pae` sets the pAE weight to 0.1 (else 0, head not trained)."""
  if stage not in TRAINING_STAGE_LOSS_WEIGHTS:
    raise ValueError(f"Unknown training stage {stage!r}; expected one of "
                     f"{sorted(TRAINING_STAGE_LOSS_WEIGHTS)}")
  config = ml_collections.ConfigDict(heads_config.to_dict())
  with config.unlocked():
    for path, value in TRAINING_STAGE_LOSS_WEIGHTS[stage].items():
      head, field = path.split(".", 1)
      config[head][field] = value
    if "predicted_aligned_error" in config:
      config.predicted_aligned_error.weight = PAE_LOSS_WEIGHT if train_pae else 0.0
  return config


def _flatten(prefix: str, tree: Mapping[str, Any], out: dict[str, Array]) -> None:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      _flatten(f"{prefix}/{key}", value, out)
    else:
      out[f"{prefix}/{key}"] = value


def structure_module_loss(batch: Mapping[str, Array], outputs: Mapping[str, Any],
                          config: ml_collections.ConfigDict) -> tuple[Array, dict[str, Array]]:
  """Loss of the structure module: FAPE, torsions and violations.

  Jumper et al. (2021) Suppl. Alg. 20 lines 17, 23 and 28, Suppl. 1.9.1-1.9.3 and 1.9.11:
    loss = (1 - weight_frac) * mean_layers(backbone FAPE) + weight_frac * side-chain FAPE
           + chi_weight * L_chi + angle_norm_weight * L_anglenorm
           + structural_violation_loss_weight * L_viol.

  Args:
    batch: final-iteration features with the ground truth (see `alphafold_loss`).
    outputs: the structure module's outputs (`traj`, `sidechains`, `final_atom14_positions`).
    config: `heads.structure_module`.

  Returns:
    (loss, aux) with aux keys relative to 'structure_module/' ('fape', 'sidechain_fape',
    'chi_loss', 'angle_norm_loss', 'alt_naming_is_better', 'renamed_atom14_gt_positions',
    'renamed_atom14_gt_exists', 'violations/...', 'metrics/...').
  """
  aux: dict[str, Array] = {}
  atom14_pred_positions = outputs["final_atom14_positions"].astype(jnp.float32)
  renamed = fape_lib.compute_renamed_ground_truth(batch, atom14_pred_positions)
  aux.update(renamed)

  violations = None
  if config.get("compute_in_graph_metrics", True) or config.structural_violation_loss_weight:
    violations = violations_lib.find_structural_violations(batch, atom14_pred_positions, config)
    _flatten("violations", violations, aux)
    metrics = violations_lib.compute_violation_metrics(batch, atom14_pred_positions, violations)
    _flatten("metrics", metrics, aux)

  backbone = fape_lib.backbone_fape_loss(
      outputs["traj"], batch["backbone_affine_tensor"], batch["backbone_affine_mask"],
      config.fape, batch.get("use_clamped_fape"))
  aux["fape"] = backbone["fape"]

  sidechains = outputs["sidechains"]
  sidechain = fape_lib.sidechain_fape_loss(
      sidechains["frames"][-1], sidechains["atom_pos"][-1], batch["rigidgroups_gt_frames"],
      batch["rigidgroups_alt_gt_frames"], batch["rigidgroups_gt_exists"],
      renamed["renamed_atom14_gt_positions"], renamed["renamed_atom14_gt_exists"],
      renamed["alt_naming_is_better"], config.sidechain)
  aux["sidechain_fape"] = sidechain["fape"]
  weight_frac = config.sidechain.weight_frac
  loss = (1.0 - weight_frac) * backbone["loss"] + weight_frac * sidechain["loss"]

  torsion = torsion_lib.supervised_chi_loss(
      sidechains["angles_sin_cos"], sidechains["unnormalized_angles_sin_cos"], batch["aatype"],
      batch["seq_mask"], batch["chi_mask"], batch["chi_angles"],
      chi_weight=config.chi_weight, angle_norm_weight=config.angle_norm_weight)
  aux["chi_loss"] = torsion["chi_loss"]
  aux["angle_norm_loss"] = torsion["angle_norm_loss"]
  loss = loss + torsion["loss"]

  if config.structural_violation_loss_weight:
    loss = loss + config.structural_violation_loss_weight * violations_lib.structural_violation_loss(
        violations, batch["atom14_atom_exists"])
  aux["loss"] = loss
  return loss, aux


def alphafold_loss(batch: Mapping[str, Array], outputs: Mapping[str, Any],
                   heads_config: ml_collections.ConfigDict, *,
                   is_distillation: Optional[Array] = None) -> tuple[Array, dict[str, Array]]:
  """Total training loss of one example and every term under AlphaFold's output names.

  Jumper et al. (2021) Suppl. 1.9 and eq. 7 (weights from `heads_config`).

  Args:
    batch: features of the final recycling iteration (leading recycle axis already sliced, i.e.
      `batch[k][num_iter_recycling]`) with the ground truth of `af2flax.data.targets`:
      aatype, seq_mask, residue_index, resolution, all_atom_positions, all_atom_mask,
      atom14_*, atom37_atom_exists, residx_atom14_to_atom37, rigidgroups_*, chi_angles,
      chi_mask, pseudo_beta(+_mask), backbone_affine_tensor(+_mask), true_msa, bert_mask and
      optionally use_clamped_fape, is_distillation.
    outputs: the model's output dict (MODEL_CONTRACT section 4).
    heads_config: `config.heads`.
    is_distillation: scalar (bool or 0/1) marking a self-distillation example; None reads
      `batch['is_distillation']` if present (else False). Distillation examples train no
      resolution-filtered head (pLDDT, experimentally resolved, pAE): AlphaFold achieves this by
      giving them resolution 0, outside its heads' [0.1 Å, 3 Å] windows ("NMR & distillation
      have resolution = 0", AlphaFold's modules.py); here they are also excluded explicitly,
      so a config whose window includes 0 (e.g. to train on NMR) still leaves them out.
      Every other term (FAPE, torsions, distogram, masked MSA and, as in AlphaFold, the
      violation loss on the predicted atoms) applies; low-confidence residues are kept out of
      the structural terms by their zero `all_atom_mask` (Suppl. 1.3).

  Returns:
    (total_loss, aux): aux maps 'distogram/loss', 'distogram/true_dist', 'masked_msa/loss',
    'structure_module/...', 'predicted_lddt/loss', 'experimentally_resolved/loss',
    'predicted_aligned_error/loss' and 'total_loss' to arrays.
  """
  if is_distillation is None:
    is_distillation = batch.get("is_distillation", False)
  is_distillation = jnp.asarray(is_distillation, jnp.float32).reshape(())
  aux: dict[str, Array] = {}
  total = jnp.zeros((), jnp.float32)

  def active(name: str) -> bool:
    return name in heads_config and bool(heads_config[name].weight) and name in outputs

  def experimental_only(name: str, loss: Array) -> Array:
    """A resolution-filtered head's loss, zero for a distillation example."""
    if heads_config[name].get("filter_by_resolution", False):
      return loss * (1.0 - is_distillation)
    return loss

  resolution = None
  if any(active(name) and heads_config[name].get("filter_by_resolution", False)
         for name in ("predicted_lddt", "experimentally_resolved", "predicted_aligned_error")):
    if "resolution" not in batch:
      raise KeyError("alphafold_loss: batch has no 'resolution', which the resolution-filtered "
                     "confidence heads need (use 0.0 for NMR / distillation examples)")
    # A distillation example counts as resolution 0 (AlphaFold's rule for its heads).
    resolution = jnp.asarray(batch["resolution"], jnp.float32).reshape(())
    resolution = jnp.where(is_distillation > 0, 0.0, resolution)

  if active("distogram"):
    cfg, out = heads_config.distogram, outputs["distogram"]
    res = heads_lib.distogram_loss(out["logits"], out["bin_edges"], batch["pseudo_beta"],
                                   batch["pseudo_beta_mask"], cfg.num_bins)
    aux["distogram/loss"], aux["distogram/true_dist"] = res["loss"], res["true_dist"]
    total += cfg.weight * res["loss"]

  if active("masked_msa"):
    cfg, out = heads_config.masked_msa, outputs["masked_msa"]
    res = heads_lib.masked_msa_loss(out["logits"], batch["true_msa"], batch["bert_mask"],
                                    cfg.num_output)
    aux["masked_msa/loss"] = res["loss"]
    total += cfg.weight * res["loss"]

  if active("structure_module"):
    cfg = heads_config.structure_module
    loss, sm_aux = structure_module_loss(batch, outputs["structure_module"], cfg)
    aux.update({f"structure_module/{key}": value for key, value in sm_aux.items()})
    total += cfg.weight * loss

  if active("predicted_lddt"):
    cfg = heads_config.predicted_lddt
    res = heads_lib.predicted_lddt_loss(
        outputs["predicted_lddt"]["logits"], outputs["structure_module"]["final_atom_positions"],
        batch["all_atom_positions"], batch["all_atom_mask"], resolution, cfg)
    aux["predicted_lddt/loss"] = experimental_only("predicted_lddt", res["loss"])
    total += cfg.weight * aux["predicted_lddt/loss"]

  if active("experimentally_resolved"):
    cfg = heads_config.experimentally_resolved
    res = heads_lib.experimentally_resolved_loss(
        outputs["experimentally_resolved"]["logits"], batch["atom37_atom_exists"],
        batch["all_atom_mask"], resolution, cfg)
    aux["experimentally_resolved/loss"] = experimental_only("experimentally_resolved", res["loss"])
    total += cfg.weight * aux["experimentally_resolved/loss"]

  if active("predicted_aligned_error"):
    cfg, out = heads_config.predicted_aligned_error, outputs["predicted_aligned_error"]
    res = heads_lib.predicted_aligned_error_loss(
        out["logits"], out["breaks"], outputs["structure_module"]["final_affines"],
        batch["backbone_affine_tensor"], batch["backbone_affine_mask"], resolution, cfg)
    aux["predicted_aligned_error/loss"] = experimental_only("predicted_aligned_error", res["loss"])
    total += cfg.weight * aux["predicted_aligned_error/loss"]

  aux["total_loss"] = total
  return total, aux
