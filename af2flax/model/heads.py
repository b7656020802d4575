"""Output heads on the trunk's representations (networks only; losses are in af2flax/losses/).

Jumper et al. (2021) Suppl. 1.9. Every head takes `(representations, batch=None,
deterministic=True)` like the structure module, so the full model can call them uniformly;
none uses the batch or dropout. Module names must be AlphaFold's when the parent creates them:
`distogram_head`, `masked_msa_head`, `predicted_lddt_head`, `experimentally_resolved_head`,
`predicted_aligned_error_head`. Logits are float32 whatever the compute dtype (losses and
confidence take softmaxes of them).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from af2flax.common import residue_constants as rc
from af2flax.model.primitives import LayerNorm, Linear
from af2flax.model.structure import compute_dtype, final_initializer

Array = jax.Array
ConfigDict = ml_collections.ConfigDict


class DistogramHead(nn.Module):
  """Symmetric logits over binned Cβ distances from the pair representation.

  Jumper et al. (2021) Suppl. 1.9.8 "Distogram prediction".
  Returns {'logits': [N, N, num_bins], 'bin_edges': [num_bins - 1]} (Å).
  """

  config: ConfigDict          # heads.distogram
  global_config: ConfigDict
  dtype: Any = None

  @nn.compact
  def __call__(self, representations: Mapping[str, Array], batch: Mapping[str, Array] | None = None,
               deterministic: bool = True) -> dict[str, Array]:
    del batch, deterministic
    c = self.config
    half_logits = Linear(c.num_bins, initializer=final_initializer(self.global_config),
                         dtype=compute_dtype(self.global_config, self.dtype),
                         name="half_logits")(representations["pair"]).astype(jnp.float32)
    logits = half_logits + jnp.swapaxes(half_logits, -2, -3)
    bin_edges = jnp.linspace(c.first_break, c.last_break, c.num_bins - 1)
    return {"logits": logits, "bin_edges": bin_edges}


class MaskedMsaHead(nn.Module):
  """Logits of the residue type at every MSA position (BERT-style reconstruction).

  Jumper et al. (2021) Suppl. 1.9.9 "Masked MSA prediction".
  Returns {'logits': [N_seq, N_res, num_output]}.
  """

  config: ConfigDict          # heads.masked_msa
  global_config: ConfigDict
  dtype: Any = None

  @nn.compact
  def __call__(self, representations: Mapping[str, Array], batch: Mapping[str, Array] | None = None,
               deterministic: bool = True) -> dict[str, Array]:
    del batch, deterministic
    logits = Linear(self.config.num_output, initializer=final_initializer(self.global_config),
                    dtype=compute_dtype(self.global_config, self.dtype),
                    name="logits")(representations["msa"])
    return {"logits": logits.astype(jnp.float32)}


class PredictedLDDTHead(nn.Module):
  """Logits of the binned per-residue lDDT-Cα from the structure module's single act.

  Jumper et al. (2021) Suppl. Alg. 29 "predictPerResidueLDDT_Ca" lines 1-3 (the network; the
  target and loss are in losses/). Reads `representations['structure_module']`.
  Returns {'logits': [N, num_bins]}.
  """

  config: ConfigDict          # heads.predicted_lddt
  global_config: ConfigDict
  dtype: Any = None

  @nn.compact
  def __call__(self, representations: Mapping[str, Array], batch: Mapping[str, Array] | None = None,
               deterministic: bool = True) -> dict[str, Array]:
    del batch, deterministic
    c = self.config
    dtype = compute_dtype(self.global_config, self.dtype)
    act = LayerNorm(dtype=dtype, name="input_layer_norm")(representations["structure_module"])
    act = nn.relu(Linear(c.num_channels, initializer="relu", dtype=dtype, name="act_0")(act))
    act = nn.relu(Linear(c.num_channels, initializer="relu", dtype=dtype, name="act_1")(act))
    logits = Linear(c.num_bins, initializer=final_initializer(self.global_config), dtype=dtype,
                    name="logits")(act)
    return {"logits": logits.astype(jnp.float32)}


class ExperimentallyResolvedHead(nn.Module):
  """Logits that each atom37 atom is resolved in a high-resolution experiment.

  Jumper et al. (2021) Suppl. 1.9.10 '"Experimentally resolved" prediction'.
  Returns {'logits': [N, 37]} (sigmoid gives the probability).
  """

  config: ConfigDict          # heads.experimentally_resolved
  global_config: ConfigDict
  dtype: Any = None

  @nn.compact
  def __call__(self, representations: Mapping[str, Array], batch: Mapping[str, Array] | None = None,
               deterministic: bool = True) -> dict[str, Array]:
    del batch, deterministic
    logits = Linear(rc.atom_type_num, initializer=final_initializer(self.global_config),
                    dtype=compute_dtype(self.global_config, self.dtype),
                    name="logits")(representations["single"])
    return {"logits": logits.astype(jnp.float32)}


class PredictedAlignedErrorHead(nn.Module):
  """Logits of the binned aligned error of residue j in the frame of residue i.

  Jumper et al. (2021) Suppl. 1.9.7 "TM-score prediction". Returns
  {'logits': [N, N, num_bins], 'breaks': [num_bins - 1]} (Å; the last bin is open).
  """

  config: ConfigDict          # heads.predicted_aligned_error
  global_config: ConfigDict
  dtype: Any = None

  @nn.compact
  def __call__(self, representations: Mapping[str, Array], batch: Mapping[str, Array] | None = None,
               deterministic: bool = True) -> dict[str, Array]:
    del batch, deterministic
    c = self.config
    logits = Linear(c.num_bins, initializer=final_initializer(self.global_config),
                    dtype=compute_dtype(self.global_config, self.dtype),
                    name="logits")(representations["pair"])
    breaks = jnp.linspace(0.0, c.max_error_bin, c.num_bins - 1)
    return {"logits": logits.astype(jnp.float32), "breaks": breaks}
