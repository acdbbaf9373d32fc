"""eval.py against lm-evaluation-harness's `hf` backend on the same checkpoint.

Trains a run (or takes --workdir), exports it (`python -m mile_jax.hf export`),
writes PIQA- and HellaSwag-shaped documents (benchmarks/parity_docs.py, --docs
per task, 0-shot), and scores the same multiple-choice items both ways on
this machine's CPU with the same batch size:

* total: wall time of the commands a user runs, in fresh processes,
  alternating (`python eval.py --tasks piqa,hellaswag ...` against
  `python -m lm_eval --model hf --model_args pretrained=HF_DIR,dtype=float32
  ...` with the harness's own task files pointed at the same documents);
* scoring only: in one process, the log-likelihood call on every request
  the harness builds, mile_jax's `LanguageModel` against lm-eval's `HFLM`,
  alternating; the first mile_jax call (which compiles) is reported apart.

Checks: each task's acc and acc_norm equal between the two commands, and
every request's log-likelihood within --tol (default 1e-4) between the two
models. Needs requirements-eval.txt. Nothing is downloaded.

    python benchmarks/eval_vs_hf.py                 # trains the default config for 60 steps
    python benchmarks/eval_vs_hf.py --model wide    # 28M parameters, 10 steps
    python benchmarks/eval_vs_hf.py --workdir /tmp/mile_run --docs 300 --reps 3
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
  os.environ[_var] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import harness_parity  # noqa: E402
import parity_docs  # noqa: E402
from mile_jax import hf  # noqa: E402
from mile_jax.evaluation import lm as lm_lib  # noqa: E402
from mile_jax.evaluation import restore as restore_lib  # noqa: E402

TASKS = {"piqa": parity_docs.piqa, "hellaswag": parity_docs.hellaswag}
METRICS = ("acc", "acc_norm")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="", help="a training workdir; default: train --model")
  p.add_argument("--model", default="default", choices=sorted(MODELS), help="what to train without --workdir")
  p.add_argument("--docs", type=int, default=200, help="scored documents per task")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--reps", type=int, default=3, help="alternating repetitions of each measurement")
  p.add_argument("--tol", type=float, default=1e-4, help="largest allowed per-request log-likelihood difference")
  p.add_argument("--dir", default="", help="where to write the run, export, documents and results")
  return p.parse_args(argv)


# --model: the default config trained 60 steps, or a wider one (8 layers, d_model 512, 28M parameters) 10 steps.
MODELS = {"default": ({}, 60), "wide": (dict(n_layers=8, d_model=512, n_heads=8, n_kv_heads=8, d_ff=1536), 10)}


def train(workdir: str, model: str) -> None:
  from mile_jax import config_lib, train_lib  # pylint: disable=import-outside-toplevel
  sizes, steps = MODELS[model]
  c = config_lib.base_config()
  c.model.update(**sizes)
  c.train.update(steps=steps, log_every=steps, eval_every=0)
  c.optim.warmup_steps = steps // 5
  c.checkpoint.update(every_steps=steps, async_save=False)
  c.mesh.update(shape=(-1, 1, 1), num_devices=1)
  train_lib.Trainer(c, workdir, echo=lambda *a: None).run()


def write_documents(root: str, n: int) -> str:
  """<root>/docs/<task>/{validation,train}.jsonl and the harness's task files in <root>/yaml."""
  docs_dir, yaml_dir = os.path.join(root, "docs"), os.path.join(root, "yaml")
  os.makedirs(yaml_dir, exist_ok=True)
  base = harness_parity._harness_tasks_dir()  # pylint: disable=protected-access
  for name, make in TASKS.items():
    for split, count in (("validation", n), ("train", 8)):
      parity_docs.write_jsonl(os.path.join(docs_dir, name, f"{split}.jsonl"), make(split, count))
    config = harness_parity._task_file(  # pylint: disable=protected-access
        os.path.join(base, harness_parity.HARNESS_FILES[name]), f"vs_{name}", os.path.join(docs_dir, name))
    with open(os.path.join(yaml_dir, f"vs_{name}.yaml"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=1)
  return docs_dir


def _timed(cmd: list[str], env: dict) -> float:
  start = time.perf_counter()
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  return time.perf_counter() - start


def run_commands(args, run: str, hf_dir: str, root: str, docs_dir: str) -> tuple[dict, dict, dict]:
  """(times {side: [s]}, eval.py metrics, lm_eval metrics), the two commands alternating."""
  env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(root, "hf_cache")}
  ours_json, theirs_dir = os.path.join(root, "eval_py.json"), os.path.join(root, "lm_eval_out")
  eval_py = [sys.executable, "eval.py", "--workdir", run, "--tasks", ",".join(TASKS), "--task_data_dir", docs_dir,
             "--batch_size", str(args.batch_size), "--mesh_shape", "1,1,1", "--output", ours_json]
  lm_eval = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32",
             "--tasks", ",".join(f"vs_{n}" for n in TASKS), "--include_path", os.path.join(root, "yaml"),
             "--batch_size", str(args.batch_size), "--device", "cpu", "--output_path", theirs_dir]
  times = {"eval.py": [], "lm_eval hf": []}
  for _ in range(args.reps):
    times["eval.py"].append(_timed(eval_py, env))
    times["lm_eval hf"].append(_timed(lm_eval, env))
  with open(ours_json, encoding="utf-8") as f:
    ours = {n: {m: v["value"] for m, v in t["metrics"].items()} for n, t in json.load(f)["tasks"].items()}
  newest = max(glob.glob(os.path.join(theirs_dir, "**", "results_*.json"), recursive=True), key=os.path.getmtime)
  with open(newest, encoding="utf-8") as f:
    results = json.load(f)["results"]
  theirs = {n: {m: results[f"vs_{n}"][f"{m},none"] for m in METRICS} for n in TASKS}
  return times, ours, theirs


