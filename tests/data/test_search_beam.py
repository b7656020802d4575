"""The Beam search pipeline runs AlphaFold's recipe with the real binaries, caches every search and
writes the layout build_dataset reads; bad inputs become failures, not crashes."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from af2flax.data import parsers, pipeline
from af2flax.data.search import (SearchConfigError, Searcher, beam_pipeline, load_config, local,
                                 make_config, make_plan, searches)
from af2flax.data.search import __main__ as search_main
from af2flax.data.search import config as config_lib
from tests.conftest import REPO_ROOT
from tests.data.conftest import (DUPLICATE_CHAIN, OPENFOLD, SEARCH_CHAINS, beam_test_options,
                                 write_fasta)

LAYOUT = ("bfd_uniclust_hits.a3m", "mgnify_hits.sto", "pdb70_hits.hhr", "uniref90_hits.sto")


def _files(directory) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _without_run_stamp(hhr: bytes) -> bytes:
  """HHR text minus the lines that name the run (date, temp paths): the rest is the search."""
  return b"\n".join(line for line in hhr.splitlines()
                    if not line.startswith((b"Date", b"Command")))


# --- config and cache keys (no tools) ------------------------------------------------------------

def test_config_files_and_errors(tmp_path, search_config):
  py = tmp_path / "dbs.py"
  py.write_text("def get_config(root='/db'):\n"
                "  return {'uniref90_database_path': root + '/uniref90.fasta',\n"
                "          'jackhmmer': {'n_iter': 2}}\n")
  config = load_config(f"{py}:/data")
  assert config["uniref90_database_path"] == "/data/uniref90.fasta"
  assert config["jackhmmer"]["n_iter"] == 2 and config["jackhmmer"]["e_value"] == 0.0001
  assert load_config(str(py))["uniref90_database_path"] == "/db/uniref90.fasta"
  js = tmp_path / "dbs.json"
  js.write_text(json.dumps({"uniref90_databse_path": "x"}))
  with pytest.raises(SearchConfigError, match="dbs.json: unknown key 'uniref90_databse_path'"):
    load_config(str(js))
  with pytest.raises(SearchConfigError, match="mgnify_database_path is required"):
    make_plan(make_config(uniref90_database_path="x"), "cache")
  with pytest.raises(SearchConfigError, match="not both"):
    make_plan(dict(search_config, pdb_seqres_database_path="x"), "cache")
  with pytest.raises(SearchConfigError, match="no files visible"):
    make_plan(dict(search_config, mgnify_database_path=str(tmp_path / "nope.fa")), "cache")
  reduced = dict(search_config, db_preset="reduced_dbs", pdb70_database_path="",
                 small_bfd_database_path=search_config["uniref90_database_path"],
                 pdb_seqres_database_path=search_config["uniref90_database_path"])
  plan = make_plan(reduced, "cache")
  assert [(s.name, s.tool, s.output_filename) for s in plan.searches] == [
      ("uniref90", "jackhmmer", "uniref90_hits.sto"),
      ("small_bfd", "jackhmmer", "small_bfd_hits.sto"),
      ("mgnify", "jackhmmer", "mgnify_hits.sto"),
      ("pdb_seqres", "hmmsearch", "pdb_hits.sto")]
  preset = load_config(f"{REPO_ROOT / 'configs' / 'search_alphafold.py'}:/dbs")
  assert preset["uniclust30_database_path"] == "/dbs/uniclust30/uniclust30_2018_08/" \
      "uniclust30_2018_08"
  assert [s.name for s in config_lib.plan_searches(preset)] == ["uniref90", "bfd", "mgnify",
                                                                "pdb70"]
  uniref30 = dict(search_config, uniclust30_database_path="",
                  uniref30_database_path=search_config["bfd_database_path"])
  assert make_plan(uniref30, "c").spec("bfd").output_filename == "bfd_uniref_hits.a3m"


def test_cache_keys_follow_sequence_databases_and_settings(tmp_path, search_config):
  plan = make_plan(search_config, "cache")
  key = search_config_key
  base = {s.name: key(plan, "MKTAYIAKQR", s.name) for s in plan.searches}
  assert base == {s.name: key(plan, "MKTAYIAKQR", s.name) for s in plan.searches}
  assert len(set(base.values())) == len(base)
  assert key(plan, "MKTAYIAKQK", "uniref90") != base["uniref90"]
  # Threads and timeouts do not change results, so they do not change keys.
  same = make_plan(dict(search_config, msa_tools_n_cpu=4,
                        jackhmmer=dict(search_config["jackhmmer"], timeout_s=9)), "cache")
  assert {s.name: key(same, "MKTAYIAKQR", s.name) for s in same.searches} == base
  # A grown UniRef90 changes its search and the template search that reads its MSA, only those.
  grown = tmp_path / "uniref90.fasta"
  grown.write_text(open(search_config["uniref90_database_path"]).read() + ">new\nMKV\n")
  changed = make_plan(dict(search_config, uniref90_database_path=str(grown)), "cache")
  differs = {s.name for s in changed.searches if key(changed, "MKTAYIAKQR", s.name) != base[s.name]}
  assert differs == {"uniref90", "pdb70"}
  # A version string replaces the file fingerprint (databases only the workers can see).
  versioned = make_plan(dict(search_config, uniref90_database_path="/workers/only.fasta",
                             database_versions={"uniref90": "2020_01"}), "cache")
  assert versioned.fingerprints["uniref90"] == "version:2020_01"
  settings = make_plan(dict(search_config, hhblits=dict(search_config["hhblits"], n_iter=3)), "c")
  assert key(settings, "MKTAYIAKQR", "bfd") != base["bfd"]


def search_config_key(plan, sequence, name):
  return config_lib.search_key(plan, sequence, plan.spec(name))


def test_read_fasta_chains_reports_bad_records(tmp_path):
  fasta = write_fasta(tmp_path / "in.fasta", [("1abc_A", "mkva"), ("../x", "MKV"),
                                              ("1abc_A", "MKV"), ("2abc_B", "MK1V"),
                                              ("3abc_C", "MKVL")])
  chains, failures = searches.read_fasta_chains(str(fasta))
  assert chains == [("1abc_A", "MKVA"), ("3abc_C", "MKVL")]
  assert [f[0] for f in failures] == ["../x", "1abc_A", "2abc_B"]
  assert "not a safe directory name" in failures[0][1]
  assert "repeats record 1" in failures[1][1]
  assert "non-letters" in failures[2][1]


def test_capped_stockholm_reads_as_the_same_msa(tmp_path):
  full = (OPENFOLD / "alignments" / "uniref90_hits.sto").read_text()
  cap = 7
  text, msa = searches._cap_stockholm(full, cap, "uniref90")
  assert len(text) < len(full) and len(msa) == cap
  (tmp_path / "uniref90_hits.sto").write_text(text)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "uniref90_hits.sto").write_text(full)
  sequence = msa.sequences[0]
  capped = pipeline.make_msa_features_from_dir(sequence, tmp_path, {"uniref90_hits": cap})
  reference = pipeline.make_msa_features_from_dir(sequence, tmp_path / "full",
                                                  {"uniref90_hits": cap})
  assert capped.keys() == reference.keys()
  for name in reference:
    np.testing.assert_array_equal(capped[name], reference[name], err_msg=name)
  assert searches._cap_stockholm(full, 0, "uniref90")[0] == full  # within the cap: verbatim


# --- the pipeline on the real binaries -----------------------------------------------------------

def test_search_writes_the_build_layout(searched, chain_sequences):
  fasta, out, cache, summary = searched
  assert (summary.chains, summary.unique_sequences, summary.input_failures) == (5, 4, 1)
  assert (summary.searched, summary.cached, summary.failed) == (16, 0, 0)
  assert (summary.chains_written, summary.chains_failed) == (5, 0)
  assert {name: row["searched"] for name, row in summary.by_search.items()} == {
      "uniref90": 4, "mgnify": 4, "bfd": 4, "pdb70": 4}
  assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(SEARCH_CHAINS +
                                                                       (DUPLICATE_CHAIN,))
  for chain in SEARCH_CHAINS:
    sequence = chain_sequences[chain]
    assert sorted(_files(out / chain)) == sorted(LAYOUT)
    files = pipeline.list_alignment_files(out / chain)
    assert [os.path.basename(p) for p in files.msas] == ["uniref90_hits.sto",
                                                         "bfd_uniclust_hits.a3m", "mgnify_hits.sto"]
    features = pipeline.make_msa_features_from_dir(sequence, out / chain)
    assert features["msa"].shape[1] == len(sequence)
    hits = pipeline.read_template_hits(sequence, files)
    assert hits[0].name == chain  # the chain's own entry in the template database
  # Identical sequences share one search: the duplicate's files are its twin's, byte for byte.
  assert _files(out / DUPLICATE_CHAIN) == _files(out / SEARCH_CHAINS[0])
  lines = (out / "failures.tsv").read_text().splitlines()
  assert lines[0] == "input\treason" and len(lines) == 2
  assert lines[1].startswith("bad/id\trecord 6: chain id")
  entries = sorted(cache.rglob("*.*"))
  assert len([p for p in entries if p.suffix != ".json"]) == 16


def test_rerun_hits_the_cache_for_every_sequence(searched, tmp_path, chain_sequences,
                                                 search_config):
  fasta, out, cache, first = searched
  plan = make_plan(search_config, str(cache))
  rerun_out = tmp_path / "again"
  config_file = tmp_path / "dbs.json"
  config_file.write_text(json.dumps(search_config))
  # The command line, with Beam's own flags passed through.
  assert search_main.main(["--fasta", str(fasta), "--databases", str(config_file), "--out",
                           str(rerun_out), "--cache", str(cache), "--runner", "DirectRunner",
                           "--direct_num_workers", "1"]) == 0
  again = json.loads((rerun_out / "search_summary.json").read_text())
  assert (again["searched"], again["cached"], again["failed"]) == (0, first.searched, 0)
  assert again["chains_written"] == 5 and again["by_search"]["bfd"]["cached"] == 4
  for chain in SEARCH_CHAINS + (DUPLICATE_CHAIN,):
    assert _files(rerun_out / chain) == _files(out / chain)
  # More sequences: only the new one is searched.
  more = write_fasta(tmp_path / "more.fasta", [(c, chain_sequences[c]) for c in SEARCH_CHAINS] +
                     [("2xr6_A", chain_sequences["2xr6_A"])])
  grown = beam_pipeline.run_search(str(more), plan, str(rerun_out), beam_test_options())
  assert (grown.searched, grown.cached, grown.failed) == (4, 16, 0)
  assert sorted(_files(rerun_out / "2xr6_A")) == sorted(LAYOUT)


def test_beam_and_plain_paths_write_the_same_alignments(searched, tmp_path, search_config):
  fasta, out, _, _ = searched
  plain_out = tmp_path / "plain"
  plan = make_plan(search_config, str(tmp_path / "plain_cache"))  # a cold cache: searched again
  summary = local.search_locally(str(fasta), plan, str(plain_out), workers=2)
  assert (summary.searched, summary.cached, summary.chains_written) == (16, 0, 5)
  assert (plain_out / "failures.tsv").read_bytes() == (out / "failures.tsv").read_bytes()
  for chain in SEARCH_CHAINS + (DUPLICATE_CHAIN,):
    beam_files, plain_files = _files(out / chain), _files(plain_out / chain)
    hhr = "pdb70_hits.hhr"
    assert _without_run_stamp(beam_files.pop(hhr)) == _without_run_stamp(plain_files.pop(hhr))
    assert beam_files == plain_files


def _wrapper(path, real: str, body: str) -> str:
  """A bash script in front of a real binary that misbehaves for marked sequences only."""
  path.write_text(f"#!/bin/bash\n{body}\nexec {real} \"$@\"\n")
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return str(path)


def test_bad_inputs_become_failures(tmp_path, searched, chain_sequences, search_config):
  _, _, cache, _ = searched
  good = chain_sequences[SEARCH_CHAINS[1]]  # cached by the first run
  crash, slow, empty = (chain_sequences["2xr6_A"][:60] + tag for tag in ("CRASH", "SLEEP", "EMPTY"))
  jackhmmer = _wrapper(tmp_path / "jackhmmer", "jackhmmer", """
