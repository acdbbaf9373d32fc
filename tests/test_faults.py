"""Faults: the workdir lock, stop signals, non-finite steps, and a run through a failed save,
SIGTERM, kill -9 during an asynchronous save and a damaged newest checkpoint."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath

from mile_jax import train_lib
from mile_jax.run import faults

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
      # A day old: the pid now belongs to another process (reused after a restart); the heartbeat decides.
      (dict(pid=live_pid, host=host), 86400, True),
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


def test_a_lock_of_bytes_that_are_not_utf8_is_stale_and_taken_over(tmp_path):
  path = os.path.join(str(tmp_path), faults.LOCK_NAME)
  with open(path, "wb") as f:
    f.write(b'{"pid": \xff\xfe\x80 damaged')
  messages = []
  with faults.WorkdirLock(str(tmp_path), echo=messages.append):
    with open(path, encoding="utf-8") as f:
      assert json.load(f)["pid"] == os.getpid()
  assert messages == [f"Taking over the stale lock {path}: the lock file is unreadable"]


@pytest.mark.parametrize("name", [faults.GUARD_NAME, faults.LOCK_NAME])
def test_a_lock_or_guard_that_is_a_directory_is_refused_in_one_line(tmp_path, name):
  os.makedirs(os.path.join(str(tmp_path), name))
  with pytest.raises(faults.ConfigError) as info:
    faults.WorkdirLock(str(tmp_path), echo=lambda m: None).acquire()
  message = str(info.value)
  assert message.startswith("--workdir: cannot ") and os.path.join(str(tmp_path), name) in message
  assert "Is a directory" in message and "\n" not in message
  assert os.path.isdir(os.path.join(str(tmp_path), name))


def test_release_leaves_a_lock_that_another_run_took_over(tmp_path, live_pid):
  lock = faults.WorkdirLock(str(tmp_path), echo=lambda m: None)
  lock.acquire()
  # Judged stale elsewhere (say, a heartbeat stalled past stale_after_s) and taken over by another run.
  taken = dict(pid=live_pid, host=socket.gethostname(), token="another run", since=time.time())
  write_lock(str(tmp_path), **taken)
  lock.release()
  with open(lock.path, encoding="utf-8") as f:
    assert json.load(f) == taken


# Takes the workdir's lock and holds it 1 s; judging the old lock stale takes 0.5 s, long enough
# for every process to judge it before any replaces it, unless taking over is one exclusive step.
TAKE_LOCK = """
import os, sys, time
sys.path.insert(0, os.getcwd())
from mile_jax.run import faults
judge = faults.WorkdirLock.stale_reason
def slow_judge(self, info, mtime):
  reason = judge(self, info, mtime)
  time.sleep(0.5)
  return reason
faults.WorkdirLock.stale_reason = slow_judge
lock = faults.WorkdirLock(sys.argv[1])
open(os.path.join(sys.argv[2], str(os.getpid())), "w").close()  # Ready.
while not os.path.exists(os.path.join(sys.argv[2], "go")):
  time.sleep(0.01)
try:
  lock.acquire()
except faults.WorkdirLockedError:
  print("refused")
else:
  time.sleep(1.0)
  print("held" if lock.holder()[0]["token"] == lock._token else "lost")
  lock.release()
