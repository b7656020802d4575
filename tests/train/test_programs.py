"""The train step as separately compiled programs (`programs.SplitTrainStep`) computes the
one-program step's values; AlphaFold's parts (recycling iterations, trunk, heads) compose to
the whole network."""

import json
import re
import subprocess
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from af2flax.model.alphafold import AlphaFold
from af2flax.train import optimizer as optimizer_lib
from af2flax.train import programs
from af2flax.train import sharding as sharding_lib
from af2flax.train import state as state_lib
from af2flax.train import step as step_lib
from tests.conftest import REPO_ROOT, load_af2_tiny_training
from tests.train import mlp


def _mlp_steps(batch_size=4, steps=3, objective=mlp.objective, **config_overrides):
  config = mlp.train_config(**config_overrides)
  model = mlp.MLP()
  tx = optimizer_lib.make_optimizer(config.optimizer)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1})
  shardings = sharding_lib.replicated(mesh)
  state = state_lib.create_train_state(mlp.init_params(model), tx, jax.random.PRNGKey(1))
  one = sharding_lib.jit_train_step(
      step_lib.make_train_step(objective(model), tx, config, mesh),
      jax.tree.map(lambda _: shardings, state), mesh)
  split = programs.SplitTrainStep(objective(model), tx, config, mesh, shardings)
  states = [jax.tree.map(jnp.copy, state), jax.tree.map(jnp.copy, state)]
  metrics = [None, None]
  for i in range(steps):
    batch = jax.device_put(mlp.make_batch(i, batch_size), sharding_lib.batch_sharding(mesh))
    for k, train_step in enumerate((one, split)):
      states[k], metrics[k] = train_step(states[k], batch)
  return states, metrics, split


def _assert_same_states(one, split):
  for a, b in zip(jax.tree.leaves((one.params, one.ema_params, one.opt_state)),
                  jax.tree.leaves((split.params, split.ema_params, split.opt_state))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_split_step_equals_one_program_step():
  """Three steps of 4 examples (a loop of 4 per step over the one device): same parameters,
  EMA, optimizer state and metrics, up to XLA's rounding. A one-stage objective: recycle,
  the loss and its gradient in one program, accumulate."""
  (one, split), (one_metrics, split_metrics), split_step = _mlp_steps()
  assert int(split.step) == 3
  _assert_same_states(one, split)
  assert set(split_metrics) == set(one_metrics)
  for key, value in one_metrics.items():
    np.testing.assert_allclose(split_metrics[key], value, rtol=1e-5, err_msg=key)
  assert float(split_metrics["clipped_fraction"]) == 1.0  # clipping is exercised
  # Compiled once for the three steps; each program timed.
  assert split_step.program_names == ["recycle", "gradient.final", "accumulate",
                                      "accumulate.add", "update"]
  assert set(split_step.compile_seconds) == {"trace_lower", "wall", *split_step.program_names}


def test_one_example_per_device_needs_no_sums_before_its_gradient():
  """One example per device (AlphaFold's): the clipped gradient becomes the sums in its own
  buffer, so no `accumulate.add` program, and no zero sums made before the example (a
  parameter-sized buffer through the backward passes); the one-program step's values."""
  (one, split), (one_metrics, split_metrics), split_step = _mlp_steps(batch_size=1)
  _assert_same_states(one, split)
  for key, value in one_metrics.items():
    np.testing.assert_allclose(split_metrics[key], value, rtol=1e-5, err_msg=key)
  assert split_step.program_names == ["recycle", "gradient.final", "accumulate", "update"]
  donated = split_step.compiled["accumulate"].as_text()
  assert "input_output_alias" in donated  # the gradient's buffer becomes the sums


def test_two_stages_equal_one_program_step():
  """Two stages: the first's forward program, the second's loss and gradient, the first's
  backward program; the same values as the one-program step of the same objective."""
  (one, split), (one_metrics, split_metrics), split_step = _mlp_steps(
      objective=mlp.staged_objective)
  _assert_same_states(one, split)
  for key, value in one_metrics.items():
    np.testing.assert_allclose(split_metrics[key], value, rtol=1e-5, err_msg=key)
  assert split_step.program_names == ["recycle", "forward.hidden", "gradient.output",
                                      "backward.hidden", "accumulate", "accumulate.add",
                                      "update"]


def test_recycling_in_parts_equals_one_program_step():
  """Recycling iterations as parts (`step.RecycleStages`): recycle.start, then each part a
  program run once per iteration up to the most any example runs (here 2; examples that
  run 1 skip the second): the one-program step's values."""
  (one, split), (one_metrics, split_metrics), split_step = _mlp_steps(
      objective=mlp.recycling_objective)
  _assert_same_states(one, split)
  for key, value in one_metrics.items():
    np.testing.assert_allclose(split_metrics[key], value, rtol=1e-5, err_msg=key)
  assert split_step.program_names == [
      "recycle.start", "recycle.first", "recycle.second", "forward.hidden", "gradient.output",
      "backward.hidden", "accumulate", "accumulate.add", "update"]
  counts = [int(np.where(mlp.make_batch(i, 4)["x"][k].sum() > 0, 2, 1))
            for i in range(3) for k in range(4)]
  assert set(counts) == {1, 2}  # both counts occur, so the skip is taken


def test_recycling_through_the_forward_programs_equals_one_program_step():
  """`recycle_through_forward`: the recycling iterations run the final iteration's forward
  programs (iteration i's inputs and key), then `recycle.next`, for as many iterations as
  the devices' examples run (`recycle.count`; here 1 or 2): the one-program step's values
  (its recycling runs the objective's parts), with no per-part recycling programs."""
  (one, split), (one_metrics, split_metrics), split_step = _mlp_steps(
      objective=mlp.recycling_through_forward_objective, recycle_through_forward=True)
  _assert_same_states(one, split)
  for key, value in one_metrics.items():
    np.testing.assert_allclose(split_metrics[key], value, rtol=1e-5, err_msg=key)
  assert split_step.program_names == ["recycle.start", "recycle.count", "recycle.next"] + [
      "forward.hidden", "gradient.output", "backward.hidden", "accumulate", "accumulate.add",
      "update"]


def test_recycling_through_the_forward_programs_needs_next_prev():
  config = mlp.train_config(recycle_through_forward=True)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1})
  tx = optimizer_lib.make_optimizer(config.optimizer)
  for objective in (mlp.objective, mlp.recycling_objective):
    with pytest.raises(ValueError, match="head_stages='structure,losses'"):
      programs.SplitTrainStep(objective(mlp.MLP()), tx, config, mesh,
                              sharding_lib.replicated(mesh))


