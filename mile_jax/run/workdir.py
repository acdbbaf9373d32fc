"""A run's directory: a local path or an object-store URI (gs://, s3://).

Checkpoints go through Orbax, which writes to either. The run files
(`config.json`, `tokenizer.model`, `token_counts.npy`, eval results, the
lock) go through `etils.epath`, which reads and writes both; the lock's
conditional writes go through TensorStore. Object stores
cannot append, so `metrics.jsonl` and TensorBoard's event files are written
in a local mirror directory and copied up by `LogMirror.push` whenever a
checkpoint is saved and when the run ends; a resumed run first copies
`metrics.jsonl` down. `gs://` needs `gcsfs` (or TensorFlow) installed,
`s3://` needs `s3fs`.
"""

import hashlib
import os

from etils import epath

METRICS_FILE = "metrics.jsonl"


def is_remote(workdir: str) -> bool:
  return "://" in os.fspath(workdir)


def resolve(workdir: str) -> str:
  """An absolute local path, or the URI without its trailing slash."""
  workdir = os.fspath(workdir)
  if is_remote(workdir):
    return workdir.rstrip("/")
  return os.path.abspath(os.path.expanduser(workdir))


def path(workdir: str, *parts: str) -> epath.Path:
  """`workdir/part/...` as an epath.Path (local or remote alike)."""
  return epath.Path(workdir).joinpath(*parts)


def join(workdir: str, *parts: str) -> str:
  """`workdir/part/...` as a string, keeping a URI's scheme."""
  return "/".join([workdir.rstrip("/"), *parts]) if is_remote(workdir) else os.path.join(workdir, *parts)


def kvstore(directory: str):
  """A TensorStore key-value store rooted at `directory` (local, gs://, s3://), for the
  reads and writes that need a generation condition (create-if-absent, replace-if-unchanged)."""
  import tensorstore as ts  # pylint: disable=import-outside-toplevel  # Installed with Orbax.
  directory = resolve(directory)
  spec = directory + "/" if is_remote(directory) else {"driver": "file", "path": directory + "/"}
  return ts.KvStore.open(spec).result()


def forget_listings(directory: str) -> None:
  """Drops this process's cached listings of `directory` (gcsfs keeps them, and another
  process may have written there since), so that the next listing asks the store."""
  if is_remote(directory):
    from etils.epath import backend  # pylint: disable=import-outside-toplevel
    backend.fsspec_backend.fs(directory).invalidate_cache()  # All of it: a step's own listing may be stale too.


def check_writable(workdir: str) -> None:
  """Raises OSError (with the reason) unless files can be created in `workdir`."""
  root = path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  probe = root / f".write-test-{os.getpid()}"
  probe.write_text("ok")
  probe.unlink()


class LogMirror:
  """The local directory that append-only logs are written to.

  For a local workdir that is the workdir itself and `pull`/`push` do
  nothing. For a remote one it is `<cache_root>/runs/<hash of the URI>`.
  """

  def __init__(self, workdir: str, cache_root: str):
    self.workdir = workdir
    self.remote = is_remote(workdir)
    if self.remote:
      digest = hashlib.sha256(workdir.encode("utf-8")).hexdigest()[:16]
      self.local = os.path.join(cache_root, "runs", digest)
    else:
      self.local = workdir
    self._pushed: dict[str, int] = {}  # relative path -> size last copied up

  def local_path(self, name: str) -> str:
    return os.path.join(self.local, name)

  def pull(self) -> None:
    """Replaces the mirror's `metrics.jsonl` with the workdir's (or removes it)."""
    if not self.remote:
      return
    os.makedirs(self.local, exist_ok=True)
    source, target = path(self.workdir, METRICS_FILE), self.local_path(METRICS_FILE)
    if source.exists():
      with open(target, "wb") as f:
        f.write(source.read_bytes())
      self._pushed[METRICS_FILE] = os.path.getsize(target)
    elif os.path.exists(target):
      os.remove(target)

  def push(self) -> None:
    """Copies every mirror file that is new or has grown since the last push."""
    if not self.remote or not os.path.isdir(self.local):
      return
    for root, _, files in os.walk(self.local):
      for name in files:
        local = os.path.join(root, name)
        relative = os.path.relpath(local, self.local)
        size = os.path.getsize(local)
        if self._pushed.get(relative) == size:
          continue
        target = path(self.workdir, *relative.split(os.sep))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "rb") as f:
          target.write_bytes(f.read())
        self._pushed[relative] = size