"""


def test_concurrent_takeovers_of_a_stale_lock_leave_one_holder(tmp_path):
  workdir = str(tmp_path / "run")
  write_lock(workdir, pid=dead_pid(), host=socket.gethostname(), since=time.time())
  start = tmp_path / "start"
  start.mkdir()
  procs = [subprocess.Popen([sys.executable, "-c", TAKE_LOCK, workdir, str(start)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
  deadline = time.time() + 60
  while len(os.listdir(start)) < len(procs) and time.time() < deadline:
    time.sleep(0.01)
  (start / "go").touch()  # All at once.
  outputs = sorted(p.communicate(timeout=60)[0] for p in procs)
  assert [p.returncode for p in procs] == [0, 0, 0], outputs
  taken = [o for o in outputs if o.startswith("Taking over the stale lock")]
  assert len(taken) == 1 and taken[0].endswith("held\n"), outputs
  assert [o for o in outputs if o not in taken] == ["refused\n", "refused\n"], outputs
  assert not os.path.exists(os.path.join(workdir, faults.LOCK_NAME))  # Released by its holder.


def test_lock_heartbeat_refreshes_the_file(tmp_path):
  lock = faults.WorkdirLock(str(tmp_path), heartbeat_s=0.05)
  with lock:
    os.utime(lock.path, (0, 0))
    time.sleep(0.5)
    assert time.time() - os.path.getmtime(lock.path) < 5


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_become_a_stop_request(sig):
  before = signal.getsignal(sig)
  messages = []
  with faults.StopSignals(echo=messages.append) as stop:
    assert not stop.should_stop(1)
    os.kill(os.getpid(), sig)
    # The handler only records the signal; the loop's next check says so, once.
    assert stop.received == sig.name and messages == []
    assert stop.should_stop(2) and stop.should_stop(3)
  assert messages == [f"Received {sig.name}: stopping after the current step and saving a checkpoint"]
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
  assert str(info.value).startswith("non-finite loss or gradients at step 7 (")
  assert "grad_norm=nan" in str(info.value)
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


# A tiny model through the real entry point: 2 CPU devices, one checkpoint every 4 steps, every step
# logged, checkpoints saved asynchronously (the default).
STEPS = 24
OVERRIDES = {
    "model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
    "model.n_kv_heads": 2, "model.d_ff": 128, "model.max_seq_len": 64, "data.seq_len": 32,
    "data.global_batch_size": 8, "train.steps": STEPS, "train.log_every": 1, "train.eval_every": 0,
    "checkpoint.every_steps": 4, "optim.warmup_steps": 4,
}

# train.py with a fault injected into Orbax's save of one step, named by $MILE_JAX_TEST_FAULT:
# "slow_commit:<step>" delays the commit (the final rename) of that step by 60 s, in the background;
# "unwritable:<step>" makes creating its directories fail as in a directory the run may not write to.
TRAIN_PY_WITH_FAULT = """
import asyncio, errno, os, runpy, sys
from orbax.checkpoint._src.path import async_path, atomicity
kind, _, step = os.environ.get("MILE_JAX_TEST_FAULT", "").partition(":")
marker = os.sep + step + ".orbax-checkpoint-tmp"
if kind == "slow_commit":
  # A filesystem's step is a temporary directory renamed when complete; an object store's is written
  # in place (`.../checkpoints/<step>`) and complete once commit_success.txt is.
  def slowed(finalize):
    async def slow_finalize(self, *args, **kwargs):
      if marker in str(self.get()) or str(self.get()).endswith("/checkpoints/" + step):
        await asyncio.sleep(60)
      return await finalize(self, *args, **kwargs)
    return slow_finalize
  for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
    cls.finalize = slowed(cls.finalize)
elif kind == "unwritable":
  mkdir = async_path.mkdir
  async def unwritable_mkdir(path, *args, **kwargs):
    if marker in str(path):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    return await mkdir(path, *args, **kwargs)
  async_path.mkdir = unwritable_mkdir
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""


def start_train_py(workdir, fault="", logs=None):
  """train.py on OVERRIDES with `fault`; its stdout and stderr go to `<logs>.stdout` and `.stderr`
  (`logs` defaults to `workdir`, a local one)."""
  logs = logs or workdir
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             MILE_JAX_TEST_FAULT=fault)
  args = [sys.executable, "-c", TRAIN_PY_WITH_FAULT, "--config", "configs/default.py", "--workdir", workdir]
  args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  with open(f"{logs}.stdout", "w", encoding="utf-8") as out, open(f"{logs}.stderr", "w", encoding="utf-8") as err:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)


def finish(proc, workdir, timeout=300):
  """(exit status, stdout, stderr's lines other than the progress bar's) once `proc` has ended."""
  proc.wait(timeout=timeout)
  with open(f"{workdir}.stdout", encoding="utf-8") as f:
    out = f.read()
  with open(f"{workdir}.stderr", encoding="utf-8") as f:
    lines = re.split(r"[\r\n]", f.read())
  # The token variable of the suite's GCS server makes TensorStore log that it uses it.
  return proc.returncode, out, [line for line in lines if line.strip() and not line.startswith("train:")
                                and not line.endswith("Using GOOGLE_AUTH_TOKEN_FOR_TESTING")]


def logged_losses(workdir):
  """[(step, loss)] of the train records in `workdir`'s metrics.jsonl (local or gs://)."""
  text = epath.Path(workdir, "metrics.jsonl").read_text(encoding="utf-8")
  records = [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]
  return [(r["step"], r["loss"]) for r in records if r["split"] == "train"]


