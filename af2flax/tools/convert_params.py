"""Convert DeepMind's AlphaFold parameter file into an af2flax params checkpoint.

    python -m af2flax.tools.convert_params --af2 params_model_1_ptm.npz --out /ckpt/model_1_ptm

The model preset is read from the file name (`params_<preset>.npz`) or given with
`--preset`. Every parameter is checked against the preset's model (names and shapes from a
shape-only trace of `AlphaFold.init`); any mismatch fails and names the path. The output is
an Orbax checkpoint of {'params': tree} that `import_af2.restore_params` (training and
inference) restores.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from typing import Any, Mapping, Sequence

import jax

from af2flax.model import batch_spec, import_af2
from af2flax.model.alphafold import AlphaFold
from af2flax.model.config import MODEL_NAMES, model_config

# Parameter shapes do not depend on the input sizes: trace with small ones.
_TRACE_SHAPES = {"num_res": 8, "num_msa": 4, "num_extra_msa": 4, "num_templates": 2}


def expected_params(config: Any) -> Mapping[str, Any]:
  """{'params': tree of ShapeDtypeStructs} of `AlphaFold(config)`, without computing."""
  features = batch_spec.feature_shapes(num_slices=config.num_recycle + 1, **_TRACE_SHAPES)
  return jax.eval_shape(AlphaFold(config).init, jax.random.PRNGKey(0), features)


def preset_from_filename(path: pathlib.Path) -> str:
  match = re.fullmatch(r"params_(model_[1-5](?:_ptm)?)\.npz", path.name)
  if not match:
    raise ValueError(f"{path}: cannot tell the model preset from the file name; pass --preset "
                     f"(one of {', '.join(MODEL_NAMES)})")
  return match.group(1)


def convert(af2_path: str | pathlib.Path, out_dir: str | pathlib.Path,
            preset: str | None = None) -> pathlib.Path:
  """Checks and converts `af2_path`; returns the checkpoint directory."""
  af2_path = pathlib.Path(af2_path)
  preset = preset or preset_from_filename(af2_path)
  flat = import_af2.load_alphafold_npz(af2_path)
  params = import_af2.flax_from_haiku(flat, expected_params(model_config(preset)),
                                      source=str(af2_path))
  return import_af2.save_params(out_dir, params)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--af2", required=True, help="DeepMind params_model_*.npz file")
  parser.add_argument("--out", required=True, help="new directory for the Orbax checkpoint")
  parser.add_argument("--preset", choices=MODEL_NAMES, default=None,
                      help="model preset (default: from the file name)")
  args = parser.parse_args(argv)
  try:
    out = convert(args.af2, args.out, args.preset)
  except (import_af2.ParameterMismatchError, ValueError, FileNotFoundError,
          FileExistsError) as error:
    print(f"convert_params: {error}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
