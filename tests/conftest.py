"""Eight fake CPU devices for every test, set before jax is imported."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import re  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

from object_store import gcs_bucket, gcs_server  # noqa: E402,F401  # The GCS server's fixtures.

os.environ.setdefault("MILE_JAX_CACHE", tempfile.mkdtemp(prefix="mile_jax_cache_"))


def make_tiny_config(**overrides):
  """A small config for tests: 2 layers, d_model 64, vocab 512, seq 32, batch 8."""
  from mile_jax import config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config()
  c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64,
                 init_std=0.02)
  c.data.update(seq_len=32, global_batch_size=8, val_fraction=0.05)
  c.optim.update(learning_rate=3e-3, warmup_steps=5)
  c.train.update(steps=30, log_every=10, eval_every=0, eval_batches=2)
  c.checkpoint.update(every_steps=10, async_save=False)
  # One device: tests of meshes ask for them (mesh.num_devices=0 or explicit devices). Fewer
  # fake-device collectives also keeps the suite fast on 2 cores.
  c.mesh.shape = (-1, 1, 1)
  c.mesh.num_devices = 1
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return c


def count_in_loops(hlo_text: str, is_match) -> tuple[int, int]:
  """(in while-loop bodies, in all) of the compiled HLO's lines for which `is_match(line)` holds."""
  bodies = {b.lstrip("%") for b in re.findall(r"body=(%?[\w.\-]+)", hlo_text)}
  in_loop = total = 0
  for computation in re.split(r"\n\n+", hlo_text.strip()):
    found = sum(1 for line in computation.splitlines() if is_match(line))
    total += found
    if computation.splitlines()[0].split(" ", 1)[0].lstrip("%") in bodies:
      in_loop += found
  return in_loop, total


@pytest.fixture
def tiny_config():
  return make_tiny_config
