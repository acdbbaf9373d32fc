"""eval.py on 2 processes x 2 CPU devices (jax.distributed on 127.0.0.1) against one process.

Each process restores the checkpoint onto its own 2 devices, scores a share
of the perplexity batches and of the benchmark's requests, and the shares
meet exactly (evaluation/processes.py); process 0 alone writes the result.
The reference is the same evaluation in this one process on a mesh of the
same shape over 2 devices: the same batches through the same programs, so
every metric must agree to the last bit.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

import conftest
from mile_jax import train_lib
from mile_jax.evaluation import runner
import processes  # tests/processes.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 9 two-choice documents: more scoring batches of 2 rows than processes, shared out unevenly.
PIQA = [("Open a jar", "Twist the lid", "Eat the lid", 0), ("Boil water", "Heat it in a pot", "Freeze it", 0),
        ("Dry hair", "Use a towel", "Use a spoon", 0), ("Cut paper", "Use a fork", "Use scissors", 1),
        ("Light a room", "Turn on the lamp", "Close the door", 0), ("Clean a floor", "Mop it", "Paint it", 0),
        ("Cool tea", "Wait a while", "Add fire", 0), ("Sharpen a pencil", "Use a sharpener", "Use a sponge", 0),
        ("Find north", "Use a compass", "Use a cup", 0)]



@pytest.mark.slow
def test_eval_py_on_two_processes_gives_the_one_process_result(tmp_path):
  workdir = str(tmp_path / "run")
  config = conftest.make_tiny_config(**{"train.steps": 4, "checkpoint.every_steps": 4, "optim.warmup_steps": 2})
  train_lib.Trainer(config, workdir, devices=jax.devices()[:1]).run()
  (tmp_path / "tasks" / "piqa").mkdir(parents=True)
  (tmp_path / "tasks" / "piqa" / "validation.jsonl").write_text("".join(
      json.dumps({"goal": g, "sol1": a, "sol2": b, "label": label}) + "\n" for g, a, b, label in PIQA))
  # 3 perplexity batches: process 0 scores two, process 1 one.
  opts = runner.EvalOptions(workdir=workdir, tasks="ppl,piqa", task_data_dir=str(tmp_path / "tasks"),
                            batch_size=2, ppl_batches=3)

  output = tmp_path / "two.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  address = processes.coordinator_address()
  cmd = [sys.executable, "eval.py", "--workdir", workdir, "--tasks", opts.tasks, "--task_data_dir",
         opts.task_data_dir, "--batch_size", "2", "--ppl_batches", "3", "--output", str(output),
         "--compilation_cache_dir", "", "--coordinator_address", address, "--num_processes", "2"]
  procs = [subprocess.Popen(cmd + ["--process_id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  reference = runner.evaluate(runner.EvalOptions(**{**vars(opts), "devices": jax.devices()[:2]}))
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=240))
    finally:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in logs]

  assert logs[0][0].rstrip().endswith(f"Wrote {output}") and "Wrote" not in logs[1][0]  # Process 0 alone writes.
  result = json.loads(output.read_text())
  assert (result["step"], result["devices"]) == (4, "2 x cpu")
  assert result["tasks"]["ppl"]["num_examples"] == 3 * 2 * 32 and result["tasks"]["piqa"]["num_examples"] == 9
  assert result["tasks"] == reference["tasks"]
