"""Presets: AlphaFold's training values (Suppl. 1.11, Table 4), fine-tuning derived from initial."""

import importlib.util

import pytest

from tests.conftest import REPO_ROOT


def _load(name):
  path = REPO_ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"test_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert "python -m af2flax.train --config=configs/" in module.__doc__  # the exact command
  return module.get_config()


def test_initial_training_values():
  config = _load("initial_training")
  opt = config.optimizer
  assert (opt.learning_rate, opt.b1, opt.b2, opt.eps) == (1e-3, 0.9, 0.999, 1e-6)
  assert (opt.warmup_steps, opt.decay_steps, opt.decay_factor) == (1000, 50_000, 0.95)
  assert (opt.clip_norm, opt.ema_decay, config.batch_size) == (0.1, 0.999, 128)
  assert config.data.train.crop_size == 256 and config.data.train.max_msa_clusters == 128
  assert config.data.common.max_extra_msa == 1024 and config.data.train.max_templates == 4
  heads = config.model.heads
  assert heads.structure_module.structural_violation_loss_weight == 0.0
  assert heads.experimentally_resolved.weight == 0.0
  assert heads.predicted_aligned_error.weight == 0.0
  assert config.model.embeddings_and_evoformer.evoformer_num_block == 48
  assert config.checkpoint.best_metric == "val/lddt_ca"


def test_finetune_is_initial_training_with_table4_changes():
  initial, finetune = _load("initial_training"), _load("finetune")
  assert finetune.optimizer.learning_rate == 5e-4 and finetune.optimizer.warmup_steps == 0
  assert finetune.data.train.crop_size == 384 and finetune.data.train.max_msa_clusters == 512
  assert finetune.data.common.max_extra_msa == 5120
  heads = finetune.model.heads
  assert heads.structure_module.structural_violation_loss_weight == 1.0
  assert heads.experimentally_resolved.weight == 0.01
  assert heads.predicted_aligned_error.weight == 0.1
  # Everything else is inherited.
  for key in ("batch_size", "mesh", "sharding", "checkpoint", "seed"):
    assert finetune[key] == initial[key], key
  assert finetune.optimizer.clip_norm == initial.optimizer.clip_norm


@pytest.mark.parametrize("name", ["initial_training", "finetune", "tiny"])
def test_recycling_count_is_shared_by_model_and_data(name):
  config = _load(name)
  assert config.model.num_recycle == config.data.common.num_recycle
  config.data.common.num_recycle = 2  # one override changes both (a FieldReference)
  assert config.model.num_recycle == 2


def test_tiny_builds_from_bundled_samples():
  config = _load("tiny")
  for structures, _ in config.dataset.build_sources:
    assert (REPO_ROOT / structures).is_dir()
  assert config.batch_size % 1 == 0 and config.num_train_steps >= 200
  assert config.model.global_config.dtype == "float32"


def test_overfit_gpu_is_alphafold_with_documented_changes():
  initial, overfit = _load("initial_training"), _load("overfit_gpu")
  evo = overfit.model.embeddings_and_evoformer
  assert (evo.evoformer_num_block, evo.extra_msa_stack_num_block) == (4, 1)
  # The second run's documented changes (docs/training_run.md): no dropout, no remat, FAPE
  # clamped for half the examples, header-less chains at 2.0 Å.
  gc = overfit.model.global_config
  assert (gc.deterministic, gc.use_remat) == (True, False)
  assert initial.model.global_config.deterministic is False
  assert overfit.data.train.clamp_fape_prob == 0.5
  assert initial.data.train.clamp_fape_prob == 0.9
  assert overfit.dataset.default_resolution == 2.0
  # Channel widths, heads and the structure module are model_1's.
  for key in ("msa_channel", "pair_channel", "seq_channel", "extra_msa_channel", "evoformer"):
    assert evo[key] == initial.model.embeddings_and_evoformer[key], key
  assert overfit.model.heads.structure_module == initial.model.heads.structure_module
  opt = overfit.optimizer
  assert (opt.learning_rate, opt.b1, opt.b2, opt.eps, opt.clip_norm) == (1e-3, 0.9, 0.999,
                                                                         1e-6, 0.1)
  # Every chain fits the crop; ~34 training chains from the bundled data, 10 held out.
  assert overfit.data.train.crop_size >= 173
  for structures, _ in overfit.dataset.build_sources:
    assert (REPO_ROOT / structures).is_dir()
  assert overfit.dataset.num_eval_examples == 10
  assert overfit.dataset.num_train_eval_examples == -1
  assert overfit.checkpoint.best_metric == "train_eval/lddt_ca"


def test_vmapped_examples_never_reach_cudnn_attention():
  """With vmap_batch_size > 1, 'cudnn' chosen outright is refused; the other choices stay,
  marked `examples_vmapped` (biased attentions then skip cuDNN: `attention_path`)."""
  from af2flax.train import step  # pylint: disable=g-import-not-at-top
  config = _load("tiny")
  config.vmap_batch_size = 1
  config.model.global_config.attention_impl = "cudnn"
  assert step.model_config_for_step(config) is config.model
  config.vmap_batch_size = 2
  with pytest.raises(ValueError, match="vmap_batch_size=2"):
    step.model_config_for_step(config)
  for impl in ("auto", "pallas", "xla", "auto_cudnn"):
    config.model.global_config.attention_impl = impl
    model_config = step.model_config_for_step(config)
    assert model_config.global_config.attention_impl == impl
    assert model_config.global_config.examples_vmapped
    assert not config.model.global_config.examples_vmapped  # the run's config is untouched
  config.model.global_config.attention_impl = "auto"
  config.model.global_config.triangle_attention_impl = "cudnn"  # the override counts too
  with pytest.raises(ValueError, match="triangle_attention_impl='cudnn'"):
    step.model_config_for_step(config)


def test_the_train_config_cuts_the_trunk_into_stages():
  """`trunk_stages` reaches the objective that the train loop builds."""
  from af2flax.train import loop  # pylint: disable=g-import-not-at-top
  config = _load("tiny")
  assert [name for name, _ in loop.create_model(config).objective.stages] == ["trunk", "heads"]
  config.trunk_stages = "embeddings+extra_msa,evoformer"
  assert [name for name, _ in loop.create_model(config).objective.stages] == [
      "embeddings+extra_msa", "evoformer", "heads"]
  config.trunk_stages = "evoformer"
  with pytest.raises(ValueError, match="trunk_stages='evoformer'"):
    loop.create_model(config)
