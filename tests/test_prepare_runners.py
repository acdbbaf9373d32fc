"""The pod runner (2 processes under jax.distributed) and the Beam runner write the same bytes as
the local runner."""

import os
import subprocess
import sys

import pytest

from mile_jax.data import prepare, shards
from test_prepare import corpus, make_store, tree_bytes  # noqa: F401  # the corpus fixture
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


def test_pod_runner_in_two_processes_writes_the_local_runners_bytes(corpus, tmp_path):
  source, tok = corpus
  make_store(corpus, tmp_path / "local", shard_tokens=SMALL)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  address = processes.coordinator_address()
  procs = [subprocess.Popen([sys.executable, "-c", POD, address, str(i), source, tok.model_path,
                             str(tmp_path / "pod"), str(SMALL)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = processes.outputs_of(procs, timeout=200)
  assert tree_bytes(tmp_path / "pod") == tree_bytes(tmp_path / "local")


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
