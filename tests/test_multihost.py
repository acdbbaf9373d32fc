"""Multi-process training: how a process joins a run, and 2 processes x 2 CPU devices against 1 x 4."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mile_jax import config_lib
from mile_jax import train_lib
from mile_jax.core import step as step_lib
from mile_jax.run import checkpoint as checkpoint_lib
from mile_jax.run import distributed
import processes  # tests/processes.py

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



def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, f) if r["split"] == "train"]


def _train_py_in_two_processes(config_file, workdir) -> list[str]:
  """train.py in 2 processes x 2 CPU devices (gloo, coordinator on 127.0.0.1): their outputs."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  address = processes.coordinator_address()
  procs = [subprocess.Popen(
      [sys.executable, "train.py", f"--config={config_file}", f"--workdir={workdir}",
       f"--config.distributed.coordinator_address={address}", "--config.distributed.num_processes=2",
       f"--config.distributed.process_id={i}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = processes.outputs_of(procs, timeout=200)
  return outputs


def _flat(tree):
  return {"/".join(str(k) for k in path): np.asarray(jax.device_get(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# The error model of comparing 2 processes with 1. Every step sums the 8 x 32 tokens' gradients (and
# loss terms) in another order: the sums differ by about u sqrt(n) of their largest term, u = 2^-24.
STEPS = 6
ROUNDING = 2.0 ** -24 * np.sqrt(8 * 32)  # ~9.5e-7
# Losses and gradient norms: one such sum each, x4 for what the earlier steps' rounding leaves in the
# parameters. Adam's moments: averages of STEPS gradients (squared for nu: x2), errors adding at worst
# linearly, relative to the leaf's largest entry (an entry near 0 can lose all its digits). Parameters:
# Adam divides each entry's update by that entry's own gradient scale, which amplifies the gradient's
# rounding by max|g| / |g_i|; over a leaf (L2) that stays below 100 ROUNDING of the distance moved
# unless gradients sit within a few ROUNDING of 0. Restoring the wrong step or misplacing a shard
# is off by the order of the distance moved itself.
LOSS_RTOL = 4 * ROUNDING
MOMENT_TOL = 2 * STEPS * ROUNDING
PARAMS_TOL = 100 * ROUNDING


@pytest.mark.slow
def test_two_processes_match_one_and_agree_on_the_checkpoint_they_resume_from(tiny_config, tmp_path):
  """train.py in 2 processes x 2 CPU devices, FSDP over all 4 devices so every parameter is split
  across the processes, against one process with 4 devices; its checkpoint restores in one process
  onto another mesh. Then step 6's shards of process 1 are garbled: only process 1 can see it, yet
  both resume from step 3 and end where the uninterrupted run did."""
  config = tiny_config(**{"train.steps": STEPS, "train.log_every": 1, "checkpoint.every_steps": 3,
                          "mesh.shape": (1, 4, 1), "mesh.num_devices": 0, "checkpoint.async_save": True})
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
  outputs = _train_py_in_two_processes(config_file, workdir)
  # Only process 0 prints metrics.
  assert "[train] step 6" in outputs[0] and "[train]" not in outputs[1]

  one, two = _losses(reference_dir), _losses(workdir)
  assert [s for s, _, _ in two] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([l for _, l, _ in two], [l for _, l, _ in one], rtol=LOSS_RTOL)
  np.testing.assert_allclose([g for _, _, g in two], [g for _, _, g in one], rtol=LOSS_RTOL)
  assert one[-1][1] < one[0][1] - 0.1  # Training moved the parameters.

  # The 2-process checkpoint restores in this single process onto another mesh.
  restorer = train_lib.Trainer(tiny_config(**{"mesh.shape": (2, 4, 1), "mesh.num_devices": 0}),
                               str(tmp_path / "restore"))
  checkpoints = os.path.join(workdir, "checkpoints")
  target = checkpoint_lib.abstract_with_shardings(restorer.abstract_state, restorer.state_shardings)
  def restore(step):
    checkpointer = checkpoint_lib.Checkpointer(checkpoints, every_steps=3, max_to_keep=3)
    assert checkpointer.all_steps() == [3, 6]
    return _flat(checkpointer.restore(step, target))
  restored = restore(6)
  fresh = _flat(step_lib.init_state(restorer.model, restorer.tx, restorer.mesh, restorer.rules,
                                     config.data.seq_len, config.seed))
  expected = _flat(reference)
  assert sorted(restored) == sorted(expected) and int(restored[".step"]) == STEPS
  for name, ref in expected.items():
    got = restored[name]
    if not np.issubdtype(ref.dtype, np.floating):
      np.testing.assert_array_equal(got, ref, err_msg=name)
    elif name.startswith(".params"):
      moved = np.linalg.norm(ref.astype(np.float64) - fresh[name])
      assert moved > 1e-3, name  # Training moved every parameter.
      assert np.linalg.norm(got.astype(np.float64) - ref) <= PARAMS_TOL * moved, name
    else:
      np.testing.assert_allclose(got, ref, rtol=0, atol=MOMENT_TOL * np.max(np.abs(ref)), err_msg=name)

  for name in os.listdir(os.path.join(checkpoints, "6", "state", "ocdbt.process_1", "d")):
    path = os.path.join(checkpoints, "6", "state", "ocdbt.process_1", "d", name)
    with open(path, "r+b") as f:
      f.write(os.urandom(os.path.getsize(path)))
  outputs = _train_py_in_two_processes(config_file, workdir)
  assert (f"Checkpoint {checkpoints}/6 (unreadable on process 1) is unreadable; restored the previous one, "
          f"{checkpoints}/3, instead") in outputs[0], outputs[0]
  assert all(f"Resuming from {checkpoints}/3" in o for o in outputs), outputs
  assert _losses(workdir) == two  # Steps 4 to 6 again, bit for bit.
  assert not os.path.exists(f"{checkpoints}/6.unreadable")  # Marked, then replaced by the resumed run's step 6.
  again = restore(6)
  for name, value in restored.items():
    np.testing.assert_array_equal(again[name], value, err_msg=name)
