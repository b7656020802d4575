"""Alignment search at scale: AlphaFold's search recipe per sequence, on Apache Beam, with a cache.

    python -m af2flax.data.search --fasta chains.fasta \
        --databases configs/search_alphafold.py:/data --out alignments/ \
        [--runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner] [beam options]

writes `<out>/<chain>/{uniref90_hits.sto, mgnify_hits.sto, bfd_uniclust_hits.a3m, pdb70_hits.hhr |
pdb_hits.sto}`, the layout `python -m af2flax.data.build_dataset --alignments` reads, plus
`failures.tsv`. See docs/data_at_scale.md.
"""

from af2flax.data.search.config import (SearchConfigError, SearchPlan, SearchSpec, load_config,
                                        make_config, make_plan)
from af2flax.data.search.searches import SearchOutcome, Searcher, SearchSummary

__all__ = ["SearchConfigError", "SearchOutcome", "SearchPlan", "SearchSpec", "SearchSummary",
           "Searcher", "load_config", "make_config", "make_plan"]
