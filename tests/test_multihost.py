"""Multi-process training: how a process joins a run, and 2 processes x 2 CPU devices against 1 x 4."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mile_jax import checkpoint as checkpoint_lib
from mile_jax import config_lib
from mile_jax import distributed
from mile_jax import train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_2_TASKS = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2",
                 "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def dist(**values):
  c = config_lib.base_config().distributed
  c.update(values)
  return c


def test_resolve_alone_explicit_env_and_slurm():
  assert distributed.resolve(dist(), {}) == distributed.Launch("single")
  assert distributed.resolve(dist(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3),
                             {}) == distributed.Launch("explicit", "10.0.0.1:1234", 4, 3)
  env = {"JAX_COORDINATOR_ADDRESS": "h:9", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert distributed.resolve(dist(), env) == distributed.Launch("explicit", "h:9", 2, 1)
  # A config value wins over the environment.
  assert distributed.resolve(dist(process_id=0), env) == distributed.Launch("explicit", "h:9", 2, 0)
  assert distributed.resolve(dist(), SLURM_2_TASKS).method == "slurm"
  assert distributed.resolve(dist(), {**SLURM_2_TASKS, "SLURM_NTASKS": "1"}).method == "single"
  assert distributed.resolve(dist(), {}, tpu_vm=True).method == "tpu_vm"
  # Explicit settings win over SLURM and TPU detection; one process needs no runtime.
  assert distributed.resolve(dist(coordinator_address="h:1", num_processes=2, process_id=0), SLURM_2_TASKS,
                             tpu_vm=True).method == "explicit"
  assert distributed.resolve(dist(coordinator_address="h:1", num_processes=1, process_id=0), {}).method == "single"


@pytest.mark.parametrize("values, env, setting", [
    (dict(coordinator_address="h:1"), {}, "distributed.num_processes"),
    (dict(num_processes=2, process_id=0), {}, "distributed.coordinator_address"),
    (dict(coordinator_address="h:1", num_processes=2), {}, "distributed.process_id"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, "distributed.process_id"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), {}, "distributed.coordinator_address"),
    (dict(coordinator_address="h:1", process_id=0), {"JAX_NUM_PROCESSES": "two"}, "distributed.num_processes"),
])
def test_incomplete_or_bad_settings_name_the_setting(values, env, setting):
  with pytest.raises(config_lib.ConfigError, match=f"^{setting}:"):
    distributed.resolve(dist(**values), env)


def test_initialize_alone_is_a_no_op():
  assert distributed.initialize(dist(), environ={}) == distributed.Launch("single")
  assert not jax.distributed.is_initialized() and jax.process_count() == 1


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tiny_config, tmp_path):
  """train.py in 2 processes x 2 CPU devices (gloo, coordinator on 127.0.0.1), FSDP over all 4
  devices so every parameter is split across the processes, against one process with 4 devices."""
  config = tiny_config(**{"train.steps": 6, "train.log_every": 1, "checkpoint.every_steps": 3,
                          "mesh.shape": (1, 4, 1), "mesh.num_devices": 0})
  reference_dir = str(tmp_path / "one_process")
  # Also fills the data cache ($MILE_JAX_CACHE) that the two processes then read.
  reference = train_lib.Trainer(config, reference_dir, devices=jax.devices()[:4]).run()

  config_json = tmp_path / "config.json"
  config_json.write_text(config.to_json())
  config_file = tmp_path / "from_json.py"
  config_file.write_text("import json\nimport ml_collections\n\n\ndef get_config():\n"
                         f"  with open({str(config_json)!r}) as f:\n"
                         "    return ml_collections.ConfigDict(json.load(f))\n")
  workdir = str(tmp_path / "two_processes")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, "train.py", f"--config={config_file}", f"--workdir={workdir}",
       f"--config.distributed.coordinator_address={address}", "--config.distributed.num_processes=2",
       f"--config.distributed.process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=150)[0])
    finally:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], outputs
  # Only process 0 prints metrics.
  assert "[train] step 6" in outputs[0] and "[train]" not in outputs[1]

  one, two = _losses(reference_dir), _losses(workdir)
  assert [s for s, _, _ in two] == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([l for _, l, _ in two], [l for _, l, _ in one], rtol=1e-6)
  np.testing.assert_allclose([g for _, _, g in two], [g for _, _, g in one], rtol=1e-5)
  assert one[-1][1] < one[0][1] - 0.1  # Training moved the parameters.

  # The 2-process checkpoint restores in this single process onto another mesh.
  restorer = train_lib.Trainer(tiny_config(**{"mesh.shape": (2, 4, 1), "mesh.num_devices": 0}), str(tmp_path / "restore"))
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=3, max_to_keep=3)
  assert checkpointer.all_steps() == [3, 6]
  target = checkpoint_lib.abstract_with_shardings(restorer.abstract_state, restorer.state_shardings)
  restored = checkpointer.restore(6, target)
  assert int(restored.step) == 6
  fresh = train_lib.init_state(restorer.model, restorer.tx, restorer.mesh, restorer.rules, config.data.seq_len,
                               config.seed)
  leaves = [jax.tree.leaves(t.params) for t in (reference, restored, fresh)]
  assert len(leaves[0]) == len(leaves[1]) == len(leaves[2]) > 0
  moved = 0.0
  for ref, got, init in zip(*leaves):
    # Gradients summed across processes (gloo) rather than inside one process differ in rounding
    # only, which Adam's first steps magnify to ~1e-6; training moved the parameters by ~1e-2.
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-5)
    moved = max(moved, float(np.max(np.abs(np.asarray(got) - np.asarray(init)))))
  assert moved > 1e-3
  for ref, got in zip(jax.tree.leaves(reference.opt_state), jax.tree.leaves(restored.opt_state)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-9)
