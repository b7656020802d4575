"""AlphaFold's genetic and template search databases under one directory (its download layout).

    python -m af2flax.data.search --fasta chains.fasta \\
        --databases configs/search_alphafold.py:/data/af2_dbs --out /data/alignments

`get_config("DIR")` is the training-era recipe (Jumper et al. 2021, Suppl. 1.2.2-1.2.3; the paths
of AlphaFold 2.0's download scripts): jackhmmer on UniRef90 and MGnify, HHblits on BFD +
Uniclust30 2018_08, HHsearch on PDB70. `get_config("DIR,v2.3")` uses AlphaFold 2.3's files
instead (MGnify 2022_05, UniRef30 2021_03 for Uniclust30, hmmsearch on pdb_seqres for templates).
Keys are AlphaFold's flag names; see af2flax/data/search/config.py for every key and default.
On Dataflow the launcher may not see the databases: set `database_versions` then (see
docs/data_at_scale.md).
"""

import os

import ml_collections


def get_config(arg: str = "/data/af2_dbs") -> ml_collections.ConfigDict:
  data_dir, _, variant = arg.partition(",")
  path = lambda *parts: os.path.join(data_dir, *parts)
  config = ml_collections.ConfigDict()
  config.uniref90_database_path = path("uniref90", "uniref90.fasta")
  config.bfd_database_path = path("bfd", "bfd_metaclust_clu_complete_id30_c90_final_seq.sorted_opt")
  if variant == "v2.3":
    config.mgnify_database_path = path("mgnify", "mgy_clusters_2022_05.fa")
    config.uniref30_database_path = path("uniref30", "UniRef30_2021_03")
    config.pdb_seqres_database_path = path("pdb_seqres", "pdb_seqres.txt")
  elif not variant:
    config.mgnify_database_path = path("mgnify", "mgy_clusters.fa")
    config.uniclust30_database_path = path("uniclust30", "uniclust30_2018_08",
                                           "uniclust30_2018_08")
    config.pdb70_database_path = path("pdb70", "pdb70")
  else:
    raise ValueError(f"unknown variant {variant!r} (use 'DIR' or 'DIR,v2.3')")
  config.msa_tools_n_cpu = 8   # AlphaFold's default; give each worker as many cores
  return config
