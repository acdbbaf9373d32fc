"""Evaluation throughput on a trained checkpoint, and the cost of restoring it.

Tasks, each run once cold (the compiles it triggers are counted through
JAX's backend-compile event) and then --reps times warm (median reported):
- ppl: `perplexity.evaluate` over --ppl_batches validation batches;
- loglikelihood: multiple-choice style requests (--docs documents x 4 choices,
  random token contexts of 8 to max_seq_len-16 tokens, 1 to 12 continuation
  tokens) through `LanguageModel.loglikelihood_tokens` (packed rows, one shared
  context per document), at each --batch_sizes;
- generate: greedy decoding of 8 prompts (8 to 32 tokens, padded to 32) for
  --gen_tokens new tokens, with the key/value cache and without it.
Restore: a checkpoint of --restore_model (random parameters, AdamW state) is
restored in a fresh process per repetition, the full TrainState
(`Checkpointer.restore`) or the parameters only (`Checkpointer.restore_params`),
alternating; peak RSS is the increase over the resident memory just before
the restore (Linux VmHWM, reset first), bytes read are TensorStore's file reads.

    python benchmarks/eval_bench.py                   # trains configs/default.py for --train_steps first
    python benchmarks/eval_bench.py --workdir /tmp/mile_run --restore_model default
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tensorstore as ts  # noqa: E402

from loss_bench import peak_rss_bytes, rss_bytes  # noqa: E402
from step_bench import MODEL_50M  # noqa: E402
from mile_jax import config_lib  # noqa: E402
from mile_jax import train_lib  # noqa: E402
from mile_jax.core import model as model_lib  # noqa: E402
from mile_jax.core import optim  # noqa: E402
from mile_jax.core import sharding  # noqa: E402
from mile_jax.core import step as step_lib  # noqa: E402
from mile_jax.evaluation import generation  # noqa: E402
from mile_jax.evaluation import lm as lm_lib  # noqa: E402
from mile_jax.evaluation import perplexity  # noqa: E402
from mile_jax.evaluation import restore as restore_lib  # noqa: E402
from mile_jax.evaluation import runner  # noqa: E402
from mile_jax.run import checkpoint as checkpoint_lib  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="", help="a trained run (default: train configs/default.py in a temp dir)")
  p.add_argument("--train_steps", type=int, default=20)
  p.add_argument("--ppl_batch", type=int, default=16)
  p.add_argument("--ppl_batches", type=int, default=4)
  p.add_argument("--docs", type=int, default=32, help="multiple-choice documents (4 requests each)")
  p.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 32])
  p.add_argument("--gen_tokens", type=int, default=32)
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--restore_model", default="50m", choices=["default", "50m", "none"])
  p.add_argument("--restore_reps", type=int, default=2)
  p.add_argument("--json", default="")
  p.add_argument("--_restore", default="", help=argparse.SUPPRESS)  # child: "mode,directory"
  return p.parse_args(argv)


class CompileCounter:
  """Counts XLA backend compiles (and their seconds) from the moment it is created."""

  def __init__(self):
    self.count, self.seconds = 0, 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **_):
    if event == COMPILE_EVENT:
      self.count += 1
      self.seconds += duration


def cold_then_warm(fn, reps: int, counter: CompileCounter) -> dict:
  """Runs `fn` once cold, then `reps` times; compiles counted in each phase."""
  before = counter.count
  start = time.perf_counter()
  fn()
  cold = time.perf_counter() - start
  compiles = counter.count - before
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {"cold_s": cold, "warm_s": statistics.median(times), "compiles": compiles,
          "warm_compiles": counter.count - before - compiles}


def train_tiny(steps: int) -> str:
  workdir = tempfile.mkdtemp(prefix="eval_bench_")
  c = config_lib.base_config()
  c.train.update(steps=steps, log_every=steps, eval_every=0)
  c.optim.warmup_steps = min(c.optim.warmup_steps, steps // 2)
  c.checkpoint.update(every_steps=steps, async_save=False)
  c.mesh.update(shape=(1, 1, 1), num_devices=1)
  train_lib.Trainer(c, workdir, devices=jax.devices()[:1], echo=lambda _: None).run()
  return workdir


def mc_requests(restored, docs: int, seed: int = 0):
  """(context, continuation) token pairs: `docs` contexts with 4 continuations each."""
  rng = np.random.default_rng(seed)
  vocab, max_len = restored.config.model.vocab_size, restored.max_seq_len
  prefix = [restored.tokenizer.eos_id]
  pairs = []
  for _ in range(docs):
    context = prefix + rng.integers(4, vocab, int(rng.integers(8, max_len - 16))).tolist()
    pairs += [(context, rng.integers(4, vocab, int(rng.integers(1, 13))).tolist()) for _ in range(4)]
  return pairs


def task_rows(restored, args, counter) -> list[dict]:
  rows = []
  opts = runner.EvalOptions(workdir=restored.workdir, batch_size=args.ppl_batch)
  dataset = runner._text_dataset(restored, opts)  # pylint: disable=protected-access
  batches = min(args.ppl_batches, dataset.rows_per_epoch // args.ppl_batch)
  r = cold_then_warm(lambda: perplexity.evaluate(restored, dataset, batch_size=args.ppl_batch,
                                                 max_batches=batches), args.reps, counter)
  tokens = batches * args.ppl_batch * restored.config.data.seq_len
  rows.append({"task": "ppl", "setting": f"batch {args.ppl_batch} x {restored.config.data.seq_len}",
               "unit": "tokens/s", "rate": tokens / r["warm_s"], **r})
  pairs = mc_requests(restored, args.docs)
  for bs in args.batch_sizes:
    lm = lm_lib.LanguageModel(restored, batch_size=bs, progress=False)
    r = cold_then_warm(lambda lm=lm: lm.loglikelihood_tokens(pairs), args.reps, counter)
    st = lm.stats
    rows.append({"task": "loglikelihood", "setting": f"batch {bs}, {len(pairs)} requests: {st['batches']} x {bs} "
                 f"rows of {st['width']}, {st['tokens']:,} of {st['slots']:,} slots real",
                 "unit": "requests/s", "rate": len(pairs) / r["warm_s"], **r})
  rng = np.random.default_rng(1)
  vocab = restored.config.model.vocab_size
  prompts = [rng.integers(4, vocab, int(rng.integers(8, 33))).tolist() for _ in range(8)]
  gen = generation.GreedyGenerator(restored.model.cfg, restored.mesh)
  outputs = {}
  for use_cache in (True, False):
    def run(use_cache=use_cache):
      with restored.context():
        outputs[use_cache] = gen.generate(restored.params, prompts, args.gen_tokens, prompt_len=32,
                                          use_cache=use_cache)
    r = cold_then_warm(run, args.reps, counter)
    rows.append({"task": "generate", "setting": f"8 x {args.gen_tokens} tokens, {'KV cache' if use_cache else 'no cache'}",
                 "unit": "tokens/s", "rate": 8 * args.gen_tokens / r["warm_s"], **r})
  if outputs[True] != outputs[False]:
    print("warning: generation with and without the cache differ")
  return rows


def restore_config(name: str):
  c = config_lib.base_config()
  if name == "50m":
    c.model.update(**MODEL_50M)
    c.data.seq_len = 256
  c.mesh.update(shape=(1, 1, 1), num_devices=1)
  return c


def _abstract(config, mesh):
  model = model_lib.Decoder(model_lib.DecoderConfig.from_config(config.model))
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  rules = sharding.rules_tuple(config.mesh.rules)
  return model, tx, rules, step_lib.state_shardings(model, tx, mesh, rules, config.data.seq_len)


def save_checkpoint(name: str) -> str:
  """A checkpoint (step 1) of model `name`: initial parameters, and random AdamW
  moments, which compress as little as a trained run's (zeros would vanish)."""
  config = restore_config(name)
  directory = tempfile.mkdtemp(prefix="eval_bench_ckpt_")
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  model, tx, rules, _ = _abstract(config, mesh)
  state = step_lib.init_state(model, tx, mesh, rules, config.data.seq_len, config.seed)
  rng = np.random.default_rng(0)
  moments = lambda x: (np.abs(rng.standard_normal(x.shape, np.float32)) * 1e-3).astype(x.dtype) if (
      jax.numpy.issubdtype(x.dtype, jax.numpy.floating)) else x
  state = state.replace(opt_state=jax.tree.map(moments, state.opt_state))
  ckpt = checkpoint_lib.Checkpointer(directory, every_steps=1, max_to_keep=2, async_save=False)
  ckpt.save(1, state)
  ckpt.close()
  return directory


