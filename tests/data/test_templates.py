"""Template features equal AlphaFold's for every hit whose mmCIF is available; filters and rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from af2flax.data import parsers, pipeline, templates
from tests.conftest import REFERENCE
from tests.data.conftest import OPENFOLD

MMCIFS = OPENFOLD / "mmcifs"
NUMERIC = ("template_aatype", "template_all_atom_positions", "template_all_atom_masks",
           "template_sum_probs")


@pytest.fixture(scope="module")
def reference(shared_dir):
  with np.load(REFERENCE / "pipeline_query" / "features.npz", allow_pickle=False) as f:
    return dict(f)


@pytest.fixture(scope="module")
def query(reference):
  sequence = str(reference["sequence"][0])
  hits = pipeline.read_template_hits(sequence,
                                     pipeline.list_alignment_files(OPENFOLD / "alignments"))
  return sequence, hits


def names(features) -> list[str]:
  return [n.decode() for n in features["template_domain_names"]]


def test_template_rows_equal_alphafolds(reference, query):
  sequence, hits = query
  result = templates.TemplateFeaturizer(str(MMCIFS)).get_templates(sequence, hits)
  reference_names = list(reference["template_domain_names"])
  # 1hf9 has no mmCIF here; every other row of AlphaFold's output is reproduced, in order.
  assert names(result.features) == [n for n in reference_names if n != "1hf9_B"]
  for row, name in enumerate(names(result.features)):
    ref_row = reference_names.index(name)
    for feature in NUMERIC:
      assert result.features[feature].dtype == reference[feature].dtype
      np.testing.assert_array_equal(result.features[feature][row], reference[feature][ref_row],
                                    err_msg=f"{name} {feature}")
    assert result.features["template_sequence"][row].decode() == reference["template_sequence"][
        ref_row]
  assert any(r.startswith("1HF9_B: no structure file") for r in result.rejected)
  # 5kc1 (in mmcifs/) fails as in AlphaFold: none of its aligned residues has atoms.
  assert any(r.startswith("5KC1_F") and "no template atoms" in r for r in result.rejected)


def test_realignment_when_the_hit_sequence_differs_from_seqres(query):
  sequence, hits = query
  hit = next(h for h in hits if h.name.startswith("3U8V_A"))
  position = hit.hit_sequence.index("K")
  mutated = dataclasses.replace(
      hit, hit_sequence=hit.hit_sequence[:position] + "W" + hit.hit_sequence[position + 1:])
  featurizer = templates.TemplateFeaturizer(str(MMCIFS))
  original = featurizer.get_templates(sequence, [hit]).features
  realigned = featurizer.get_templates(sequence, [mutated]).features
  assert names(realigned) == ["3u8v_A"]
  for feature in NUMERIC + ("template_sequence",):
    np.testing.assert_array_equal(realigned[feature], original[feature])
  # Below 90% identity to SEQRES the hit is dropped.
  scrambled = dataclasses.replace(hit, hit_sequence="".join(
      "W" if c != "-" else c for c in hit.hit_sequence))
  result = featurizer.get_templates(sequence, [scrambled])
  assert names(result.features) == [] and "identical to the hit sequence" in result.rejected[0]


def test_training_rules_dates_own_entry_and_max_hits(query):
  sequence, hits = query
  featurizer = templates.TemplateFeaturizer(str(MMCIFS))
  # 3u8v was released 2011-11-09: 60 days before a 2012-01-01 query is too late for it.
  dated = featurizer.get_templates(sequence, hits, query_release_date="2012-01-01")
  assert "3u8v_A" not in names(dated.features) and "2crb_A" in names(dated.features)
  assert featurizer.cutoff("2012-01-01").isoformat() == "2011-11-02"
  global_cutoff = templates.TemplateFeaturizer(str(MMCIFS), max_template_date="2010-01-01")
  assert names(global_cutoff.get_templates(sequence, hits).features) == ["2crb_A", "1psm_A",
                                                                          "2q2k_A"]
  own = featurizer.get_templates(sequence, hits, query_pdb_id="3U8V")
  assert "3u8v_A" not in names(own.features)
  assert "3U8V_A: same PDB entry as the query" in own.rejected
  few = templates.TemplateFeaturizer(str(MMCIFS), max_hits=2).get_templates(sequence, hits)
  assert names(few.features) == ["3u8v_A", "2crb_A"]


def test_prefilter_reasons():
  query = "A" * 100
  def hit(hit_sequence, aligned_cols):
    return parsers.TemplateHit(1, "1abc_A", aligned_cols, 1.0, "A", hit_sequence, [0], [0])
  with pytest.raises(templates.TemplateError, match="aligned fraction 0.100"):
    templates.prefilter(hit("C" * 20, 10), query)
  with pytest.raises(templates.TemplateError, match="exact subsequence"):
    templates.prefilter(hit("A" * 96, 96), query)
  with pytest.raises(templates.TemplateError, match="only 9 residues"):
    templates.prefilter(hit("C" * 9, 20), query)
  templates.prefilter(hit("A" * 95, 95), query)  # 95% long: not a duplicate


def test_no_hits_gives_zero_templates():
  result = templates.TemplateFeaturizer(str(MMCIFS)).get_templates("MKV", [])
  assert result.features["template_all_atom_positions"].shape == (0, 3, 37, 3)
  assert result.features["template_aatype"].shape == (0, 3, 22)
  assert result.features["template_domain_names"].shape == (0,)
