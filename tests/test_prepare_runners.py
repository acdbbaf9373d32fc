"""The pod runner (2 processes under jax.distributed) and the Beam runner write the same bytes as
the local runner; two processes on a bucket cache prepare one store together."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mile_jax.data import pipeline, prepare, shards, store
from test_prepare import BATCH, SEED, SEQ, VOCAB, corpus, data_config, make_store, tree_bytes  # noqa: F401
import processes  # tests/processes.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = 1 << 10  # ids per zarr shard: several assembly units to share


POD = """
import sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from mile_jax.data import prepare, shards
from mile_jax.data.tokenizer import load_tokenizer
job = prepare.make_job(shards.Inputs(source=sys.argv[3], val_fraction=0.2), load_tokenizer(sys.argv[4]),
                       add_bos=False, add_eos=True, output=sys.argv[5], shard_tokens=int(sys.argv[6]))
prepare.run_pod(job, workers=1)
"""


def run_in_two_processes(script: str, *args: str) -> list[str]:
  """`script` run by 2 processes of one jax.distributed job (argv: coordinator, process index, *args),
  each on one CPU device: their outputs, stdout and stderr together."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  address = processes.coordinator_address()
  procs = [subprocess.Popen([sys.executable, "-c", script, address, str(i), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  return processes.outputs_of(procs, timeout=200)


def test_pod_runner_in_two_processes_writes_the_local_runners_bytes(corpus, tmp_path):
  source, tok = corpus
  make_store(corpus, tmp_path / "local", shard_tokens=SMALL)
  run_in_two_processes(POD, source, tok.model_path, str(tmp_path / "pod"), str(SMALL))
  assert tree_bytes(tmp_path / "pod") == tree_bytes(tmp_path / "local")


SHARED_CACHE = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from mile_jax import config_lib
from mile_jax.data import pipeline
c = config_lib.base_config().data
c.update(source=sys.argv[3], tokenizer_path=sys.argv[4], cache_dir=sys.argv[5], val_fraction=0.2,
         global_batch_size=%d, segment_documents=True)
data = pipeline.make_data(c, %d, %d, %d)
batch = data.train.batch(3, %d, jax.process_index(), 2)
print(json.dumps({k: v.tolist() for k, v in batch.items()}))
""" % (BATCH, VOCAB, SEQ, SEED, BATCH)


@pytest.mark.slow
def test_two_processes_on_a_bucket_cache_prepare_one_store_and_read_their_rows(corpus, tmp_path, gcs_bucket):
  """A `files:` source with `data.cache_dir` on gs://: the processes prepare one store in the bucket
  together (the pod runner) and each reads its share of the batch that one process on a local cache reads."""
  source, tok = corpus
  cache = f"{gcs_bucket}/cache"
  outputs = run_in_two_processes(SHARED_CACHE, source, tok.model_path, cache)
  stores = {k.split("/")[0] for k in store.list_keys(f"{cache}/stores")}
  assert len(stores) == 1
  assert "manifest.json" in store.list_keys(f"{cache}/stores/{stores.pop()}")
  local = pipeline.make_data(data_config(tmp_path, source=source, tokenizer_path=tok.model_path,
                                         segment_documents=True), VOCAB, SEQ, SEED)
  for p, out in enumerate(outputs):
    got = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))
    want = local.train.batch(3, BATCH, p, 2)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
      np.testing.assert_array_equal(np.asarray(got[key]), value)


def test_beam_direct_runner_writes_the_local_runners_bytes(corpus, tmp_path):
  # Beam lives in its own environment (the [prepare] extra); there .ci/run sets MILE_JAX_TEST_BEAM, and a
  # missing package must fail rather than skip.
  if not os.environ.get("MILE_JAX_TEST_BEAM"):
    pytest.importorskip("apache_beam", reason="pip install '.[prepare]' in an environment of its own")
  from mile_jax.data.prepare import beam  # pylint: disable=import-outside-toplevel

  source, tok = corpus
  make_store(corpus, tmp_path / "local", shard_tokens=SMALL)
  job = prepare.make_job(shards.Inputs(source=source, val_fraction=0.2), tok, add_bos=False, add_eos=True,
                         output=str(tmp_path / "beam"), shard_tokens=SMALL)
  beam.run_beam(job, ["--runner=DirectRunner"])
  assert tree_bytes(tmp_path / "beam") == tree_bytes(tmp_path / "local")
