"""haiku_to_flax / flax_to_haiku: Haiku `path//name` keys <-> nested Flax params."""

import numpy as np
import pytest

from af2flax.model.import_af2 import flax_to_haiku, haiku_to_flax


def test_nesting_under_a_prefix_and_back():
  flat = {
      "alphafold/alphafold_iteration/structure_module/fold_iteration/affine_update//bias": np.ones(6),
      "alphafold/alphafold_iteration/structure_module/fold_iteration/invariant_point_attention"
      "//trainable_point_weights": np.ones(12),
      "alphafold/alphafold_iteration/structure_module_other/x//w": np.ones(1),  # not under prefix
      "alphafold/alphafold_iteration/distogram_head/half_logits//weights": np.ones((2, 3)),
  }
  prefix = "alphafold/alphafold_iteration/structure_module"
  tree = haiku_to_flax(flat, prefix)
  assert set(tree) == {"fold_iteration"}
  assert tree["fold_iteration"]["affine_update"]["bias"].shape == (6,)
  assert tree["fold_iteration"]["invariant_point_attention"]["trainable_point_weights"].shape == (12,)
  back = flax_to_haiku(tree, prefix)
  assert set(back) == {k for k in flat if k.startswith(prefix + "/")}
  full = haiku_to_flax(flat)  # default prefix: the top-level "alphafold" module
  assert set(full["alphafold_iteration"]) == {"structure_module", "structure_module_other",
                                              "distogram_head"}
  assert set(flax_to_haiku(full)) == set(flat)


def test_malformed_keys_fail_with_the_key_named():
  with pytest.raises(ValueError, match="no_separator"):
    haiku_to_flax({"alphafold/no_separator": np.ones(1)})
  with pytest.raises(ValueError, match="both a parameter and a module"):
    haiku_to_flax({"alphafold/a//b": np.ones(1), "alphafold/a/b//c": np.ones(1)})
