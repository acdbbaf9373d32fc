"""The prepare step and the token store: throughput, where the time goes, and the cost of opening a store.

    python benchmarks/prepare_bench.py [--mb 25] [--vocabs 1024,32000] [--open_mb 25,100] [--markdown]
        [--open_only] [--work DIR] [--gcs]

Corpus: ``.jsonl`` files of about 8 MB each, ``--mb`` MB in all, of the
built-in corpus's documents repeated (each copy numbered, so no two are
equal). Tokenizers: BPE, trained on the first shard's first 4000 documents.

- prepare: ``prepare.run_local`` with 1 and 2 workers, tokens/s (wall) and
  tokens per CPU-second (this process and its children), against a serial
  build in one process (read all, ``encode_batch`` on every core, flatten
  with ``np.fromiter``, write one file), the way a single process tokenized
  before the prepare step existed.
- breakdown: one shard read, encoded, laid out (``prepare._pack``) and
  written, each timed on its own.
- open: a fresh process runs ``make_data`` on ``store:<path>`` and reads its
  first batch: seconds and peak RSS, for stores of ``--open_mb`` MB of text.
  Then ``train.py`` (the default config on that store, one step) in a fresh
  process: seconds to its ``[train] step 1`` line and its peak RSS.
- reader: rows/s of ``batch`` (64 rows of 1025 tokens) from a local store,
  and with ``--gcs`` from the same store prepared into a bucket of the suite's
  GCS server (``tests/object_store.py``, the ``[dev]`` extra) on localhost.

``--open_only`` skips the throughput and breakdown parts; ``--work DIR`` keeps
the corpora and stores in DIR and reuses those already there (a store is
reused when its manifest exists), so that large stores are built once.
"""

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mile_jax.data import builtin, prepare, shards, store  # noqa: E402
from mile_jax.data.packing import PackedDataset  # noqa: E402
from mile_jax.data.tokenizer import train_tokenizer  # noqa: E402

FILE_MB = 8


def write_corpus(root: str, mb: int) -> str:
  texts = [t for _, t in builtin.pydocs_documents()]
  os.makedirs(root, exist_ok=True)
  size, f, copy = 0, 0, 0
  while size < mb << 20:
    with open(os.path.join(root, f"part{f:04d}.jsonl"), "w", encoding="utf-8") as fh:
      written = 0
      while written < FILE_MB << 20 and size + written < mb << 20:
        for t in texts:
          line = json.dumps({"text": f"{copy} {t}"}) + "\n"
          fh.write(line)
          written += len(line)
        copy += 1
    size, f = size + written, f + 1
  return f"files:{root}/*.jsonl"


def cpu_seconds() -> float:
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn):
  wall, cpu = time.perf_counter(), cpu_seconds()
  out = fn()
  return out, time.perf_counter() - wall, cpu_seconds() - cpu


def serial_build(inputs, tok, out_dir):
  """Read everything, encode on every core, flatten with np.fromiter, write one file."""
  plan, _ = shards.plan(inputs)
  texts = [t for s in plan for _, t in shards.documents(inputs, s)]
  total = 0
  with open(os.path.join(out_dir, "tokens.bin"), "wb") as f:
    for i in range(0, len(texts), 2048):
      encoded = tok.encode_batch(texts[i:i + 2048])
      flat = np.fromiter(itertools.chain.from_iterable(encoded), np.uint16, sum(map(len, encoded)))
      f.write(flat.tobytes())
      total += len(flat)
  return total


def breakdown(inputs, tok):
  plan, _ = shards.plan(inputs)
  job = prepare.make_job(inputs, tok, add_bos=False, add_eos=True, output=tempfile.mkdtemp())
  texts, read = timed(lambda: [t for _, t in shards.documents(inputs, plan[0])])[:2]
  encoded, encode = timed(lambda: tok.encode_batch(texts, 1))[:2]
  (tokens, _), flatten = timed(lambda: prepare._pack(encoded, None, tok.eos_id, np.uint16))[:2]
  _, write = timed(lambda: store.write_array(store.join(job.output, "t"), tokens))[:2]
  return {"read": read, "encode": encode, "flatten": flatten, "write": write, "tokens": len(tokens)}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Starts train.py as a child, stops it at its first step line: the seconds to it and the child's peak RSS.
STEP_1 = """
import resource, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen([sys.executable] + sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
seen = []
for line in child.stdout:
  seen.append(line)
  if line.startswith("[train] step 1:"):
    break
seconds = time.perf_counter() - start
child.kill()
child.wait()
if not seen or not seen[-1].startswith("[train] step 1:"):
  sys.exit("train.py did not reach step 1:\\n" + "".join(seen[-20:]))
print(seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
"""

OPEN = """
import sys, time
start = time.perf_counter()
from mile_jax import config_lib
from mile_jax.data import pipeline
c = config_lib.base_config().data
c.update(source="store:" + sys.argv[1], cache_dir=sys.argv[2], global_batch_size=64)
data = pipeline.make_data(c, int(sys.argv[3]), 1024, 0)
data.train.batch(0, 64)
seconds = time.perf_counter() - start
# This process's own peak: ru_maxrss can carry the parent's peak across the exec that started it.
with open("/proc/self/status", encoding="ascii") as status:
  peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(seconds, peak / 1024)
"""


