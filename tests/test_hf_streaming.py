"""Streamed export and lazy import: the same tensors as the whole-tree conversion, one array at a time.

The reference is the parameters themselves (random NumPy arrays saved in a
checkpoint), converted by `layout.to_hf` as a whole tree: the layout that
tests/test_hf.py checks against transformers' LlamaForCausalLM. The files
are read back with the `safetensors` package (the reference reader) where it
is installed.
"""

import json
import os
import re
import weakref

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest

from mile_jax.core import model as model_lib
from mile_jax.core import optim
from mile_jax.core import sharding
from mile_jax.core import step as step_lib
from mile_jax.data import corpus as corpus_lib
from mile_jax.data import tokenizer as tokenizer_lib
from mile_jax.hf import exporter
from mile_jax.hf import layout as hf_layout
from mile_jax.hf import safetensors_io
from mile_jax.hf.layout import HFError
from mile_jax.hf.saved_arrays import SavedArrays
from mile_jax.run import checkpoint as checkpoint_lib
from conftest import make_tiny_config

N_LAYERS = 3


def random_params(config, seed: int):
  """Unrolled float32 parameters of `config` (NumPy), standard normal."""
  rng = np.random.default_rng(seed)
  cfg = model_lib.DecoderConfig.from_config(config.model)
  abstract = model_lib.unrolled_layers(nn.unbox(model_lib.abstract_params(cfg)), cfg.n_layers)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)


def write_run_files(workdir: str, config) -> None:
  """The workdir's config.json and tokenizer.model (a 512-piece BPE model of the built-in corpus)."""
  cache = os.environ["MILE_JAX_CACHE"]
  tokenizer = tokenizer_lib.train_tokenizer(
      corpus_lib.load_corpus(config.data, cache).train[:400], config.model.vocab_size,
      os.path.join(cache, "tokenizers"), corpus_key="hf-streaming")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, "tokenizer.model"), "wb") as f:
    f.write(tokenizer.serialized_model())


def write_run(workdir: str, config, params, step: int = 5) -> None:
  """A workdir as train.py leaves it; `params` unrolled, saved in `config`'s layer layout."""
  cfg = model_lib.DecoderConfig.from_config(config.model)
  saved = model_lib.with_layout(params, cfg.scan_layers)
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  state = step_lib.TrainState(step=np.int32(step), params=saved, opt_state=tx.init(saved))
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, max_to_keep=1,
                                             async_save=False)
  checkpointer.save(step, state, json.loads(config.to_json_best_effort()), {})
  checkpointer.close()
  write_run_files(workdir, config)


@pytest.fixture(scope="module", params=["unrolled", "scanned"])
def run(request, tmp_path_factory):
  """(workdir, config, unrolled params) of a 3-layer run saved in either layer layout."""
  config = make_tiny_config(**{"model.n_layers": N_LAYERS, "model.scan_layers": request.param == "scanned"})
  params = random_params(config, seed=3)
  workdir = str(tmp_path_factory.mktemp(request.param) / "run")
  write_run(workdir, config, params)
  return workdir, config, params


def read_back(directory: str) -> dict[str, np.ndarray]:
  """The directory's tensors, through the `safetensors` package when installed (float32)."""
  files = safetensors_io.weight_files(directory)
  try:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  except ImportError:
    load_file = None
  out = {}
  for path in files:
    first = safetensors_io.read_file(path)
    bf16 = any(t.dtype == np.dtype(ml_dtypes.bfloat16) for t in first.values())
    out.update(load_file(path) if load_file and not bf16 else {k: np.asarray(v) for k, v in first.items()})
  return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_export_equals_the_whole_tree_conversion(run, tmp_path, monkeypatch, dtype):
  """Shards of at most 40 KB (tensors of the layers split across them) written in blocks of
  1000 bytes (the embedding's 256-byte rows in blocks of 3 and a remainder) hold the saved
  parameters bit for bit, as `layout.to_hf` of the whole tree lays them out."""
  workdir, config, params = run
  monkeypatch.setattr(exporter, "BLOCK_BYTES", 1000)
  out = str(tmp_path / "hf")
  limit = 40_000 // (2 if dtype == "bfloat16" else 1)
  files = exporter.export(workdir, out, dtype=dtype, max_shard_bytes=limit)
  shards = [f for f in files if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f)]
  assert len(shards) >= 4 and safetensors_io.INDEX_FILE in files
  with open(os.path.join(out, safetensors_io.INDEX_FILE), encoding="utf-8") as f:
    index = json.load(f)
  got = read_back(out)
  want = {k: v.astype(exporter.DTYPES[dtype]) for k, v in hf_layout.to_hf(params, N_LAYERS).items()}
  assert sorted(got) == sorted(want) == sorted(index["weight_map"])
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in want.values())
  for name, value in want.items():
    assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
    assert np.array_equal(got[name].view(np.uint8), value.view(np.uint8)), name
  for shard in shards:  # Within the limit (plus the header), unless one tensor alone exceeds it.
    held = [n for n, f in index["weight_map"].items() if f == shard]
    assert len(held) == 1 or os.path.getsize(os.path.join(out, shard)) <= limit + 4096, shard