def wait_for_step(proc, workdir, step, timeout=120):
  """Waits until the run `proc` has printed the metrics of `step` (a resumed run's metrics.jsonl
  holds the records of the run before until it drops those after its checkpoint)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, finish(proc, workdir)
    with open(f"{workdir}.stdout", encoding="utf-8") as f:
      if f"[train] step {step}:" in f.read():
        return
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached")


def garble(step_dir):
  """Overwrites a saved state's data files (arrays and their metadata) with random bytes, as a bad
  disk would."""
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) == "d":
      for name in files:
        path = os.path.join(root, name)
        with open(path, "r+b") as f:
          f.write(os.urandom(os.path.getsize(path)))


@pytest.mark.slow
def test_a_run_through_faults_logs_the_losses_of_an_uninterrupted_run(tmp_path):
  """A run whose save fails, then stopped by SIGTERM, then killed with SIGKILL while an asynchronous
  save is in flight, then finding its newest checkpoint damaged, ends with the per-step losses of an
  uninterrupted run, bit for bit. Each fault is reported in one line and loses no checkpoint."""
  straight = str(tmp_path / "straight")
  status, out, err = finish(start_train_py(straight), straight)
  assert status == 0 and not err, (out[-3000:], err)
  expected = logged_losses(straight)
  assert [s for s, _ in expected] == list(range(1, STEPS + 1))

  workdir = str(tmp_path / "interrupted")
  checkpoints = os.path.join(workdir, "checkpoints")
  complete = lambda: sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())  # noqa: E731
  # The save of step 8 fails: the run ends at once with one line, exit 1, and checkpoint 4 intact.
  # (Orbax's threads waiting for that save's directories would hold the exit for 300 s.)
  status, out, err = finish(start_train_py(workdir, "unwritable:8"), workdir, timeout=150)
  assert status == 1 and len(err) == 1, (out[-3000:], err)
  assert err[0].startswith(f"Checkpoint error: could not save step 8 to {checkpoints}/8 (Permission denied"), err
  assert err[0].endswith(f"; the last complete checkpoint is {checkpoints}/4"), err
  assert complete() == [4]

  # SIGTERM: the current step is finished and saved, and the process exits 0.
  proc = start_train_py(workdir)
  wait_for_step(proc, workdir, 6)
  proc.send_signal(signal.SIGTERM)
  status, out, err = finish(proc, workdir, timeout=120)
  assert status == 0 and not err, (out[-3000:], err)
  assert f"Resuming from {checkpoints}/4" in out
  stopped_at = logged_losses(workdir)[-1][0]
  assert f"Stopped by SIGTERM after step {stopped_at}; saved checkpoint {checkpoints}/{stopped_at}" in out
  assert complete()[0] == 4 and complete()[-1] == stopped_at

  # SIGKILL while the save of step `slow` is being written in the background and training goes on.
  slow = (stopped_at // 4 + 2) * 4
  assert slow + 3 <= STEPS, stopped_at
  proc = start_train_py(workdir, f"slow_commit:{slow}")
  wait_for_step(proc, workdir, slow + 2)
  proc.kill()
  status, out, _ = finish(proc, workdir, timeout=60)
  assert f"Resuming from {checkpoints}/{stopped_at}" in out
  assert complete()[-2:] == [stopped_at, slow - 4]  # Step `slow` was never committed.
  assert any(n.startswith(f"{slow}.orbax-checkpoint-tmp") for n in os.listdir(checkpoints))
  assert os.path.exists(os.path.join(workdir, "lock"))  # Left behind by the killed process.

  # The newest complete checkpoint is damaged: the run says so in one line and resumes from the one before.
  garble(os.path.join(checkpoints, str(slow - 4)))
  status, out, err = finish(start_train_py(workdir), workdir)
  assert status == 0 and not err, (out[-3000:], err)  # No stray tracebacks of the failed read.
  assert "Taking over the stale lock" in out
  warnings = [line for line in out.splitlines() if line.startswith("Checkpoint ")]
  assert len(warnings) == 1 and warnings[0].startswith(f"Checkpoint {checkpoints}/{slow - 4} ("), warnings
  assert f"is unreadable; restored the previous one, {checkpoints}/{stopped_at}, instead" in warnings[0]
  assert f"Resuming from {checkpoints}/{stopped_at}" in out
  assert logged_losses(workdir) == expected  # Steps, order and every loss, bit for bit.
