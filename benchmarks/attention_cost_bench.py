"""What a FLOP of XLA attention costs against a FLOP of the projections, in eval.py's layout.

The packed scorer (`evaluation/packed_requests.py`) chooses row widths with a
cost model in FLOPs: per row slot (projections and feed-forward) and per
(query, key) pair (attention, weighted by `Cost.ATTENTION_WEIGHT` because XLA
forms and masks the (B, N, W, W) scores in memory). This measures that weight.

The decoder's forward (hidden states, the explicit (B, 1, W, W) mask that the
shared-context rows use) is timed at a fixed number of tokens T = B x W for
several widths W. Then time(W) = T x slot_time + T x W x pair_time, a line in W:
the intercept gives the time per slot, the slope the time per pair, and

    weight = (pair_time / pair FLOPs) / (slot_time / slot FLOPs).

    python benchmarks/attention_cost_bench.py                  # default and 50M models
    python benchmarks/attention_cost_bench.py --models 50m --tokens 8192 --widths 128 256 512 1024
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from step_bench import MODEL_50M  # noqa: E402
from mile_jax import config_lib  # noqa: E402
from mile_jax.core import model as model_lib  # noqa: E402
from mile_jax.evaluation import packed_requests  # noqa: E402


def decoder_config(name: str, max_width: int) -> model_lib.DecoderConfig:
  c = config_lib.base_config()
  if name == "50m":
    c.model.update(**MODEL_50M)
  c.model.max_seq_len = max(c.model.max_seq_len, max_width)
  return model_lib.DecoderConfig.from_config(c.model)


def time_forward(cfg: model_lib.DecoderConfig, batch: int, width: int, reps: int) -> float:
  """Median seconds of one forward over (batch, width) tokens with an explicit causal mask."""
  model = model_lib.Decoder(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, width)), jnp.int32)
  mask = jnp.broadcast_to(jnp.tril(jnp.ones((width, width), bool)), (batch, 1, width, width))
  params = jax.jit(model.init)(jax.random.key(0), tokens[:1, :8])["params"]
  forward = jax.jit(lambda p, t, m: model.apply({"params": p}, t, return_hidden=True, attention_mask=m))
  forward(params, tokens, mask).block_until_ready()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    forward(params, tokens, mask).block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=["default", "50m"], choices=["default", "50m"])
  p.add_argument("--tokens", type=int, default=4096, help="B x W, the same at every width")
  p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
  p.add_argument("--reps", type=int, default=7)
  args = p.parse_args(argv)
  print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs; {args.tokens} tokens per forward; "
        f"ATTENTION_WEIGHT in the code: {packed_requests.Cost.ATTENTION_WEIGHT}\n")
  print("| model | W | B | forward ms | ms per 1k tokens |")
  print("|---|---|---|---|---|")
  summary = []
  for name in args.models:
    cfg = decoder_config(name, max(args.widths))
    cost = packed_requests.Cost.of(cfg)
    slot_flops, pair_flops = cost.slot, cost.pair / packed_requests.Cost.ATTENTION_WEIGHT
    times = []
    for width in args.widths:
      batch = args.tokens // width
      t = time_forward(cfg, batch, width, args.reps)
      times.append(t)
      print(f"| {name} | {width} | {batch} | {t * 1e3:.1f} | {t * 1e6 / args.tokens:.2f} |")
    slope, intercept = np.polyfit(np.asarray(args.widths, float), np.asarray(times), 1)
    slot_time, pair_time = intercept / args.tokens, slope / args.tokens
    summary.append((name, slot_time / slot_flops, pair_time / pair_flops))
  print("\n| model | s per slot FLOP | s per attention FLOP | weight |")
  print("|---|---|---|---|")
  for name, per_slot, per_pair in summary:
    print(f"| {name} | {per_slot:.3g} | {per_pair:.3g} | {per_pair / per_slot:.2f} |")


if __name__ == "__main__":
  main()
