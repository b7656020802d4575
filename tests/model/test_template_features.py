"""Template geometry features: torsion angles, distograms, pseudo-beta."""

import jax
import numpy as np
import pytest

from af2flax.common import residue_constants as rc
from af2flax.model import template_features as tf_lib


def _dihedral(p0, p1, p2, p3):
  """Textbook (IUPAC) dihedral angle of four points, float64."""
  b0, b1, b2 = p0 - p1, p2 - p1, p3 - p2
  b1 = b1 / np.linalg.norm(b1)
  v = b0 - np.dot(b0, b1) * b1
  w = b2 - np.dot(b2, b1) * b1
  return np.arctan2(np.dot(np.cross(b1, v), w), np.dot(v, w))


@pytest.fixture(scope="module")
def two_chains():
  """Two random chains [2, N, 37, 3] with all atoms of their residue types present."""
  rng = np.random.default_rng(0)
  aatype = rng.integers(0, 20, size=(2, 9)).astype(np.int32)
  aatype[0, 3] = rc.restype_order["D"]   # Asp: chi2 is pi-periodic.
  positions = rng.normal(scale=3.0, size=(2, 9, 37, 3)).astype(np.float32)
  mask = rc.restype_atom37_mask[aatype].astype(np.float32)
  result = jax.jit(tf_lib.atom37_to_torsion_angles)(aatype, positions, mask)
  return aatype, positions, mask, {key: np.asarray(value) for key, value in result.items()}


def test_torsions_are_textbook_dihedrals(two_chains):
  aatype, positions, _, result = two_chains
  n, ca, c, o = (rc.atom_order[a] for a in ("N", "CA", "C", "O"))
  sin_cos = result["torsion_angles_sin_cos"]
  for b in range(2):
    for i in range(1, 9):
      p, q = positions[b, i - 1].astype(np.float64), positions[b, i].astype(np.float64)
      expected = {
          0: _dihedral(p[ca], p[c], q[n], q[ca]),                    # omega (pre)
          1: _dihedral(p[c], q[n], q[ca], q[c]),                     # phi
          2: _dihedral(q[n], q[ca], q[c], q[o]) + np.pi,             # psi (mirrored via O)
      }
      for chi, atoms in enumerate(rc.chi_angles_atoms[rc.restype_1to3[rc.restypes[aatype[b, i]]]]):
        expected[3 + chi] = _dihedral(*[q[rc.atom_order[a]] for a in atoms])
      for index, angle in expected.items():
        np.testing.assert_allclose(sin_cos[b, i, index], [np.sin(angle), np.cos(angle)],
                                   atol=2e-4, err_msg=f"chain {b} residue {i} torsion {index}")


def test_masks_and_alternative_torsions(two_chains):
  aatype, _, mask, result = two_chains
  torsion_mask = result["torsion_angles_mask"]
  np.testing.assert_array_equal(torsion_mask[:, 0, :2], 0.0)  # no predecessor: no omega, phi
  np.testing.assert_array_equal(torsion_mask[:, 1:, :3], 1.0)
  num_chis = np.asarray(rc.chi_angles_mask)[aatype].sum(-1)
  np.testing.assert_array_equal(torsion_mask[..., 3:].sum(-1), num_chis)
  alt = result["alt_torsion_angles_sin_cos"]
  periodic = np.asarray(rc.chi_pi_periodic)[aatype]
  assert periodic[0, 3].tolist() == [0, 1, 0, 0]
  np.testing.assert_allclose(alt[..., 3:, :],
                             np.where(periodic[..., None] > 0, -1.0, 1.0)
                             * result["torsion_angles_sin_cos"][..., 3:, :])
  # A missing atom removes every torsion it defines.
  missing_cb = mask.copy()
  missing_cb[0, 4, rc.atom_order["CB"]] = 0.0
  changed = tf_lib.atom37_to_torsion_angles(aatype, two_chains[1], missing_cb)
  has_chi1 = np.asarray(rc.chi_angles_mask)[aatype[0, 4], 0] > 0
  assert float(changed["torsion_angles_mask"][0, 4, 3]) == 0.0
  assert float(torsion_mask[0, 4, 3]) == float(has_chi1)
  placeholders = tf_lib.atom37_to_torsion_angles(aatype, two_chains[1], mask,
                                                 placeholder_for_undefined=True)
  np.testing.assert_allclose(np.asarray(placeholders["torsion_angles_sin_cos"])[:, 0, 0],
                             [[1, 0]] * 2)


def test_dgram_from_positions():
  positions = np.array([[0.0, 0, 0], [4.0, 0, 0], [0, 30.0, 0], [0, 0, 1.0]], np.float32)
  dgram = np.asarray(tf_lib.dgram_from_positions(positions, num_bins=15, min_bin=3.25,
                                                 max_bin=20.75))
  assert dgram.shape == (4, 4, 15)
  edges = np.linspace(3.25, 20.75, 15)
  assert dgram[0, 1].tolist() == (np.arange(15) == np.searchsorted(edges, 4.0) - 1).tolist()
  assert dgram[0, 2, -1] == 1 and dgram[0, 2].sum() == 1      # beyond max_bin: last bin
  assert dgram[0, 3].sum() == 0 and dgram[1, 1].sum() == 0    # below min_bin: no bin
  np.testing.assert_array_equal(dgram, dgram.transpose(1, 0, 2))


def test_pseudo_beta_is_ca_for_glycine():
  aatype = np.array([rc.restype_order["G"], rc.restype_order["A"]])
  positions = np.zeros((2, 37, 3), np.float32)
  positions[:, rc.atom_order["CA"]] = 1.0
  positions[:, rc.atom_order["CB"]] = 2.0
  np.testing.assert_array_equal(tf_lib.pseudo_beta(aatype, positions), [[1.0] * 3, [2.0] * 3])
  mask = np.zeros((2, 37), np.float32)
  mask[0, rc.atom_order["CA"]] = 1.0
  np.testing.assert_array_equal(tf_lib.pseudo_beta_mask(aatype, mask), [1.0, 0.0])
