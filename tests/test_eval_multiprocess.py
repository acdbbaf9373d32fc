"""Log-likelihood scoring and generation in 2 processes x 2 CPU devices against one process, request
by request and in the metrics (evaluation/processes.py)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import eval_processes_worker as worker
from mile_jax.core import sharding
from mile_jax.evaluation import scoring
import processes  # tests/processes.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _two_processes(tmp_path) -> list[dict]:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  address = processes.coordinator_address()
  outputs = [str(tmp_path / f"process{i}.json") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "eval_processes_worker.py"), address,
                             str(i), outputs[i]], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = processes.outputs_of(procs, timeout=240)
  out = []
  for path in outputs:
    with open(path, encoding="utf-8") as f:
      out.append(json.load(f))
  return out


def _accuracy(results, pairs) -> float:
  """acc over documents (requests sharing a context), as `scoring.multiple_choice` with gold 0."""
  docs: dict = {}
  for (logp, _), (context, _) in zip(results, pairs):
    docs.setdefault(tuple(context), []).append(logp)
  return float(np.mean([scoring.multiple_choice(lls, ["x"] * len(lls), 0)["acc"] for lls in docs.values()]))


@pytest.mark.slow
def test_two_processes_score_what_one_process_scores(tmp_path):
  """On the mesh that spans both processes (training's) each feeds its rows of every batch; on its
  own devices (eval.py) each scores every other batch. Either way every process ends with every
  request's score, bit for bit what one process computes on a mesh of the same shape (the same
  batches through the same program), and so the same metrics."""
  two = _two_processes(tmp_path)
  pairs = worker.requests()
  for key, devices in (("spanning", 4), ("local", 2)):
    one, stats = worker.score(sharding.make_mesh((devices, 1, 1), jax.devices()[:devices]))
    one = [(float.fromhex(x), g) for x, g in one]
    for process in two:
      got = [(float.fromhex(x), g) for x, g in process[key]]
      assert got == one, key
      assert _accuracy(got, pairs) == _accuracy(one, pairs)
    # Each process laid out a share of the rows: together, every token once.
    shares = [process[f"{key}_tokens"] for process in two]
    assert min(shares) > 0 and sum(shares) == stats["tokens"], (key, shares, stats)

  # Generation on each process's own devices (eval.py): the batches shared out, every prompt's tokens on both.
  one, batches = worker.generate(sharding.make_mesh((2, 1, 1), jax.devices()[:2]))
  assert len(one) == len(worker.prompts()) and len({len(t) for t in one}) > 1
  for process in two:
    assert process["generated"] == one
  assert [process["generated_batches"] for process in two] == [(batches + 1) // 2, batches // 2]
  # On the mesh that spans both processes (training's): each feeds its rows, every batch together.
  one, _ = worker.generate(sharding.make_mesh((4, 1, 1), jax.devices()[:4]))
  for process in two:
    assert process["generated_spanning"] == one
