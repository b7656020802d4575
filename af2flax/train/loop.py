"""`train_and_evaluate(config, workdir)`: the training recipe, top to bottom.

mesh → input → model → sharded train state → restore (or start from imported weights),
while the step is traced and lowered (optionally compiled) beside it → loop with metrics,
validation, checkpoints and preemption handling. Every knob is in the config
(`configs/*.py`); the recipe's constants are Jumper et al. (2021) Suppl. 1.11.
"""

from __future__ import annotations

from concurrent import futures
import dataclasses
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from af2flax.common import residue_constants
from af2flax.train import checkpoint as checkpoint_lib
from af2flax.train import metrics as metrics_lib
from af2flax.train import optimizer as optimizer_lib
from af2flax.train import programs as programs_lib
from af2flax.train import sharding as sharding_lib
from af2flax.train import state as state_lib
from af2flax.train import step as step_lib

PyTree = Any
Batch = Mapping[str, np.ndarray]
EVAL_MASK_KEY = "eval_mask"


class NonFiniteTrainingError(RuntimeError):
  """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass(frozen=True)
class ModelFns:
  """What the loop needs from a model, all on ONE example (no batch axis).

  init: (rng, example) -> params.
  objective: (params, example, dropout_rng) -> (loss, aux scalars), see `step.py`.
  evaluate: (params, example) -> {metric name: scalar}, deterministic (validation).
  """

  init: Callable[[jax.Array, Batch], PyTree]
  objective: step_lib.Objective
  evaluate: Callable[[PyTree, Batch], Mapping[str, jax.Array]]


@dataclasses.dataclass
class InputData:
  """The training iterator and the validation set of this process.

  train: yields local batches (numpy, leading axis = global batch / process count) and has
    `get_state()` / `set_state(state)` with a JSON-serialisable state (its position).
  eval_batches: None, or a callable returning the local validation batches; every batch has
    the same local size and an `eval_mask` [B] (0 for padding), and every process yields the
    same number of batches.
  train_eval_batches: None, or the same for examples of the training set (with validation's
    fixed transforms): how well the model fits what it trains on, logged as `train_eval/...`.
  """

  train: Iterator[Batch]
  eval_batches: Callable[[], Iterable[Batch]] | None
  train_eval_batches: Callable[[], Iterable[Batch]] | None = None


def create_model(config: ml_collections.ConfigDict) -> ModelFns:
  """AlphaFold (MODEL_CONTRACT sections 3-6) with its losses and validation metrics."""
  from af2flax.losses import total as total_loss_lib  # pylint: disable=g-import-not-at-top
  from af2flax.model.alphafold import AlphaFold  # pylint: disable=g-import-not-at-top
  from af2flax.train import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top

  model = AlphaFold(step_lib.model_config_for_step(config))
  # Evaluation takes one example at a time (never vmapped): the model as configured, the
  # same parameters.
  eval_model = AlphaFold(config.model)
  ca = residue_constants.atom_order["CA"]

  def init(rng, example):
    return model.init({"params": rng, "dropout": rng}, example, deterministic=True)["params"]

  def evaluate(params, example):
    """Validation metrics of one example, EMA params, all recycles of the batch, no dropout."""
    outputs = eval_model.apply({"params": params}, example, deterministic=True)
    outputs = step_lib.to_float32(outputs)
    final = step_lib.final_iteration_features(example)
    metrics = evaluate_lib.structure_metrics(
        outputs["structure_module"]["final_atom_positions"][:, ca],
        final["all_atom_positions"][:, ca], final["all_atom_mask"][:, ca])
    metrics["loss"], _ = total_loss_lib.alphafold_loss(final, outputs, config.model.heads)
    return metrics

  objective = step_lib.alphafold_objective(model, config.model,
                                           config.get("trunk_stages", "trunk"),
                                           config.get("head_stages", "heads"),
                                           bool(config.get("recycle_stages", False)))
  return ModelFns(init=init, objective=objective, evaluate=evaluate)


def create_input(config: ml_collections.ConfigDict, workdir: epath.Path,
                 local_batch_size: int) -> InputData:
  """AlphaFold's tf.data input (`config.data`, `config.dataset`), this process's shard."""
  from af2flax.train import input as input_lib  # pylint: disable=g-import-not-at-top
  return input_lib.create_input(config, os.fspath(workdir), local_batch_size)


def _evaluate(eval_step, params, eval_batches, batch_sharding,
              prefix: str = "val") -> dict[str, float]:
  """Mean of each validation metric over the real (unmasked) examples of every process."""
  sums, count = None, 0.0
  for local_batch in eval_batches():
    batch = sharding_lib.global_batch(local_batch, batch_sharding)
    batch_sums, batch_count = jax.device_get(eval_step(params, batch))
    sums = batch_sums if sums is None else {k: sums[k] + v for k, v in batch_sums.items()}
    count += float(batch_count)
  if not sums or count == 0:
    return {}
  return {f"{prefix}/{k}": float(v) / count for k, v in sums.items()}


def make_step(objective: Any, optimizer: Any, config: ml_collections.ConfigDict, mesh: Any,
              state_shardings: Any, param_specs: Any) -> Any:
  """The train step over the mesh as `config.step_programs` says: 'one' XLA program, or
  'split' into programs compiled at the same time (`programs.SplitTrainStep`)."""
  kind = config.get("step_programs", "one")
  if kind == "split":
    return programs_lib.SplitTrainStep(objective, optimizer, config, mesh, state_shardings,
                                       param_specs)
  if kind != "one":
    raise ValueError(f"config.step_programs={kind!r}; expected 'one' or 'split'")
  if config.get("cublas_stages"):
    raise ValueError(f"config.cublas_stages={config.cublas_stages!r} names stages of the "
                     "split step's programs; with step_programs='one' the step is one "
                     "program: set step_programs='split' or cublas_stages=''")
  return sharding_lib.jit_train_step(
      step_lib.make_train_step(objective, optimizer, config, mesh, param_specs),
      state_shardings, mesh)


def _abstract_state(state_shape: PyTree, state_shardings: PyTree) -> PyTree:
  """The state as `jax.ShapeDtypeStruct`s with its shardings and weak types: what the
  created or restored state will be, so that jit's caches key both the same."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s,
                                        weak_type=getattr(x, "weak_type", False)),
      state_shape, state_shardings)


