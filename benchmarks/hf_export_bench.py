"""Peak host memory and time of `python -m mile_jax.hf export` and `import` at three model sizes.

    python benchmarks/hf_export_bench.py --models default 50m 1b --root /tmp/hf_bench

For each model a run with random float32 parameters is written (a checkpoint
holding `params` and `step` only: export reads nothing else), saved from
--devices CPU devices in FSDP as a run on them saves it, then measured,
each in a fresh process:

- export: the command line, float32, default --max_shard_mb;
- place: `layout.load_params` + `layout.place` onto this process's devices,
  what `import` and `init.from_hf` do to read the weights;
- import: the command line; it writes the train state (parameters, two Adam
  moments, step) one group of arrays at a time, each group at most the
  largest array (`checkpoint_stream`).

Peak RSS is the process's VmHWM after the command, reset (/proc/self/clear_refs)
once the modules are imported, JAX's CPU backend is started and has compiled
one trivial program (XLA's compiler keeps about 40 MiB after its first
compilation whatever the model: a fixed cost of any command that compiles);
the baseline is VmRSS at that moment. On a CPU backend the arrays the devices
hold are host memory too, so for `place` and `import` the table also gives
the peak less those arrays (for import, one group: the largest array). The
criterion: peak - baseline (less the placed arrays) below twice the largest
tensor held at once: the largest saved array for export, the largest
transformers tensor in float32 for place, the larger of the two for import,
which writes each saved array whole.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# step_bench.py's 50M model: 10 layers of d_model 512, a 16k vocabulary.
MODEL_50M = dict(vocab_size=16384, d_model=512, n_layers=10, n_heads=8, n_kv_heads=8, d_ff=1536, max_seq_len=256)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=["default", "50m", "1b"], choices=["default", "50m", "1b"])
  p.add_argument("--root", default="/tmp/hf_bench", help="where the runs and exports go (removed afterwards)")
  p.add_argument("--skip_import_for", nargs="*", default=[])
  p.add_argument("--devices", type=int, default=8, help="CPU devices the checkpoint is saved from, in FSDP: "
                 "each array's chunks are its shards, as a run on that many devices saves them")
  p.add_argument("--keep", action="store_true", help="keep --root")
  p.add_argument("--_child", nargs=argparse.REMAINDER, default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def config_for(name: str):
  from mile_jax import config_lib  # pylint: disable=import-outside-toplevel
  if name == "1b":
    return config_lib.paper_config("1b")
  c = config_lib.base_config()
  if name == "50m":
    c.model.update(**MODEL_50M)
  return c


def _status(field: str) -> int:
  with open("/proc/self/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {field} in /proc/self/status")


def _tokenizer(vocab_size: int, cache: str):
  """A BPE SentencePiece model of `vocab_size` pieces trained on pseudo-words (cached)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mile_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  words = ["".join(rng.choice(letters, int(n))) for n in rng.integers(2, 9, 60_000)]
  texts = [" ".join(rng.choice(words, 200)) for _ in range(3000)]
  return tokenizer_lib.train_tokenizer(texts, vocab_size, cache, corpus_key="hf-bench-words")