def test_residuals_leave_out_the_parameters():
  """The backward program takes the parameters again: the forward program's residuals do not
  copy the weights that the backward pass reads (here the output layer's kernel, [16, 1])."""
  _, _, split_step = _mlp_steps(steps=1, objective=mlp.staged_objective)
  # pylint: disable=protected-access
  _, layout = split_step._vjp[0]
  # Dense_1/kernel, read again
  assert [where for where in layout if where is not None] == [("params", 3)]
  shapes = [tuple(x.shape) for x in jax.tree.leaves(split_step._residuals[0])]
  assert (1, 16, 1) not in shapes and (1, 4, 16) in shapes  # [device, ...]: activations only
  assert split_step.residual_bytes()["forward.hidden"] > 0


def test_offloaded_residuals_stay_in_host_memory_between_programs():
  """Residuals that a checkpoint keeps in the host's memory leave the forward program there
  and enter the backward program there, not copied to the accelerator in between (on an
  H200 at fine-tuning shapes that copy made the split step peak at 24.81 GiB, against 14.96
  for one program); the values are the one-program step's."""
  (one, split), _, split_step = _mlp_steps(
      steps=2, objective=lambda model: mlp.staged_objective(model, offload=True))
  _assert_same_states(one, split)
  # pylint: disable=protected-access
  host = split_step._host_residuals[0]
  assert host.count(True) == 1  # the stacked layer inputs, [2, 4, 16] per device
  kinds = lambda shardings: [s.memory_kind for s in jax.tree.leaves(shardings)]
  _, residuals_out = split_step.compiled["forward.hidden"].output_shardings
  assert kinds(residuals_out) == ["pinned_host" if h else "device" for h in host]
  _, inputs_in, _ = split_step.compiled["backward.hidden"].input_shardings[0]
  # (residuals the backward pass does not read are pruned from its inputs)
  assert kinds(inputs_in["residuals"]).count("pinned_host") == 1
  assert split_step.residual_bytes(host=True)["forward.hidden"] == 2 * 4 * 16 * 4


def _mlp_split_step(objective, **config_overrides):
  """A split step of the MLP's `objective` on one device, and its first train state."""
  config = mlp.train_config(**config_overrides)
  model = mlp.MLP()
  tx = optimizer_lib.make_optimizer(config.optimizer)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1})
  split = programs.SplitTrainStep(objective(model), tx, config, mesh,
                                  sharding_lib.replicated(mesh))
  return split, state_lib.create_train_state(mlp.init_params(model), tx, jax.random.PRNGKey(1))


def _assert_loss_of_default(split, state, batch):
  """`split`'s loss on `batch` is that of a split step with the default settings."""
  default, _ = _mlp_split_step(mlp.staged_objective)
  _, metrics = split(jax.tree.map(jnp.copy, state), batch)
  _, expected = default(jax.tree.map(jnp.copy, state), batch)
  np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-6)


