"""The train step's AlphaFold objective equals AlphaFold's own training loss on af2_tiny.

`step.alphafold_objective` = the model with dropout + `alphafold_loss` on the final recycling
iteration's features, in float32 (MODEL_CONTRACT sections 3-6). The reference was computed by
DeepMind's code with every dropout rate 0, so dropout randomness does not change the value.
"""

import jax
import numpy as np
import pytest

from af2flax.model.alphafold import AlphaFold
from af2flax.train import step as step_lib
from tests.conftest import load_af2_tiny_training


@pytest.fixture(scope="module")
def reference(shared_dir):
  del shared_dir
  return load_af2_tiny_training()


def test_objective_equals_alphafold_training_loss(reference):
  config, params, batch, outputs = reference
  objective = jax.jit(step_lib.alphafold_objective(AlphaFold(config), config))
  loss, aux = objective(params, batch, jax.random.PRNGKey(7))
  np.testing.assert_allclose(loss, outputs["total_loss"], rtol=1e-4)
  for key in ("distogram/loss", "masked_msa/loss", "structure_module/fape",
              "structure_module/sidechain_fape", "predicted_lddt/loss",
              "predicted_aligned_error/loss", "experimentally_resolved/loss"):
    # The glue (recycle slice, float32, weights) is what this test pins; the per-term numerics
    # are the parity tool's (a wiring error shows as O(1), not 1e-4).
    np.testing.assert_allclose(aux[key], outputs[key], rtol=1e-3, err_msg=key)
