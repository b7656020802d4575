"""Wrappers of the search tools of AlphaFold's pipeline (Jumper et al. 2021, Suppl. 1.2.2-1.2.3)."""

from af2flax.data.tools.hhblits import HHBlits
from af2flax.data.tools.hhsearch import HHSearch
from af2flax.data.tools.hmmbuild import Hmmbuild
from af2flax.data.tools.hmmsearch import Hmmsearch
from af2flax.data.tools.jackhmmer import Jackhmmer
from af2flax.data.tools.kalign import Kalign
from af2flax.data.tools.utils import ToolError

__all__ = ["HHBlits", "HHSearch", "Hmmbuild", "Hmmsearch", "Jackhmmer", "Kalign", "ToolError"]
