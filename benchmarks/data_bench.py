"""Data pipeline throughput against the train step's, on the default config.

    python benchmarks/data_bench.py [--steps 20] [--batches 300] [--markdown]

Pipeline: `Trainer.local_batch` (what the prefetch thread runs each step:
row lookup, one range read per row from the token store, shift, mask) timed over
`--batches` consecutive steps, with and without segment ids. Train step: the
jitted step of `train_lib.Trainer` on real batches, after one warm-up step,
timed over `--steps` steps with a device sync at the end. Tokens per step are
global_batch_size x seq_len in both.
"""

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from mile_jax import train_lib  # noqa: E402
from mile_jax.core import sharding  # noqa: E402
from mile_jax.data import Prefetcher  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import default  # noqa: E402  # pylint: disable=wrong-import-position


def pipeline_rate(trainer, dataset, batches: int) -> float:
  """Batches per second made by `local_batch` (the same work the prefetch thread does)."""
  trainer.local_batch(dataset, 0)
  start = time.perf_counter()
  for step in range(batches):
    trainer.local_batch(dataset, step)
  return batches / (time.perf_counter() - start)


def step_rate(trainer, steps: int) -> float:
  """Train steps per second, fed through the Prefetcher as in `Trainer.run`."""
  data = trainer.load_data()
  state = trainer.initial_state()
  with Prefetcher(lambda s: trainer.local_batch(data.train, s), 0, trainer.config.data.prefetch) as prefetch:
    _, local = prefetch.next()
    state, metrics = trainer.train_step(state, sharding.make_global_batch(local, trainer.mesh))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
      _, local = prefetch.next()
      state, metrics = trainer.train_step(state, sharding.make_global_batch(local, trainer.mesh))
    jax.block_until_ready((state, metrics))
    return steps / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--batches", type=int, default=300)
  args = parser.parse_args()
  config = default.get_config()
  config.checkpoint.async_save = False
  workdir = "/tmp/mile_jax_data_bench"
  trainer = train_lib.Trainer(config, workdir)
  data = trainer.load_data()
  tokens = config.data.global_batch_size * config.data.seq_len
  plain = pipeline_rate(trainer, data.train, args.batches)
  seg_config = default.get_config()
  seg_config.data.segment_documents = True
  seg_trainer = train_lib.Trainer(seg_config, workdir + "_seg")
  segmented = pipeline_rate(seg_trainer, seg_trainer.load_data().train, args.batches)
  train = step_rate(trainer, args.steps)
  rows = [("pipeline (local_batch)", plain), ("pipeline, segment_documents", segmented), ("train step", train)]
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}; default config, "
        f"{config.data.global_batch_size} x {config.data.seq_len} tokens per step")
  print("| what | steps/s | tokens/s | x train step |")
  print("|---|---|---|---|")
  for name, rate in rows:
    print(f"| {name} | {rate:,.1f} | {rate * tokens:,.0f} | {rate / train:,.1f} |")


if __name__ == "__main__":
  main()