class _Hooked:
  """A lowered program whose `compile` goes through `hook(name, compiler_options, compile)`,
  where `compile()` is the program's own compile with those options."""

  def __init__(self, name, lowered, hook):
    self._name, self._lowered, self._hook = name, lowered, hook

  def as_text(self):
    return self._lowered.as_text()

  def compile(self, compiler_options=None):
    return self._hook(self._name, compiler_options,
                      lambda: self._lowered.compile(compiler_options=compiler_options))


def _hook_compiles(monkeypatch, split, hook):
  """Every program that `split` lowers compiles through `hook` (`_Hooked`)."""
  real = split._lower_each  # pylint: disable=protected-access
  monkeypatch.setattr(split, "_lower_each", lambda state, batch: (
      (name, _Hooked(name, program, hook)) for name, program in real(state, batch)))


def test_split_step_recompiles_only_for_new_shapes():
  split, state = _mlp_split_step(mlp.objective)
  state, _ = split(state, mlp.make_batch(0, 2))
  first = split.compiled["gradient.final"]
  state, _ = split(state, mlp.make_batch(1, 2))
  assert split.compiled["gradient.final"] is first
  state, metrics = split(state, mlp.make_batch(2, 3))  # another batch size: compiled again
  assert split.compiled["gradient.final"] is not first and int(state.step) == 3
  assert np.isfinite(float(metrics["loss"]))


def test_programs_compile_while_the_next_are_lowered(monkeypatch):
  """`compile` hands each program to XLA as soon as it is lowered: the first program's
  compile has begun before the second is traced (so tracing overlaps compiling)."""
  split, state = _mlp_split_step(mlp.staged_objective)
  started = threading.Event()
  order = []

  def start(name, compiler_options, compile_program):  # pylint: disable=unused-argument
    started.set()
    return compile_program()

  real = split._lower_each  # pylint: disable=protected-access

  def watched(state, batch):
    programs_lowered = real(state, batch)
    name, first = next(programs_lowered)
    yield name, _Hooked(name, first, start)
    order.append(started.wait(60))  # before the next program is lowered
    for name, program in programs_lowered:
      order.append(name)
      yield name, program

  monkeypatch.setattr(split, "_lower_each", watched)
  seconds = split.compile(state, mlp.make_batch(1, 2))
  assert order[0] is True
  assert sorted(order[1:] + ["recycle"]) == sorted(split.program_names)
  assert set(split.compiled) == set(split.program_names)
  assert 0 < seconds["trace_lower"] <= seconds["wall"]


def test_split_step_refuses_vmapped_examples():
  config = mlp.train_config(vmap_batch_size=2)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1})
  with pytest.raises(ValueError, match="vmap_batch_size=2"):
    programs.SplitTrainStep(mlp.objective(mlp.MLP()), optimizer_lib.make_optimizer(
        config.optimizer), config, mesh, sharding_lib.replicated(mesh))


def test_step_programs_config_is_checked():
  from af2flax.train import loop  # pylint: disable=g-import-not-at-top
  config = mlp.loop_config(step_programs="three")
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1})
  with pytest.raises(ValueError, match="step_programs='three'"):
    loop.make_step(mlp.objective(mlp.MLP()), optimizer_lib.make_optimizer(config.optimizer),
                   config, mesh, sharding_lib.replicated(mesh), jax.sharding.PartitionSpec())


