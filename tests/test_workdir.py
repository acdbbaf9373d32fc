"""Run files, logs and the lock in an object-store workdir (gs://, served here from a local directory)."""

import json
import os
import time

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from mile_jax import config_lib
from mile_jax import train_lib
from mile_jax.data import tokenizer as tokenizer_lib
from mile_jax.evaluation import restore
from mile_jax.evaluation.errors import EvalError
from mile_jax.run import faults
from mile_jax.run import workdir as workdir_lib


class _BucketsInADirectory(LocalFileSystem):
  """`gs://bucket/key` read and written as `<root>/bucket/key`."""
  protocol = ("gs", "gcs")
  root = ""

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = os.path.join(cls.root, path[len(prefix):])
    return super()._strip_protocol(path)


@pytest.fixture(scope="module")
def bucket_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("buckets")
  _BucketsInADirectory.root = str(root)
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, _BucketsInADirectory, clobber=True)
  return root


def test_paths_keep_the_scheme():
  assert workdir_lib.resolve("gs://b/runs/x/") == "gs://b/runs/x"
  assert workdir_lib.join("gs://b/runs/x", "checkpoints") == "gs://b/runs/x/checkpoints"
  assert workdir_lib.resolve("runs/x") == os.path.join(os.getcwd(), "runs/x")
  assert not workdir_lib.is_remote("/tmp/gs:/b")


def test_logs_are_mirrored_and_resume_from_the_bucket(bucket_root, tmp_path):
  workdir = "gs://bucket/runs/logs"
  mirror = workdir_lib.LogMirror(workdir, str(tmp_path / "cache"))
  assert mirror.local.startswith(str(tmp_path / "cache"))
  mirror.pull()  # Nothing in the bucket yet.
  with open(mirror.local_path("metrics.jsonl"), "w", encoding="utf-8") as f:
    f.write('{"step": 1}\n')
  os.makedirs(mirror.local_path("tensorboard"))
  with open(mirror.local_path("tensorboard/events.1"), "wb") as f:
    f.write(b"abc")
  mirror.push()
  remote = bucket_root / "bucket/runs/logs"
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


def test_run_files_are_written_to_the_bucket(bucket_root, tiny_config):
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
  workdir_lib.check_writable("gs://bucket/runs/files")
  train_lib.write_run_files("gs://bucket/runs/files", config, _Data)
  remote = bucket_root / "bucket/runs/files"
  assert json.loads((remote / "config.json").read_text())["model"]["vocab_size"] == 512
  assert (remote / "tokenizer.model").read_bytes() == b"sp-model"
  np.testing.assert_array_equal(np.load(remote / "token_counts.npy"), np.arange(512))
  assert sorted(os.listdir(remote)) == ["config.json", "token_counts.npy", "tokenizer.model"]


def test_lock_in_a_bucket(bucket_root):
  workdir = "gs://bucket/runs/locked"
  lock_file = bucket_root / "bucket/runs/locked/lock"
  with faults.WorkdirLock(workdir, heartbeat_s=0.05) as lock:
    first = json.loads(lock_file.read_text())
    time.sleep(0.3)
    beat = json.loads(lock_file.read_text())["beat"]
    assert beat > first["beat"]  # The heartbeat rewrites the object.
    assert lock.remote
  assert not lock_file.exists()

  # A holder on another host with a recent heartbeat keeps the workdir...
  lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": 0, "beat": time.time() - 10}))
  with pytest.raises(faults.WorkdirLockedError, match="gs://bucket/runs/locked is in use by process 1 on host elsewhere"):
    faults.WorkdirLock(workdir, stale_after_s=300).acquire()
  # ... one whose heartbeat stopped 10 minutes ago is taken over.
  lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": 0, "beat": time.time() - 600}))
  messages = []
  taken = faults.WorkdirLock(workdir, stale_after_s=300, echo=messages.append)
  taken.acquire()
  assert json.loads(lock_file.read_text())["pid"] == os.getpid()
  assert "has not refreshed it for 600 s" in messages[0]
  taken.release()


def test_object_store_without_its_package_is_a_config_error(tiny_config):
  pytest.importorskip("fsspec")
  if "s3" in fsspec.registry or _installed("s3fs"):
    pytest.skip("s3fs is installed")
  with pytest.raises(config_lib.ConfigError, match=r"workdir: s3://bucket/run needs a package: .*pip install s3fs"):
    train_lib.Trainer(tiny_config(), "s3://bucket/run")


def _installed(module: str) -> bool:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return importlib.util.find_spec(module) is not None


def test_eval_finds_a_run_in_a_bucket(bucket_root, tiny_config, tmp_path):
  """eval.py's lookups (checkpoint steps, config.json, tokenizer, token counts) on a gs:// workdir."""
  texts = [f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}" for i in range(200)]
  local = tokenizer_lib.train_tokenizer(texts, 300, str(tmp_path / "tok"), corpus_key="bucket-run")
  run = bucket_root / "bucket/runs/trained"
  for step in (4, 12, 8):
    (run / "checkpoints" / str(step) / "state").mkdir(parents=True)
  (run / "checkpoints" / "12.unreadable").mkdir()
  config = tiny_config(**{"model.vocab_size": 300})
  (run / "config.json").write_text(config.to_json_best_effort())
  (run / "tokenizer.model").write_bytes(local.serialized_model())
  np.save(run / "token_counts.npy", np.arange(300))

  assert restore.locate("gs://bucket/runs/trained/", None) == (
      "gs://bucket/runs/trained", "gs://bucket/runs/trained/checkpoints", 12)
  assert restore.locate("gs://bucket/runs/trained/checkpoints/8", None)[2] == 8
  with pytest.raises(EvalError, match=r"--step: no checkpoint 5 in gs://bucket/runs/trained/checkpoints; "
                                      r"available steps: \[4, 8, 12\]"):
    restore.locate("gs://bucket/runs/trained", 5)
  loaded, _ = restore.load_config("gs://bucket/runs/trained")
  assert loaded.model.vocab_size == 300
  remote = tokenizer_lib.load_tokenizer("gs://bucket/runs/trained/tokenizer.model")
  assert remote.encode(texts[3]) == local.encode(texts[3]) and len(local.encode(texts[3])) > 3