def make_run(name: str, workdir: str, cache: str) -> None:
  """A workdir with config.json, tokenizer.model and checkpoint 1 of random float32 parameters."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mile_jax.core import model as model_lib  # pylint: disable=import-outside-toplevel
  from mile_jax.run import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  config = config_for(name)
  cfg = model_lib.DecoderConfig.from_config(config.model)
  rng = np.random.default_rng(0)
  abstract = nn.unbox(model_lib.abstract_params(cfg))
  from mile_jax.core import sharding  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh((1, -1, 1), jax.devices())
  shardings = sharding.logical_shardings(model_lib.abstract_params(cfg), mesh, config.mesh.rules)

  def draw(a, s):
    value = 0.02 * rng.standard_normal(a.shape, np.float32)
    return jax.make_array_from_callback(a.shape, s, lambda index: value[index])
  params = jax.tree.map(draw, abstract, shardings)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, max_to_keep=1,
                                             async_save=False)
  checkpointer.save(1, {"params": params, "step": np.int32(1)}, json.loads(config.to_json_best_effort()), {})
  checkpointer.close()
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, "tokenizer.model"), "wb") as f:
    f.write(_tokenizer(config.model.vocab_size, cache).serialized_model())


def child(argv: list[str]) -> None:
  """Measures one command in this process; prints a JSON line."""
  what, args = argv[0], argv[1:]
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mile_jax.hf import convert  # pylint: disable=import-outside-toplevel
  if what == "make":
    make_run(*args)
    return
  jax.devices()
  jax.jit(lambda x: x + 1)(np.float32(0)).block_until_ready()  # XLA's compiler, kept by any command that compiles.
  baseline = _status("VmRSS")
  with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
    f.write("5")  # Resets VmHWM to the current RSS.
  start = time.perf_counter()
  placed = 0
  if what == "place":
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    from mile_jax.core import model as model_lib  # pylint: disable=import-outside-toplevel
    from mile_jax.core import sharding  # pylint: disable=import-outside-toplevel
    from mile_jax.hf import layout as hf_layout  # pylint: disable=import-outside-toplevel
    hf_dir, name = args
    config = config_for(name)
    cfg = model_lib.DecoderConfig.from_config(config.model)
    boxed = model_lib.abstract_params(cfg)
    mesh = sharding.make_mesh((1, -1, 1), jax.devices())
    tree = hf_layout.load_params(hf_dir, nn.unbox(boxed), cfg.n_layers, cfg.head_dim, echo=lambda _: None)
    arrays = hf_layout.place(tree, sharding.logical_shardings(boxed, mesh, config.mesh.rules))
    jax.block_until_ready(arrays)
    placed = sum(int(np.prod(a.shape)) * 4 for a in jax.tree.leaves(arrays))
  else:
    sys.argv = ["mile_jax.hf", what, *args]
    convert._define_flags()  # pylint: disable=protected-access
    try:
      from absl import app  # pylint: disable=import-outside-toplevel
      app.run(convert.main)
    except SystemExit as e:
      if e.code not in (0, None):
        raise
  seconds = time.perf_counter() - start
  print("RESULT " + json.dumps({"baseline": baseline, "peak": _status("VmHWM"), "seconds": seconds,
                                "placed": placed}), flush=True)


def run_child(*argv: str, devices: int = 1) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child", *argv], cwd=ROOT, check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env).stdout
  lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
  return json.loads(lines[-1][len("RESULT "):]) if lines else {}


def largest(name: str) -> tuple[int, int, int]:
  """(parameters, largest saved array, largest transformers tensor) in float32 bytes or count."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mile_jax.core import model as model_lib  # pylint: disable=import-outside-toplevel
  cfg = model_lib.DecoderConfig.from_config(config_for(name).model)
  abstract = nn.unbox(model_lib.abstract_params(cfg))
  sizes = [int(np.prod(a.shape)) for a in jax.tree.leaves(abstract)]
  unrolled = [int(np.prod(a.shape)) for a in jax.tree.leaves(model_lib.unrolled_layers(abstract, cfg.n_layers))]
  return sum(sizes), 4 * max(sizes), 4 * max(unrolled)


def main(argv):
  args = parse_args(argv)
  if args._child is not None:  # pylint: disable=protected-access
    child(args._child)  # pylint: disable=protected-access
    return
  mib = lambda b: f"{b / (1 << 20):,.0f}"  # noqa: E731
  rows = []
  os.makedirs(args.root, exist_ok=True)
  try:
    for name in args.models:
      root = os.path.join(args.root, name)
      if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
      os.makedirs(root)
      run_child("make", name, os.path.join(root, "run"), os.path.join(args.root, "tokenizers"), devices=args.devices)
      count, saved_max, hf_max = largest(name)
      measured = {"export": run_child("export", "--workdir", os.path.join(root, "run"),
                                      "--out", os.path.join(root, "hf"))}
      measured["place"] = run_child("place", os.path.join(root, "hf"), name)
      if name not in args.skip_import_for:
        measured["import"] = run_child("import", "--hf_dir", os.path.join(root, "hf"),
                                       "--workdir", os.path.join(root, "imported"))
      if "import" in measured:  # One group of the state's arrays at a time, at most the largest.
        measured["import"]["placed"] = saved_max
      for what, m in measured.items():
        limit = {"export": saved_max, "place": hf_max, "import": max(saved_max, hf_max)}[what]
        extra = m["peak"] - m["baseline"] - m["placed"]
        rows.append((name, f"{count / 1e6:,.0f}M", what, mib(m["baseline"]), mib(m["peak"] - m["baseline"]),
                     mib(m["placed"]) if m["placed"] else "-", mib(extra), mib(limit), f"{extra / limit:.2f}",
                     f"{m['seconds']:.1f}"))
      if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
  finally:
    if not args.keep:
      shutil.rmtree(args.root, ignore_errors=True)
  header = ("model", "params", "command", "baseline MiB", "peak - baseline MiB", "placed MiB",
            "host overhead MiB", "largest tensor MiB", "overhead / largest", "seconds")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  main(sys.argv[1:])
