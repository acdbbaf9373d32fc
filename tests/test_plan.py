"""Will it fit: per-device bytes and FLOPs of the compiled train step against hand-derived values."""

import os
import subprocess
import sys

import jax
import pytest

from mile_jax import plan as plan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny test model (conftest): vocab 512, d_model 64, 2 layers, 4 heads and 2 kv heads of 16, d_ff 128.
V, D, L, H, KV, HD, F, T, B = 512, 64, 2, 4, 2, 16, 128, 32, 8
BLOCK_MATMUL = D * H * HD + 2 * D * KV * HD + H * HD * D + 3 * D * F  # q, k, v, out, gate, up, down
NORMS = 2 * L * D + D  # RMSNorm scales: replicated by the rules.
MATRICES = L * BLOCK_MATMUL + 2 * V * D  # Every matrix has an `embed` axis, sharded over fsdp.
TOKENS = B * T


def hand_param_bytes(fsdp: int, tensor: int) -> int:
  return 4 * (MATRICES // (fsdp * tensor) + NORMS)


def hand_train_flops(remat: str) -> float:
  """2 FLOPs per multiply-add, backward twice the forward; full remat reruns each block's forward.

  Attention as XLA computes it: the full T x T scores (QK^T and AV, 2 * 2 * T * H * HD per token).
  """
  attention = L * 4 * T * H * HD
  forward = 2 * (L * BLOCK_MATMUL + V * D) + attention  # The input embedding is a gather.
  recompute = 2 * L * BLOCK_MATMUL + attention if remat == "full" else 0
  return TOKENS * (3 * forward + recompute)


@pytest.fixture(scope="module")
def plans():
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  cases = {"fsdp4": ((1, 4, 1), "none"), "data4": ((4, 1, 1), "none"), "fsdp2_tensor2": ((1, 2, 2), "none"),
           "fsdp4_full": ((1, 4, 1), "full")}
  out = {}
  for name, (mesh, remat) in cases.items():
    config = make_tiny_config(**{"mesh.shape": mesh, "model.remat": remat})
    out[name] = plan_lib.plan(config, jax.devices()[:4])
  return out


@pytest.mark.parametrize("name, fsdp, tensor", [("fsdp4", 4, 1), ("data4", 1, 1), ("fsdp2_tensor2", 2, 2)])
def test_state_bytes_per_device_match_hand_count(plans, name, fsdp, tensor):
  p = plans[name]
  assert p.num_params == MATRICES + NORMS == 139584
  assert p.params_bytes == hand_param_bytes(fsdp, tensor)
  assert p.grads_bytes == p.params_bytes
  # Adam's two moments per parameter plus int32 step counters.
  assert 2 * p.params_bytes < p.opt_state_bytes <= 2 * p.params_bytes + 4 * 4
  dp = p.mesh_shape[0] * p.mesh_shape[1]
  assert p.batch_bytes == (B // dp) * T * (4 + 4 + 4)  # inputs, targets int32; mask float32
  assert p.tokens_per_step == TOKENS


@pytest.mark.parametrize("name", ["fsdp4", "data4", "fsdp2_tensor2"])
def test_compiled_program_takes_sharded_state_and_donates_it(plans, name):
  """The compiled step's inputs are the shards (not whole arrays) and its new state overwrites the old."""
  p = plans[name]
  state = p.params_bytes + p.opt_state_bytes + 4  # + the int32 step
  assert p.argument_bytes == state + p.batch_bytes
  assert p.alias_bytes == state
  assert p.peak_bytes == p.argument_bytes + p.output_bytes - p.alias_bytes + p.temp_bytes
  assert p.temp_bytes >= p.params_bytes  # The gradients live among the temporaries.


@pytest.mark.parametrize("name, remat", [("fsdp4", "none"), ("data4", "none"), ("fsdp2_tensor2", "none"),
                                         ("fsdp4_full", "full")])
def test_flops_per_step_match_hand_count(plans, name, remat):
  p = plans[name]
  # Above the matmuls and attention: element-wise work (norms, softmax, loss) and the AdamW update,
  # done once per copy of a parameter; tens of FLOPs per parameter, far below full remat's extra
  # 2 * L * BLOCK_MATMUL + attention per token (over 290 per parameter here).
  extra = p.compiled_flops_per_step - hand_train_flops(remat)
  assert 0 <= extra <= 200 * p.num_params, p.compiled_flops_per_step
  # The model's count differs from the hand one only by the causal half of attention.
  causal_saving = 3 * TOKENS * L * 2 * T * H * HD
  assert p.model_flops_per_step == pytest.approx(hand_train_flops("none") - causal_saving, rel=1e-12)


def test_verdict_threshold(plans):
  p = plans["fsdp4"]
  assert p.fits(p.peak_bytes) and not p.fits(p.peak_bytes - 1)
  assert p.fits(p.peak_bytes / 0.5, usable_fraction=0.5) and not p.fits(p.peak_bytes / 0.5 - 2, usable_fraction=0.5)


def _cli(*args):
  tiny = ["--config.model.vocab_size=512", "--config.model.d_model=64", "--config.model.n_layers=2",
          "--config.model.d_ff=128", "--config.model.max_seq_len=64", "--config.data.seq_len=32"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "mile_jax.plan", "--config=configs/default.py", *tiny, *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)


def test_cli_prints_table_and_verdict():
  fits = _cli("--mesh=1,2,1", "--device_memory_gib=16")
  assert fits.returncode == 0, fits.stderr
  assert "data 1 x fsdp 2 x tensor 1 = 2 devices" in fits.stdout
  assert "16 x 32 = 512 tokens" in fits.stdout
  row = [l for l in fits.stdout.splitlines() if l.startswith("| none | 1 |")]
  assert len(row) == 1 and row[0].rstrip().endswith("| fits |")
  # Parameters per device: 4 kv heads (the default config's), matrices halved over fsdp 2.
  matrices = 2 * (4 * 64 * 64 + 3 * 64 * 128) + 2 * 512 * 64
  assert f"| {4 * (matrices // 2 + 5 * 64) / 1024:.2f} KiB |" in row[0]

  tiny_memory = _cli("--mesh=1,2,1", "--device_memory_gib=0.0001")
  assert tiny_memory.returncode == 1 and "| does not fit |" in tiny_memory.stdout


@pytest.mark.parametrize("args, setting", [
    (["--mesh=1,8"], "--mesh"),
    (["--mesh=1,3,1"], "data.global_batch_size"),  # 16 rows do not split over 3 devices.
    (["--mesh=1,2,1", "--remat=some"], "model.remat"),
    (["--mesh=1,1,3"], "--mesh: (1, 1, 3) splits dimension 0 (size 512) of params/embed/embedding over tensor 3"),
    (["--mesh=1,2,1", "--microbatches=x"], "--microbatches: must be comma-separated positive integers"),
    (["--mesh=1,2,1", "--config.model.d_modle=64"], "--config.model.d_modle: no such setting in configs/default.py"),
])
def test_cli_rejects_bad_settings_before_compiling(args, setting):
  result = _cli(*args)
  assert result.returncode == 2
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(f"Config error: {setting}")
  assert "compiling" not in result.stderr


@pytest.mark.parametrize("segments", [False, True])
def test_eval_plan_bytes_match_hand_count(segments):
  """The scoring program (`plan --eval`) on 2 data-parallel devices, the model configured for splash:
  its inputs are the replicated parameters and this device's half of the batch. The tree runs XLA's
  attention whatever the config says, and its temporaries hold at least one layer's float32
  (rows, heads, W, W) scores; the segment layout runs the configured kernel, which holds none."""
  from conftest import make_tiny_config  # pylint: disable=import-outside-toplevel
  from mile_jax import eval_plan  # pylint: disable=import-outside-toplevel
  config = make_tiny_config(**{"mesh.shape": (2, 1, 1), "model.attention": "splash"})
  batch, width, scored = 4, 1024, 16  # two splash blocks of 512 per row: no padding
  p = eval_plan.plan_eval(config, jax.devices()[:2], batch_size=batch, width=width, scored=scored,
                          segments=segments)
  assert (p.layout, p.attention) == (("segments", "splash") if segments else ("tree", "xla"))
  assert p.params_bytes == 4 * (MATRICES + NORMS)
  rows = batch // 2
  assert p.argument_bytes == p.params_bytes + 3 * rows * width * 4 + 2 * scored * 4
  # log-probabilities float32, greedy flags bool, and the output tuple's two 8-byte pointers
  assert p.output_bytes == scored * (4 + 1) + 2 * 8
  scores = rows * H * width * width * 4
  assert (p.temp_bytes < scores) if segments else (p.temp_bytes >= scores)