def test_export_reads_each_saved_array_once_and_holds_one(run, tmp_path, monkeypatch):
  """Every parameter array of the checkpoint is read once, and none is still alive when the next is read."""
  workdir, _, params = run
  live, reads, most = set(), [], [0]
  original = SavedArrays.read

  def tracked(self, key):
    array = original(self, key)
    reads.append(key)
    live.add(id(array))
    most[0] = max(most[0], len(live))
    weakref.finalize(array, live.discard, id(array))
    return array
  monkeypatch.setattr(SavedArrays, "read", tracked)
  exporter.export(workdir, str(tmp_path / "hf"))
  saved = SavedArrays(os.path.join(workdir, "checkpoints", "5", "state"))
  assert sorted(reads) == sorted(k for k in saved.keys if k[0] == "params")
  assert len(reads) == (len(jax.tree.leaves(params)) if "layer_0" in str(reads) else 9 + 3)
  assert most[0] == 1


def test_export_of_a_checkpoint_that_config_json_does_not_describe(run, tmp_path):
  workdir, config, _ = run
  other = config.copy_and_resolve_references()
  other.model.d_ff = 2 * config.model.d_ff
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(other.to_json_best_effort(indent=2))
  try:
    with pytest.raises(HFError, match=r"config\.json: checkpoint .* has params/.*mlp.* of shape .*use the config"):
      exporter.export(workdir, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf") and not os.path.exists(str(tmp_path / "hf") + ".tmp-export")
  finally:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))


def _mappings(path: str) -> int:
  with open("/proc/self/maps", encoding="utf-8") as f:
    return sum(1 for line in f if line.rstrip().endswith(path))


def test_import_places_each_device_slice_and_keeps_no_file_mapped(run, tmp_path):
  """`load_params` + `place` onto a (1, 2, 2) mesh: every device holds its slice of the saved
  parameters, and no safetensors file is still mapped once the arrays are placed."""
  workdir, config, params = run
  out = str(tmp_path / "hf")
  exporter.export(workdir, out, max_shard_bytes=60_000)
  cfg = model_lib.DecoderConfig.from_config(config.model)
  boxed = model_lib.abstract_params(cfg)
  mesh = sharding.make_mesh((1, 2, 2), jax.devices()[:4])
  shardings = sharding.logical_shardings(boxed, mesh, config.mesh.rules)
  tree = hf_layout.load_params(out, nn.unbox(boxed), cfg.n_layers, cfg.head_dim)
  placed = hf_layout.place(tree, shardings)
  files = safetensors_io.weight_files(out)
  if os.path.exists("/proc/self/maps"):
    assert sum(_mappings(f) for f in files) == 0
  want = model_lib.with_layout(params, cfg.scan_layers)
  for (path, array), expected, wanted in zip(jax.tree_util.tree_leaves_with_path(placed), jax.tree.leaves(want),
                                             jax.tree.leaves(shardings)):
    assert array.sharding == wanted
    for shard in array.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index], err_msg=jax.tree_util.keystr(path))
  assert any(len({str(s.index) for s in a.addressable_shards}) > 1 for a in jax.tree.leaves(placed))  # Really split.


def test_saved_arrays_are_read_in_slabs_of_whole_chunks(tmp_path, monkeypatch):
  """An array saved from 4 devices, its columns split (chunks of 10 columns), is read in slabs of whole
  chunks along the columns, at most `SLAB_BYTES` each where a chunk allows, and equals what was saved."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from mile_jax.hf import saved_arrays  # pylint: disable=import-outside-toplevel
  value = np.arange(12 * 40, dtype=np.float32).reshape(12, 40) * 0.5
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("x",))
  placed = jax.device_put(value, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x")))
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(tmp_path / "state"), {"params": {"w": placed}})
  saved = SavedArrays(str(tmp_path / "state"))
  boxes = []
  real_open = saved.open

  def spied_open(key):
    array = real_open(key)

    class Spy:  # The array, recording the boxes read from it.
      shape, dtype, chunk_layout = array.shape, array.dtype, array.chunk_layout

      def __getitem__(self, box):
        boxes.append(box)
        return array[box]
    return Spy()
  monkeypatch.setattr(saved, "open", spied_open)
  # 12 rows x 10 columns x 4 bytes = 480 bytes a chunk: 1000 bytes hold two chunks, 100 bytes less than one.
  for slab_bytes, starts in ((1000, [0, 20]), (100, [0, 10, 20, 30]), (1 << 20, [0])):
    boxes.clear()
    monkeypatch.setattr(saved_arrays, "SLAB_BYTES", slab_bytes)
    got = saved.read(("params", "w"))
    assert got.dtype == np.float32 and np.array_equal(got, value)
    assert [b[1].start for b in boxes] == starts and all(b[0] == slice(None) for b in boxes)
    assert [b[1].stop for b in boxes] == starts[1:] + [40]
