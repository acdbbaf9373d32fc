"""Checkpoints: restore onto any mesh, fall back past an unreadable newest step,
refuse another model's checkpoint, and hold what resuming and evaluation need."""

import base64
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mile_jax import config_lib
from mile_jax import train_lib
from mile_jax.run import checkpoint as checkpoint_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_state(trainer, seed):
  """A TrainState of random values (numpy), placed with the trainer's shardings."""
  rng = np.random.default_rng(seed)
  def leaf(a, s):
    if np.issubdtype(a.dtype, np.integer):
      value = rng.integers(0, 1000, a.shape).astype(a.dtype)
    else:
      value = rng.standard_normal(a.shape).astype(a.dtype)
    return value, jax.device_put(value, s)
  pairs = jax.tree.map(leaf, trainer.abstract_state, trainer.state_shardings)
  is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], np.ndarray)  # noqa: E731
  return (jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair),
          jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair))


def assert_state_equal(restored, expected):
  leaves_r, tree_r = jax.tree.flatten(restored)
  leaves_e, tree_e = jax.tree.flatten(expected)
  assert tree_r == tree_e
  for r, e in zip(leaves_r, leaves_e):
    np.testing.assert_array_equal(np.asarray(jax.device_get(r)), e)


@pytest.mark.parametrize("save_mesh, restore_meshes", [
    ((2, 2, 2), [((1, 1, 1), 1), ((8, 1, 1), 8)]),
    ((8, 1, 1), [((2, 2, 2), 8)]),
    ((1, 1, 1), [((2, 2, 2), 8), ((1, 4, 2), 8)]),
])
def test_restore_onto_other_meshes(tiny_config, tmp_path, save_mesh, restore_meshes):
  workdir = str(tmp_path)
  devices = jax.devices()[:int(np.prod(save_mesh))]
  saver = train_lib.Trainer(tiny_config(**{"mesh.shape": save_mesh}), workdir, devices=devices)
  expected, state = random_state(saver, seed=1)
  saver.checkpointer.save(7, state)
  saver.checkpointer.wait()
  for shape, count in restore_meshes:
    trainer = train_lib.Trainer(tiny_config(**{"mesh.shape": shape}), workdir, devices=jax.devices()[:count])
    restored = trainer.initial_state()
    assert trainer.restored_step == 7
    assert_state_equal(restored, expected)
    # The arrays are laid out as the target mesh says, not as they were saved.
    for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(trainer.state_shardings)):
      assert r.sharding.is_equivalent_to(s, r.ndim)
    kernel = restored.params["lm_head"]["kernel"]
    assert len(kernel.sharding.device_set) == count


def corrupt(step_dir, how="no metadata"):
  """Damages a saved state the way a partial copy ("no metadata") or a bad disk ("garbled") would."""
  if how == "no metadata":
    os.remove(os.path.join(step_dir, "state", "_METADATA"))
    return
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) == "d" and "ocdbt.process_" in root:  # Array data, not metadata.
      for name in files:
        with open(os.path.join(root, name), "r+b") as f:
          f.write(os.urandom(os.path.getsize(os.path.join(root, name))))


@pytest.mark.parametrize("how", ["no metadata", "garbled"])
def test_damaged_newest_restores_previous_and_keeps_both(tiny_config, tmp_path, how):
  workdir = str(tmp_path)
  trainer = train_lib.Trainer(tiny_config(**{"checkpoint.max_to_keep": 2}), workdir)
  expected10, state10 = random_state(trainer, seed=10)
  _, state20 = random_state(trainer, seed=20)
  trainer.checkpointer.save(10, state10)
  trainer.checkpointer.save(20, state20)
  trainer.checkpointer.wait()
  ckpt = trainer.checkpointer.directory
  corrupt(os.path.join(ckpt, "20"), how)
  # What a process killed while saving leaves: Orbax's temporary directory, never listed.
  shutil.copytree(os.path.join(ckpt, "10"), os.path.join(ckpt, "30.orbax-checkpoint-tmp-1234"))

  messages = []
  resumed = train_lib.Trainer(tiny_config(**{"checkpoint.max_to_keep": 2}), workdir, echo=messages.append)
  restored = resumed.initial_state()
  assert resumed.restored_step == 10
  assert_state_equal(restored, expected10)
  warning = [m for m in messages if m.startswith("Checkpoint ")]
  assert len(warning) == 1
  assert os.path.join(ckpt, "20") in warning[0] and os.path.join(ckpt, "10") in warning[0]
  # The unreadable step is kept where it is and marked (nothing copied), the good one untouched, and
  # step 20 can be saved again, which replaces the damaged one and its mark.
  assert sorted(os.listdir(ckpt))[:4] == ["10", "20", "20.unreadable", "30.orbax-checkpoint-tmp-1234"]
  assert json.loads(open(os.path.join(ckpt, "20.unreadable"), encoding="utf-8").read())["step"] == 20
  assert resumed.checkpointer.all_steps() == [10]
  assert train_lib.Trainer(tiny_config(), workdir).checkpointer.latest_step() == 10  # Every reader skips it.
  resumed.checkpointer.save(20, restored)
  resumed.checkpointer.wait()
  assert resumed.checkpointer.all_steps() == [10, 20]
  assert "20.unreadable" not in os.listdir(ckpt)
  assert_state_equal(resumed.checkpointer.restore(20, checkpoint_lib.abstract_with_shardings(
      resumed.abstract_state, resumed.state_shardings)), expected10)


