"""The search recipe's configuration: database paths and tool settings, named as AlphaFold's flags.

Jumper et al. (2021) Suppl. 1.2.2 "Genetic search" (jackhmmer on UniRef90 and MGnify, HHblits on
BFD + Uniclust30) and Suppl. 1.2.3 "Template search" (HHsearch on PDB70; AlphaFold 2.3 and the
multimer use hmmsearch on pdb_seqres). Keys are `run_alphafold.py`'s flag names
(`uniref90_database_path`, `jackhmmer_binary_path`, `db_preset`, ...) plus the pipeline's
(`uniref_max_hits`, `mgnify_max_hits`, `msa_tools_n_cpu`); per-tool settings live in the
`jackhmmer`, `hhblits`, `hhsearch` and `hmmsearch` sub-dicts (the fields of our tool wrappers).

A config is a Python file with `get_config()` (optionally `path.py:arg` -> `get_config("arg")`)
returning an `ml_collections.ConfigDict` or a dict, or a JSON file; it overrides `DEFAULTS` and
unknown keys are an error. `make_plan` turns it into the list of searches with each database's
fingerprint (its version string from `database_versions`, else the names and sizes of its files),
which the cache keys include.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import os
from typing import Any, Mapping

from apache_beam.io.filesystems import FileSystems

from af2flax.data.tools import hmmsearch

DEFAULTS: dict[str, Any] = {
    "jackhmmer_binary_path": "jackhmmer",
    "hhblits_binary_path": "hhblits",
    "hhsearch_binary_path": "hhsearch",
    "hmmsearch_binary_path": "hmmsearch",
    "hmmbuild_binary_path": "hmmbuild",
    "uniref90_database_path": "",
    "mgnify_database_path": "",
    "bfd_database_path": "",
    "uniclust30_database_path": "",   # AlphaFold 2.0-2.2 (the training set's Uniclust30 2018_08)
    "uniref30_database_path": "",     # AlphaFold 2.3's replacement; output bfd_uniref_hits.a3m
    "small_bfd_database_path": "",    # db_preset 'reduced_dbs'
    "pdb70_database_path": "",        # template search with HHsearch -> pdb70_hits.hhr
    "pdb_seqres_database_path": "",   # template search with hmmsearch -> pdb_hits.sto
    "db_preset": "full_dbs",
    "uniref_max_hits": 10_000,        # rows kept in uniref90_hits.sto (0 = all)
    "mgnify_max_hits": 501,           # rows kept in mgnify_hits.sto (0 = all)
    "msa_tools_n_cpu": 8,
    # database name (uniref90, mgnify, bfd, uniclust30, uniref30, small_bfd, pdb70, pdb_seqres) ->
    # version string; a database without one is fingerprinted by its files' names and sizes.
    "database_versions": {},
    # Bump to invalidate every cached search (e.g. after upgrading hmmer or hhsuite).
    "cache_version": "",
    # Run only these searches of the recipe (names: uniref90, mgnify, bfd | small_bfd, pdb70 |
    # pdb_seqres); [] = all. One pipeline per database group keeps each worker's disk small; a
    # template search alone reads the UniRef90 MSA from the cache of an earlier run.
    "searches": [],
    "jackhmmer": {"n_iter": 1, "e_value": 0.0001, "z_value": 0, "filter_f1": 0.0005,
                  "filter_f2": 0.00005, "filter_f3": 0.0000005, "timeout_s": 0},
    "hhblits": {"n_iter": 3, "e_value": 0.001, "maxseq": 1_000_000, "realign_max": 100_000,
                "maxfilt": 100_000, "min_prefilter_hits": 1000, "all_seqs": False, "p": 20,
                "z": 500, "timeout_s": 0},
    "hhsearch": {"maxseq": 1_000_000, "timeout_s": 0},
    "hmmsearch": {"flags": list(hmmsearch.DEFAULT_FLAGS), "timeout_s": 0},
}

_TOOL_SECTIONS = ("jackhmmer", "hhblits", "hhsearch", "hmmsearch")
# Settings that do not change a tool's output, hence not part of the cache key.
_NOT_IN_KEY = frozenset({"timeout_s"})


class SearchConfigError(ValueError):
  """The search config is unusable; the message names the config and the key to fix."""


@dataclasses.dataclass(frozen=True)
class SearchSpec:
  """One search of the recipe: which tool on which databases, and the file it writes per chain.

  `upstream` names the search whose MSA is this one's input (the template search reads the
  UniRef90 alignment, Suppl. 1.2.3); `max_hits` caps the rows kept (0 = all).
  """
  name: str
  tool: str                     # jackhmmer | hhblits | hhsearch | hmmsearch
  databases: tuple[str, ...]    # config database names, e.g. ('bfd', 'uniclust30')
  output_filename: str
  max_hits: int = 0
  upstream: str | None = None


@dataclasses.dataclass(frozen=True)
class SearchPlan:
  """Everything a worker needs: the config, the searches to run in order (`searches`, a subset of
  the whole `recipe`) and the fingerprints of the recipe's databases."""
  config: Mapping[str, Any]
  searches: tuple[SearchSpec, ...]
  fingerprints: Mapping[str, str]   # database name -> fingerprint
  cache_dir: str
  recipe: tuple[SearchSpec, ...] = ()

  def spec(self, name: str) -> SearchSpec:
    return next(s for s in self.recipe + self.searches if s.name == name)

  @property
  def msa_searches(self) -> tuple[SearchSpec, ...]:
    return tuple(s for s in self.searches if s.upstream is None)

  @property
  def template_searches(self) -> tuple[SearchSpec, ...]:
    return tuple(s for s in self.searches if s.upstream is not None)

  def runs_upstream_of(self, spec: SearchSpec) -> bool:
    """Whether this run also searches `spec`'s input (else it must be in the cache)."""
    return any(s.name == spec.upstream for s in self.searches)


