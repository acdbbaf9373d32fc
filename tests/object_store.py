"""A Google Cloud Storage server on localhost for the tests: `gs://` paths served for real.

The server is `gcp-storage-emulator` (a `[dev]` dependency) run in its own process, with
five things it lacks added here, each a few lines and each how GCS itself behaves:

- every media download answers with its object's `x-goog-generation` (TensorStore's gcs
  kvstore reads it to know what it read);
- `Range: bytes=-N` (the last N bytes; TensorStore reads an OCDBT manifest's tail so);
- the `ifGenerationMatch` / `ifGenerationNotMatch` / `ifMetagenerationMatch` preconditions on
  uploads, deletes and reads (a create with `ifGenerationMatch=0` fails with 412 when the
  object exists; a read whose `ifGenerationNotMatch` matches answers 304);
- listings bounded by `startOffset` / `endOffset` (TensorStore lists a key range so, and deletes
  what it lists);
- an upload of an empty object (the emulator takes the empty body for a missing one).

What it does not emulate (docs/checkpoints.md): latency, throttling (429/503), transient
errors, eventual listing, request sizes and resumable uploads split across requests.

Clients reach it through the variables the real libraries read: `STORAGE_EMULATOR_HOST`
(gcsfs, google-cloud-storage, and so etils.epath) and `TENSORSTORE_GCS_HTTP_URL`
(TensorStore, and so Orbax); they are inherited by the subprocesses a test starts.

Run directly: `python tests/object_store.py PORT DATA_DIR`.
"""

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from http import HTTPStatus

import pytest

# gcsfs reads this when imported: its bucket-type probe uses Google's storage-control API, which the
# server does not have (every real bucket answers it; here it would only log a warning per call).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


def _query_int(request, name):
  value = request.query.get(name)
  return int(value[0]) if value else None


def _precondition_failed(request, response, current) -> bool:
  """Answers 412 and returns True where the request's generation preconditions fail.

  `current` is the object's resource (a dict) or None when it does not exist.
  """
  generation = int(current["generation"]) if current else 0
  wanted = _query_int(request, "ifGenerationMatch")
  if wanted is None:
    header = request.get_header("x-goog-if-generation-match", None)
    wanted = int(header) if header is not None else None
  if wanted is not None and wanted != generation:
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "conditionNotMet"}})
    return True
  not_wanted = _query_int(request, "ifGenerationNotMatch")
  if not_wanted is not None and current is not None and not_wanted == generation:
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "conditionNotMet"}})
    return True
  meta = _query_int(request, "ifMetagenerationMatch")
  if meta is not None and (current is None or int(current["metageneration"]) != meta):
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({"error": {"code": 412, "message": "conditionNotMet"}})
    return True
  return False


def _current(storage, bucket, name):
  from gcp_storage_emulator.exceptions import NotFound  # pylint: disable=import-outside-toplevel
  try:
    return storage.get_file_obj(bucket, name)
  except NotFound:
    return None


def _upload_name(request):
  if "name" in request.query:
    return request.query["name"][0]
  if isinstance(request.data, dict) and request.data.get("meta"):
    return request.data["meta"].get("name")
  return request.params.get("object_id")


def _guarded_write(handler):
  def write(request, response, storage, *args, **kwargs):
    if request.query.get("uploadType", [""])[0] == "media" and request.data is None:
      request._data = b""  # pylint: disable=protected-access  # An empty object, not a missing body.
    bucket = request.params["bucket_name"]
    name = _upload_name(request)
    if name is not None and _precondition_failed(request, response, _current(storage, bucket, name)):
      return None
    return handler(request, response, storage, *args, **kwargs)
  return write


def _guarded_delete(handler):
  def delete(request, response, storage, *args, **kwargs):
    current = _current(storage, request.params["bucket_name"], request.params["object_id"])
    if current is not None and _precondition_failed(request, response, current):
      return None
    return handler(request, response, storage, *args, **kwargs)
  return delete


