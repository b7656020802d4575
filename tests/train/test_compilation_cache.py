"""The persistent compilation cache: a resumed run loads its compiled step instead of compiling.

Each run is its own process (JAX opens its cache once per process), on the small MLP.
"""

import json
import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

_RUN = """
import json, sys
import jax
from af2flax.train import loop
from tests.train import mlp

jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
mlp.patch_loop(loop)
config = mlp.loop_config(num_train_steps=int(sys.argv[2]), compilation_cache_dir=sys.argv[3])
metrics = loop.train_and_evaluate(config, sys.argv[1])
print(json.dumps({"hits": len(hits), "cache_dir": jax.config.jax_compilation_cache_dir}))
"""


def _run(workdir, steps, cache_dir, **env):
  result = subprocess.run(
      [sys.executable, "-c", _RUN, str(workdir), str(steps), cache_dir], cwd=REPO_ROOT,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT), **env),
      capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_resumed_run_loads_compiled_programs_from_the_cache(tmp_path):
  workdir = tmp_path / "run"
  first = _run(workdir, 4, "{workdir}/compilation_cache")
  cache = workdir / "compilation_cache"
  assert first == {"hits": 0, "cache_dir": str(cache)}
  assert any(cache.iterdir())
  resumed = _run(workdir, 6, "{workdir}/compilation_cache")  # resumes at step 4
  assert resumed["hits"] >= 2, resumed  # the train step and the evaluation step at least


def test_cache_off_and_jax_setting_wins(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from af2flax.train import loop  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:  # this process: "" leaves JAX's cache off
    assert loop.enable_compilation_cache("", tmp_path) is None
    assert not jax.config.jax_compilation_cache_dir
  own = tmp_path / "own_cache"
  chosen = _run(tmp_path / "env", 2, "{workdir}/compilation_cache",
                JAX_COMPILATION_CACHE_DIR=str(own))
  assert chosen["cache_dir"] == str(own) and any(own.iterdir())
  assert not (tmp_path / "env" / "compilation_cache").exists()