def train_to_step_1(url: str, vocab: int, workdir: str) -> tuple[float, float]:
  """Seconds from starting `train.py` on `store:<url>` to its `[train] step 1` line, and its peak RSS (MB)."""
  command = [sys.executable, "-c", STEP_1, os.path.join(REPO, "train.py"), "--config", "configs/default.py",
             "--workdir", workdir, f"--config.data.source=store:{url}", f"--config.model.vocab_size={vocab}",
             "--config.train.log_every=1"]
  shutil.rmtree(workdir, ignore_errors=True)
  out = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
  if out.returncode:
    sys.exit(out.stdout + out.stderr)
  seconds, rss = out.stdout.split()[-2:]
  return float(seconds), float(rss)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--mb", type=int, default=25)
  parser.add_argument("--vocabs", default="1024,32000")
  parser.add_argument("--open_mb", default="25,100")
  parser.add_argument("--markdown", action="store_true")
  parser.add_argument("--open_only", action="store_true")
  parser.add_argument("--work", default="")
  parser.add_argument("--gcs", action="store_true", help="also read from a store on the suite's GCS server")
  args = parser.parse_args()
  work = args.work or tempfile.mkdtemp(prefix="prepare_bench-")
  rows = []
  source = write_corpus(os.path.join(work, f"c{args.mb}"), args.mb)
  inputs = shards.Inputs(source=source, val_fraction=0.01)
  sample = [t for _, t in shards.documents(inputs, shards.plan(inputs)[0][0])][:4000]
  for vocab in [] if args.open_only else map(int, args.vocabs.split(",")):
    tok = train_tokenizer(sample, vocab, os.path.join(work, "tok"), corpus_key=str(vocab), model_type="bpe")
    out = os.path.join(work, f"serial{vocab}")
    os.makedirs(out)
    n, wall, cpu = timed(lambda: serial_build(inputs, tok, out))
    rows.append((vocab, "serial, one process", n / wall, n / cpu))
    for workers in (1, 2):
      job = prepare.make_job(inputs, tok, add_bos=False, add_eos=True,
                             output=os.path.join(work, f"store{vocab}-{workers}"))
      manifest, wall, cpu = timed(lambda: prepare.run_local(job, workers))
      n = sum(s["num_tokens"] for s in manifest.splits.values())
      rows.append((vocab, f"prepare, {workers} worker(s)", n / wall, n / cpu))
    parts = breakdown(inputs, tok)
    total = sum(v for k, v in parts.items() if k != "tokens")
    print(f"vocab {vocab}, one shard of {parts['tokens']} tokens: " + ", ".join(
        f"{k} {parts[k]:.2f} s ({parts[k] / total:.0%})" for k in ("read", "encode", "flatten", "write")))
  if rows:
    print("| vocab | build | tokens/s | tokens per CPU-s |\n|---|---|---|---|")
  for vocab, name, rate, per_cpu in rows:
    print(f"| {vocab} | {name} | {rate:,.0f} | {per_cpu:,.0f} |")
  vocab = int(args.vocabs.split(",")[0])
  tok = train_tokenizer(sample, vocab, os.path.join(work, "tok"), corpus_key=str(vocab), model_type="bpe")
  print("| text MB | tokens | make_data + first batch, s | peak RSS, MB | train.py to step 1, s | "
        "its peak RSS, MB |\n|---|---|---|---|---|---|")
  for mb in map(int, args.open_mb.split(",")):
    url = os.path.join(work, f"open-store{mb}")
    if os.path.exists(os.path.join(url, "manifest.json")):
      manifest = store.read_manifest(url)
    else:
      src = write_corpus(os.path.join(work, f"open{mb}"), mb)
      manifest = prepare.run_local(prepare.make_job(shards.Inputs(source=src, val_fraction=0.01), tok,
                                                    add_bos=False, add_eos=True, output=url), 2)
    out = subprocess.run([sys.executable, "-c", OPEN, url, os.path.join(work, "cache"), str(vocab)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    seconds, rss = out.stdout.split()[-2:]
    step1, step1_rss = train_to_step_1(url, vocab, os.path.join(work, f"run{mb}"))
    print(f"| {mb} | {manifest.splits['train']['num_tokens']:,} | {float(seconds):.2f} | {float(rss):.0f} | "
          f"{step1:.1f} | {step1_rss:.0f} |")
  print(f"reader, local store: {reader_rows_per_second(url, vocab, tok):,.0f} rows/s of 1025 tokens")
  if args.gcs:
    print(f"reader, the GCS server: {gcs_reader_rows_per_second(source, tok, vocab, work):,.0f} rows/s")


def reader_rows_per_second(url: str, vocab: int, tok, batches: int = 50) -> float:
  """Rows of 1025 tokens per second that one process's `PackedDataset.batch` reads from the store at `url`."""
  _, streams = store.open_store(url, vocab_size=vocab, add_bos=False, add_eos=True, tokenizer_fingerprint=None)
  ds = PackedDataset.from_stream(streams["train"], 1024, tok.eos_id, 0)
  ds.batch(0, 64)
  _, wall, _ = timed(lambda: [ds.batch(s, 64) for s in range(1, batches + 1)])
  return batches * 64 / wall


def gcs_reader_rows_per_second(source: str, tok, vocab: int, work: str) -> float:
  """`reader_rows_per_second` on the `--mb` corpus prepared into a bucket of the suite's GCS server."""
  sys.path.insert(0, os.path.join(REPO, "tests"))
  import object_store  # pylint: disable=import-outside-toplevel  # tests/object_store.py
  server = object_store.GcsServer(tempfile.mkdtemp(prefix="gcs-", dir=work))
  try:
    os.environ.update(server.env)
    url = server.create_bucket("bench") + "/store"
    prepare.run_local(prepare.make_job(shards.Inputs(source=source, val_fraction=0.01), tok, add_bos=False,
                                       add_eos=True, output=url), 2)
    return reader_rows_per_second(url, vocab, tok, batches=10)
  finally:
    server.stop()


if __name__ == "__main__":
  main()