def _download(request, response, storage, *args, **kwargs):
  """A media download with the generation header, suffix ranges and read preconditions."""
  del args, kwargs
  bucket, name = request.params["bucket_name"], request.params["object_id"]
  current = _current(storage, bucket, name)
  if current is None:
    response.status = HTTPStatus.NOT_FOUND
    response.json({"error": {"code": 404, "message": "No such object"}})
    return
  not_match = _query_int(request, "ifGenerationNotMatch")
  if not_match is not None and not_match == int(current["generation"]):
    response.status = HTTPStatus.NOT_MODIFIED
    response["x-goog-generation"] = current["generation"]
    return
  if _precondition_failed(request, response, current):
    return
  content = storage.get_file(bucket, name)
  response["x-goog-generation"] = current["generation"]
  response["x-goog-metageneration"] = current["metageneration"]
  size = len(content)
  wanted = request.get_header("range", None)
  match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", wanted or "")
  if match and (match.group(1) or match.group(2)):
    if match.group(1):
      start = int(match.group(1))
      end = min(size, int(match.group(2)) + 1) if match.group(2) else size
    else:
      start, end = max(0, size - int(match.group(2))), size
    if start >= size and size:
      response.status = HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE
      response["Content-Range"] = f"bytes */{size}"
      return
    response.status = HTTPStatus.PARTIAL_CONTENT
    response["Content-Range"] = f"bytes {start}-{max(start, end) - 1}/{size}"
    content = content[start:end]
  response.write_file(content, content_type=current.get("contentType") or "application/octet-stream")


def _get_with_preconditions(handler):
  def get(request, response, storage, *args, **kwargs):
    if request.query.get("alt", [""])[0] == "media":
      return _download(request, response, storage)
    current = _current(storage, request.params["bucket_name"], request.params["object_id"])
    if current is not None and _precondition_failed(request, response, current):
      return None
    return handler(request, response, storage, *args, **kwargs)
  return get


def _bounded_list(handler):
  def ls(request, response, storage, *args, **kwargs):
    handler(request, response, storage, *args, **kwargs)
    start = request.query.get("startOffset", [""])[0]
    end = request.query.get("endOffset", [""])[0]
    if response.status == HTTPStatus.OK and (start or end):
      listing = json.loads(response._content)  # pylint: disable=protected-access
      listing["items"] = [item for item in listing.get("items") or []
                          if item["name"] >= start and (not end or item["name"] < end)]
      response.json(listing)
  return ls


def patch_emulator():
  """Routes the emulator's object handlers through the GCS behaviour above."""
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel
  replaced = {
      objects.insert: _guarded_write(objects.insert),
      objects.xml_upload: _guarded_write(objects.xml_upload),
      objects.download: _download,
      objects.get: _get_with_preconditions(objects.get),
      objects.delete: _guarded_delete(objects.delete),
      objects.ls: _bounded_list(objects.ls),
  }
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler in replaced:
        handlers[method] = replaced[handler]


def serve(port: int, data_dir: str) -> None:
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  patch_emulator()
  create_server("127.0.0.1", port, in_memory=False, data_dir=data_dir).run()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class GcsServer:
  """The server process and the environment that points clients at it."""

  def __init__(self, data_dir: str):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    log = open(os.path.join(data_dir, "server.log"), "wb")  # pylint: disable=consider-using-with
    self._process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(self.port), data_dir],
                                     stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
      try:
        urllib.request.urlopen(self.url + "/", timeout=2).read()
        break
      except OSError:
        if self._process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"the GCS test server did not start; see {data_dir}/server.log") from None
        time.sleep(0.1)

  @property
  def env(self) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_CLOUD_PROJECT": "test-project", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            # A token TensorStore sends as is, instead of looking for credentials the server does not check.
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}

  def create_bucket(self, name: str) -> str:
    body = ('{"name": "%s"}' % name).encode()
    request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test-project", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=10).read()
    return f"gs://{name}"

  def stop(self):
    self._process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
      self._process.wait(timeout=10)
    if self._process.poll() is None:
      self._process.kill()


def _reset_gcs_clients():
  """Forgets gcsfs's cached filesystems, which hold the endpoint they were made with."""
  with contextlib.suppress(ImportError):
    import gcsfs  # pylint: disable=import-outside-toplevel
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
  """The session's GCS server; its environment is set only while a `gcs_bucket` test runs."""
  if os.environ.get("CI"):  # A missing package must fail in CI, not skip.
    import gcp_storage_emulator  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
    import gcsfs  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import
  else:
    pytest.importorskip("gcp_storage_emulator", reason="pip install -e '.[dev]' for the GCS test server")
    pytest.importorskip("gcsfs", reason="pip install -e '.[dev]' for gs:// paths")
  server = GcsServer(str(tmp_path_factory.mktemp("gcs")))
  yield server
  server.stop()


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch):
  """A fresh bucket, as `gs://NAME`, with clients in this process and its children pointed at it."""
  for key, value in gcs_server.env.items():
    monkeypatch.setenv(key, value)
  _reset_gcs_clients()
  yield gcs_server.create_bucket(f"test-{uuid.uuid4().hex[:12]}")
  _reset_gcs_clients()


if __name__ == "__main__":
  serve(int(sys.argv[1]), sys.argv[2])