# Restores a garbled checkpoint 12 times and prints how many failed and what was reported besides: errors
# passed to sys.unraisablehook and asyncio's reports of errors never retrieved. A process of its own,
# as with 8 host devices (the tests') Orbax's reads rarely outlive the failure.
READ_GARBLED = """
import gc, logging, os, sys, time
import jax, numpy as np
from mile_jax.run import checkpoint as checkpoint_lib
stray = []
sys.unraisablehook = stray.append
class Keep(logging.Handler):
  def emit(self, record):
    stray.append(record.getMessage())
logging.getLogger("asyncio").addHandler(Keep())
checkpointer = checkpoint_lib.Checkpointer(sys.argv[1], every_steps=1, max_to_keep=1, async_save=False)
rng = np.random.default_rng(0)
state = {f"w{i}": 0.02 * rng.standard_normal((64, 64 * (i % 8 + 1)), np.float32) for i in range(22)}
state.update({f"m{i}": np.zeros((64, 64 * (i % 8 + 1)), np.float32) for i in range(44)})
checkpointer.save(1, jax.device_put(state))
checkpointer.wait()
for root, _, files in os.walk(os.path.join(sys.argv[1], "1", "state")):
  if os.path.basename(root) == "d":
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        f.write(os.urandom(os.path.getsize(os.path.join(root, name))))
sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)
failed = 0
for _ in range(12):
  try:
    checkpointer.restore(1, abstract)
  except Exception:
    failed += 1
time.sleep(0.5)  # The reads the failures abandoned finish.
gc.collect()
print(failed, len(stray))
"""


