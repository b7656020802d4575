"""Template features from template-search hits and the hits' structures.

Jumper et al. (2021) Suppl. 1.2.3 "Template search": hits of HHsearch (PDB70) or hmmsearch
(pdb_seqres) are taken in order of decreasing sum of probabilities, pre-filtered (release date,
aligned fraction > 10%, not a >95%-long exact subsequence of the query, at least 10 residues), then
their structures are read and each query residue gets the atoms of the template residue it is
aligned to. When the hit's sequence is not found in the structure's SEQRES (PDB70 holds an older
sequence), the hit is realigned to SEQRES with Kalign and kept only at >= 90% identity. Training
examples (Suppl. 1.2.4) also drop hits of the query's own PDB entry and use templates released at
least 60 days before the query (`query_release_date`).

Output (AlphaFold's names; T templates, N query residues): `template_aatype` [T, N, 22] float32
one-hot in HHblits' alphabet, `template_all_atom_positions` [T, N, 37, 3], `template_all_atom_masks`
[T, N, 37], `template_sum_probs` [T, 1], `template_domain_names` [T], `template_sequence` [T].
No usable hit gives T = 0 (AlphaFold's hmmsearch featurizer inserts one all-zero template instead;
the input pipeline pads, so an empty axis is simpler and unambiguous).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import os
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from af2flax.common import residue_constants
from af2flax.data import parsers
from af2flax.data.tools.kalign import Kalign

log = logging.getLogger(__name__)

_HIT_NAME = re.compile(r"[a-zA-Z\d]{4}_[a-zA-Z0-9.]+")
_NUM_ATOMS = residue_constants.atom_type_num
# Alanine, the residue with fewest heavy atoms, has 5: a template must have at least that many.
_MIN_TEMPLATE_ATOMS = 5
# AlphaFold's CA-CA distance bound: "essentially infinity", only absurd structures fail it.
_MAX_CA_CA_DISTANCE = 150.0
TEMPLATE_DTYPES = {"template_aatype": np.float32, "template_all_atom_masks": np.float32,
                   "template_all_atom_positions": np.float32, "template_domain_names": object,
                   "template_sequence": object, "template_sum_probs": np.float32}


class TemplateError(Exception):
  """A hit was rejected; `reason` is logged or collected, it never stops the chain."""


@dataclasses.dataclass(frozen=True)
class TemplateStructure:
  """What the featurizer needs of a template entry: SEQRES per chain and atoms aligned to it."""
  file_id: str
  release_date: str | None
  seqres: Mapping[str, str]
  atoms: Callable[[str], tuple[np.ndarray, np.ndarray]]  # chain -> ([L, 37, 3], [L, 37])


def read_template_structure(path: str, fix_arginine: bool = True) -> TemplateStructure:
  """Reads an mmCIF (SEQRES from `_entity_poly_seq`) or PDB file with `af2flax.common.protein`."""
  from af2flax.common import protein
  if ".cif" in os.path.basename(path).lower():
    entry = protein.read_mmcif_entry(path, fix_arginine=fix_arginine)
    return TemplateStructure(entry.file_id.lower(), entry.release_date, dict(entry.seqres),
                             entry.chain_atoms)
  structure = protein.read_structure(path, fix_arginine=fix_arginine)
  chains = {name: structure.chain(name) for name in structure.chain_names}
  seqres = {name: chain.sequence for name, chain in chains.items()}
  return TemplateStructure(os.path.basename(path)[:4].lower(), structure.release_date, seqres,
                           lambda name: (chains[name].atom_positions, chains[name].atom_mask))


def find_structure_file(directory: str, pdb_id: str, chain_id: str) -> str | None:
  """`<id>.cif[.gz]` (either case), else `<id><chain>.pdb[.gz]` or `<id>.pdb[.gz]`."""
  candidates = [f"{stem}{ext}" for stem in (pdb_id.lower(), pdb_id.upper())
                for ext in (".cif", ".cif.gz")]
  candidates += [f"{pdb_id.lower()}{chain_id}{ext}" for ext in (".pdb", ".pdb.gz")]
  candidates += [f"{pdb_id.lower()}{ext}" for ext in (".pdb", ".pdb.gz")]
  for name in candidates:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  return None


def parse_date(text: str | None) -> datetime.date | None:
  return datetime.date.fromisoformat(text) if text else None


def query_to_hit_mapping(hit: parsers.TemplateHit, query_sequence: str) -> dict[int, int]:
  """Query residue index -> index in the hit's (gap-free) sequence, from the hit's aligned rows."""
  if not hit.query:
    return {}
  hit_query = hit.query.replace("-", "")
  hit_length = len(hit.hit_sequence.replace("-", ""))
  offset = query_sequence.find(hit_query)
  if offset < 0:
    raise TemplateError(f"the hit's query rows {hit_query!r} are not part of the query sequence")
  aligned_hit = [i for i in hit.indices_hit if i > -1]
  aligned_query = [i for i in hit.indices_query if i > -1]
  if not aligned_hit or not aligned_query:
    return {}
  first_hit, first_query = min(aligned_hit), min(aligned_query)
  mapping = {}
  for q, t in zip(hit.indices_query, hit.indices_hit):
    if q == -1 or t == -1:
      continue
    q, t = q - first_query + offset, t - first_hit
    if t < hit_length and q < len(query_sequence):
      mapping[q] = t
  return mapping


def prefilter(hit: parsers.TemplateHit, query_sequence: str, *, max_subsequence_ratio: float = 0.95,
              min_align_ratio: float = 0.1, min_length: int = 10) -> None:
  """Suppl. 1.2.3 hit filters that need no structure; raises TemplateError with the reason."""
  template_sequence = hit.hit_sequence.replace("-", "")
  align_ratio = hit.aligned_cols / len(query_sequence)
  length_ratio = len(template_sequence) / len(query_sequence)
  if align_ratio <= min_align_ratio:
    raise TemplateError(f"aligned fraction {align_ratio:.3f} <= {min_align_ratio}")
  if template_sequence in query_sequence and length_ratio > max_subsequence_ratio:
    raise TemplateError(f"exact subsequence of the query covering {length_ratio:.2f} of it")
  if len(template_sequence) < min_length:
    raise TemplateError(f"only {len(template_sequence)} residues")


def locate_in_seqres(structure: TemplateStructure, chain_id: str, template_sequence: str
                     ) -> tuple[str, int] | None:
  """(chain, offset) of the hit's sequence in SEQRES: same chain, any chain, then X as wildcard."""
  own = structure.seqres.get(chain_id)
  if own and template_sequence in own:
    return chain_id, own.find(template_sequence)
  for name, sequence in structure.seqres.items():
    if sequence and template_sequence in sequence:
      return name, sequence.find(template_sequence)
  pattern = re.compile("".join("." if aa == "X" else f"(?:{aa}|X)" for aa in template_sequence))
  for name, sequence in structure.seqres.items():
    match = pattern.search(sequence)
    if match:
      return name, match.start()
  return None


