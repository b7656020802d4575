"""The total loss: zero-padding invariance, finite gradients, distillation and training stages."""

import jax
import numpy as np
import pytest

from af2flax.losses import total as total_lib
from tests.losses import af2_tiny

NUM_RES, PAD = 40, 8
_MASK_KEYS = ("seq_mask", "all_atom_mask", "atom14_atom_exists", "atom14_gt_exists",
              "atom14_alt_gt_exists", "atom37_atom_exists", "rigidgroups_gt_exists",
              "chi_mask", "pseudo_beta_mask", "backbone_affine_mask", "bert_mask")


def _pad_residues(tree, fill):
  """Pads every axis of size NUM_RES by PAD entries made by `fill(shape, dtype)`."""
  def pad(x):
    x = np.asarray(x)
    for axis, size in enumerate(x.shape):
      if size == NUM_RES:
        shape = list(x.shape)
        shape[axis] = PAD
        x = np.concatenate([x, fill(tuple(shape), x.dtype)], axis=axis)
    return x
  return jax.tree.map(pad, tree)


def _padded_inputs():
  rng = np.random.default_rng(0)
  batch = _pad_residues(af2_tiny.final_iteration_batch(), lambda s, d: np.zeros(s, d))
  # Model outputs at padded positions are arbitrary (finite) numbers.
  outputs = _pad_residues(af2_tiny.model_outputs(),
                          lambda s, d: rng.normal(size=s).astype(d) * 5)
  return batch, outputs


def test_zero_padding_leaves_every_term_unchanged():
  """The input pipeline pads features with zeros (masks 0): no loss term may change."""
  loss = af2_tiny.jitted_loss()
  _, reference = loss(af2_tiny.final_iteration_batch(), af2_tiny.model_outputs(), False)
  batch, outputs = _padded_inputs()
  total, padded = loss(batch, outputs, False)
  assert set(padded) == set(reference)
  for key, value in reference.items():
    value, other = np.asarray(value), np.asarray(padded[key])
    if value.ndim:
      other = other[tuple(slice(0, n) for n in value.shape)]
    np.testing.assert_allclose(other, value, rtol=2e-5, atol=1e-6, err_msg=key)
  assert np.isfinite(float(total))


def test_gradients_are_finite_and_zero_on_padding():
  batch, outputs = _padded_inputs()
  value, grads = af2_tiny.jitted_loss_and_grad()(outputs, batch)
  assert np.isfinite(float(value))
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  nonzero = 0
  for path, grad in flat:
    grad = np.asarray(grad)
    assert np.isfinite(grad).all(), path
    nonzero += int(np.abs(grad).sum() > 0)
    for axis, size in enumerate(grad.shape):
      if size == NUM_RES + PAD:
        padded_part = np.take(grad, np.arange(NUM_RES, NUM_RES + PAD), axis=axis)
        assert np.abs(padded_part).max() == 0.0, path
  assert nonzero >= 8  # Logits of 5 heads, traj, side-chain frames/atoms/angles, atoms.


def test_all_masks_zero_gives_finite_loss_and_gradients():
  batch, outputs = _padded_inputs()
  for key in _MASK_KEYS:
    batch[key] = np.zeros_like(batch[key])
  value, grads = af2_tiny.jitted_loss_and_grad()(outputs, batch)
  assert np.isfinite(float(value))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_distillation_examples_do_not_train_resolution_filtered_heads():
  loss = af2_tiny.jitted_loss()
  batch, outputs = af2_tiny.final_iteration_batch(), af2_tiny.model_outputs()
  total, aux = loss(batch, outputs, False)
  total_distill, aux_distill = loss(batch, outputs, True)
  config = af2_tiny.heads_config()
  filtered = ("predicted_lddt", "experimentally_resolved", "predicted_aligned_error")
  for name in filtered:
    assert float(aux[f"{name}/loss"]) > 0 and float(aux_distill[f"{name}/loss"]) == 0.0
  removed = sum(config[name].weight * float(aux[f"{name}/loss"]) for name in filtered)
  assert float(total_distill) == pytest.approx(float(total) - removed, rel=1e-6)
  assert float(aux_distill["distogram/loss"]) == float(aux["distogram/loss"])


