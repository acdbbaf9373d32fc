"""Run files, logs and the lock in an object-store workdir (gs://, on the suite's GCS server)."""

import json
import os
import time

import fsspec
import numpy as np
import pytest
from etils import epath

from mile_jax import config_lib
from mile_jax import train_lib
from mile_jax.data import tokenizer as tokenizer_lib
from mile_jax.evaluation import restore
from mile_jax.evaluation.errors import EvalError
from mile_jax.run import faults
from mile_jax.run import workdir as workdir_lib


def test_paths_keep_the_scheme():
  assert workdir_lib.resolve("gs://b/runs/x/") == "gs://b/runs/x"
  assert workdir_lib.join("gs://b/runs/x", "checkpoints") == "gs://b/runs/x/checkpoints"
  assert workdir_lib.resolve("runs/x") == os.path.join(os.getcwd(), "runs/x")
  assert not workdir_lib.is_remote("/tmp/gs:/b")


def test_logs_are_mirrored_and_resume_from_the_bucket(gcs_bucket, tmp_path):
  workdir = f"{gcs_bucket}/runs/logs"
  mirror = workdir_lib.LogMirror(workdir, str(tmp_path / "cache"))
  assert mirror.local.startswith(str(tmp_path / "cache"))
  mirror.pull()  # Nothing in the bucket yet.
  with open(mirror.local_path("metrics.jsonl"), "w", encoding="utf-8") as f:
    f.write('{"step": 1}\n')
  os.makedirs(mirror.local_path("tensorboard"))
  with open(mirror.local_path("tensorboard/events.1"), "wb") as f:
    f.write(b"abc")
  mirror.push()
  remote = epath.Path(workdir)
  assert (remote / "metrics.jsonl").read_text() == '{"step": 1}\n'
  assert (remote / "tensorboard/events.1").read_bytes() == b"abc"
  with open(mirror.local_path("metrics.jsonl"), "a", encoding="utf-8") as f:
    f.write('{"step": 2}\n')
  mirror.push()
  assert (remote / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'

  # Another machine resumes: it starts from the bucket's log, not from its own stale copy.
  other = workdir_lib.LogMirror(workdir, str(tmp_path / "other_cache"))
  os.makedirs(other.local)
  with open(other.local_path("metrics.jsonl"), "w", encoding="utf-8") as f:
    f.write('{"step": 99}\n')
  other.pull()
  with open(other.local_path("metrics.jsonl"), encoding="utf-8") as f:
    assert f.read() == '{"step": 1}\n{"step": 2}\n'


def test_local_workdir_is_its_own_mirror(tmp_path):
  mirror = workdir_lib.LogMirror(str(tmp_path), "/nonexistent-cache")
  assert mirror.local == str(tmp_path)
  mirror.pull()
  mirror.push()
  assert os.listdir(tmp_path) == []


def test_run_files_are_written_to_the_bucket(gcs_bucket, tiny_config):
  class _Data:  # What write_run_files reads: the tokenizer's bytes and training counts.
    class tokenizer:  # noqa: N801
      @staticmethod
      def serialized_model():
        return b"sp-model"

    class train:  # noqa: N801
      @staticmethod
      def token_counts(vocab_size):
        return np.arange(vocab_size, dtype=np.int64)

  config = tiny_config()
  workdir_lib.check_writable(f"{gcs_bucket}/runs/files")
  train_lib.write_run_files(f"{gcs_bucket}/runs/files", config, _Data)
  remote = epath.Path(f"{gcs_bucket}/runs/files")
  assert json.loads((remote / "config.json").read_text())["model"]["vocab_size"] == 512
  assert (remote / "tokenizer.model").read_bytes() == b"sp-model"
  with (remote / "token_counts.npy").open("rb") as f:
    np.testing.assert_array_equal(np.load(f), np.arange(512))
  assert sorted(p.name for p in remote.iterdir()) == ["config.json", "token_counts.npy", "tokenizer.model"]


def _read_object(directory, name):
  """An object's JSON read in one request, as GCS serves it: whole, one generation.

  (gcsfs reads the size first and the bytes after, so an object rewritten between the two, as
  the heartbeat does, can come back cut.)
  """
  return json.loads(workdir_lib.kvstore(directory).read(name).result().value)


def test_lock_in_a_bucket(gcs_bucket):
  workdir = f"{gcs_bucket}/runs/locked"
  lock_file = epath.Path(workdir) / "lock"
  with faults.WorkdirLock(workdir, heartbeat_s=0.05) as lock:
    first = _read_object(workdir, "lock")
    time.sleep(0.5)
    beat = _read_object(workdir, "lock")["beat"]
    assert beat > first["beat"]  # The heartbeat rewrites the object.
    assert lock.remote
  assert not lock_file.exists()

  # A holder on another host with a recent heartbeat keeps the workdir...
  lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": 0, "beat": time.time() - 10}))
  with pytest.raises(faults.WorkdirLockedError, match=f"{workdir} is in use by process 1 on host elsewhere"):
    faults.WorkdirLock(workdir, stale_after_s=300).acquire()
  # ... one whose heartbeat stopped 10 minutes ago is taken over.
  lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": 0, "beat": time.time() - 600}))
  messages = []
  taken = faults.WorkdirLock(workdir, stale_after_s=300, echo=messages.append)
  taken.acquire()
  assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  assert "has not refreshed it for 600 s" in messages[0]
  taken.release()
  assert not lock_file.exists()


def test_two_runs_taking_a_bucket_lock_at_once_leave_one_holder(gcs_bucket, monkeypatch):
  """B takes the stale lock between A's read and A's write: A's write, conditional on the generation it
  read, fails and A is refused; B holds the lock, and A's refusal leaves it alone."""
  workdir = f"{gcs_bucket}/runs/race"
  lock_file = epath.Path(workdir) / "lock"
  lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": 0, "beat": time.time() - 600}))
  a = faults.WorkdirLock(workdir, echo=lambda m: None)
  b = faults.WorkdirLock(workdir, echo=lambda m: None)
  judge = faults.WorkdirLock.stale_reason
  def judge_while_b_takes_it(self, info, mtime):
    reason = judge(self, info, mtime)
    if self is a:
      b.acquire()
    return reason
  monkeypatch.setattr(faults.WorkdirLock, "stale_reason", judge_while_b_takes_it)
  with pytest.raises(faults.WorkdirLockedError, match=f"could not take the lock {workdir}/lock: another run took it"):
    a.acquire()
  assert json.loads(lock_file.read_text())["token"] == b._token
  # A holder whose lock was taken over does not delete the new holder's lock when it releases.
  lock_file.write_text(json.dumps({"pid": 2, "host": "elsewhere", "token": "c", "since": 0, "beat": time.time()}))
  b.release()
  assert json.loads(lock_file.read_text())["token"] == "c"


def test_object_store_without_its_package_is_a_config_error(tiny_config):
  pytest.importorskip("fsspec")
  if "s3" in fsspec.registry or _installed("s3fs"):
    pytest.skip("s3fs is installed")
  with pytest.raises(config_lib.ConfigError, match=r"workdir: s3://bucket/run needs a package: .*pip install s3fs"):
    train_lib.Trainer(tiny_config(), "s3://bucket/run")


def _installed(module: str) -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec(module) is not None


def test_eval_finds_a_run_in_a_bucket(gcs_bucket, tiny_config, tmp_path):
  """eval.py's lookups (checkpoint steps, config.json, tokenizer, token counts) on a gs:// workdir: only
  finished steps (with Orbax's commit_success.txt) that are not marked unreadable are checkpoints."""
  texts = [f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(200)]
  local = tokenizer_lib.train_tokenizer(texts, 300, str(tmp_path / "tok"), corpus_key="bucket-run")
  workdir = f"{gcs_bucket}/runs/trained"
  run = epath.Path(workdir)
  for step in (4, 12, 8, 16):
    (run / "checkpoints" / str(step) / "state" / "manifest.ocdbt").write_text("x")
    if step != 16:  # 16: a save still in progress, or one a crash cut short.
      (run / "checkpoints" / str(step) / "commit_success.txt").write_text("done")
  (run / "checkpoints" / "12.unreadable").write_text("{}")
  config = tiny_config(**{"model.vocab_size": 300})
  (run / "config.json").write_text(config.to_json_best_effort())
  (run / "tokenizer.model").write_bytes(local.serialized_model())
  with (run / "token_counts.npy").open("wb") as f:
    np.save(f, np.arange(300))

  assert restore.locate(f"{workdir}/", None) == (workdir, f"{workdir}/checkpoints", 8)
  assert restore.locate(f"{workdir}/checkpoints/4", None)[2] == 4
  with pytest.raises(EvalError, match=rf"--step: no checkpoint 5 in {workdir}/checkpoints; "
                                      r"available steps: \[4, 8\]"):
    restore.locate(workdir, 5)
  with pytest.raises(EvalError, match=rf"--step: checkpoint {workdir}/checkpoints/16 is not finished"):
    restore.locate(workdir, 16)
  with pytest.raises(EvalError, match=rf"--step: checkpoint {workdir}/checkpoints/12 is marked unreadable"):
    restore.locate(f"{workdir}/checkpoints/12", None)
  loaded, _ = restore.load_config(workdir)
  assert loaded.model.vocab_size == 300
  remote = tokenizer_lib.load_tokenizer(f"{workdir}/tokenizer.model")
  assert remote.encode(texts[3]) == local.encode(texts[3]) and len(local.encode(texts[3])) > 3
  np.testing.assert_array_equal(restore.load_token_counts(workdir, 300), np.arange(300))


def test_an_object_missing_for_a_moment_is_read_again_not_called_damage(gcs_bucket, tiny_config, monkeypatch):
  """On an object store a NOT_FOUND can be transient: the newest step is read again (not marked) and
  restored; one still missing after the retries is damage, marked without moving anything."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from mile_jax.run import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  from mile_jax.run import checkpoint_steps  # pylint: disable=import-outside-toplevel
  workdir = f"{gcs_bucket}/runs/flaky"
  trainer = train_lib.Trainer(tiny_config(), workdir)
  state = trainer.initial_state()
  trainer.checkpointer.save(10, state)
  trainer.checkpointer.save(20, state)
  trainer.checkpointer.wait()
  monkeypatch.setattr(checkpoint_lib, "OBJECT_STORE_RETRY_DELAYS", (0.0, 0.0))
  read, failures = ocp.Checkpointer.restore, []
  def missing_for_a_while(self, directory, *args, **kwargs):
    if str(directory).startswith(f"{workdir}/checkpoints/20/") and len(failures) < failures_wanted:
      failures.append(directory)
      raise ValueError('NOT_FOUND: Error reading "d/0123": not found')
    return read(self, directory, *args, **kwargs)
  monkeypatch.setattr(ocp.Checkpointer, "restore", missing_for_a_while)
  target = checkpoint_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)

  failures_wanted = 2  # Missing twice, found on the third read.
  step, _ = trainer.checkpointer.restore_latest(target, warn=pytest.fail)
  assert step == 20 and len(failures) == 2
  assert checkpoint_steps.unreadable_steps(f"{workdir}/checkpoints") == set()

  failures.clear()
  failures_wanted = 3  # Still missing after both retries: damage.
  warnings = []
  step, _ = trainer.checkpointer.restore_latest(target, warn=warnings.append)
  assert step == 10 and len(failures) == 3 and "marked by" in warnings[0]
  assert checkpoint_steps.unreadable_steps(f"{workdir}/checkpoints") == {20}
  assert checkpoint_steps.numbered_steps(f"{workdir}/checkpoints") == [10, 20]  # Nothing moved.
