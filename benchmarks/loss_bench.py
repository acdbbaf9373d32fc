"""Forward + backward of the loss alone: naive cross-entropy, naive MiLe and chunked MiLe.

For each vocabulary size and token count, every variant computes the loss
sums and the gradients of the loss numerator w.r.t. the hidden states
[N, d] and the unembedding [d, V], as in the train step. Reported per variant:

* time: median over --reps interleaved repetitions (variant order rotates each
  repetition), so the ratios come from one run under the same conditions;
* temp: the compiled executable's `memory_analysis().temp_size_in_bytes`
  (reported even where execution is skipped);
* rss: in a fresh process that compiles the variant, the peak resident memory
  of one run (peak reset after compilation) minus the resident memory before
  it (--rss; Linux).

    python benchmarks/loss_bench.py                      # CPU defaults
    python benchmarks/loss_bench.py --dtype=bfloat16 --max_tflop=1000 --reps=10   # a GPU
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mile_jax.core import fused_loss  # noqa: E402
from mile_jax.core import losses  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--vocab", type=int, nargs="+", default=[32000, 131072])
  p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
  p.add_argument("--d_model", type=int, default=1024)
  p.add_argument("--dtype", default="float32", help="matmul input dtype (hidden states and kernel)")
  p.add_argument("--chunked", nargs="+", default=["256:0", "512:4096"],
                 help="chunked variants as block_size:vocab_block_size (0 = whole vocabulary)")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--max_tflop", type=float, default=0.5,
                 help="skip timing cases whose forward+backward matmuls exceed this many TFLOP")
  p.add_argument("--rss", action="store_true", help="also measure peak RSS in a fresh process per variant")
  p.add_argument("--json", default="", help="write the results here as JSON")
  p.add_argument("--_one", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def variants(args):
  out = {"ce_naive": ("cross_entropy", None), "mile_naive": ("mile", None)}
  for spec in args.chunked:
    block, vocab_block = (int(x) for x in spec.split(":"))
    out[f"mile_chunked[{block}:{vocab_block}]"] = ("mile", (block, vocab_block))
  return out


def make_fn(loss_name, blocks, dtype):
  """jit((hidden, kernel, targets, mask) -> (sums, d hidden, d kernel))."""
  def numerator(hidden, kernel, targets, mask):
    if blocks is None:
      # (N, V) float32: inputs in dtype, float32 accumulation and output, as the model's lm_head.
      logits = jnp.dot(hidden.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
      sums = losses.loss_sums(loss_name, logits, targets, mask)
    else:
      sums = fused_loss.chunked_loss_sums(loss_name, hidden, kernel, targets, mask, block_size=blocks[0],
                                          vocab_block_size=blocks[1], dtype=dtype)
    return sums["loss_numerator"], sums

  def step(hidden, kernel, targets, mask):
    (d_hidden, d_kernel), sums = jax.grad(numerator, argnums=(0, 1), has_aux=True)(hidden, kernel, targets, mask)
    return sums, d_hidden, d_kernel
  return jax.jit(step)


def make_inputs(n, d, vocab, dtype):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(k1, (n, d), jnp.float32).astype(dtype)
  kernel = jax.random.normal(k2, (d, vocab), jnp.float32) * (2.0 / np.sqrt(d))
  targets = jax.random.randint(k3, (n,), 0, vocab)
  mask = (jax.random.uniform(k4, (n,)) > 0.1).astype(jnp.float32)
  return hidden, kernel, targets, mask


def rss_bytes() -> int:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
  with open("/proc/self/status", encoding="ascii") as f:
    line = next(l for l in f if l.startswith("VmHWM:"))
  return int(line.split()[1]) * 1024


def run_one(args):
  """Child process: compile and run one variant once; print its memory."""
  name, vocab, n = args._one.split(",")
  loss_name, blocks = variants(args)[name]
  inputs = make_inputs(int(n), args.d_model, int(vocab), jnp.dtype(args.dtype))
  compiled = make_fn(loss_name, blocks, jnp.dtype(args.dtype)).lower(*inputs).compile()
  jax.block_until_ready(inputs)
  with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
    f.write("5")  # Resets the peak (VmHWM) so that compilation is not counted.
  before = rss_bytes()
  jax.block_until_ready(compiled(*inputs))
  print(json.dumps({"rss_peak": peak_rss_bytes(), "rss_before": before}))


def measure_rss(args, name, vocab, n):
  cmd = [sys.executable, os.path.abspath(__file__), f"--_one={name},{vocab},{n}", f"--d_model={args.d_model}",
         f"--dtype={args.dtype}", "--chunked", *args.chunked]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_bytes(x):
  return "-" if x is None else f"{x / 2**20:,.0f} MiB"


def main(args):
  dtype = jnp.dtype(args.dtype)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, d_model {args.d_model}, dtype {args.dtype}")
  results = []
  for vocab in args.vocab:
    for n in args.tokens:
      inputs = make_inputs(n, args.d_model, vocab, dtype)
      tflop = 6 * n * args.d_model * vocab / 1e12
      compiled = {}
      for name, (loss_name, blocks) in variants(args).items():
        c = make_fn(loss_name, blocks, dtype).lower(*inputs).compile()
        compiled[name] = c
        results.append({"vocab": vocab, "tokens": n, "variant": name,
                        "temp_bytes": int(c.memory_analysis().temp_size_in_bytes), "time_s": None, "rss": None})
      rows = results[-len(compiled):]
      if tflop <= args.max_tflop:
        times = {name: [] for name in compiled}
        outs = {name: jax.block_until_ready(c(*inputs)) for name, c in compiled.items()}  # warm-up
        ref = outs["mile_naive"]
        for name, out in outs.items():
          if name.startswith("mile_chunked"):
            err = abs(float(out[0]["loss_numerator"]) / float(ref[0]["loss_numerator"]) - 1)
            assert err < 1e-3, (name, err)
        del outs, ref
        names = list(compiled)
        for rep in range(args.reps):
          for name in names[rep % len(names):] + names[:rep % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*inputs))
            times[name].append(time.perf_counter() - start)
        for row in rows:
          row["time_s"] = float(np.median(times[row["variant"]]))
      del compiled, inputs
      if args.rss:
        for row in rows:
          if row["time_s"] is not None:
            mem = measure_rss(args, row["variant"], vocab, n)
            row["rss"] = None if mem is None else mem["rss_peak"] - mem["rss_before"]
      print_table(rows)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"args": vars(args), "results": results}, f, indent=1)


def print_table(rows):
  ce = next(r for r in rows if r["variant"] == "ce_naive")
  mile = next(r for r in rows if r["variant"] == "mile_naive")
  print(f"\nvocab {rows[0]['vocab']}, tokens {rows[0]['tokens']}")
  print(f"| variant | time (s) | time / CE naive | temp | temp / MiLe naive | peak RSS increase |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    t = "-" if r["time_s"] is None else f"{r['time_s']:.3f}"
    ratio = "-" if r["time_s"] is None else f"{r['time_s'] / ce['time_s']:.2f}"
    print(f"| {r['variant']} | {t} | {ratio} | {fmt_bytes(r['temp_bytes'])} | "
          f"{r['temp_bytes'] / mile['temp_bytes']:.3f} | {fmt_bytes(r['rss'])} |")
  sys.stdout.flush()


if __name__ == "__main__":
  parsed = parse_args()
  if parsed._one:
    run_one(parsed)
  else:
    main(parsed)