def realign_to_seqres(template_sequence: str, chain_id: str, structure: TemplateStructure,
                      mapping: Mapping[int, int], kalign: Kalign,
                      min_identity: float = 0.9) -> tuple[str, dict[int, int]]:
  """Kalign the hit's sequence to the chain's SEQRES; remap query -> SEQRES (Suppl. 1.2.3)."""
  seqres = structure.seqres.get(chain_id, "")
  if not seqres:
    if len(structure.seqres) != 1:
      raise TemplateError(f"no chain {chain_id} in {structure.file_id}")
    seqres = next(iter(structure.seqres.values()))
  try:
    old_aligned, new_aligned = parsers.parse_a3m(kalign.align([template_sequence, seqres]),
                                                 "kalign output").sequences
  except Exception as e:  # a tool or parse failure rejects this hit only
    raise TemplateError(f"kalign could not align {template_sequence} to {seqres}: {e}") from e
  old_to_new, old_index, new_index, same = {}, -1, -1, 0
  for old_aa, new_aa in zip(old_aligned, new_aligned):
    old_index += old_aa != "-"
    new_index += new_aa != "-"
    if old_aa != "-" and new_aa != "-":
      old_to_new[old_index] = new_index
      same += old_aa == new_aa
  identity = same / min(len(template_sequence), len(seqres))
  if identity < min_identity:
    raise TemplateError(f"SEQRES of {structure.file_id}_{chain_id} is only {identity:.2f} "
                        f"identical to the hit sequence")
  return seqres, {q: old_to_new.get(t, -1) for q, t in mapping.items()}