def _merge(defaults: Mapping[str, Any], overrides: Mapping[str, Any], source: str,
           prefix: str = "") -> dict[str, Any]:
  merged = copy.deepcopy(dict(defaults))
  for key, value in overrides.items():
    if key not in defaults:
      raise SearchConfigError(f"{source}: unknown key {prefix}{key!r} (known: "
                              f"{', '.join(sorted(defaults))})")
    if isinstance(defaults[key], dict) and key != "database_versions":
      if not isinstance(value, Mapping):
        raise SearchConfigError(f"{source}: {prefix}{key} must be a dict, got {value!r}")
      merged[key] = _merge(defaults[key], value, source, f"{prefix}{key}.")
    else:
      merged[key] = dict(value) if isinstance(value, Mapping) else value
  return merged


def load_config(spec: str) -> dict[str, Any]:
  """Reads a config: `x.json`, `x.py` (its `get_config()`) or `x.py:arg` (`get_config(arg)`)."""
  path, argument = spec, ""
  if ".py:" in spec:
    path, argument = spec.split(".py:", 1)
    path += ".py"
  if not os.path.isfile(path):
    raise SearchConfigError(f"{path}: search config not found")
  if path.endswith(".json"):
    try:
      with open(path) as f:
        raw = json.load(f)
    except json.JSONDecodeError as e:
      raise SearchConfigError(f"{path}: not valid JSON ({e})") from e
  elif path.endswith(".py"):
    module_spec = importlib.util.spec_from_file_location("af2flax_search_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise SearchConfigError(f"{path}: a Python config needs a get_config() function")
    raw = module.get_config(argument) if argument else module.get_config()
  else:
    raise SearchConfigError(f"{path}: a search config is a .py (get_config) or .json file")
  if hasattr(raw, "to_dict"):
    raw = raw.to_dict()
  if not isinstance(raw, Mapping):
    raise SearchConfigError(f"{path}: the config must be a mapping, got {type(raw).__name__}")
  return _merge(DEFAULTS, raw, path)


def make_config(**overrides: Any) -> dict[str, Any]:
  """DEFAULTS with `overrides` (validated like a config file's keys)."""
  return _merge(DEFAULTS, overrides, "<config>")


def plan_searches(config: Mapping[str, Any]) -> tuple[SearchSpec, ...]:
  """AlphaFold's recipe for the databases the config names (Suppl. 1.2.2-1.2.3), in merge order."""
  def need(key: str, why: str) -> None:
    if not config[key]:
      raise SearchConfigError(f"search config: {key} is required ({why})")

  need("uniref90_database_path", "jackhmmer UniRef90 search")
  need("mgnify_database_path", "jackhmmer MGnify search")
  searches = [SearchSpec("uniref90", "jackhmmer", ("uniref90",), "uniref90_hits.sto",
                         config["uniref_max_hits"])]
  if config["db_preset"] == "full_dbs":
    need("bfd_database_path", "db_preset full_dbs")
    if bool(config["uniclust30_database_path"]) == bool(config["uniref30_database_path"]):
      raise SearchConfigError("search config: db_preset full_dbs needs exactly one of "
                              "uniclust30_database_path and uniref30_database_path")
    second = "uniclust30" if config["uniclust30_database_path"] else "uniref30"
    filename = "bfd_uniclust_hits.a3m" if second == "uniclust30" else "bfd_uniref_hits.a3m"
    searches.append(SearchSpec("bfd", "hhblits", ("bfd", second), filename))
  elif config["db_preset"] == "reduced_dbs":
    need("small_bfd_database_path", "db_preset reduced_dbs")
    searches.append(SearchSpec("small_bfd", "jackhmmer", ("small_bfd",), "small_bfd_hits.sto"))
  else:
    raise SearchConfigError(f"search config: db_preset must be 'full_dbs' or 'reduced_dbs', got "
                            f"{config['db_preset']!r}")
  searches.append(SearchSpec("mgnify", "jackhmmer", ("mgnify",), "mgnify_hits.sto",
                             config["mgnify_max_hits"]))
  if config["pdb70_database_path"] and config["pdb_seqres_database_path"]:
    raise SearchConfigError("search config: set pdb70_database_path (HHsearch) or "
                            "pdb_seqres_database_path (hmmsearch), not both")
  if config["pdb70_database_path"]:
    searches.append(SearchSpec("pdb70", "hhsearch", ("pdb70",), "pdb70_hits.hhr",
                               upstream="uniref90"))
  elif config["pdb_seqres_database_path"]:
    searches.append(SearchSpec("pdb_seqres", "hmmsearch", ("pdb_seqres",), "pdb_hits.sto",
                               upstream="uniref90"))
  return tuple(searches)


def selected_searches(config: Mapping[str, Any],
                      recipe: tuple[SearchSpec, ...]) -> tuple[SearchSpec, ...]:
  """The recipe's searches named in config['searches'] (all when it is empty)."""
  chosen = list(config["searches"])
  unknown = sorted(set(chosen) - {s.name for s in recipe})
  if unknown:
    raise SearchConfigError(f"search config: searches {unknown} are not in this recipe "
                            f"({', '.join(s.name for s in recipe)})")
  return tuple(s for s in recipe if not chosen or s.name in chosen)


def database_path(config: Mapping[str, Any], database: str) -> str:
  return config[f"{database}_database_path"]


def database_files(path: str, hhsuite: bool) -> list[tuple[str, int]]:
  """(basename, size) of a database's files: the FASTA itself, or an HH-suite prefix's `_*`."""
  pattern = FileSystems.match([path + "_*" if hhsuite else path])[0]
  return sorted((os.path.basename(m.path), m.size_in_bytes) for m in pattern.metadata_list)


def fingerprint_database(config: Mapping[str, Any], database: str, hhsuite: bool) -> str:
  """A database's version for the cache key: its configured version, else its files' names+sizes.

  Sizes, not modification times: workers often hold their own copy of a database (local SSD), whose
  mtimes differ from the launcher's although the contents are the same.
  """
  version = config["database_versions"].get(database)
  if version:
    return f"version:{version}"
  path = database_path(config, database)
  files = database_files(path, hhsuite)
  if not files:
    raise SearchConfigError(
        f"search config: {database}_database_path {path!r} has no files visible here; fix the "
        f"path or set database_versions['{database}'] when only the workers can see it")
  return "files:" + ",".join(f"{name}={size}" for name, size in files)


def make_plan(config: Mapping[str, Any], cache_dir: str) -> SearchPlan:
  """Validates the config and fingerprints every database the recipe searches."""
  recipe = plan_searches(config)
  searches = selected_searches(config, recipe)
  needed = {s.name for s in searches} | {s.upstream for s in searches if s.upstream}
  fingerprints = {}
  for spec in recipe:
    if spec.name in needed:  # keys of template searches include the UniRef90 search's key
      for database in spec.databases:
        fingerprints[database] = fingerprint_database(config, database,
                                                      spec.tool in ("hhblits", "hhsearch"))
  return SearchPlan(dict(config), searches, fingerprints, cache_dir, recipe)


def tool_settings(config: Mapping[str, Any], tool: str) -> dict[str, Any]:
  """The settings of a tool that change its output (cache key material)."""
  return {k: v for k, v in config[tool].items() if k not in _NOT_IN_KEY}


def search_key(plan: SearchPlan, sequence: str, spec: SearchSpec) -> str:
  """Cache key of one search: sequence, tool settings, database fingerprints (and the upstream key).

  Identical sequences share a key, so each is searched once; a new database version or setting
  changes the key of exactly the searches that use it.
  """
  material = {
      "format": 1,
      "cache_version": plan.config["cache_version"],
      "sequence": sequence,
      "search": spec.name,
      "tool": spec.tool,
      "settings": tool_settings(plan.config, spec.tool),
      "databases": [plan.fingerprints[d] for d in spec.databases],
      "max_hits": spec.max_hits,
      "upstream": search_key(plan, sequence, plan.spec(spec.upstream)) if spec.upstream else None,
  }
  if spec.tool == "hmmsearch":
    material["hmmbuild"] = "hand"
  text = json.dumps(material, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sequence_id(sequence: str) -> str:
  """Short stable id of a sequence (the grouping key of identical chains)."""
  return hashlib.sha256(sequence.encode("utf-8")).hexdigest()[:32]