def restore_child(args):
  """Child process: one restore; prints its time, peak RSS increase and bytes read."""
  mode, directory = args._restore.split(",")  # pylint: disable=protected-access
  config = restore_config(args.restore_model)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  _, _, _, (abstract, shardings) = _abstract(config, mesh)
  ckpt = checkpoint_lib.Checkpointer(directory, every_steps=1, max_to_keep=2, async_save=False)
  read = lambda: ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
  count = lambda m: sum(v.get("value", 0) for x in m for v in x["values"])
  with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
    f.write("5")  # Resets the peak (VmHWM): imports and tracing are not counted.
  before, read_before = rss_bytes(), count(read())
  start = time.perf_counter()
  if mode == "full":
    out = ckpt.restore(1, checkpoint_lib.abstract_with_shardings(abstract, shardings))
  else:
    out = ckpt.restore_params(1, checkpoint_lib.abstract_with_shardings(abstract.params, shardings.params))
  jax.block_until_ready(out)
  seconds = time.perf_counter() - start
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  print(json.dumps({"mode": mode, "seconds": seconds, "rss_increase": peak_rss_bytes() - before,
                    "bytes_read": count(read()) - read_before, "restored_bytes": nbytes(out),
                    "param_bytes": nbytes(abstract.params)}))


def restore_rows(args) -> list[dict]:
  directory = save_checkpoint(args.restore_model)
  results = {"full": [], "params": []}
  for rep in range(args.restore_reps):
    for mode in (("full", "params") if rep % 2 == 0 else ("params", "full")):
      cmd = [sys.executable, os.path.abspath(__file__), f"--_restore={mode},{directory}",
             f"--restore_model={args.restore_model}"]
      out = subprocess.run(cmd, capture_output=True, text=True, check=True)
      results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
  rows = []
  for mode, runs in results.items():
    rows.append({"mode": mode, **{k: statistics.median(r[k] for r in runs)
                                 for k in ("seconds", "rss_increase", "bytes_read", "restored_bytes", "param_bytes")}})
  return rows


