"""Checkpointer: round trip, retention (last K + best), atomicity, starting from other weights."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from af2flax.train import checkpoint as checkpoint_lib
from af2flax.train import optimizer as optimizer_lib
from af2flax.train import state as state_lib
from tests.train import mlp


def _config(**overrides):
  config = ml_collections.ConfigDict({"every_steps": 2, "keep": 2, "keep_best": 1,
                                      "best_metric": "val/lddt_ca", "best_mode": "max",
                                      "async_save": True})
  config.update(overrides)
  return config


def _state(seed=0):
  tx = optimizer_lib.make_optimizer(mlp.train_config().optimizer)
  return state_lib.create_train_state(mlp.init_params(mlp.MLP(), seed), tx,
                                      jax.random.PRNGKey(seed))


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def test_round_trip_of_everything(tmp_path):
  state = _state().replace(step=jnp.int32(4), skipped_steps=jnp.int32(2))
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, _config())
  assert not checkpointer.save(3, state, {"position": 3})  # not due (every 2 steps)
  assert checkpointer.save(4, state, {"position": 4, "seed": 7})
  checkpointer.wait_until_finished()
  assert checkpointer.latest_step() == 4
  restored, input_state = checkpointer.restore(4, _abstract(state))
  assert input_state == {"position": 4, "seed": 7}
  assert isinstance(restored, state_lib.TrainState)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert not checkpointer.save(4, state, {"position": 4}, force=True)  # already saved
  checkpointer.close()


def test_keeps_last_k_and_best(tmp_path):
  state = _state()
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, _config(every_steps=1))
  lddt = {2: 0.9, 4: 0.5, 6: 0.7}
  for step in range(1, 8):
    metrics = {"val/lddt_ca": lddt[step]} if step in lddt else None
    checkpointer.save(step, state, {"position": step}, metrics=metrics)
  checkpointer.wait_until_finished()
  assert sorted(checkpointer.manager.all_steps()) == [2, 6, 7]  # best (2) + last two
  checkpointer.close()


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
  state = _state()
  checkpointer = checkpoint_lib.Checkpointer(tmp_path, _config())
  checkpointer.save(2, state, {"position": 2})
  checkpointer.close()
  # What a kill during Orbax's write of step 4 leaves: an unfinished temporary directory.
  partial = tmp_path / "4.orbax-checkpoint-tmp-1234567890"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
  reopened = checkpoint_lib.Checkpointer(tmp_path, _config())
  assert reopened.latest_step() == 2
  restored, position = reopened.restore(2, _abstract(state))
  assert position == {"position": 2}
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
  assert not partial.exists()  # cleaned up on start
  reopened.close()


def test_init_from_training_workdir_takes_ema_params(tmp_path):
  source = _state(seed=1)
  source = source.replace(ema_params=jax.tree.map(lambda x: x + 1.0, source.ema_params))
  checkpointer = checkpoint_lib.Checkpointer(tmp_path / "run" / "checkpoints", _config())
  checkpointer.save(2, source, {"position": 2})
  checkpointer.close()
  init = mlp.init_params(mlp.MLP(), seed=5)
  params = checkpoint_lib.load_pretrained_params(tmp_path / "run", init)
  jax.tree.map(np.testing.assert_array_equal, params, source.ema_params)


def test_init_from_orbax_params_and_new_head(tmp_path):
  small = mlp.init_params(mlp.MLP(), seed=1)
  writer = ocp.StandardCheckpointer()
  writer.save(tmp_path / "params", {"params": small})
  writer.wait_until_finished()
  init = dict(mlp.init_params(mlp.MLP(), seed=5))
  init["new_head"] = {"kernel": jnp.full((16, 2), 3.0)}
  params = checkpoint_lib.load_pretrained_params(tmp_path / "params", init)
  jax.tree.map(np.testing.assert_array_equal, params["Dense_0"], small["Dense_0"])
  np.testing.assert_array_equal(params["new_head"]["kernel"], 3.0)  # kept at init


def test_init_from_alphafold_npz_and_errors(tmp_path):
  source = mlp.init_params(mlp.MLP(), seed=2)
  flat = {"alphafold/Dense_0//kernel": np.asarray(source["Dense_0"]["kernel"]),
          "alphafold/Dense_0//bias": np.asarray(source["Dense_0"]["bias"]),
          "alphafold/unused_module//w": np.zeros(3, np.float32)}
  np.savez(tmp_path / "params_model_x.npz", **flat)
  init = mlp.init_params(mlp.MLP(), seed=5)
  params = checkpoint_lib.load_pretrained_params(tmp_path / "params_model_x.npz", init)
  np.testing.assert_array_equal(params["Dense_0"]["kernel"], source["Dense_0"]["kernel"])
  np.testing.assert_array_equal(params["Dense_1"]["kernel"], init["Dense_1"]["kernel"])

  np.savez(tmp_path / "bad_shape.npz", **{"alphafold/Dense_0//kernel": np.zeros((2, 2))})
  with pytest.raises(ValueError, match=r"bad_shape.npz: parameter Dense_0/kernel has shape"):
    checkpoint_lib.load_pretrained_params(tmp_path / "bad_shape.npz", init)
  np.savez(tmp_path / "other.npz", **{"other/x//w": np.zeros(2)})
  with pytest.raises(ValueError, match="none of its"):
    checkpoint_lib.load_pretrained_params(tmp_path / "other.npz", init)
  with pytest.raises(FileNotFoundError, match="nothing_here"):
    checkpoint_lib.load_pretrained_params(tmp_path / "nothing_here", init)
