"""A checkpoint step written a group of arrays at a time (`checkpoint_stream`), against the step
`Checkpointer.save` writes of the same state: the reference is Orbax's own save of the whole tree.

The state's every array is random (moments and counts too), so a value written under another
key, or a key written with another container type, shows.
"""

import json
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mile_jax.core import model as model_lib
from mile_jax.core import optim
from mile_jax.core import sharding
from mile_jax.core import step as step_lib
from mile_jax.run import checkpoint as checkpoint_lib
from mile_jax.run import checkpoint_steps
from mile_jax.run import checkpoint_stream
from conftest import make_tiny_config

STEP = 7
META = {"data": {"next_batch_step": STEP, "seed": 3}, "note": "streamed"}


def _abstract_state(scanned: bool):
  config = make_tiny_config(**{"model.n_layers": 3, "model.scan_layers": scanned})
  model = model_lib.Decoder(model_lib.DecoderConfig.from_config(config.model))
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  mesh = sharding.make_mesh((1, 2, 2), jax.devices()[:4])
  abstract, shardings = step_lib.state_shardings(model, tx, mesh, sharding.rules_tuple(config.mesh.rules),
                                                 config.data.seq_len)
  return config, tx, abstract, shardings


def _random_state(abstract, seed: int):
  """{key path: NumPy array} of random values for every array of the state."""
  rng = np.random.default_rng(seed)

  def draw(leaf):
    if np.issubdtype(leaf.dtype, np.integer):
      return rng.integers(1, 1000, leaf.shape).astype(leaf.dtype)
    return rng.standard_normal(leaf.shape).astype(leaf.dtype)
  return {path: draw(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


def _placed(values: dict, shardings):
  by_path = dict(jax.tree_util.tree_leaves_with_path(shardings))
  return {path: jax.make_array_from_callback(v.shape, by_path[path], lambda i, v=v: v[i]) for path, v in values.items()}


def _metadata(step_dir: str) -> dict:
  with open(os.path.join(step_dir, "state", "_METADATA"), encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module", params=["unrolled", "scanned"])
def saved(request, tmp_path_factory):
  """(config, abstract state, shardings, values, the reference directory written by `Checkpointer.save`)."""
  config, _, abstract, shardings = _abstract_state(request.param == "scanned")
  values = _random_state(abstract, seed=1)
  placed = _placed(values, shardings)
  state = jax.tree_util.tree_unflatten(jax.tree.structure(abstract), [placed[p] for p, _ in
                                                                      jax.tree_util.tree_leaves_with_path(abstract)])
  reference = str(tmp_path_factory.mktemp(request.param) / "checkpoints")
  checkpointer = checkpoint_lib.Checkpointer(reference, every_steps=1, max_to_keep=1, async_save=False)
  checkpointer.save(STEP, state, json.loads(config.to_json_best_effort()), META)
  checkpointer.close()
  return config, abstract, shardings, values, reference


def _write(directory, config, abstract, shardings, values, max_group_bytes, seen=None):
  def make_arrays(group):
    if seen is not None:
      seen.append(group)
    return [_placed({path: values[path]}, shardings)[path] for path, _ in group]
  return checkpoint_stream.write_step(directory, STEP, abstract, make_arrays, json.loads(config.to_json_best_effort()),
                                      META, max_group_bytes)


def test_streamed_step_is_the_step_checkpointer_save_writes(saved, tmp_path):
  config, abstract, shardings, values, reference = saved
  directory = str(tmp_path / "checkpoints")
  checkpoint_lib.Checkpointer(directory, every_steps=1, max_to_keep=1)  # Creates the directory, as a run does.
  largest = max(v.nbytes for v in values.values())
  seen = []
  path = _write(directory, config, abstract, shardings, values, largest // 2, seen)
  assert path == os.path.join(directory, str(STEP)) and len(seen) > 3  # Really in several groups.
  ours, theirs = _metadata(path), _metadata(os.path.join(reference, str(STEP)))
  assert ours["tree_metadata"] == theirs["tree_metadata"]  # Keys, their container types, value types, shapes.
  assert (ours["use_zarr3"], ours["use_ocdbt"]) == (theirs["use_zarr3"], theirs["use_ocdbt"])
  assert not os.path.exists(directory + checkpoint_stream.STAGING_SUFFIX)

  checkpointer = checkpoint_lib.Checkpointer(directory, every_steps=1, max_to_keep=1)
  assert checkpointer.all_steps() == [STEP] and checkpoint_steps.is_finished(directory, STEP)
  assert checkpointer.restore_config(STEP) == json.loads(config.to_json_best_effort())
  assert checkpointer.restore_meta(STEP) == META
  assert checkpointer.state_shapes(STEP) == checkpoint_lib.Checkpointer(
      reference, every_steps=1, max_to_keep=1).state_shapes(STEP)
  checkpointer.check_compatible(abstract, json.loads(config.to_json_best_effort()))
  restored = checkpointer.restore(STEP, checkpoint_lib.abstract_with_shardings(abstract, shardings))
  for (path, array), wanted in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(shardings)):
    assert array.sharding == wanted, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(array), values[path], err_msg=jax.tree_util.keystr(path))


def test_each_array_is_made_once_and_one_group_is_held_at_a_time(saved, tmp_path):
  """Every array is asked for once, groups stay within the budget (an array over it alone), and
  no array of a group is alive when the next group is made."""
  config, abstract, shardings, values, _ = saved
  budget = max(v.nbytes for v in values.values()) // 3
  live, most, asked = set(), [0], []

  def track(group):
    asked.extend(path for path, _ in group)
    assert not live, f"{len(live)} arrays of the previous group still alive"
    sizes = [values[path].nbytes for path, _ in group]
    assert sum(sizes) <= budget or len(group) == 1
    arrays = [_placed({path: values[path]}, shardings)[path] for path, _ in group]
    for array in arrays:
      live.add(id(array))
      weakref.finalize(array, live.discard, id(array))
    most[0] = max(most[0], len(live))
    return arrays
  directory = str(tmp_path / "checkpoints")
  checkpointer = checkpoint_lib.Checkpointer(directory, every_steps=1, max_to_keep=1)
  checkpoint_stream.write_step(directory, STEP, abstract, track, {}, {}, budget)
  assert sorted(map(jax.tree_util.keystr, asked)) == sorted(map(jax.tree_util.keystr, values))
  assert most[0] < len(values)
  checkpointer.close()


def test_an_interrupted_write_leaves_no_step_and_the_next_one_completes(saved, tmp_path):
  config, abstract, shardings, values, _ = saved
  directory = str(tmp_path / "checkpoints")
  checkpoint_lib.Checkpointer(directory, every_steps=1, max_to_keep=1)
  calls = []

  def failing(group):
    calls.append(group)
    if len(calls) == 3:
      raise OSError("disk gone")
    return [_placed({path: values[path]}, shardings)[path] for path, _ in group]
  budget = max(v.nbytes for v in values.values()) // 2
  with pytest.raises(OSError, match="disk gone"):
    checkpoint_stream.write_step(directory, STEP, abstract, failing, {}, {}, budget)
  assert checkpoint_lib.Checkpointer(directory, every_steps=1, max_to_keep=1).all_steps() == []
  assert not os.path.exists(os.path.join(directory, str(STEP)))
  path = _write(directory, config, abstract, shardings, values, budget)  # The leftovers are not merged in.
  restored = checkpoint_lib.Checkpointer(directory, every_steps=1, max_to_keep=1).restore(
      STEP, checkpoint_lib.abstract_with_shardings(abstract, shardings))
  assert os.path.isdir(path)
  for path, array in jax.tree_util.tree_leaves_with_path(restored):
    np.testing.assert_array_equal(np.asarray(array), values[path])


def test_a_directory_in_a_bucket_is_refused_before_anything_is_made(saved):
  _, abstract, _, _, _ = saved
  made = []
  with pytest.raises(ValueError, match=r"gs://b/run/checkpoints: a step is written a group at a time on a filesystem"):
    checkpoint_stream.write_step("gs://b/run/checkpoints", STEP, abstract, made.append, {}, {}, 1 << 20)
  assert not made


def test_fresh_optimizer_arrays_are_those_of_the_whole_init():
  """Leaves asked for in any grouping equal `tx.init` of (random) parameters, with the shardings asked
  for; beside AdamW's zeros, a transformation whose fresh state is twos and a count of 5 shows the order."""
  _, adamw, abstract, shardings = _abstract_state(scanned=True)
  twos = optax.GradientTransformation(
      init=lambda p: (jax.tree.map(lambda x: jnp.full_like(x, 2.0), p), jnp.int32(5)),
      update=lambda g, s, p=None: (g, s))
  tx = optax.chain(adamw, twos)
  shardings = (shardings.opt_state, (shardings.params, shardings.step))
  params = {path: v for path, v in _random_state(abstract.params, seed=2).items()}
  params = jax.tree_util.tree_unflatten(jax.tree.structure(abstract.params), list(params.values()))
  expected = jax.tree.leaves(tx.init(params))
  wanted = jax.tree.leaves(shardings)
  assert len(wanted) == len(expected)
  make = optim.fresh_state_arrays(tx, abstract.params)
  indices = list(range(len(expected)))
  got = {}
  for part in (indices[::3], indices[1::3], indices[2::3]):
    got.update(zip(part, make(part, [wanted[i] for i in part])))
  assert sorted(got) == indices
  for i, value in enumerate(expected):
    assert got[i].sharding == wanted[i] and got[i].dtype == value.dtype
    np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(value))


def test_an_optimizer_whose_fresh_state_reads_the_parameters_is_refused():
  _, _, abstract, _ = _abstract_state(scanned=False)
  keeps_a_copy = optax.GradientTransformation(init=lambda p: jax.tree.map(lambda x: 0.5 * x, p),
                                              update=lambda g, s, p=None: (g, s))
  with pytest.raises(ValueError, match="depends on the parameters' values"):
    optim.fresh_state_arrays(keeps_a_copy, abstract.params)
  optim.fresh_state_arrays(optax.adamw(1e-3), abstract.params)  # Zero moments and a count: accepted.