def check_ca_distances(positions: np.ndarray, mask: np.ndarray, limit: float) -> None:
  ca = residue_constants.atom_order["CA"]
  observed = np.flatnonzero(mask[:, ca] > 0)
  if len(observed) > 1:
    gaps = np.linalg.norm(np.diff(positions[observed, ca].astype(np.float64), axis=0), axis=-1)
    if (gaps > limit).any():
      raise TemplateError(f"CA-CA distance {gaps.max():.1f} A > {limit}")


def _one_template(query_sequence: str, hit: parsers.TemplateHit, pdb_id: str, chain_id: str,
                  structure: TemplateStructure, kalign: Kalign) -> dict[str, np.ndarray]:
  """Features of one hit whose structure is loaded (Suppl. 1.2.3)."""
  mapping = query_to_hit_mapping(hit, query_sequence)
  template_sequence = hit.hit_sequence.replace("-", "")
  if not structure.seqres:
    raise TemplateError(f"no protein chains in {structure.file_id}")
  located = locate_in_seqres(structure, chain_id, template_sequence)
  if located is None:
    log.info("%s_%s: hit sequence not in SEQRES, realigning with kalign", pdb_id, chain_id)
    template_sequence, mapping = realign_to_seqres(template_sequence, chain_id, structure,
                                                   mapping, kalign)
    offset = 0
  else:
    chain_id, offset = located
  try:
    positions, mask = structure.atoms(chain_id)
  except (KeyError, ValueError) as e:
    raise TemplateError(f"no atoms for {pdb_id}_{chain_id}: {e}") from e
  check_ca_distances(positions, mask, _MAX_CA_CA_DISTANCE)
  num_res = len(query_sequence)
  out_positions = np.zeros((num_res, _NUM_ATOMS, 3), np.float32)
  out_mask = np.zeros((num_res, _NUM_ATOMS), np.float32)
  out_sequence = ["-"] * num_res
  for query_index, template_index in mapping.items():
    if template_index < 0:
      # Lost in the realignment. AlphaFold's indexing reads SEQRES' last residue here; we leave
      # the query residue without template atoms.
      continue
    out_positions[query_index] = positions[template_index + offset]
    out_mask[query_index] = mask[template_index + offset]
    out_sequence[query_index] = template_sequence[template_index]
  if out_mask.sum() < _MIN_TEMPLATE_ATOMS:
    raise TemplateError(f"{pdb_id}_{chain_id}: no template atoms aligned to the query")
  sequence = "".join(out_sequence)
  return {
      "template_all_atom_positions": out_positions,
      "template_all_atom_masks": out_mask,
      "template_sequence": sequence.encode(),
      "template_aatype": residue_constants.sequence_to_onehot(
          sequence, residue_constants.HHBLITS_AA_TO_ID).astype(np.float32),
      "template_domain_names": f"{pdb_id}_{chain_id}".encode(),
      "template_sum_probs": np.array([hit.sum_probs or 0.0], np.float32),
  }


def empty_template_features(num_res: int) -> dict[str, np.ndarray]:
  return {"template_aatype": np.zeros((0, num_res, 22), np.float32),
          "template_all_atom_positions": np.zeros((0, num_res, _NUM_ATOMS, 3), np.float32),
          "template_all_atom_masks": np.zeros((0, num_res, _NUM_ATOMS), np.float32),
          "template_sum_probs": np.zeros((0, 1), np.float32),
          "template_domain_names": np.zeros((0,), object),
          "template_sequence": np.zeros((0,), object)}


@dataclasses.dataclass(frozen=True)
class TemplateResult:
  features: dict[str, np.ndarray]
  rejected: list[str]  # '<hit name>: <reason>' for every hit that was not used