def _mesh_worker(*args):
  """`tests.train.mesh_worker` with `args` on 8 CPU devices in a subprocess: its JSON."""
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"}
  result = subprocess.run([sys.executable, "-m", "tests.train.mesh_worker", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=1800, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_split_step_on_meshes_equals_one_device():
  """Data-parallel (8 devices) and FSDP (4 x 2) meshes: the split step gives the one-program
  step's losses, parameters and EMA on one device (CPU devices in a subprocess)."""
  run = _mesh_worker
  reference = run("1,1")["1,1"]
  for mesh, result in run("--split", "1,1", "8,1", "4,2").items():
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5, err_msg=mesh)
    for tree in ("params", "ema"):
      for name, value in reference[tree].items():
        np.testing.assert_allclose(result[tree][name], value, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{tree} {name} on mesh {mesh}")


@pytest.mark.slow
@pytest.mark.parametrize("recycling", [[], ["--recycle_through_forward"]],
                         ids=["parts", "through_forward"])
def test_alphafold_split_step_in_parts_on_a_mesh_equals_one_device(shared_dir, recycling):
  """af2_tiny, two steps, every other example running no recycling iteration (so devices
  run different counts): the split step with the trunk in three stages, the structure
  module apart and the recycling iterations in parts (or through the forward programs,
  whose `recycle.next` keeps `prev` where a device's example has run its count), on a 4 x 2
  FSDP mesh, gives the one-program step's losses, parameters and EMA on one device.
  (Measured 2026-12-05: parameters within 2.6e-5, the Adam update's rounding, EMA within
  6e-8.)"""
  del shared_dir
  reference = _mesh_worker("--alphafold", "--mixed_recycling", "1,1")["1,1"]
  result = _mesh_worker("--alphafold", "--mixed_recycling", "--split",
                        "--trunk_stages=embeddings,extra_msa,evoformer",
                        "--head_stages=structure,losses", "--recycle_stages", *recycling,
                        "4,2")["4,2"]
  np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5)
  for tree, atol in (("params", 1e-4), ("ema", 1e-6)):
    for name, value in reference[tree].items():
      np.testing.assert_allclose(result[tree][name], value, rtol=0, atol=atol,
                                 err_msg=f"{tree} {name}")


@pytest.fixture(scope="module")
def tiny(shared_dir):
  del shared_dir
  return load_af2_tiny_training()[:3]


def test_alphafold_parts_compose_to_the_whole_network(tiny):
  """`apply(recycle_only=True)` then `apply(prev=...)` is one `apply`, and so is
  `apply(prev=..., trunk_only=True)` then `apply(representations=...)`; the recycled inputs
  are what the recycling iterations made (not the zeros of the first iteration)."""
  config, params, batch = tiny
  assert config.num_recycle > 0 and int(batch["num_iter_recycling"][0]) > 0
  model = AlphaFold(config)
  variables = {"params": params}
  whole = jax.jit(lambda b: model.apply(variables, b))(batch)
  prev = jax.jit(lambda b: model.apply(variables, b, recycle_only=True))(batch)
  assert set(prev) == {"prev_pos", "prev_msa_first_row", "prev_pair"}
  assert float(jnp.abs(prev["prev_pair"]).max()) > 0
  halves = jax.jit(lambda b, p: model.apply(variables, b, prev=p))(batch, prev)
  # The final iteration itself in two parts: the trunk, then the heads.
  representations = jax.jit(lambda b, p: model.apply(variables, b, prev=p, trunk_only=True))(
      batch, prev)
  assert {"msa", "pair", "single", "msa_first_row"} <= set(representations)
  parts = jax.jit(lambda b, r: model.apply(variables, b, representations=r))(
      batch, representations)
  for outputs in (halves, parts):
    np.testing.assert_allclose(outputs["structure_module"]["final_atom_positions"],
                               whole["structure_module"]["final_atom_positions"],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outputs["representations"]["pair"],
                               whole["representations"]["pair"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outputs["distogram"]["logits"], whole["distogram"]["logits"],
                               rtol=1e-4, atol=1e-4)


def _with_dropout(config):
  """af2_tiny's config (`deterministic`, dropout rates 0) with dropout on and AlphaFold's
  training rate 0.15 in every Evoformer and extra-MSA module: then the dropout keys
  matter."""
  config = config.copy_and_resolve_references()
  config.global_config.deterministic = False
  for stack in (config.embeddings_and_evoformer.evoformer,):
    for module in stack.values():
      if hasattr(module, "get") and "dropout_rate" in module:
        module.dropout_rate = 0.15
  return config


def test_alphafold_trunk_parts_compose_to_the_trunk(tiny):
  """The trunk's parts one after another (`trunk_parts=`, `trunk_activations=`), with
  dropout on and the same key, give the whole trunk's representations; so do two stages."""
  config, params, batch = tiny
  config = _with_dropout(config)
  model = AlphaFold(config)
  variables = {"params": params}
  rngs = {"dropout": jax.random.PRNGKey(3)}
  prev = jax.jit(lambda b: model.apply(variables, b, recycle_only=True))(batch)

  @jax.jit
  def run(b, p):
    whole = model.apply(variables, b, False, prev=p, trunk_only=True, rngs=rngs)
    first = model.apply(variables, b, False, prev=p, trunk_only=True,
                        trunk_parts=("embeddings",), rngs=rngs)
    second = model.apply(variables, b, False, trunk_only=True, trunk_parts=("extra_msa",),
                         trunk_activations=first, rngs=rngs)
    three = model.apply(variables, b, False, trunk_only=True, trunk_parts=("evoformer",),
                        trunk_activations=second, rngs=rngs)
    pair = model.apply(variables, b, False, prev=p, trunk_only=True,
                       trunk_parts=("embeddings", "extra_msa"), rngs=rngs)
    two = model.apply(variables, b, False, trunk_only=True, trunk_parts=("evoformer",),
                      trunk_activations=pair, rngs=rngs)
    undropped = model.apply(variables, b, True, prev=p, trunk_only=True)
    return whole, first, three, two, undropped

  whole, first, three, two, undropped = run(batch, prev)
  assert set(first) == {"msa", "pair"}
  assert set(three) == set(whole)
  for name in whole:
    for staged in (three, two):
      np.testing.assert_allclose(staged[name], whole[name], rtol=1e-5, atol=1e-5, err_msg=name)
  # Dropout was on: the key matters (else the test could not tell the keys apart).
  assert float(jnp.abs(whole["pair"] - undropped["pair"]).max()) > 1e-3


def test_alphafold_trunk_parts_are_checked(tiny):
  config, params, batch = tiny
  model = AlphaFold(config)
  variables = {"params": params}
  prev = jax.eval_shape(lambda b: model.apply(variables, b, recycle_only=True), batch)
  activations = jax.eval_shape(lambda b, p: model.apply(
      variables, b, prev=p, trunk_only=True, trunk_parts=("embeddings",)), batch, prev)
  with pytest.raises(ValueError, match=r"expected consecutive parts of embeddings, "
                                       r"extra_msa, evoformer"):
    jax.eval_shape(lambda b, p: model.apply(variables, b, prev=p, trunk_only=True,
                                            trunk_parts=("embeddings", "evoformer")), batch, prev)
  with pytest.raises(ValueError, match="the activations of the parts before them are needed"):
    model.apply(variables, batch, trunk_only=True, trunk_parts=("evoformer",))
  with pytest.raises(ValueError, match="activations are not taken"):
    jax.eval_shape(lambda b, a: model.apply(variables, b, trunk_only=True,
                                            trunk_parts=("embeddings",), trunk_activations=a),
                   batch, activations)
  for parts in ({"trunk_parts": ("evoformer",), "trunk_activations": activations},
                {"prev": prev, "trunk_parts": ("evoformer",),
                 "trunk_activations": activations, "trunk_only": True}):
    with pytest.raises(ValueError, match="cannot be given together"):
      model.apply(variables, batch, **parts)


@pytest.mark.parametrize("spec,names", [
    ("trunk", ["trunk", "heads"]),
    (" trunk ", ["trunk", "heads"]),
    ("embeddings+extra_msa,evoformer", ["embeddings+extra_msa", "evoformer", "heads"]),
    ("embeddings,extra_msa,evoformer", ["embeddings", "extra_msa", "evoformer", "heads"]),
    ("embeddings, extra_msa + evoformer", ["embeddings", "extra_msa+evoformer", "heads"])])
def test_trunk_stages_name_the_objective_stages(spec, names):
  objective = step_lib.alphafold_objective(None, types.SimpleNamespace(heads=None), spec)
  assert [name for name, _ in objective.stages] == names


@pytest.mark.parametrize("spec", ["evoformer,embeddings+extra_msa", "embeddings,evoformer",
                                  "embeddings,extra_msa,evoformer,evoformer", "", "trunk,heads"])
def test_trunk_stages_out_of_order_are_refused(spec):
  with pytest.raises(ValueError, match=re.escape(f"trunk_stages={spec!r}: expected 'trunk'")):
    step_lib.trunk_stages(spec)


def test_alphafold_objective_in_three_trunk_stages_is_the_objective(tiny):
  """The staged objective's loss with the trunk in three stages is the one-stage loss, for
  the same example key (dropout on). Without recycling iterations, which only the trunk's
  first stage's `prev` would carry (the recycling in parts has its own test below): the
  recycling loop is most of this test's compile."""
  config, params, batch = tiny
  config = _with_dropout(config)
  config.num_recycle = 0
  model = AlphaFold(config)
  key = jax.random.PRNGKey(5)
  losses = [jax.jit(lambda p, b, spec=spec: step_lib.alphafold_objective(model, config, spec)(
      p, b, key)[0])(params, batch) for spec in ("trunk", "embeddings,extra_msa,evoformer")]
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_alphafold_heads_apart_compose_to_the_heads(tiny):
  """`apply(representations=r, heads=['structure_module'])` then `apply(representations=r,
  structure=...)` give every head's output of `apply(representations=r)`, with the same
  dropout keys (the structure module's dropout on)."""
  config, params, batch = tiny
  config = _with_dropout(config)
  config.heads.structure_module.dropout = 0.1
  model = AlphaFold(config)
  variables = {"params": params}
  rngs = {"dropout": jax.random.PRNGKey(3)}
  representations = jax.jit(lambda b: model.apply(variables, b, trunk_only=True,
                                                  deterministic=False, rngs=rngs))(batch)
  heads = jax.jit(lambda b, r: model.apply(variables, b, representations=r, deterministic=False,
                                           rngs=rngs))(batch, representations)
  structure = jax.jit(lambda b, r: model.apply(
      variables, b, representations=r, heads=["structure_module"], deterministic=False,
      rngs=rngs))(batch, representations)
  assert set(structure) == {"representations", "structure_module"}
  rest = jax.jit(lambda b, r, s: model.apply(
      variables, b, representations=r, structure=s, deterministic=False, rngs=rngs))(
          batch, representations, structure["structure_module"])
  assert set(rest) == set(heads)
  for a, b in zip(jax.tree.leaves(heads), jax.tree.leaves(rest)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
  without_dropout = jax.jit(lambda b, r: model.apply(
      variables, b, representations=r, heads=["structure_module"]))(batch, representations)
  assert not np.allclose(without_dropout["structure_module"]["final_atom_positions"],
                         structure["structure_module"]["final_atom_positions"])


@pytest.mark.slow
def test_alphafold_objective_with_the_structure_module_apart_is_the_objective(tiny):
  """`head_stages='structure,losses'` gives the one-stage heads' loss and gradient for the
  same example key (dropout on, in the structure module too). Without recycling iterations
  (they run before the heads either way). Slow: two whole gradients compiled, 72 s alone
  and 126 s beside the other worker on CI's 2-core machine (2026-12-06), the suite's slowest
  test; `test_alphafold_heads_apart_compose_to_the_heads` checks the same composition's
  values in CI, and the slow mesh test above the split step with these stages."""
  config, params, batch = tiny
  config = _with_dropout(config)
  config.heads.structure_module.dropout = 0.1
  config.num_recycle = 0
  model = AlphaFold(config)
  key = jax.random.PRNGKey(5)
  objectives = [step_lib.alphafold_objective(model, config, "trunk", heads)
                for heads in ("heads", "structure,losses")]
  assert [name for name, _ in objectives[1].stages] == ["trunk", "structure", "losses"]
  results = [jax.jit(jax.value_and_grad(lambda p, b, o=o: o(p, b, key)[0]))(params, batch)
             for o in objectives]
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_alphafold_recycling_in_parts_is_the_models_loop(tiny):
  """`recycle_in_stages`: the recycling iterations as parts (the trunk's three stages, then
  the structure module), each iteration with `RecycleStages.key`, give the model's own
  loop's `prev` exactly (dropout on, three iterations); `iteration=` is checked."""
  config, params, batch = tiny
  config = _with_dropout(config)
  config.heads.structure_module.dropout = 0.1
  config.num_recycle = 3
  batch = {k: jnp.concatenate([v, v], 0) for k, v in batch.items()}  # 4 iterations' features
  batch["num_iter_recycling"] = jnp.full_like(batch["num_iter_recycling"], 3)
  model = AlphaFold(config)
  objective = step_lib.alphafold_objective(model, config, "embeddings,extra_msa,evoformer",
                                           recycle_in_stages=True)
  parts = objective.recycle_stages
  assert [name for name, _ in parts.stages] == ["embeddings", "extra_msa", "evoformer",
                                                "structure"]
  assert parts.maximum == 3 and int(parts.count(batch)) == 3
  key = jax.random.PRNGKey(7)
  loop = jax.jit(lambda p, b: objective.recycle(p, b, key))(params, batch)
  staged = jax.jit(lambda p, b: parts.run(p, b, key))(params, batch)
  assert set(staged) == set(loop) == {"prev_pos", "prev_msa_first_row", "prev_pair"}
  for name in loop:
    np.testing.assert_allclose(staged[name], loop[name], rtol=1e-6, atol=1e-6, err_msg=name)
  other_key = jax.jit(lambda p, b: parts.run(p, b, jax.random.PRNGKey(8)))(params, batch)
  assert not np.allclose(other_key["prev_pair"], loop["prev_pair"])
  with pytest.raises(ValueError, match="iteration=... is taken only with"):
    model.apply({"params": params}, batch, iteration=0)


@pytest.mark.parametrize("spec", ["structure", "losses,structure", "heads,losses", ""])
def test_head_stages_are_checked(spec):
  with pytest.raises(ValueError, match=re.escape(f"head_stages={spec!r}: expected one of")):
    step_lib.head_stages(spec)
  assert step_lib.head_stages(" structure , losses") == ("structure", "losses")


def test_alphafold_prev_is_checked(tiny):
  config, params, batch = tiny
  model = AlphaFold(config)
  variables = {"params": params}
  prev = jax.eval_shape(lambda b: model.apply(variables, b, recycle_only=True), batch)
  wrong = dict(prev, prev_pair=jax.ShapeDtypeStruct((3, 3, 1), jnp.float32))
  with pytest.raises(ValueError, match=r"prev=...\)\['prev_pair'\] has shape \(3, 3, 1\)"):
    jax.eval_shape(lambda b, p: model.apply(variables, b, prev=p), batch, wrong)
  with pytest.raises(ValueError, match="has keys"):
    jax.eval_shape(lambda b, p: model.apply(variables, b, prev=p), batch,
                   {"prev_pos": prev["prev_pos"]})
  for parts in ({"prev": prev, "recycle_only": True},
                {"representations": {}, "trunk_only": True},
                {"representations": {}, "prev": prev}):
    with pytest.raises(ValueError, match="cannot be given together"):
      model.apply(variables, batch, **parts)


@pytest.mark.slow
@pytest.mark.parametrize("trunk,heads,recycle,overrides", [
    ("trunk", "heads", False, {}), ("embeddings+extra_msa,evoformer", "heads", False, {}),
    ("trunk", "structure,losses", False, {}),
    ("embeddings+extra_msa,evoformer", "heads", True, {}),
    # the presets' flattened scan under remat (no copy of the parameters kept)
    ("embeddings,extra_msa,evoformer", "structure,losses", True,
     {"use_remat": True, "scan_flat_params": True}),
    # the recycling iterations through the forward programs
    ("embeddings,extra_msa,evoformer", "structure,losses", "through_forward",
     {"use_remat": True, "scan_flat_params": True})])
def test_alphafold_split_step_equals_one_program_step(tiny, trunk, heads, recycle, overrides):
  """af2_tiny with its reference parameters and batch, dropout on: one step of the split
  step and of the one-program step give the same loss, metrics and parameters, with the
  trunk in one stage or two, the heads in one stage or two, and the recycling iterations
  in one program, in parts or through the forward programs; and with the stacks
  rematerialised and scanned over flat parameters."""
  config, params, batch = tiny
  config = _with_dropout(config)
  config.global_config.update(overrides)
  config.heads.structure_module.dropout = 0.1
  objective = step_lib.alphafold_objective(AlphaFold(config), config, trunk, heads,
                                           bool(recycle))
  train_config = mlp.train_config(recycle_through_forward=recycle == "through_forward")
  train_config.optimizer.learning_rate = 1e-3
  tx = optimizer_lib.make_optimizer(train_config.optimizer)
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1})
  state = state_lib.create_train_state(params, tx, jax.random.PRNGKey(1))
  shardings = sharding_lib.replicated(mesh)
  one = sharding_lib.jit_train_step(step_lib.make_train_step(objective, tx, train_config, mesh),
                                    jax.tree.map(lambda _: shardings, state), mesh)
  split = programs.SplitTrainStep(objective, tx, train_config, mesh, shardings)
  batch = {k: v[None] for k, v in batch.items()}
  one_state, one_metrics = one(jax.tree.map(jnp.copy, state), batch)
  split_state, split_metrics = split(jax.tree.map(jnp.copy, state), batch)
  for key in ("loss", "grad_norm", "update_grad_norm", "param_norm"):
    np.testing.assert_allclose(split_metrics[key], one_metrics[key], rtol=1e-5, err_msg=key)
  for a, b in zip(jax.tree.leaves(one_state.params), jax.tree.leaves(split_state.params)):
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("workers", [1, 2, 0])
def test_compile_workers_bound_the_compiles_at_a_time(monkeypatch, workers):
  """`compile_workers`: at most that many programs compile at once (each compile here is
  held 0.8 s, so unbounded ones overlap: 3 or more at once), every program is
  compiled, and the step's values are those of the default."""
  split, state = _mlp_split_step(mlp.staged_objective, compile_workers=workers)
  lock, running, most = threading.Lock(), [0], [0]

  def held(name, compiler_options, compile_program):  # pylint: disable=unused-argument
    with lock:
      running[0] += 1
      most[0] = max(most[0], running[0])
    try:
      time.sleep(0.8)
      return compile_program()
    finally:
      with lock:
        running[0] -= 1

  _hook_compiles(monkeypatch, split, held)
  batch = mlp.make_batch(0, 2)
  split.compile(state, batch)
  if workers:
    assert most[0] == workers
  else:  # all at once
    assert most[0] >= 3, most
  assert set(split.compiled) == set(split.program_names)
  _assert_loss_of_default(split, state, batch)


@pytest.mark.parametrize("overrides,message", [
    ({"compile_workers": -1}, "compile_workers=-1"),
    ({"compile_schedule": "sometimes"}, "compile_schedule='sometimes'"),
    ({"compile_schedule": "share_autotuning", "compile_workers": 2}, "compile_workers=2 bounds"),
    ({"cublas_stages": "final,trunk"}, "no stage 'trunk'; this step's stages are final$"),
])
def test_compile_settings_are_checked(overrides, message):
  with pytest.raises(ValueError, match=message):
    _mlp_split_step(mlp.objective, **overrides)


def test_cublas_stages_compile_their_programs_without_triton_gemms(monkeypatch):
  """`cublas_stages`: the programs of those stages (forward, backward) are compiled with
  XLA's Triton GEMMs off, every other program with no options; the step's values are the
  default's (XLA:CPU ignores the option, so this checks the plumbing)."""
  split, state = _mlp_split_step(mlp.staged_objective, cublas_stages=" hidden ")
  seen = {}

  def recorded(name, compiler_options, compile_program):
    seen[name] = compiler_options
    return compile_program()

  _hook_compiles(monkeypatch, split, recorded)
  batch = mlp.make_batch(0, 2)
  split.compile(state, batch)
  off = {"xla_gpu_enable_triton_gemm": False}
  assert set(seen) == set(split.program_names)
  assert {name for name, options in seen.items() if options == off} == {
      "forward.hidden", "backward.hidden"}, seen
  assert all(options is None for name, options in seen.items() if not name.endswith(".hidden"))
  _assert_loss_of_default(split, state, batch)


def test_matrix_products_are_read_from_the_stablehlo():
  """The distinct `dot_general`s of a lowered program, by types and dimension numbers (not
  by SSA name or location): two products of the same shapes count once."""
  def f(x, w1, w2, v):
    return (x @ w1) @ w2, jnp.einsum("bi,bi->b", x, v)

  args = (jnp.ones((4, 8)), jnp.ones((8, 8)), jnp.ones((8, 8)), jnp.ones((4, 8)))
  text = jax.jit(f).lower(*args).as_text()
  products = programs.matrix_products(text)
  assert text.count("stablehlo.dot_general") == 3
  assert len(products) == 2, products
  assert any("tensor<4x8xf32>, tensor<8x8xf32>" in p for p in products), products
  assert not any("%" in p.replace("%,", "").replace("% ", "") or "loc(" in p
                 for p in products), products
  assert programs.matrix_products("no products here") == frozenset()


def test_autotuning_schedule_waits_for_larger_programs_sharing_products():
  """Each program waits for the programs that tune its products: for each product, the
  first in the order (the most products first, then the longest) holding it."""
  products = {"small": frozenset({"c", "d"}), "large": frozenset({"a", "b", "c"}),
              "apart": frozenset({"e"}), "none": frozenset(),
              "tie": frozenset({"a", "f", "g"}),
              "later": frozenset({"a", "x"})}  # `a` is tie's to tune, though large holds it
  order, waits = programs.autotuning_schedule(products, {"large": 10, "tie": 20, "small": 5})
  assert order[:4] == ["tie", "large", "small", "later"]
  assert waits == {"tie": [], "large": ["tie"], "small": ["large"], "later": ["tie"],
                   "apart": [], "none": []}


def test_shallow_autotuning_schedule_never_chains_waits():
  """'share_autotuning' (shallow) against 'share_autotuning_all': only programs that wait
  for nothing tune, and a program waits only where they tune at least half its products."""
  products = {"big": frozenset("abcd"), "peer": frozenset("apqr"), "fwd": frozenset("abp"),
              "chain": frozenset("ps"), "after": frozenset("st")}
  sizes = {"big": 10, "peer": 5, "chain": 3, "after": 1}
  order, full = programs.autotuning_schedule(products, sizes)
  assert order == ["big", "peer", "fwd", "chain", "after"]
  assert full == {"big": [], "peer": ["big"], "fwd": ["big", "peer"], "chain": ["peer"],
                  "after": ["chain"]}
  _, shallow = programs.autotuning_schedule(products, sizes, shallow=True)
  assert shallow == {"big": [], "peer": [], "fwd": ["big", "peer"], "chain": ["peer"],
                     "after": []}


@pytest.mark.parametrize("schedule", ["share_autotuning", "share_autotuning_all"])
def test_compile_schedule_sharing_autotuning(monkeypatch, schedule):
  """`compile_schedule='share_autotuning(_all)'`: every program is lowered first; each starts
  compiling only after the programs that tune its matrix products (larger ones) are
  compiled; the step's values are the default's."""
  split, state = _mlp_split_step(mlp.staged_objective, compile_schedule=schedule)
  lock, times = threading.Lock(), {}

  def timed(name, compiler_options, compile_program):  # pylint: disable=unused-argument
    begin = time.perf_counter()
    time.sleep(0.3)
    compiled = compile_program()
    with lock:
      times[name] = (begin, time.perf_counter())
    return compiled

  _hook_compiles(monkeypatch, split, timed)
  # The MLP's forward and backward programs share no product (no rematerialisation): let
  # every program holding one share it, so that one waits for the other.
  monkeypatch.setattr(programs, "matrix_products", lambda text: frozenset(
      {"shared"} if "stablehlo.dot_general" in text else ()))
  seen = {}
  real_schedule = programs.autotuning_schedule
  monkeypatch.setattr(programs, "autotuning_schedule",
                      lambda *a, **k: seen.setdefault("schedule", real_schedule(*a, **k)))
  batch = mlp.make_batch(0, 2)
  split.compile(state, batch)
  assert set(split.compiled) == set(split.program_names) == set(times)
  order, waits = seen["schedule"]
  assert waits["backward.hidden"] == ["forward.hidden"] or waits["forward.hidden"] == [
      "backward.hidden"], waits
  for name, earlier in waits.items():
    for other in earlier:
      assert times[other][1] <= times[name][0], (name, other, times)
  _assert_loss_of_default(split, state, batch)