def test_distillation_stays_out_of_a_resolution_window_that_includes_zero():
  """A config that trains the confidence heads on NMR (min_resolution 0) still leaves
  distillation examples (resolution 0 too) out: they are excluded by is_distillation itself.
  Without the window filter a head trains on every example (AlphaFold's rule)."""
  config = af2_tiny.heads_config()
  filtered = ("predicted_lddt", "experimentally_resolved", "predicted_aligned_error")
  for name in filtered:
    config[name].min_resolution = 0.0
  unfiltered_config = af2_tiny.heads_config()
  unfiltered_config.predicted_lddt.filter_by_resolution = False

  @jax.jit
  def loss_terms(batch, outputs):
    return (total_lib.alphafold_loss(batch, outputs, config, is_distillation=False)[1],
            total_lib.alphafold_loss(batch, outputs, config, is_distillation=True)[1],
            total_lib.alphafold_loss(batch, outputs, unfiltered_config, is_distillation=True)[1])

  batch = dict(af2_tiny.final_iteration_batch(), resolution=np.zeros((), np.float32))
  nmr, distillation, unfiltered = loss_terms(batch, af2_tiny.model_outputs())
  for name in filtered:
    assert float(nmr[f"{name}/loss"]) > 0, name
    assert float(distillation[f"{name}/loss"]) == 0.0, name
  assert float(unfiltered["predicted_lddt/loss"]) == pytest.approx(
      float(nmr["predicted_lddt/loss"]), rel=1e-6)


def test_training_stage_weights():
  config = af2_tiny.heads_config()
  initial = total_lib.apply_training_stage(config, "initial_training")
  assert initial.structure_module.structural_violation_loss_weight == 0.0
  assert initial.experimentally_resolved.weight == 0.0
  assert initial.predicted_aligned_error.weight == 0.0
  finetune = total_lib.apply_training_stage(config, "finetuning", train_pae=True)
  assert finetune.structure_module.structural_violation_loss_weight == 1.0
  assert finetune.experimentally_resolved.weight == 0.01
  assert finetune.predicted_aligned_error.weight == 0.1
  assert config.experimentally_resolved.weight == 0.01  # The input is not modified.
  with pytest.raises(ValueError, match="stage"):
    total_lib.apply_training_stage(config, "pretraining")


def test_violation_weight_adds_the_violation_loss():
  """structure_module/loss with violation weight 1 = with weight 0 + L_viol (Suppl. 1.9.11)."""
  from af2flax.losses import violations
  batch, outputs = af2_tiny.final_iteration_batch(), af2_tiny.model_outputs()
  _, aux = af2_tiny.jitted_loss()(batch, outputs, False)
  config = total_lib.apply_training_stage(af2_tiny.heads_config(), "initial_training")
  without, aux0 = jax.jit(lambda b, o: total_lib.structure_module_loss(
      b, o, config.structure_module))(batch, outputs["structure_module"])
  nested = {"between_residues": {k.split("/")[-1]: aux0[f"violations/between_residues/{k}"]
                                 for k in ("bonds_c_n_loss_mean", "angles_ca_c_n_loss_mean",
                                           "angles_c_n_ca_loss_mean",
                                           "clashes_per_atom_loss_sum")},
            "within_residues": {"per_atom_loss_sum":
                                aux0["violations/within_residues/per_atom_loss_sum"]}}
  viol = violations.structural_violation_loss(nested, batch["atom14_atom_exists"])
  assert float(viol) > 1.0
  assert float(aux["structure_module/loss"]) == pytest.approx(float(without) + float(viol),
                                                               rel=1e-5)