input="${@: -2:1}"
if grep -q SLEEP "$input"; then sleep 60; fi
if grep -q EMPTY "$input"; then
  while [ $# -gt 0 ]; do [ "$1" = -A ] && : > "$2"; shift; done; exit 0
fi""")
  hhblits = _wrapper(tmp_path / "hhblits", "hhblits",
                     'if grep -q CRASH "$2"; then echo "Segmentation fault" >&2; exit 139; fi')
  config = dict(search_config, jackhmmer_binary_path=jackhmmer, hhblits_binary_path=hhblits,
                jackhmmer=dict(search_config["jackhmmer"], timeout_s=2))
  plan = make_plan(config, str(cache))
  fasta = write_fasta(tmp_path / "bad.fasta", [("good_A", good), ("crash_A", crash),
                                               ("slow_A", slow), ("empty_A", empty)])
  out = tmp_path / "out"
  summary = beam_pipeline.run_search(str(fasta), plan, str(out), beam_test_options())
  assert (summary.chains_written, summary.chains_failed) == (1, 3)
  assert summary.cached == 4  # the good chain: nothing searched twice
  assert sorted(_files(out / "good_A")) == sorted(LAYOUT)
  assert not any((out / c).exists() for c in ("crash_A", "slow_A", "empty_A"))
  reasons = dict(line.split("\t") for line in (out / "failures.tsv").read_text().splitlines()[1:])
  assert "bfd: ToolError: hhblits: failed (exit status 139)" in reasons["crash_A"]
  assert "Segmentation fault" in reasons["crash_A"]
  assert "timed out after 2 s" in reasons["slow_A"]
  assert "uniref90: ParseError" in reasons["empty_A"] and "empty file" in reasons["empty_A"]
  # Failures are not cached: a re-run (e.g. with a longer timeout) tries them again.
  for sequence in (crash, slow, empty):
    spec = plan.spec("bfd" if sequence == crash else "uniref90")
    result_path, _ = searches.cache_paths(plan, spec, search_config_key(plan, sequence, spec.name))
    assert not os.path.exists(result_path)


def test_hmmsearch_template_search(tmp_path, search_config, chain_sequences):
  config = dict(search_config, pdb70_database_path="",
                pdb_seqres_database_path=search_config["uniref90_database_path"])
  searcher = Searcher(make_plan(config, str(tmp_path / "cache")))
  sequence = chain_sequences["2cvi_A"]
  assert searcher.run(sequence, "uniref90").status == searches.SEARCHED
  outcome = searcher.run(sequence, "pdb_seqres")
  assert outcome.status == searches.SEARCHED, outcome.reason
  text = open(outcome.cache_path).read()
  assert parsers.parse_hmmsearch_sto(sequence, text)[0].name == "2cvi_A"
  assert searcher.run(sequence, "pdb_seqres").status == searches.CACHED


def test_one_database_group_per_run(searched, tmp_path, chain_sequences, search_config):
  """config 'searches' runs part of the recipe; a template search alone reads UniRef90's cache."""
  _, first_out, cache, _ = searched
  with pytest.raises(SearchConfigError, match=r"searches \['pdb_seqres'\] are not in this recipe"):
    make_plan(dict(search_config, searches=["pdb_seqres"]), str(cache))
  templates_only = make_plan(dict(search_config, searches=["pdb70"]), str(cache))
  new = chain_sequences["2xr6_A"][:70]
  old = SEARCH_CHAINS[2]
  fasta = write_fasta(tmp_path / "two.fasta", [(old, chain_sequences[old]), ("new_A", new)])
  out = tmp_path / "out"
  summary = beam_pipeline.run_search(str(fasta), templates_only, str(out), beam_test_options())
  assert (summary.searched, summary.cached, summary.failed) == (0, 1, 1)
  assert _files(out / SEARCH_CHAINS[2]) == {
      "pdb70_hits.hhr": (first_out / SEARCH_CHAINS[2] / "pdb70_hits.hhr").read_bytes()}
  reasons = (out / "failures.tsv").read_text()
  assert "new_A\tpdb70: MissingUpstreamError" in reasons and "run the uniref90 search" in reasons
  uniref90_only = make_plan(dict(search_config, searches=["uniref90"]), str(cache))
  assert local.search_locally(str(fasta), uniref90_only, str(out)).searched == 1
  again = local.search_locally(str(fasta), templates_only, str(out))
  assert (again.searched, again.cached, again.chains_written) == (1, 1, 2)
  assert sorted(_files(out / "new_A")) == ["pdb70_hits.hhr", "uniref90_hits.sto"]
