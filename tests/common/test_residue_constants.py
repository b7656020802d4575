"""residue_constants holds AlphaFold's tables exactly (compared with the shared JSON export)."""

import ast
import json

import numpy as np
import pytest

from af2flax.common import residue_constants as rc
from tests.conftest import REFERENCE


def _reference_tables():
  path = REFERENCE / "residue_constants.json"
  if not path.exists():
    pytest.skip(f"{path} missing")
  with open(path) as handle:
    return json.load(handle)


def _assert_same(name, ours, ref):
  if isinstance(ref, dict) and "__ndarray__" in ref:
    expected = np.asarray(ref["__ndarray__"], dtype=ref["dtype"]).reshape(ref["shape"])
    ours = np.asarray(ours)
    assert ours.shape == expected.shape, name
    assert ours.dtype == expected.dtype, name
    if np.issubdtype(expected.dtype, np.floating):
      np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0, err_msg=name)
    else:
      np.testing.assert_array_equal(ours, expected, err_msg=name)
  elif isinstance(ref, dict):
    ours_keys = {str(k) if not isinstance(k, tuple) else str(k) for k in ours}
    assert ours_keys == set(ref), name
    for key, value in ref.items():
      our_key = key
      if key not in ours:
        try:
          our_key = ast.literal_eval(key)
        except (ValueError, SyntaxError):
          our_key = int(key)
      _assert_same(f"{name}[{key}]", ours[our_key], value)
  elif isinstance(ref, list):
    assert len(ours) == len(ref), name
    for index, (a, b) in enumerate(zip(ours, ref)):
      _assert_same(f"{name}[{index}]", a, b)
  elif isinstance(ref, float):
    assert ours == pytest.approx(ref, abs=1e-6), name
  else:
    assert ours == ref, name


def test_every_table_matches_alphafold():
  ref = _reference_tables()
  assert set(rc.TABLE_NAMES) == set(ref)
  for name, value in ref.items():
    assert hasattr(rc, name), f"residue_constants lacks {name}"
    _assert_same(name, getattr(rc, name), value)


def test_atom14_bounds_recomputed_from_stereo_chemical_props():
  """The violation-loss bounds follow from the shipped Engh & Huber file at AF's settings."""
  bounds = rc.make_atom14_dists_bounds(overlap_tolerance=1.5, bond_length_tolerance_factor=12.0)
  for key, value in rc.atom14_dists_bounds_default.items():
    np.testing.assert_allclose(bounds[key], value, atol=1e-6, err_msg=key)


def test_virtual_bonds_match_table():
  _, virtual_bonds, _ = rc.load_stereo_chemical_props()
  for resname, entries in rc.stereo_residue_virtual_bonds.items():
    ours = [[b.atom1_name, b.atom2_name, b.length, b.stddev] for b in virtual_bonds[resname]]
    assert len(ours) == len(entries)
    for a, b in zip(ours, entries):
      assert a[:2] == b[:2]
      np.testing.assert_allclose(a[2:], b[2:], atol=1e-9)


def test_sequence_round_trip_and_bad_letter():
  seq = "ACDEFGHIKLMNPQRSTVWYX"
  assert rc.aatype_to_sequence(rc.sequence_to_aatype(seq)) == seq
  with pytest.raises(ValueError, match="position 1"):
    rc.sequence_to_onehot("A1", rc.restype_order_with_x)
