"""A failure on one process of a multi-process run stops every process within seconds, with one line."""

import errno
import os
import re
import subprocess
import sys
import time

import pytest

import processes  # tests/processes.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# train.py whose Orbax save of step $MILE_JAX_FAIL_STEP fails on this process only (a full disk).
TRAIN_PY_FAILING_SAVE = """
import errno, os, runpy, sys
import orbax.checkpoint as ocp
failing = int(os.environ["MILE_JAX_FAIL_STEP"])
save = ocp.CheckpointManager.save
def full_disk_save(self, step, *args, **kwargs):
  if step == failing:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))
  return save(self, step, *args, **kwargs)
ocp.CheckpointManager.save = full_disk_save
sys.argv[0] = "train.py"
runpy.run_path("train.py", run_name="__main__")
"""

OVERRIDES = {
    "model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
    "model.n_kv_heads": 2, "model.d_ff": 128, "model.max_seq_len": 64, "data.seq_len": 32,
    "data.global_batch_size": 8, "train.steps": 12, "train.log_every": 1, "train.eval_every": 0,
    "checkpoint.every_steps": 3, "optim.warmup_steps": 2, "mesh.shape": "(1,4,1)", "mesh.num_devices": 0,
}



@pytest.mark.slow
def test_a_save_failing_on_process_1_stops_both_processes_within_seconds(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "MILE_JAX_FAIL_STEP": "6"}
  address = processes.coordinator_address()
  workdir = str(tmp_path / "run")
  procs = []
  for i in range(2):
    program = ["-c", TRAIN_PY_FAILING_SAVE] if i == 1 else ["train.py"]
    args = [sys.executable, *program, "--config", "configs/default.py", f"--workdir={workdir}",
            f"--config.distributed.coordinator_address={address}", "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}", *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
    procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  ended = [None, None]
  deadline = time.monotonic() + 240
  while None in ended and time.monotonic() < deadline:
    for i, p in enumerate(procs):
      if ended[i] is None and p.poll() is not None:
        ended[i] = time.monotonic()
    time.sleep(0.05)
  outputs = []
  for p in procs:
    p.kill()
    outputs.append(p.communicate())
  assert None not in ended, outputs
  assert [p.returncode for p in procs] == [1, 1], outputs
  errors = [[line for line in re.split(r"[\r\n]", err) if line.strip() and not line.startswith("train:")]
            for _, err in outputs]
  assert len(errors[1]) == 1 and errors[1][0].startswith(
      f"Checkpoint error: could not save step 6 to {workdir}/checkpoints/6 ({os.strerror(errno.ENOSPC)}"), errors
  assert errors[0] == [f"Training stopped: process 1: {errors[1][0]}"], (errors, outputs[0][0][-2000:], outputs[0][1][-3000:])
  # Process 0 was waiting for process 1 (in a collective or a barrier of the save) and stopped at once;
  # without the announcement it would wait for the coordination service's heartbeat timeout (100 s).
  assert ended[0] - ended[1] < 10, ended