def _prepare_beside(train_step: Any, abstract_state: PyTree, batch: PyTree,
                    compile_too: bool) -> futures.Future:
  """Traces and lowers `train_step` for this state and batch on a thread of its own, then,
  with `compile_too`, has XLA compile it there too; the future gives (step, lower seconds,
  compile seconds or None). Tracing is Python and holds its lock, but XLA compiling (the
  initialisation's program or this one) and Orbax reading a checkpoint mostly do not, so
  the state's creation or restore overlaps the step's trace and compile.

  The step the future gives: the split step, its programs compiled (`SplitTrainStep.compile`
  with the lowered programs), or lowered only (its `compile(..., lowered=...)` left to the
  caller); the one-program step as `_CompiledStep` (its executable, called directly), or,
  lowered only, the jitted step itself, whose jit keeps the lowering in its cache (its first
  call traces nothing again)."""
  def prepare():
    start = time.perf_counter()
    lowered = train_step.lower(abstract_state, batch)
    lower_s = time.perf_counter() - start
    if not compile_too:
      return (lowered if isinstance(train_step, programs_lib.SplitTrainStep) else train_step,
              lower_s, None)
    start = time.perf_counter()
    if isinstance(train_step, programs_lib.SplitTrainStep):
      train_step.compile(abstract_state, batch, lowered=lowered)
      step = train_step
    else:
      step = _CompiledStep(lowered.compile(), train_step, batch)
    return step, lower_s, time.perf_counter() - start

  pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare_train_step")
  try:
    return pool.submit(prepare)
  finally:
    pool.shutdown(wait=False)


class _CompiledStep:
  """The one-program step compiled ahead of its first call: batches shaped as the one it was
  compiled for run its executable directly (whatever jit's own caches hold: no second
  compile); any other batch goes through the jitted step. The state's shapes and shardings
  are the step's own (`jit_train_step` fixes both), so only the batch is checked."""

  def __init__(self, compiled: Any, jitted: Any, batch: PyTree):
    self._compiled, self._jitted = compiled, jitted
    self._batch_signature = programs_lib.shapes_signature(batch)

  def __call__(self, state: PyTree, batch: PyTree) -> Any:
    if programs_lib.shapes_signature(batch) == self._batch_signature:
      return self._compiled(state, batch)
    return self._jitted(state, batch)


def _check_skips(consecutive_skips: jax.Array | None, max_skips: int, step: int,
                 checkpointer: checkpoint_lib.Checkpointer, workdir: epath.Path) -> None:
  if consecutive_skips is None or int(consecutive_skips) < max_skips:
    return
  raise NonFiniteTrainingError(
      f"{int(consecutive_skips)} consecutive steps up to step {step} had a non-finite loss or "
      f"gradient and were skipped (max_consecutive_skips={max_skips}); parameters are those "
      f"before the first of them. The last checkpoint is step {checkpointer.latest_step()} in "
      f"{workdir / 'checkpoints'}. Lower optimizer.learning_rate or check the input data, "
      "then run again.")


