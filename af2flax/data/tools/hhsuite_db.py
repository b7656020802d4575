"""Builds a small HH-suite database (`<prefix>_{a3m,hhm,cs219}.ff{data,index}`) from A3M records.

What HHblits/HHsearch read (Suppl. 1.2.2-1.2.3: BFD, Uniclust30, PDB70 are such databases). Used by
the tests to search real binaries against databases made from `../shared/data` sequences, and by
anyone who wants a custom PDB70-like template database: one record per template chain, named
`<pdbid>_<chain>` so that the template featurizer can find its structure.

Debian ships `cstranslate` only as SIMD variants under /usr/libexec/hhsuite (its dispatch script
there is broken), so `find_cstranslate` picks the variant this CPU supports.
"""

from __future__ import annotations

import os
import shutil
from typing import Mapping

from af2flax.data.tools import utils

_SIMD_LEVELS = ("avx2", "avx", "sse4.1", "ssse3", "sse3")
_HHSUITE_LIBEXEC = "/usr/libexec/hhsuite"
_DATA_DIRS = ("/usr/share/hhsuite/data", "/usr/lib/hhsuite/data", "/usr/local/share/hhsuite/data")


def find_cstranslate() -> str:
  """Path of a working cstranslate binary (PATH first, then Debian's SIMD variants)."""
  path = os.environ.get("CSTRANSLATE") or shutil.which("cstranslate")
  if path:
    return path
  try:
    with open("/proc/cpuinfo") as f:
      flags = f.read()
  except OSError:
    flags = ""
  for level in _SIMD_LEVELS:
    candidate = os.path.join(_HHSUITE_LIBEXEC, f"cstranslate-{level}")
    if level.replace(".", "_") in flags and os.access(candidate, os.X_OK):
      return candidate
  candidate = os.path.join(_HHSUITE_LIBEXEC, "cstranslate-plain")
  if os.access(candidate, os.X_OK):
    return candidate
  raise utils.ToolError("cstranslate", "not found (install hhsuite or set $CSTRANSLATE)")


def find_context_data() -> tuple[str, str]:
  """HH-suite's cs219.lib and context_data.lib (from $HHLIB/data or the Debian data package)."""
  directories = ([os.path.join(os.environ["HHLIB"], "data")] if "HHLIB" in os.environ else [])
  for directory in directories + list(_DATA_DIRS):
    library, context = os.path.join(directory, "cs219.lib"), os.path.join(directory,
                                                                            "context_data.lib")
    if os.path.exists(library) and os.path.exists(context):
      return library, context
  raise utils.ToolError("cstranslate", "cs219.lib/context_data.lib not found (hhsuite-data)")


def build_hhsuite_database(a3m_by_name: Mapping[str, str], prefix: str,
                           timeout_s: float | None = None) -> str:
  """Writes `<prefix>_a3m`, `_hhm` (hhmake) and `_cs219` (cstranslate) ffindex databases.

  `a3m_by_name` maps an entry name to its A3M text (one sequence is fine). Returns `prefix`, the
  path HHblits/HHsearch take with `-d`.
  """
  if not a3m_by_name:
    raise ValueError("an HH-suite database needs at least one entry")
  with utils.temp_dir() as tmp:
    entries = os.path.join(tmp, "a3m")
    os.mkdir(entries)
    for name, a3m in a3m_by_name.items():
      if os.sep in name or not name:
        raise ValueError(f"invalid database entry name {name!r}")
      with open(os.path.join(entries, f"{name}.a3m"), "w") as f:
        f.write(a3m)
    for suffix in ("a3m", "hhm", "cs219"):
      for extension in ("ffdata", "ffindex"):
        path = f"{prefix}_{suffix}.{extension}"
        if os.path.exists(path):
          os.remove(path)
    utils.run("ffindex_build", [utils.find_binary("ffindex_build"), "-s",
                                f"{prefix}_a3m.ffdata", f"{prefix}_a3m.ffindex", entries],
              timeout_s)
  utils.run("ffindex_apply", [utils.find_binary("ffindex_apply"), f"{prefix}_a3m.ffdata",
                              f"{prefix}_a3m.ffindex", "-i", f"{prefix}_hhm.ffindex",
                              "-d", f"{prefix}_hhm.ffdata", "--",
                              utils.find_binary("hhmake"), "-i", "stdin", "-o", "stdout",
                              "-v", "0"],
            timeout_s)
  library, context = find_context_data()
  utils.run("cstranslate", [find_cstranslate(), "-f", "-x", "0.3", "-c", "4", "-I", "a3m",
                            "-i", f"{prefix}_a3m", "-o", f"{prefix}_cs219",
                            "-A", library, "-D", context], timeout_s)
  return prefix
