"""train.py, eval.py and the export on a gs:// workdir served by the suite's GCS server: a run through
a kill -9 during an asynchronous save, SIGTERM and a damaged newest step logs the losses of an
uninterrupted run, bit for bit, and its checkpoints are read back by eval.py and the export."""

import json
import os
import subprocess
import sys

import pytest
from etils import epath

from mile_jax.evaluation import restore
from mile_jax.run import checkpoint_steps
from test_faults import ROOT, finish, logged_losses, start_train_py, wait_for_step


def garble_in_bucket(step_dir: str) -> list[str]:
  """Overwrites the array data objects of a saved state with other bytes of the same length."""
  garbled = []
  for path in epath.Path(step_dir, "state").glob("ocdbt.process_*/d/*"):
    data = path.read_bytes()
    path.write_bytes(bytes(b ^ 0x5A for b in data))
    garbled.append(path.name)
  return garbled


@pytest.mark.slow
def test_a_run_in_a_bucket_through_faults_matches_an_uninterrupted_one(gcs_bucket, tmp_path):
  straight = str(tmp_path / "straight")
  status, out, err = finish(start_train_py(straight), straight)
  assert status == 0 and not err, (out[-3000:], err)
  expected = logged_losses(straight)

  workdir = f"{gcs_bucket}/runs/faults"
  checkpoints = f"{workdir}/checkpoints"
  logs = str(tmp_path / "bucket_run")

  # kill -9 while step 8 is written in the bucket in the background: its objects are there, its
  # commit_success.txt is not. No reader takes it for a checkpoint.
  proc = start_train_py(workdir, "slow_commit:8", logs=logs)
  wait_for_step(proc, logs, 10)
  proc.kill()
  finish(proc, logs, timeout=60)
  assert checkpoint_steps.numbered_steps(checkpoints) == [4, 8]
  assert checkpoint_steps.readable_steps(checkpoints) == [4]
  assert restore.locate(workdir, None)[2] == 4

  # SIGTERM: the run resumes from step 4 over the unfinished step 8, saves where it stops, exits 0.
  proc = start_train_py(workdir, logs=logs)
  wait_for_step(proc, logs, 10)
  proc.send_signal(15)
  status, out, err = finish(proc, logs, timeout=120)
  assert status == 0 and not err, (out[-3000:], err)
  assert "Taking over the stale lock" in out and f"Resuming from {checkpoints}/4" in out
  stopped_at = logged_losses(workdir)[-1][0]
  assert f"saved checkpoint {checkpoints}/{stopped_at}" in out
  assert checkpoint_steps.readable_steps(checkpoints)[-1] == stopped_at

  # The newest step is damaged: marked (nothing copied), the one before restored, the run finished.
  assert garble_in_bucket(f"{checkpoints}/{stopped_at}")
  previous = checkpoint_steps.readable_steps(checkpoints)[-2]
  status, out, err = finish(start_train_py(workdir, logs=logs), logs)
  assert status == 0 and not err, (out[-3000:], err)
  warnings = [line for line in out.splitlines() if line.startswith("Checkpoint ")]
  assert len(warnings) == 1 and f"restored the previous one, {checkpoints}/{previous}" in warnings[0], warnings
  assert f"marked by {checkpoints}/{stopped_at}.unreadable" in warnings[0]
  assert logged_losses(workdir) == expected  # Steps, order and every loss, bit for bit.
  assert checkpoint_steps.unreadable_steps(checkpoints) == set()  # Saved anew when the run got there.
  assert checkpoint_steps.readable_steps(checkpoints)[-1] == len(expected)
  assert list(epath.Path(workdir, "tensorboard").glob("events.out.tfevents.*"))
  assert not epath.Path(workdir, "lock").exists()

  # eval.py and the export read the bucket.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  result = str(tmp_path / "eval.json")
  run = subprocess.run([sys.executable, "eval.py", "--workdir", workdir, "--tasks", "ppl", "--ppl_batches", "2",
                        "--batch_size", "8", "--output", result, "--compilation_cache_dir", ""],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(result, encoding="utf-8") as f:
    evaluated = json.load(f)
  perplexity = evaluated["tasks"]["ppl"]["metrics"]["perplexity"]["value"]
  assert evaluated["step"] == len(expected) and 1 < perplexity < 512  # Better than chance over 512 ids.
  exported = str(tmp_path / "hf")
  run = subprocess.run([sys.executable, "-m", "mile_jax.hf", "export", "--workdir", workdir, "--out", exported],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "config.json" in os.listdir(exported)
  assert any(name.endswith(".safetensors") for name in os.listdir(exported))
