"""Faults: the workdir lock, stop signals, non-finite steps, and kill -9 at a random step."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mile_jax import faults
from mile_jax import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_lock(workdir, **info):
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, faults.LOCK_NAME)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(info, f)
  return path


@pytest.fixture
def live_pid():
  proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  yield proc.pid
  proc.kill()
  proc.wait()


def dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_second_run_on_a_workdir_is_refused_naming_the_holder(tiny_config, tmp_path, live_pid):
  workdir = str(tmp_path)
  write_lock(workdir, pid=live_pid, host=socket.gethostname(), since=time.time())
  with pytest.raises(faults.WorkdirLockedError) as info:
    train_lib.Trainer(tiny_config(), workdir).run()
  assert f"process {live_pid} on host {socket.gethostname()}" in str(info.value)
  assert os.path.join(workdir, "lock") in str(info.value)
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))  # Refused before doing anything.


def test_stale_locks_are_detected(tmp_path, live_pid):
  host = socket.gethostname()
  cases = [  # (lock contents, mtime age in seconds, stale?)
      (dict(pid=live_pid, host=host), 0, False),
      (dict(pid=dead_pid(), host=host), 0, True),
      (dict(pid=os.getpid(), host=host), 0, True),  # An earlier process with our pid (a restarted container).
      (dict(pid=1234, host="elsewhere"), 10, False),  # Another host's heartbeat is fresh.
      (dict(pid=1234, host="elsewhere"), 3600, True),
      ({}, 0, True),  # Cut short by a kill.
  ]
  for i, (info, age, stale) in enumerate(cases):
    workdir = str(tmp_path / str(i))
    path = write_lock(workdir, **info)
    os.utime(path, (time.time() - age, time.time() - age))
    messages = []
    lock = faults.WorkdirLock(workdir, stale_after_s=300, echo=messages.append)
    if stale:
      with lock:
        with open(path, encoding="utf-8") as f:
          assert json.load(f)["pid"] == os.getpid()
      assert len(messages) == 1 and messages[0].startswith(f"Taking over the stale lock {path}"), (i, messages)
      assert not os.path.exists(path)  # Released.
    else:
      with pytest.raises(faults.WorkdirLockedError, match=f"process {info['pid']} on host {info['host']}"):
        lock.acquire()
      with open(path, encoding="utf-8") as f:
        assert json.load(f)["pid"] == info["pid"]  # Left alone.


def test_lock_heartbeat_refreshes_the_file(tmp_path):
  lock = faults.WorkdirLock(str(tmp_path), heartbeat_s=0.05)
  with lock:
    os.utime(lock.path, (0, 0))
    time.sleep(0.5)
    assert time.time() - os.path.getmtime(lock.path) < 5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_become_a_stop_request(sig):
  before = signal.getsignal(sig)
  with faults.StopSignals(echo=lambda m: None) as stop:
    assert not stop.should_stop(1)
    os.kill(os.getpid(), sig)
    assert stop.received == sig.name and stop.should_stop(2)
  assert signal.getsignal(sig) is before


def test_drop_records_after(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  records = [{"step": s, "split": "train"} for s in (1, 2, 3, 4)] + [{"step": 2, "split": "eval"}]
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
    f.write('{"step": 5, "spl')  # A line cut short by kill -9.
  assert faults.drop_records_after(path, 2) == 3
  with open(path, encoding="utf-8") as f:
    assert [json.loads(line) for line in f] == [records[0], records[1], records[4]]


def poison_batches(trainer, bad_step):
  """Makes the batch of `bad_step` (0-based) carry a NaN in its mask, so its loss is NaN."""
  original = trainer.local_batch
  def local_batch(dataset, step):
    batch = original(dataset, step)
    if step == bad_step and dataset is trainer.data.train:
      batch = dict(batch, mask=batch["mask"].copy())
      batch["mask"][0, 0] = np.nan
    return batch
  trainer.local_batch = local_batch


def test_nonfinite_step_stops_without_saving_it(tiny_config, tmp_path):
  config = tiny_config(**{"train.steps": 10, "train.log_every": 5, "checkpoint.every_steps": 5})
  trainer = train_lib.Trainer(config, str(tmp_path))
  trainer.load_data()
  poison_batches(trainer, bad_step=6)  # The update to step 7.
  with pytest.raises(faults.NonFiniteError) as info:
    trainer.run()
  checkpoints = os.path.join(str(tmp_path), "checkpoints")
  assert str(info.value).startswith("non-finite loss or gradients at step 7 (loss=nan")
  assert f"the last good checkpoint is {os.path.join(checkpoints, '5')}" in str(info.value)
  assert trainer.checkpointer.all_steps() == [5]
  assert not os.path.exists(os.path.join(str(tmp_path), "lock"))
  restored = train_lib.Trainer(config, str(tmp_path)).initial_state()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


def test_skip_nonfinite_skips_the_update_and_counts_it(tiny_config, tmp_path):
  config = tiny_config(**{"train.steps": 10, "train.log_every": 5, "train.skip_nonfinite": True})
  trainer = train_lib.Trainer(config, str(tmp_path))
  trainer.load_data()
  poison_batches(trainer, bad_step=6)
  snapshots = {}
  step_fn = trainer.train_step
  def recording_step(state, batch):
    index = int(state.step)
    if index in (6, 7):
      snapshots[index] = jax.tree.map(np.asarray, (state.params, state.opt_state))
    new_state, metrics = step_fn(state, batch)
    if index in (6, 7):
      snapshots[index + 0.5] = jax.tree.map(np.asarray, (new_state.params, new_state.opt_state))
    return new_state, metrics
  trainer.train_step = recording_step
  final = trainer.run()
  # The poisoned update left params and optimizer state exactly as they were; the next one did not.
  for before, after in zip(jax.tree.leaves(snapshots[6]), jax.tree.leaves(snapshots[6.5])):
    np.testing.assert_array_equal(before, after)
  assert any(not np.array_equal(b, a) for b, a in zip(jax.tree.leaves(snapshots[7]),
                                                      jax.tree.leaves(snapshots[7.5])))
  assert int(final.step) == 10
  with open(os.path.join(str(tmp_path), "metrics.jsonl"), encoding="utf-8") as f:
    logged = [json.loads(line) for line in f]
  assert [(r["step"], r["nonfinite_steps"]) for r in logged] == [(5, 0.0), (10, 1.0)]
  assert np.isfinite(logged[1]["loss"]) and np.isfinite(logged[1]["grad_norm"])
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(final.params))


# A tiny model through the real entry point: 2 CPU devices, one checkpoint every 4 steps, every step logged.
STEPS = 24
OVERRIDES = {
    "model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
    "model.n_kv_heads": 2, "model.d_ff": 128, "model.max_seq_len": 64, "data.seq_len": 32,
    "data.global_batch_size": 8, "train.steps": STEPS, "train.log_every": 1, "train.eval_every": 0,
    "checkpoint.every_steps": 4, "optim.warmup_steps": 4,
}


def start_train_py(workdir):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  args = [sys.executable, "train.py", "--config", "configs/default.py", "--workdir", workdir]
  args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.endswith("\n")]
  return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


def wait_for_step(proc, workdir, step, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    try:
      if any(s >= step for s, _ in logged_losses(workdir)):
        return
    except (FileNotFoundError, json.JSONDecodeError):
      pass
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached")


def wait_for_checkpoint_after(proc, checkpoints, step, timeout=120):
  """Waits until a finished checkpoint newer than `step` exists (Orbax renames a
  step's folder to its number only once the save is complete)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    if any(name.isdigit() and int(name) > step for name in os.listdir(checkpoints)):
      return
    time.sleep(0.05)
  raise TimeoutError(f"no checkpoint after step {step}")


@pytest.mark.slow
def test_sigterm_then_kill9_then_resume_equals_uninterrupted(tmp_path):
  """Per-step losses of a run stopped by SIGTERM, then killed with SIGKILL at a
  random step, then finished, equal an uninterrupted run's bit for bit."""
  straight = str(tmp_path / "straight")
  proc = start_train_py(straight)
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, output[-3000:]
  expected = logged_losses(straight)
  assert [s for s, _ in expected] == list(range(1, STEPS + 1))

  workdir = str(tmp_path / "interrupted")
  checkpoints = os.path.join(workdir, "checkpoints")
  # SIGTERM: the current step is finished and saved, and the process exits 0.
  proc = start_train_py(workdir)
  wait_for_step(proc, workdir, 5)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, output[-3000:]
  stopped_at = logged_losses(workdir)[-1][0]
  assert f"Stopped by SIGTERM after step {stopped_at}; saved checkpoint {checkpoints}/{stopped_at}" in output
  assert str(stopped_at) in os.listdir(checkpoints)

  # SIGKILL at a random step after the first checkpoint of the resumed run.
  kill_at = random.Random().randint(min(stopped_at + 3, STEPS - 8), STEPS - 8)
  proc = start_train_py(workdir)
  wait_for_step(proc, workdir, kill_at)
  wait_for_checkpoint_after(proc, checkpoints, stopped_at)
  proc.kill()
  output = proc.communicate(timeout=60)[0]
  killed_at = logged_losses(workdir)[-1][0]
  assert f"Resuming from {checkpoints}/{stopped_at}" in output
  assert os.path.exists(os.path.join(workdir, "lock"))  # Left behind by the killed process.

  proc = start_train_py(workdir)
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, output[-3000:]
  assert "Taking over the stale lock" in output
  resumed_from = int(output.split(f"Resuming from {checkpoints}/")[1].split()[0])
  assert stopped_at < resumed_from <= killed_at, (stopped_at, resumed_from, killed_at)
  assert logged_losses(workdir) == expected  # Steps, order and every loss, bit for bit.