def enable_compilation_cache(template: str, workdir: str | os.PathLike) -> str | None:
  """Keeps compiled programs in JAX's persistent cache at `template` ("{workdir}" expanded).

  A resumed run (after preemption or a crash) or a second run of the same model and shapes
  then loads the train step instead of compiling it again (minutes at the full model; XLA's
  per-fusion GEMM autotuning results are kept there too, so a changed program re-uses the
  autotuning of its unchanged fusions). "" leaves the cache off. A cache directory given to
  JAX itself (`--jax_compilation_cache_dir` or `JAX_COMPILATION_CACHE_DIR`) wins, and so does
  the first directory of a process that trains twice: JAX opens its cache once per process.
  Returns the directory in use, or None.
  """
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    return configured
  if not template:
    return None
  path = str(template).replace("{workdir}", str(workdir))
  jax.config.update("jax_compilation_cache_dir", path)
  logging.info("compilation cache: %s", path)
  return path


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike) -> dict[str, float]:
  """Trains (or resumes training of) a model as `config` says, writing into `workdir`.

  Returns the last logged metrics (`train/...` and, if validated, `val/...`), the same on
  every process.
  """
  workdir = epath.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  is_chief = jax.process_index() == 0
  logging.info("process %d/%d, %d local / %d global devices, workdir %s",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), workdir)
  if is_chief:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  enable_compilation_cache(config.get("compilation_cache_dir", ""), workdir)
  writer = metrics_lib.create_writer(workdir, just_logging=not is_chief)

  # Mesh: examples over every device, parameters over the fsdp axis.
  mesh = sharding_lib.make_mesh(config.mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  if config.batch_size % jax.device_count():
    raise ValueError(f"batch_size={config.batch_size} must be a multiple of the "
                     f"{jax.device_count()} devices (one or more examples per device)")
  eval_batch_size = config.get("dataset", {}).get("eval_batch_size", jax.device_count())
  if eval_batch_size % jax.device_count():
    raise ValueError(f"dataset.eval_batch_size={eval_batch_size} must be a multiple of the "
                     f"{jax.device_count()} devices")
  local_batch_size = config.batch_size // jax.process_count()
  logging.info("mesh %s; global batch %d, %d per process", dict(mesh.shape),
               config.batch_size, local_batch_size)

  # Input: this process's shard of the training data, and the validation set.
  data = create_input(config, workdir, local_batch_size)
  train_iter = data.train
  first_batch = next(train_iter)  # its shapes initialise the model
  example = jax.tree.map(lambda x: np.asarray(x)[0], first_batch)

  # Model and train state, created directly in their shards.
  model = create_model(config)
  optimizer = optimizer_lib.make_optimizer(config.optimizer)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))

  def init_state(rng):
    return state_lib.create_train_state(model.init(rng, example), optimizer, state_rng)

  rules = [tuple(rule) for rule in config.sharding.rules]
  state_shape = jax.eval_shape(init_state, init_rng)
  state_shardings = sharding_lib.infer_sharding(state_shape, mesh, rules,
                                                config.sharding.min_size_to_shard_mb)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state_shape.params))
  logging.info("model: %d parameters", num_params)

  # The step over the mesh. It is traced and lowered (with config.compile_beside_state, also
  # compiled) on a thread of its own while the state is created or restored below
  # (`_prepare_beside`).
  param_specs = jax.tree.map(lambda s: s.spec, state_shardings.params)
  train_step = make_step(model.objective, optimizer, config, mesh, state_shardings,
                         param_specs)
  first_global = sharding_lib.global_batch(first_batch, batch_sharding)
  compile_beside = bool(config.get("compile_beside_state", False))
  preparing = _prepare_beside(train_step, _abstract_state(state_shape, state_shardings),
                              first_global, compile_beside)

  # Resume from the latest checkpoint; else start from imported weights; else from scratch.
  creation_start = time.monotonic()
  checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", config.checkpoint)
  latest = checkpointer.latest_step()
  if latest is not None:
    logging.info("resuming from %s step %d", workdir / "checkpoints", latest)
    abstract = sharding_lib.abstract_with_sharding(state_shape, state_shardings)
    state, input_state = checkpointer.restore(latest, abstract)
    if input_state is not None:
      train_iter.set_state(input_state)
      first_batch = None
    else:
      logging.warning("checkpoint %d has no input position for this process: the input "
                      "starts again from its beginning", latest)
  else:
    state = jax.jit(init_state, out_shardings=state_shardings)(init_rng)
    if config.get("init_from"):
      # Imported AlphaFold weights or another run's EMA parameters; new parameters (e.g. a
      # head added for fine-tuning) keep their initialisation. Optimizer and EMA start fresh.
      params = checkpoint_lib.load_pretrained_params(config.init_from, state.params)
      state = jax.jit(lambda p: state_lib.create_train_state(p, optimizer, state_rng),
                      out_shardings=state_shardings)(params)
  initial_step = int(jax.device_get(state.step))
  creation_s = time.monotonic() - creation_start
  waiting = time.monotonic()
  prepared, lower_s, compile_s = preparing.result()  # the thread's error is raised here
  where = f"beside the state's {'restore' if latest is not None else 'creation'}"
  if compile_beside:
    logging.info("train step traced and lowered in %.1f s and compiled in %.1f s %s "
                 "(%.1f s), then waited for %.1f s", lower_s, compile_s, where, creation_s,
                 time.monotonic() - waiting)
  else:
    logging.info("train step traced and lowered in %.1f s %s (%.1f s)", lower_s, where,
                 creation_s)
    if isinstance(train_step, programs_lib.SplitTrainStep):
      train_step.compile(state, first_global, lowered=prepared)
  if not isinstance(train_step, programs_lib.SplitTrainStep):
    train_step = prepared  # compiled beside the state, or the jit holding its lowering
  del prepared
  if first_batch is None:
    first_global = None

  def masked_metrics(params, example):
    mask = example[EVAL_MASK_KEY]
    values = model.evaluate(params, {k: v for k, v in example.items() if k != EVAL_MASK_KEY})
    return {k: jnp.where(mask > 0, v, 0.0) for k, v in values.items()}, mask

  eval_step = jax.jit(sharding_lib.sum_over_examples(
      masked_metrics, mesh, out_specs=jax.sharding.PartitionSpec()))

  # Metrics, progress, profiling and preemption.
  writer.write_hparams({"batch_size": config.batch_size, "num_params": num_params,
                        "learning_rate": config.optimizer.learning_rate})
  actions = metrics_lib.periodic_actions(config, workdir, writer, config.num_train_steps)
  accumulator = metrics_lib.MetricAccumulator()
  preemption = checkpoint_lib.PreemptionWatcher()
  max_skips = int(config.max_consecutive_skips)
  previous_skips = None
  log_time, log_step = time.monotonic(), initial_step
  last_metrics: dict[str, float] = {}

  logging.info("training from step %d to %d", initial_step, config.num_train_steps)
  step = initial_step
  try:
    while step < config.num_train_steps:
      step += 1
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = (first_global if first_global is not None
                 else sharding_lib.global_batch(next(train_iter), batch_sharding))
        first_global = None
        state, metrics = train_step(state, batch)
        del batch
      accumulator.add(metrics)
      for action in actions:
        action(step)

      # Stop on repeated non-finite steps (checked one step late: no wait for the device).
      _check_skips(previous_skips, max_skips, step - 1, checkpointer, workdir)
      previous_skips = metrics["consecutive_skips"]

      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        summary = accumulator.summary()
        now = time.monotonic()
        steps_per_sec = (step - log_step) / max(now - log_time, 1e-9)
        summary["train/steps_per_sec"] = steps_per_sec
        summary["train/examples_per_sec"] = steps_per_sec * config.batch_size
        log_time, log_step = now, step
        last_metrics.update(summary)
        writer.write_scalars(step, summary)
        if is_chief:
          logging.info(metrics_lib.format_line(step, summary, (
              "train/loss", "train/grad_norm", "train/learning_rate", "train/skipped_steps",
              "train/examples_per_sec")))

      eval_metrics = None
      eval_sets = [(prefix, batches) for prefix, batches in
                   (("val", data.eval_batches), ("train_eval", data.train_eval_batches))
                   if batches is not None]
      if eval_sets and config.eval_every_steps and (
          step % config.eval_every_steps == 0 or step == config.num_train_steps):
        eval_start = time.monotonic()
        eval_metrics = {}
        for prefix, batches in eval_sets:
          values = _evaluate(eval_step, state.ema_params, batches, batch_sharding, prefix)
          logging.info("step %d %s (EMA params): %s", step,
                       "validation" if prefix == "val" else "training examples", values)
          eval_metrics.update(values)
        log_time += time.monotonic() - eval_start  # steps/s counts training time only
        last_metrics.update(eval_metrics)
        writer.write_scalars(step, eval_metrics)

      preempted = preemption.should_stop(step)
      checkpointer.save(step, state, train_iter.get_state(), metrics=eval_metrics,
                        force=preempted or eval_metrics is not None
                        or step == config.num_train_steps)
      if preempted:
        logging.warning("preempted: saved step %d, stopping", step)
        break
    _check_skips(previous_skips, max_skips, step, checkpointer, workdir)
  finally:
    checkpointer.wait_until_finished()  # a started save always completes
    checkpointer.close()
    preemption.close()
    writer.flush()
    writer.close()

  if is_chief:
    logging.info(
        "finished at step %d. TensorBoard: tensorboard --logdir %s ; checkpoints in %s. "
        "Running the same command again resumes from the latest checkpoint (raise "
        "--config.num_train_steps to train longer).", step, workdir, workdir / "checkpoints")
  return last_metrics
