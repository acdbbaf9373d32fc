"""Whole train-step time of MiLe vs focal vs cross-entropy, tokens/s and MFU.

Every variant (loss x loss implementation x remat policy x compute dtype x
attention kernel) is compiled first, then timed in interleaved repetitions
(the variant order rotates each repetition); each repetition times --steps
consecutive steps and the table reports the median step time. Model FLOPs per token are
`model.flops_per_token` (6 x matmul parameters plus causal attention). MFU is
reported against this machine's float32 (or --dtype) matmul rate measured
here with a large `jnp.dot`, and against the device's bf16 peak where
`metrics.PEAK_FLOPS` knows it.

    python benchmarks/step_bench.py --model=default
    python benchmarks/step_bench.py --model=50m --remat none full --dtype float32 bfloat16
    python benchmarks/step_bench.py --model=50m --losses mile --impl chunked --layers unrolled scanned
    python benchmarks/step_bench.py --loop        # host overhead: log every step vs every 50
    python benchmarks/step_bench.py --model=468m --dtype=bfloat16 --remat=full --batch=16 --reps=5   # a GPU
    python benchmarks/step_bench.py --model=468m --dtype=bfloat16 --losses=mile --impl=chunked \
        --attention xla cudnn --batch=16 --reps=5   # attention kernels on a GPU (docs/attention.md)
"""

import argparse
import itertools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mile_jax import config_lib  # noqa: E402
from mile_jax import train_lib  # noqa: E402
from mile_jax.core import model as model_lib  # noqa: E402
from mile_jax.core import sharding  # noqa: E402
from mile_jax.core import step as step_lib  # noqa: E402
from mile_jax.run import metrics as metrics_lib  # noqa: E402

# A ~50M-parameter model: 10 layers of d_model 512 and a 16k vocabulary.
MODEL_50M = dict(vocab_size=16384, d_model=512, n_layers=10, n_heads=8, n_kv_heads=8, d_ff=1536, max_seq_len=256)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="default", choices=["default", "50m", "468m", "1b"])
  p.add_argument("--losses", nargs="+", default=["cross_entropy", "focal", "mile"])
  p.add_argument("--impl", nargs="+", default=["naive", "chunked"])
  p.add_argument("--remat", nargs="+", default=None, help="remat policies (default: the config's)")
  p.add_argument("--dtype", nargs="+", default=None, help="compute dtypes (default: the config's)")
  p.add_argument("--attention", nargs="+", default=None,
                 help="attention kernels: auto xla splash cudnn (default: the config's)")
  p.add_argument("--layers", nargs="+", default=None, choices=["unrolled", "scanned"],
                 help="layer layouts, model.scan_layers (default: the config's)")
  p.add_argument("--batch", type=int, default=0, help="global batch (default: the config's, 8 for 50m)")
  p.add_argument("--seq", type=int, default=0, help="sequence length (default: the config's)")
  p.add_argument("--block_size", type=int, default=0, help="loss.block_size for chunked (default: config)")
  p.add_argument("--vocab_block_size", type=int, default=-1, help="loss.vocab_block_size (default: config)")
  p.add_argument("--steps", type=int, default=3, help="steps per timed repetition")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--loop", action="store_true", help="measure Trainer.run with log_every 1 vs 50 instead")
  p.add_argument("--loop_steps", type=int, default=150)
  p.add_argument("--json", default="")
  return p.parse_args(argv)


def base_config(args):
  if args.model in ("468m", "1b"):
    c = config_lib.paper_config(args.model)
    c.data.global_batch_size = 16
  else:
    c = config_lib.base_config()
    if args.model == "50m":
      c.model.update(**MODEL_50M)
      c.data.update(seq_len=256, global_batch_size=8)
  if args.batch:
    c.data.global_batch_size = args.batch
  if args.seq:
    c.data.seq_len = args.seq
    c.model.max_seq_len = max(c.model.max_seq_len, args.seq)
  if args.block_size:
    c.loss.block_size = args.block_size
  if args.vocab_block_size >= 0:
    c.loss.vocab_block_size = args.vocab_block_size
  c.mesh.shape = (1, -1, 1)
  c.train.microbatches = 1
  return c