def test_failed_reads_leave_no_stray_errors(tmp_path):
  """A failing restore abandons its other reads; they finish after Orbax closed their event loop
  ("Event loop is closed"), and its tasks hold errors nobody retrieves. None of it is reported
  again: the fallback warning or the CheckpointError says what failed."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  result = subprocess.run([sys.executable, "-c", READ_GARBLED, str(tmp_path / "checkpoints")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split() == ["12", "0"], result.stderr[-3000:]
  assert "Event loop is closed" not in result.stderr and "never retrieved" not in result.stderr


@pytest.mark.parametrize("error", [
    MemoryError("out of host memory"), ConnectionError("connection reset by peer"),
    ValueError('DEADLINE_EXCEEDED: Error reading "params.embed.embedding/0.0": timed out')])  # An object store.
def test_a_failure_that_shows_no_damage_is_raised_and_moves_nothing(tiny_config, tmp_path, monkeypatch, error):
  trainer = train_lib.Trainer(tiny_config(), str(tmp_path))
  _, state = random_state(trainer, seed=5)
  for step in (10, 20):
    trainer.checkpointer.save(step, state)
  trainer.checkpointer.wait()
  newest = os.path.join(trainer.checkpointer.directory, "20")
  read = ocp.Checkpointer.restore
  def failing_read(self, directory, *args, **kwargs):
    if str(directory).startswith(newest + os.sep):
      raise error
    return read(self, directory, *args, **kwargs)
  monkeypatch.setattr(ocp.Checkpointer, "restore", failing_read)
  with pytest.raises(checkpoint_lib.CheckpointError) as info:
    train_lib.Trainer(tiny_config(), str(tmp_path)).initial_state()
  assert str(info.value).startswith(f"could not read checkpoint {newest} ("), str(info.value)
  assert "nothing shows that it is damaged, so it is left as it is" in str(info.value)
  assert info.value.__cause__ is error
  assert sorted(os.listdir(trainer.checkpointer.directory)) == ["10", "20"]


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tiny_config, tmp_path):
  trainer = train_lib.Trainer(tiny_config(), str(tmp_path))
  _, state = random_state(trainer, seed=3)
  trainer.checkpointer.save(5, state)
  trainer.checkpointer.wait()
  corrupt(os.path.join(trainer.checkpointer.directory, "5"))
  with pytest.raises(checkpoint_lib.CheckpointError, match="no readable checkpoint in .*step 5"):
    train_lib.Trainer(tiny_config(), str(tmp_path)).initial_state()
  assert os.path.isdir(os.path.join(trainer.checkpointer.directory, "5"))


def test_checkpoint_of_another_model_shape_is_refused_by_name(tiny_config, tmp_path):
  trainer = train_lib.Trainer(tiny_config(), str(tmp_path))
  _, state = random_state(trainer, seed=4)
  trainer.checkpointer.save(3, state, trainer.config_json)
  trainer.checkpointer.wait()
  with pytest.raises(config_lib.ConfigError) as info:
    train_lib.Trainer(tiny_config(**{"model.d_model": 128, "model.n_layers": 3}), str(tmp_path))
  message = str(info.value)
  assert message.startswith("model.d_model: checkpoint " + os.path.join(str(tmp_path), "checkpoints", "3"))
  assert "model.d_model=64 there, 128 in this config" in message
  assert "model.n_layers=2 there, 3 in this config" in message
  # Settings that do not change any array shape may change on resume.
  train_lib.Trainer(tiny_config(**{"loss.gamma": 0.5, "optim.learning_rate": 1e-4}), str(tmp_path))


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A 4-step run saving asynchronously (the default) at steps 2 and 4, with host copies of the
  states it saved and whether each step donated (reused) its input state's buffers."""
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp("trained"))
  config = make_tiny_config(**{"train.steps": 4, "checkpoint.every_steps": 2, "train.log_every": 2,
                             "optim.warmup_steps": 2, "checkpoint.async_save": True})
  trainer = train_lib.Trainer(config, workdir)
  saved, donated = {}, []
  save, step_fn = trainer.checkpointer.save, trainer.train_step
  def recording_save(step, state, *args):
    # A copy (a zero-copy view would hold the buffers and stop the next step from donating them).
    saved[step] = jax.tree.map(lambda x: np.array(x, copy=True), state)
    save(step, state, *args)
  def recording_step(state, batch):
    out = step_fn(state, batch)
    donated.append(state.params["lm_head"]["kernel"].is_deleted())
    return out
  trainer.checkpointer.save, trainer.train_step = recording_save, recording_step
  trainer.run()
  return workdir, config, saved, donated


def test_async_saves_of_a_donated_state_hold_their_step(trained_workdir, tiny_config):
  """Saved in the background while the next steps donate the state's buffers, each checkpoint
  holds the state of its own step (JAX copies instead of donating a buffer still being saved)."""
  workdir, _, saved, donated = trained_workdir
  assert donated[0] and donated[1], donated  # Steps after no save reused their input's buffers.
  trainer = train_lib.Trainer(tiny_config(), str(workdir))
  target = checkpoint_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
  for step in (2, 4):
    assert_state_equal(trainer.checkpointer.restore(step, target), saved[step])


def test_checkpoint_holds_config_data_position_and_tokenizer(trained_workdir):
  workdir, config, _, _ = trained_workdir
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=2, max_to_keep=3)
  assert ckpt.all_steps() == [2, 4]
  for step in (2, 4):
    assert ckpt.restore_config(step)["model"]["d_model"] == config.model.d_model
    meta = ckpt.restore_meta(step)
    assert meta["data"] == {"next_batch_step": step, "seed": config.seed}
    with open(os.path.join(workdir, "tokenizer.model"), "rb") as f:
      tokenizer = f.read()
    assert checkpoint_lib.tokenizer_bytes(meta) == tokenizer
    assert meta["tokenizer"]["model_base64"] == base64.b64encode(tokenizer).decode("ascii")