def mib(x):
  return f"{x / 2**20:,.0f} MiB"


def print_tables(rows, restore, header):
  print(header)
  print("| task | setting | rate | compiles (cold) | compiles (warm) | cold (s) | warm (s) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['task']} | {r['setting']} | {r['rate']:,.1f} {r['unit']} | {r['compiles']} | {r['warm_compiles']} "
          f"| {r['cold_s']:.2f} | {r['warm_s']:.3f} |")
  gen = {r["setting"].endswith("KV cache"): r["rate"] for r in rows if r["task"] == "generate"}
  if len(gen) == 2:
    print(f"\ngeneration, KV cache / no cache: {gen[True] / gen[False]:.2f}x tokens/s")
  if not restore:
    return
  params = restore[0]["param_bytes"]
  print(f"\nrestore ({mib(params)} of float32 parameters, medians of fresh processes)")
  print("| restore | time (s) | peak RSS increase | / params | bytes read | / params |")
  print("|---|---|---|---|---|---|")
  for r in restore:
    print(f"| {r['mode']} | {r['seconds']:.2f} | {mib(r['rss_increase'])} | {r['rss_increase'] / params:.2f} "
          f"| {mib(r['bytes_read'])} | {r['bytes_read'] / params:.2f} |")
  full, only = (next(r for r in restore if r["mode"] == m) for m in ("full", "params"))
  print(f"\nparams-only / full: time {only['seconds'] / full['seconds']:.2f}, peak RSS "
        f"{only['rss_increase'] / full['rss_increase']:.2f}, bytes read {only['bytes_read'] / full['bytes_read']:.2f}")


def main(args):
  if args._restore:  # pylint: disable=protected-access
    restore_child(args)
    return
  workdir = args.workdir or train_tiny(args.train_steps)
  counter = CompileCounter()
  restored = restore_lib.restore(workdir, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  params = model_lib.count_params(restored.params)
  header = (f"device: {jax.devices()[0].device_kind}; checkpoint {workdir} step {restored.step}: "
            f"{params / 1e6:.2f}M params, max_seq_len {restored.max_seq_len}")
  rows = task_rows(restored, args, counter)
  restore = restore_rows(args) if args.restore_model != "none" else []
  print_tables(rows, restore, header)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"tasks": rows, "restore": restore}, f, indent=1)


if __name__ == "__main__":
  main(parse_args())