def harness_requests(root: str):
  """The loglikelihood Instances lm-eval builds for the tasks (0-shot)."""
  from lm_eval.tasks import TaskManager, get_task_dict  # pylint: disable=import-outside-toplevel
  with warnings.catch_warnings():  # deprecated in 0.4.13 for TaskManager.load, which older 0.4 releases lack
    warnings.simplefilter("ignore", DeprecationWarning)
    tasks = get_task_dict([f"vs_{n}" for n in TASKS], TaskManager(include_path=os.path.join(root, "yaml")))
  requests = []
  for task in tasks.values():
    task.set_config(key="num_fewshot", value=0)
    task.build_all_requests(rank=0, world_size=1)
    requests += task.instances
  return requests


def score_both(args, restored, hf_dir: str, requests) -> tuple[dict, list[float], list[float], float]:
  """Scoring times {side: [s]}, both sides' log-likelihoods, and mile_jax's first (compiling) call's time."""
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
  ours_lm = lm_lib.LanguageModel(restored, batch_size=args.batch_size, progress=False)
  theirs_lm = HFLM(pretrained=hf_dir, batch_size=args.batch_size, device="cpu", dtype="float32")
  pairs = [tuple(r.args) for r in requests]
  start = time.perf_counter()
  ours = [ll for ll, _ in ours_lm.loglikelihood(pairs)]
  cold = time.perf_counter() - start
  times = {"eval.py": [], "lm_eval hf": []}
  for _ in range(args.reps):
    start = time.perf_counter()
    ours = [ll for ll, _ in ours_lm.loglikelihood(pairs)]
    times["eval.py"].append(time.perf_counter() - start)
    start = time.perf_counter()
    theirs = [ll for ll, _ in theirs_lm.loglikelihood(requests, disable_tqdm=True)]
    times["lm_eval hf"].append(time.perf_counter() - start)
  return times, ours, theirs, cold


def main(argv=None):
  args = parse_args(argv)
  root = args.dir or tempfile.mkdtemp(prefix="eval_vs_hf_")
  run = args.workdir or os.path.join(root, "run")
  if not args.workdir:
    print(f"training the {args.model} model for {MODELS[args.model][1]} steps in {run}")
    train(run, args.model)
  hf_dir = os.path.join(root, "hf")
  if not os.path.isdir(hf_dir):
    hf.export(run, hf_dir)
  docs_dir = write_documents(root, args.docs)
  restored = restore_lib.restore(run, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  requests = harness_requests(root)
  score_times, ours, theirs, cold = score_both(args, restored, hf_dir, requests)
  worst = max(abs(a - b) for a, b in zip(ours, theirs))
  total_times, ours_metrics, theirs_metrics = run_commands(args, restored.workdir, hf_dir, root, docs_dir)

  params = sum(x.size for x in jax.tree.leaves(restored.params))
  import lm_eval, torch, transformers  # pylint: disable=import-outside-toplevel,multiple-imports
  print(f"\njax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, transformers {transformers.__version__}, lm-eval "
        f"{lm_eval.__version__}; {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end")
  print(f"\ncheckpoint {restored.workdir} step {restored.step} ({params / 1e6:.2f}M parameters), exported to "
        f"{hf_dir}; {len(requests)} requests ({', '.join(f'{args.docs} {n}' for n in TASKS)} documents), "
        f"batch {args.batch_size}, {args.reps} alternating repetitions, medians\n")
  print("| task | metric | eval.py | lm_eval hf | equal |")
  print("|---|---|---|---|---|")
  same = True
  for name in TASKS:
    for m in METRICS:
      a, b = ours_metrics[name][m], theirs_metrics[name][m]
      same &= a == b
      print(f"| {name} | {m} | {a:.4f} | {b:.4f} | {'yes' if a == b else 'NO'} |")
  print(f"\nper-request log-likelihood: largest |difference| {worst:.2e} over {len(requests)} requests "
        f"(tolerance {args.tol:g})\n")
  print("| time (s) | eval.py | lm_eval hf | eval.py / lm_eval hf |")
  print("|---|---|---|---|")
  for label, times in (("total (command)", total_times), ("scoring only", score_times)):
    a, b = statistics.median(times["eval.py"]), statistics.median(times["lm_eval hf"])
    print(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
  print(f"| scoring, first call (compiles) | {cold:.2f} | | |")
  if not same or worst > args.tol:
    raise SystemExit("eval.py and lm_eval's hf backend disagree")


if __name__ == "__main__":
  main()
