"""Cost of the epoch order at large corpus sizes: a document permutation against the keyed row permutation.

    python benchmarks/shuffle_bench.py --documents 1e6,1e7,1e8

For each corpus size (documents of 1 to 2000 tokens, EOS after each; the
tokens are a zero-stride array, so only the order's own memory counts):

- ``document permutation``: what an epoch of a document-shuffled packing
  needs before its first row, ``np.random.default_rng([seed, epoch])
  .permutation(D)`` and the prefix sums of the lengths in that order (the
  epoch's document starts and ends), as ``PackedDataset`` built them before
  it permuted rows; time and peak traced memory of one epoch.
- ``row permutation``: ``PackedDataset`` as it is: its construction (the
  static end offsets) and one 512 x 1024-token batch of a fresh epoch.
- ``mixture schedule``: ``MixtureSchedule.assign`` per row, three components.

Peak memory is numpy's allocations as ``tracemalloc`` sees them.
"""

import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mile_jax.data.mixture import MixtureSchedule  # noqa: E402
from mile_jax.data.packing import PackedDataset  # noqa: E402


def measure(fn):
  tracemalloc.start()
  began = time.perf_counter()
  out = fn()
  seconds = time.perf_counter() - began
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  return out, seconds, peak


def document_epoch(lengths: np.ndarray, seed: int, epoch: int):
  order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
  extended = lengths[order] + 1  # + EOS
  ends = np.cumsum(extended)
  return order, ends - extended, ends


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--documents", default="1e6,1e7")
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--seq_len", type=int, default=1024)
  args = parser.parse_args()
  print("| documents | rows per epoch | document permutation: s, GiB per epoch | row permutation: build s, "
        "GiB | batch s |")
  print("|---|---|---|---|---|")
  for d in (int(float(x)) for x in args.documents.split(",")):
    lengths = np.random.default_rng(0).integers(1, 2000, size=d)
    offsets = np.zeros(d + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.broadcast_to(np.int32(0), (int(offsets[-1]),))
    _, old_s, old_peak = measure(lambda: document_epoch(lengths, 0, 1))
    ds, build_s, build_peak = measure(lambda: PackedDataset.from_flat(tokens, offsets, args.seq_len, 3, seed=0))
    epoch_1 = ds.rows_per_epoch // args.batch + 1  # a batch of the second epoch
    _, batch_s, _ = measure(lambda: ds.batch(epoch_1, args.batch))
    print(f"| {d:.0e} | {ds.rows_per_epoch:,} | {old_s:.2f} s, {old_peak / 2**30:.2f} GiB | {build_s:.2f} s, "
          f"{build_peak / 2**30:.2f} GiB | {batch_s * 1e3:.1f} ms |")
  schedule = MixtureSchedule([0.6, 0.3, 0.1], seed=0)
  rows = np.arange(10**15, 10**15 + 10**6)
  _, seconds, _ = measure(lambda: schedule.assign(rows))
  print(f"\nmixture schedule: {seconds / len(rows) * 1e9:.0f} ns per row (3 components, rows near 1e15)")


if __name__ == "__main__":
  main()