def test_resuming_with_another_tokenizer_is_refused(trained_workdir, tmp_path):
  workdir, config, _, _ = trained_workdir
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  # Checkpoint 4 as if trained with another tokenizer: its saved fingerprint differs.
  meta_file = os.path.join(copy, "checkpoints", "4", "meta", "metadata")
  with open(meta_file, encoding="utf-8") as f:
    meta = json.load(f)
  meta["tokenizer"]["sha256"] = "0" * 64
  with open(meta_file, "w", encoding="utf-8") as f:
    json.dump(meta, f)
  other = config.copy_and_resolve_references()
  other.train.steps = 6
  with pytest.raises(config_lib.ConfigError, match=r"data.tokenizer_path: the tokenizer differs from the one "
                     r"checkpoint .*/checkpoints/4 was trained with"):
    train_lib.Trainer(other, copy).run()


def overwrite_part(step_dir, seed=0):
  """Writes random bytes over the middle half of the newest step's largest array file (under
  `ocdbt.process_*/d`), as a bad disk would: its compressed blocks no longer decode."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           if os.path.basename(root) == "d" and "ocdbt.process_" in root for name in names]
  path = max(files, key=os.path.getsize)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 4)
    f.write(np.random.default_rng(seed).integers(0, 256, size // 2, dtype=np.uint8).tobytes())


def test_corrupt_bytes_in_an_array_file_restore_the_previous_step(tiny_config, tmp_path):
  """Random bytes over part of an array file make its decompression fail: damage, so the run resumes
  from the step before and keeps the damaged one aside."""
  workdir = str(tmp_path)
  trainer = train_lib.Trainer(tiny_config(), workdir)
  # Compressible values (small integers), as trained weights are in part: zstd stores them compressed.
  def state_of(seed):
    rng = np.random.default_rng(seed)
    values = jax.tree.map(lambda a: rng.integers(0, 4, a.shape).astype(a.dtype), trainer.abstract_state)
    return values, jax.tree.map(jax.device_put, values, trainer.state_shardings)
  expected10, state10 = state_of(10)
  _, state20 = state_of(20)
  trainer.checkpointer.save(10, state10)
  trainer.checkpointer.save(20, state20)
  trainer.checkpointer.wait()
  overwrite_part(os.path.join(trainer.checkpointer.directory, "20"))
  messages = []
  resumed = train_lib.Trainer(tiny_config(), workdir, echo=messages.append)
  restored = resumed.initial_state()
  assert resumed.restored_step == 10
  assert_state_equal(restored, expected10)
  warning = [m for m in messages if m.startswith("Checkpoint ")]
  assert len(warning) == 1 and "ZSTD_decompressStream() failed" in warning[0], messages
  assert sorted(os.listdir(trainer.checkpointer.directory)) == ["10", "20", "20.unreadable"]


def _read_error(message):
  """An error as Orbax raises it for a failed array read: a generic Exception from TensorStore's."""
  try:
    try:
      raise ValueError(message)
    except ValueError as inner:
      raise Exception("Encountered error while reading array index: (slice(0, 64, 1),)") from inner  # pylint: disable=broad-exception-raised
  except Exception as outer:  # pylint: disable=broad-except
    return outer


@pytest.mark.parametrize("message", [
    'Error reading "params.embed.embedding/0.0" in OCDBT database: ZSTD_decompressStream() failed: '
    'Data corruption detected; at byte 0',  # TensorStore's words with no status code in front.
    'INTERNAL: Error reading "params.embed.embedding/0.0": checksum mismatch'])
def test_decompression_and_checksum_failures_show_damage_whatever_the_status(tiny_config, tmp_path, monkeypatch,
                                                                            message):
  trainer = train_lib.Trainer(tiny_config(), str(tmp_path))
  expected, state = random_state(trainer, seed=5)
  trainer.checkpointer.save(10, state)
  trainer.checkpointer.save(20, random_state(trainer, seed=6)[1])
  trainer.checkpointer.wait()
  newest = os.path.join(trainer.checkpointer.directory, "20")
  read = ocp.Checkpointer.restore
  def failing_read(self, directory, *args, **kwargs):
    if str(directory).startswith(newest + os.sep):
      raise _read_error(message)
    return read(self, directory, *args, **kwargs)
  monkeypatch.setattr(ocp.Checkpointer, "restore", failing_read)
  resumed = train_lib.Trainer(tiny_config(), str(tmp_path), echo=lambda m: None)
  assert_state_equal(resumed.initial_state(), expected)
  assert resumed.restored_step == 10
  assert sorted(os.listdir(trainer.checkpointer.directory)) == ["10", "20", "20.unreadable"]
