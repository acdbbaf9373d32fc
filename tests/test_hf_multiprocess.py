"""Export on 2 processes (2 CPU devices each, jax.distributed on 127.0.0.1) of a checkpoint they saved, and import.

The checkpoint's parameters are split over all 4 devices (FSDP), so each
array's chunks were written by both processes. The export must be written
once, by process 0, be complete when it returns on either process, and be
byte for byte what one process exports from the same checkpoint, both from
`exporter.export` in a program that joined the run and from the command
`python -m mile_jax.hf export`, which joins it through its flags; its tensors
are the saved parameters as `layout.to_hf` lays them out (the layout
tests/test_hf.py checks against transformers). The import command on the
same 2 processes then writes, group by group, the checkpoint that one
process's import writes.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mile_jax.hf import convert as hf
from mile_jax.hf import exporter
from mile_jax.hf import layout as hf_layout
from mile_jax.hf import safetensors_io
from mile_jax.hf.saved_arrays import SavedArrays
from conftest import make_tiny_config
from test_hf_streaming import random_params, write_run_files
import processes  # tests/processes.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each process: join, place the parameters (from params.npz) over a (1, 4, 1) mesh, save them as
# checkpoint 5, call `exporter.export` and print what it returned and what the directory holds then.
WORKER = """
import json, os, sys
import jax, numpy as np
workdir, out, flags = sys.argv[1], sys.argv[2], dict(arg[2:].split("=", 1) for arg in sys.argv[3:])
jax.distributed.initialize(flags["coordinator_address"], num_processes=2, process_id=int(flags["process_id"]))
import flax.linen as nn
import ml_collections
from mile_jax.core import model as model_lib
from mile_jax.core import sharding
from mile_jax.hf import convert as hf
from mile_jax.hf import exporter
from mile_jax.run import checkpoint as checkpoint_lib
with open(os.path.join(workdir, "config.json")) as f:
  config = ml_collections.ConfigDict(json.load(f))
boxed = model_lib.abstract_params(model_lib.DecoderConfig.from_config(config.model))
mesh = sharding.make_mesh((1, 4, 1), jax.devices())
shardings = sharding.logical_shardings(boxed, mesh, config.mesh.rules)
saved = np.load(os.path.join(workdir, "params.npz"))
def place(path, leaf, s):
  value = saved[jax.tree_util.keystr(path)]
  return jax.make_array_from_callback(value.shape, s, lambda index: value[index])
params = jax.tree_util.tree_map_with_path(place, nn.unbox(boxed), shardings)
assert all(a.addressable_shards[0].data.size * 4 == a.size for a in jax.tree.leaves(params) if a.ndim >= 2)
checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, max_to_keep=1,
                                           async_save=False)
checkpointer.save(5, {"params": params, "step": np.int32(5)}, config.to_dict(), {})
checkpointer.close()
files = exporter.export(workdir, out, max_shard_bytes=int(float(flags["max_shard_mb"]) * (1 << 20)))
print("RESULT " + json.dumps({"returned": files, "listed": sorted(os.listdir(out))}), flush=True)
"""
MAX_SHARD_MB = 0.06  # Several shards and an index from the tiny model's weights.



def _run_on_two_processes(args: list[str], env: dict) -> list[tuple[int, str, str]]:
  """(returncode, stdout, stderr) of `python args... --coordinator_address=... --num_processes=2
  --process_id=i` for processes 0 and 1 of one run."""
  address = processes.coordinator_address()
  procs = [subprocess.Popen([sys.executable, *args, f"--coordinator_address={address}", "--num_processes=2",
                             f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  done = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=200)
    finally:
      p.kill()
    done.append((p.returncode, out, err))
  return done


@pytest.mark.slow
def test_two_processes_export_once_what_one_process_exports(tmp_path):
  config = make_tiny_config()
  params = random_params(config, seed=11)
  workdir, out_lib, out_cli = str(tmp_path / "run"), str(tmp_path / "hf_two"), str(tmp_path / "hf_cli")
  write_run_files(workdir, config)
  import jax  # pylint: disable=import-outside-toplevel
  flat = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  np.savez(os.path.join(workdir, "params.npz"), **flat)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  shard = f"--max_shard_mb={MAX_SHARD_MB}"
  saved = _run_on_two_processes(["-c", WORKER, workdir, out_lib, shard], env)
  assert [r[0] for r in saved] == [0, 0], [r[2][-3000:] for r in saved]
  results = [json.loads(r[1].split("RESULT ", 1)[1].splitlines()[0]) for r in saved]
  state = os.path.join(workdir, "checkpoints", "5", "state")
  assert {d for d in os.listdir(state) if d.startswith("ocdbt.process_")} == {"ocdbt.process_0", "ocdbt.process_1"}
  # The command, each process joining through its flags.
  exported = _run_on_two_processes(["-m", "mile_jax.hf", "export", f"--workdir={workdir}", f"--out={out_cli}",
                                    shard], env)
  assert [r[0] for r in exported] == [0, 0], [r[2][-3000:] for r in exported]

  single = str(tmp_path / "hf_one")
  files = exporter.export(workdir, single, max_shard_bytes=int(MAX_SHARD_MB * (1 << 20)))
  assert sum(f.endswith(".safetensors") for f in files) >= 3
  assert results[0]["returned"] == files and results[1]["returned"] == []  # Written by process 0 alone...
  assert results[0]["listed"] == results[1]["listed"] == files  # ...and complete when either returned.
  wrote = [[line for line in r[1].splitlines() if line.startswith("Wrote")] for r in exported]
  assert wrote == [[f"Wrote {out_cli}: {', '.join(files)}"], []]
  for out in (out_lib, out_cli):
    assert sorted(os.listdir(out)) == files
    for name in files:
      with open(os.path.join(out, name), "rb") as a, open(os.path.join(single, name), "rb") as b:
        assert a.read() == b.read(), (out, name)
  got = safetensors_io.read_dir(out_cli)
  for name, value in hf_layout.to_hf(params, config.model.n_layers).items():
    np.testing.assert_array_equal(np.asarray(got[name]), value, err_msg=name)

  # And back: the import command on both processes (its arrays split over their 4 devices, each group
  # written by both) writes the checkpoint one process writes, array for array.
  imported_two, imported_one = str(tmp_path / "imported_two"), str(tmp_path / "imported_one")
  done = _run_on_two_processes(["-m", "mile_jax.hf", "import", f"--hf_dir={out_cli}", f"--workdir={imported_two}"],
                               env)
  assert [r[0] for r in done] == [0, 0], [r[2][-3000:] for r in done]
  hf.import_hf(out_cli, imported_one, echo=lambda *a: None)
  two, one = (_saved_state(os.path.join(d, "checkpoints", "0", "state")) for d in (imported_two, imported_one))
  assert two.keys() == one.keys() and any(k[0] == "opt_state" for k in one)
  for key, value in one.items():
    np.testing.assert_array_equal(two[key], value, err_msg="/".join(key))


def _saved_state(directory: str) -> dict:
  """{key: array or value type} of a saved state, from its files."""
  with open(os.path.join(directory, "_METADATA"), encoding="utf-8") as f:
    tree = json.load(f)["tree_metadata"]
  saved = SavedArrays(directory)
  out = {}
  for entry in tree.values():
    key = tuple(k["key"] for k in entry["key_metadata"])
    kind = entry["value_metadata"]["value_type"]
    out[key] = saved.read(key) if kind == "jax.Array" else np.asarray(kind)
  return out