def matmul_flops(dtype, n=4096, reps=5) -> float:
  """Measured FLOP/s of an n x n x n `jnp.dot` in `dtype` (median of reps)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(jnp.dot)
  f(a, a).block_until_ready()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    f(a, a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / float(np.median(times))


def synthetic_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, t = config.data.global_batch_size, config.data.seq_len
  tokens = rng.integers(0, config.model.vocab_size, (b, t + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones((b, t), np.float32)}


def build(config):
  trainer = train_lib.Trainer(config, tempfile.mkdtemp(prefix="step_bench_"))
  state = step_lib.init_state(trainer.model, trainer.tx, trainer.mesh, trainer.rules,
                               config.data.seq_len, config.seed)
  batch = sharding.make_global_batch(synthetic_batch(config), trainer.mesh)
  with trainer._context():  # pylint: disable=protected-access
    compiled = trainer._train_step.lower(state, batch).compile()  # pylint: disable=protected-access
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  return {"step": compiled, "state": state, "batch": batch, "temp": temp}


def time_steps(v, steps):
  start = time.perf_counter()
  state, metrics = v["state"], None
  for _ in range(steps):
    state, metrics = v["step"](state, v["batch"])
  jax.block_until_ready(metrics)
  v["state"] = state
  return (time.perf_counter() - start) / steps


def step_table(args):
  base = base_config(args)
  remats = args.remat or [base.model.remat]
  dtypes = args.dtype or [base.model.dtype]
  attentions = args.attention or [base.model.attention]
  layouts = args.layers or ["scanned" if model_lib.DecoderConfig.from_config(base.model).scan_layers else "unrolled"]
  mcfg = model_lib.DecoderConfig.from_config(base.model)
  params = model_lib.count_params(model_lib.abstract_params(mcfg))
  tokens = base.data.global_batch_size * base.data.seq_len
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; model {args.model}: {params / 1e6:.1f}M params, "
        f"{tokens} tokens/step")
  device_peak = metrics_lib.peak_flops_per_device() * jax.device_count()
  variants = {}
  for loss, impl, remat, dtype, attention, layout in itertools.product(args.losses, args.impl, remats, dtypes,
                                                                       attentions, layouts):
    c = base.copy_and_resolve_references()
    c.loss.name, c.loss.impl, c.model.remat, c.model.dtype, c.model.attention = loss, impl, remat, dtype, attention
    c.model.scan_layers = layout == "scanned"
    variants[(loss, impl, remat, dtype, attention, layout)] = build(c)
  flops_token = model_lib.flops_per_token(model_lib.DecoderConfig.from_config(base.model), base.data.seq_len)
  times = {k: [] for k in variants}
  matmul = {d: [] for d in dtypes}
  keys = list(variants)
  for rep in range(args.reps):
    for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
      times[k].append(time_steps(variants[k], args.steps))
    for d in dtypes:  # The peak is measured between the steps, under the same conditions.
      matmul[d].append(matmul_flops(jnp.dtype(d)))
  peaks = {d: float(np.median(f)) for d, f in matmul.items()}
  for d, f in peaks.items():
    print(f"measured {d} matmul (4096^3 jnp.dot, median): {f / 1e9:.1f} GFLOP/s")
  rows = []
  for (loss, impl, remat, dtype, attention, layout), ts in times.items():
    t = float(np.median(ts))
    ce = _median(times, ("cross_entropy", impl, remat, dtype, attention, layout))
    ce_naive = _median(times, ("cross_entropy", "naive", remat, dtype, attention, layout))
    flops = flops_token * tokens / t
    rows.append({"loss": loss, "impl": impl, "remat": remat, "dtype": dtype, "attention": attention,
                 "layers": layout, "step_s": t,
                 "vs_ce": None if ce is None else t / ce, "vs_ce_naive": None if ce_naive is None else t / ce_naive,
                 "tokens_per_s": tokens / t,
                 "temp_bytes": variants[(loss, impl, remat, dtype, attention, layout)]["temp"],
                 "flops_per_token": flops_token, "mfu_measured": flops / peaks[dtype],
                 "mfu_device_peak": flops / device_peak if device_peak else None, "times": ts})
  print(f"model FLOPs per token: {flops_token / 1e6:.1f}M")
  print("| loss | impl | remat | dtype | attention | layers | step (s) | / CE same impl | / CE naive | tokens/s "
        "| temp | MFU (measured matmul) | MFU (bf16 peak) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    vs = "-" if r["vs_ce"] is None else f"{r['vs_ce']:.3f}"
    vs_naive = "-" if r["vs_ce_naive"] is None else f"{r['vs_ce_naive']:.3f}"
    peak = "-" if r["mfu_device_peak"] is None else f"{100 * r['mfu_device_peak']:.1f}%"
    print(f"| {r['loss']} | {r['impl']} | {r['remat']} | {r['dtype']} | {r['attention']} | {r['layers']} "
          f"| {r['step_s']:.3f} | {vs} "
          f"| {vs_naive} | {r['tokens_per_s']:,.0f} | {r['temp_bytes'] / 2**20:,.0f} MiB "
          f"| {100 * r['mfu_measured']:.1f}% | {peak} |")
  return rows


def _median(times, key):
  return float(np.median(times[key])) if key in times else None


def loop_overhead(args):
  """Trainer.run on the built-in corpus with log_every 1 and 50: wall time per
  step between the logs at steps 50 and --loop_steps (compile excluded)."""
  rows = []
  for log_every in (1, 50):
    c = base_config(args)
    c.train.update(steps=args.loop_steps, log_every=log_every, eval_every=0)
    c.checkpoint.every_steps = 10 * args.loop_steps
    workdir = tempfile.mkdtemp(prefix="loop_bench_")
    train_lib.Trainer(c, workdir, echo=lambda _: None).run()
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      logged = {r["step"]: r["time"] for r in map(json.loads, f) if r["split"] == "train"}
    per_step = (logged[args.loop_steps] - logged[50]) / (args.loop_steps - 50)
    rows.append({"log_every": log_every, "step_s": per_step})
  print("| log_every | wall per step (s), steps 50 to %d |" % args.loop_steps)
  print("|---|---|")
  for r in rows:
    print(f"| {r['log_every']} | {r['step_s']:.4f} |")
  print(f"ratio log every step / every 50: {rows[0]['step_s'] / rows[1]['step_s']:.3f}")
  return rows


def main():
  args = parse_args()
  rows = loop_overhead(args) if args.loop else step_table(args)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"args": vars(args), "results": rows}, f, indent=1)


if __name__ == "__main__":
  main()
