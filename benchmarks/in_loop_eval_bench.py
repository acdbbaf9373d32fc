"""The share of a training run's wall time spent evaluating inside the loop.

Trains a config (default: configs/default.py, 300 steps, validation every 100)
with `train.eval_tasks` set to two benchmarks at `train.eval_tasks_limit`
documents each, scored every --tasks_every steps, and times each part of the
loop: the train steps, the `[eval]` loss estimate, the per-bucket perplexity
and the benchmarks (cold: the first call, which compiles; warm: the others).

No benchmark data is downloaded: the documents are written here in the PIQA
and HellaSwag layouts, with word counts near the real sets' means (PIQA: goal
8 words, two solutions of 20; HellaSwag: a 25 + 5 word context and four
18-word endings), the words drawn from the built-in corpus so that they
tokenize like text. Scores are meaningless; the cost is what a real set of
these lengths costs.

    python benchmarks/in_loop_eval_bench.py
    python benchmarks/in_loop_eval_bench.py --limit 200 --tasks_every 100 --steps 300
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from mile_jax import config_lib  # noqa: E402
from mile_jax import train_lib  # noqa: E402
from mile_jax.data import builtin  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--eval_every", type=int, default=100)
  p.add_argument("--tasks_every", type=int, default=100)
  p.add_argument("--limit", type=int, default=200)
  p.add_argument("--batch_size", type=int, default=32, help="train.eval_tasks_batch_size")
  p.add_argument("--model", default="default", choices=sorted(config_lib.PAPER_MODELS) + ["default"],
                 help="default: configs/default.py; a paper size (then --global_batch and --seq_len apply)")
  p.add_argument("--global_batch", type=int, default=0, help="data.global_batch_size for a paper size")
  p.add_argument("--seq_len", type=int, default=0, help="data.seq_len for a paper size")
  return p.parse_args(argv)


def write_tasks(root: str, count: int) -> None:
  words = " ".join(text for _, text in builtin.pydocs_documents()[:200]).split()
  rng = random.Random(0)
  span = lambda n: " ".join(words[(i := rng.randrange(len(words) - n)):i + n])  # noqa: E731
  piqa = [{"goal": span(8), "sol1": span(20), "sol2": span(20), "label": i % 2} for i in range(count)]
  hellaswag = [{"activity_label": span(2), "ctx_a": span(25), "ctx_b": span(5), "label": str(i % 4),
                "endings": [span(18) for _ in range(4)]} for i in range(count)]
  for name, docs in (("piqa", piqa), ("hellaswag", hellaswag)):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    with open(os.path.join(root, name, "validation.jsonl"), "w", encoding="utf-8") as f:
      f.write("".join(json.dumps(d) + "\n" for d in docs))


def timed(record: list, fn):
  def wrapper(*args, **kwargs):
    began = time.perf_counter()
    out = fn(*args, **kwargs)
    record.append(time.perf_counter() - began)
    return out
  return wrapper


def main(argv=None):
  args = parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    write_tasks(os.path.join(tmp, "tasks"), args.limit)
    if args.model == "default":
      config = config_lib.base_config()
    else:
      config = config_lib.paper_config(args.model)
      config.data.update(global_batch_size=args.global_batch or 32, seq_len=args.seq_len or 1024)
      config.train.update(log_every=25, eval_batches=8)
    config.optim.warmup_steps = min(config.optim.warmup_steps, args.steps - 1)
    config.train.update(steps=args.steps, eval_every=args.eval_every, eval_tasks="piqa,hellaswag",
                        eval_tasks_every=args.tasks_every, eval_tasks_limit=args.limit,
                        eval_tasks_data_dir=os.path.join(tmp, "tasks"), eval_tasks_batch_size=args.batch_size)
    config.checkpoint.update(every_steps=args.steps, async_save=False)
    trainer = train_lib.Trainer(config, os.path.join(tmp, "run"))
    times = {"[eval] loss": [], "[buckets]": [], "[tasks]": []}
    trainer.evaluate = timed(times["[eval] loss"], trainer.evaluate)
    trainer.in_loop.write_buckets = timed(times["[buckets]"], trainer.in_loop.write_buckets)
    trainer.in_loop.write_tasks = timed(times["[tasks]"], trainer.in_loop.write_tasks)
    began = time.perf_counter()
    trainer.run()
    wall = time.perf_counter() - began
  print(f"\n{jax.devices()[0].device_kind} x {len(jax.devices())}; {args.model} config, {args.steps} steps; "
        f"tasks piqa,hellaswag at limit {args.limit} every {args.tasks_every} steps; wall {wall:.1f} s\n")
  print("| part | calls | total (s) | share of wall | first call (s) | later calls, mean (s) |")
  print("|---|---|---|---|---|---|")
  for name, spent in times.items():
    later = f"{sum(spent[1:]) / len(spent[1:]):.2f}" if len(spent) > 1 else ""
    print(f"| {name} | {len(spent)} | {sum(spent):.1f} | {sum(spent) / wall:.1%} | "
          f"{spent[0] if spent else 0:.2f} | {later} |")
  in_loop = sum(times["[buckets]"]) + sum(times["[tasks]"])
  print(f"\nIn-loop evaluation (buckets + tasks): {in_loop:.1f} s = {in_loop / wall:.1%} of the wall time")


if __name__ == "__main__":
  main()