@dataclasses.dataclass(frozen=True)
class TemplateFeaturizer:
  """Turns template hits into features (Suppl. 1.2.3), reading structures from `structure_dir`.

  max_template_date: 'YYYY-MM-DD'; later templates are dropped (None: no global cut-off).
  release_dates: optional pdb_id -> 'YYYY-MM-DD' to drop late hits before reading them.
  obsolete_pdbs: optional pdb_id -> replacement id (None = withdrawn).
  """
  structure_dir: str
  max_template_date: str | None = None
  max_hits: int = 20
  kalign: Kalign = Kalign()
  release_dates: Mapping[str, str] = dataclasses.field(default_factory=dict)
  obsolete_pdbs: Mapping[str, str | None] = dataclasses.field(default_factory=dict)
  fix_arginine: bool = True

  def cutoff(self, query_release_date: str | None) -> datetime.date | None:
    """The latest template date: the global cut-off, or 60 days before the query's release."""
    cutoff = parse_date(self.max_template_date)
    if query_release_date:
      query_cutoff = parse_date(query_release_date) - datetime.timedelta(days=60)
      cutoff = min(cutoff, query_cutoff) if cutoff else query_cutoff
    return cutoff

  def get_templates(self, query_sequence: str, hits: Sequence[parsers.TemplateHit],
                    query_pdb_id: str | None = None, query_release_date: str | None = None
                    ) -> TemplateResult:
    """Features of the best `max_hits` usable hits, in order of decreasing sum_probs."""
    cutoff = self.cutoff(query_release_date)
    ordered = (list(hits) if not hits or hits[0].sum_probs is None
               else sorted(hits, key=lambda h: h.sum_probs, reverse=True))
    rows: list[dict[str, np.ndarray]] = []
    seen_sequences: set[bytes] = set()
    rejected: list[str] = []
    for hit in ordered:
      if len(rows) >= self.max_hits:
        break
      try:
        features = self._process_hit(query_sequence, hit, cutoff, query_pdb_id)
        if hit.sum_probs is None:  # hmmsearch lists a sequence once per chain: keep the first
          if features["template_sequence"] in seen_sequences:
            raise TemplateError("same aligned sequence as an earlier hit")
          seen_sequences.add(features["template_sequence"])
        rows.append(features)
      except TemplateError as e:
        rejected.append(f"{hit.name.split()[0]}: {e}")
    if not rows:
      return TemplateResult(empty_template_features(len(query_sequence)), rejected)
    stacked = {name: np.stack([row[name] for row in rows]).astype(dtype)
               for name, dtype in TEMPLATE_DTYPES.items()}
    return TemplateResult(stacked, rejected)

  def _process_hit(self, query_sequence: str, hit: parsers.TemplateHit,
                   cutoff: datetime.date | None, query_pdb_id: str | None) -> dict[str, np.ndarray]:
    match = _HIT_NAME.match(hit.name)
    if match is None:
      raise TemplateError(f"hit name does not start with <pdbid>_<chain>: {hit.name[:40]!r}")
    pdb_id, chain_id = match.group(0).split("_")
    pdb_id = pdb_id.lower()
    if pdb_id in self.obsolete_pdbs:
      if self.obsolete_pdbs[pdb_id] is None:
        raise TemplateError("obsolete (withdrawn) entry")
      if pdb_id not in self.release_dates:
        pdb_id = self.obsolete_pdbs[pdb_id]
    known_date = parse_date(self.release_dates.get(pdb_id))
    if cutoff and known_date and known_date > cutoff:
      raise TemplateError(f"released {known_date} after the template cut-off {cutoff}")
    if query_pdb_id and pdb_id == query_pdb_id.lower():
      raise TemplateError("same PDB entry as the query")
    prefilter(hit, query_sequence)
    path = find_structure_file(self.structure_dir, pdb_id, chain_id)
    if path is None:
      raise TemplateError(f"no structure file for {pdb_id} in {self.structure_dir}")
    try:
      structure = _cached_structure(path, self.fix_arginine)
    except ValueError as e:  # StructureParseError and friends
      raise TemplateError(f"unreadable structure {path}: {e}") from e
    date = parse_date(structure.release_date)
    if cutoff and date and date > cutoff:
      raise TemplateError(f"released {date} after the template cut-off {cutoff}")
    return _one_template(query_sequence, hit, pdb_id, chain_id, structure, self.kalign)


@functools.lru_cache(maxsize=32)
def _cached_structure(path: str, fix_arginine: bool) -> TemplateStructure:
  """Template entries recur across hits and chains: keep the last 32 parsed (AlphaFold keeps 16
  file texts; on the 40-chain benchmark 32 parsed entries cut template parsing by ~3x)."""
  return read_template_structure(path, fix_arginine)
