"""eval.py against lm-evaluation-harness's `hf` backend, and against its own previous version.

Trains a run (or takes --workdir), exports it (`python -m mile_jax.hf export`),
writes PIQA- and HellaSwag-shaped documents (benchmarks/parity_docs.py, --docs
per task, 0-shot), and scores the same multiple-choice items on this
machine's CPU with the same batch size (rows per forward pass) three ways:
eval.py as it is, eval.py at git revision --previous (its tree extracted with
`git archive`), and lm-eval's `HFLM` on the exported model.

* scoring only: in one process, the log-likelihood call on every request
  the harness builds, the three sides alternating (first call of each
  mile_jax side, which compiles, reported apart);
* total: wall time of the commands a user runs, in fresh processes,
  alternating (`python eval.py --tasks piqa,hellaswag ...` with its persistent
  compilation cache, filled by the first run, and with it turned off, the same
  in the previous tree, `python -m lm_eval --model hf ...` with the harness's
  own task files pointed at the same documents);
* stages: each side's steps in a fresh process (imports, model load,
  building the requests, scoring with its compiles), alternating;
* tokens: the row slots each side runs through the model (padding
  included), the real tokens among them, and the positions it unembeds,
  counted from each side's batching of the same token ids.

Checks: each task's acc and acc_norm equal across the commands, every
request's log-likelihood within --tol (default 1e-4) of the harness's and of
the previous version's, the greedy flags equal. The load average is printed
before and after: measure on an idle machine. Needs requirements-eval.txt.
Nothing is downloaded.

One file on purpose: the four measurements share the trained run, the
documents and the alternation of sides, and a reader checks the comparison's
fairness in one place.

    python benchmarks/eval_vs_hf.py                 # trains the default config for 60 steps
    python benchmarks/eval_vs_hf.py --model 50m     # step_bench.py's 50M model (16384-token vocabulary), 10 steps
    python benchmarks/eval_vs_hf.py --workdir /tmp/mile_run --docs 300 --reps 3
"""

import time

STARTED = time.perf_counter()  # before any import: a stage child's import time counts from here

import argparse  # noqa: E402
import glob  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402

for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
  os.environ[_var] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import parity_docs  # noqa: E402  (standard library only)

# Everything else is imported where it is used, so that a stage child
# imports only its own side's libraries.
TASKS = {"piqa": parity_docs.piqa, "hellaswag": parity_docs.hellaswag}
METRICS = ("acc", "acc_norm")
SIDES = ("eval.py", "previous", "lm_eval hf")
COLD = "eval.py, no compilation cache"  # a command-line side only: eval.py compiling every program afresh
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# The last revision whose eval.py scored one padded request per row.
PREVIOUS = "2e859f4"

# --model: (model settings, data settings, training steps); "50m" is step_bench.py's MODEL_50M.
MODELS = {"default": ({}, {}, 60),
          "wide": (dict(n_layers=8, d_model=512, n_heads=8, n_kv_heads=8, d_ff=1536), {}, 10),
          "50m": (dict(vocab_size=16384, d_model=512, n_layers=10, n_heads=8, n_kv_heads=8, d_ff=1536,
                       max_seq_len=256), dict(seq_len=128), 10)}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="", help="a training workdir; default: train --model")
  p.add_argument("--model", default="default", choices=sorted(MODELS), help="what to train without --workdir")
  p.add_argument("--docs", type=int, default=200, help="scored documents per task")
  p.add_argument("--unique_contexts", action="store_true",
                 help="a distinct goal per PIQA document (parity_docs repeats them, which shared contexts exploit)")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--reps", type=int, default=3, help="alternating repetitions of each measurement")
  p.add_argument("--previous", default=PREVIOUS, help="git revision of this repository to compare; '' to skip")
  p.add_argument("--skip", default="", help="comma-separated parts to skip: scoring, commands, stages")
  p.add_argument("--tol", type=float, default=1e-4, help="largest allowed per-request log-likelihood difference")
  p.add_argument("--dir", default="", help="where to write the run, export, documents and results")
  p.add_argument("--json", default="", help="also write every measurement here")
  p.add_argument("--_stages", default="", help=argparse.SUPPRESS)  # child: "eval.py", "previous" or "lm_eval hf"
  return p.parse_args(argv)


def train(workdir: str, model: str) -> None:
  from mile_jax import config_lib, train_lib  # pylint: disable=import-outside-toplevel
  sizes, data, steps = MODELS[model]
  c = config_lib.base_config()
  c.model.update(**sizes)
  c.data.update(**data)
  c.train.update(steps=steps, log_every=steps, eval_every=0)
  c.optim.warmup_steps = steps // 5
  c.checkpoint.update(every_steps=steps, async_save=False)
  c.mesh.update(shape=(-1, 1, 1), num_devices=1)
  train_lib.Trainer(c, workdir, echo=lambda *a: None).run()


def write_documents(root: str, n: int, unique: bool = False) -> str:
  """<root>/docs/<task>/{validation,train}.jsonl and the harness's task files in <root>/yaml;
  `unique`: every PIQA document gets its own goal."""
  import harness_parity  # pylint: disable=import-outside-toplevel
  docs_dir, yaml_dir = os.path.join(root, "docs"), os.path.join(root, "yaml")
  os.makedirs(yaml_dir, exist_ok=True)
  base = harness_parity._harness_tasks_dir()  # pylint: disable=protected-access
  for name, make in TASKS.items():
    for split, count in (("validation", n), ("train", 8)):
      docs = make(split, count)
      if name == "piqa" and unique:  # parity_docs repeats goals (87 distinct in 200); PIQA's are distinct
        docs = [dict(d, goal=f"{d['goal'][:-1]} (case {i})?") for i, d in enumerate(docs)]
      parity_docs.write_jsonl(os.path.join(docs_dir, name, f"{split}.jsonl"), docs)
    config = harness_parity._task_file(  # pylint: disable=protected-access
        os.path.join(base, harness_parity.HARNESS_FILES[name]), f"vs_{name}", os.path.join(docs_dir, name))
    with open(os.path.join(yaml_dir, f"vs_{name}.yaml"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=1)
  return docs_dir


def previous_tree(revision: str, root: str) -> str:
  """This repository at `revision`, extracted to <root>/previous (once)."""
  tree = os.path.join(root, "previous")
  if not os.path.isdir(tree):
    os.makedirs(tree)
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
  return tree


def previous_lm_module(tree: str):
  """The previous tree's evaluation/lm.py, imported beside the current package."""
  spec = importlib.util.spec_from_file_location("previous_lm", os.path.join(tree, "mile_jax", "evaluation", "lm.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# --- tokens each side computes, from each side's batching of the same token ids ---

def previous_tokens(pairs, batch_size: int, max_len: int) -> dict:
  """The previous eval.py: one request per row, sorted by length, each batch
  padded to a power-of-two length bucket, logits at every slot."""
  from mile_jax.evaluation import lm as lm_lib  # pylint: disable=import-outside-toplevel
  seqs = sorted((len((list(c) + list(x))[-(max_len + 1):]) - 1 for c, x in pairs), reverse=True)
  buckets = lm_lib.length_buckets(max_len)
  slots = sum(batch_size * next(b for b in buckets if b >= seqs[i]) for i in range(0, len(seqs), batch_size))
  return {"slots": slots, "tokens": sum(seqs), "logit_rows": slots}


def hf_tokens(pairs, batch_size: int, max_len: int) -> dict:
  """lm-eval's HFLM: requests equal in context + continuation[:-1] once, sorted
  by length, each batch padded to its longest, logits at every slot."""
  groups = {}
  for c, x in pairs:
    key = tuple(c) + tuple(x[:-1])
    if key not in groups or len(x) > len(groups[key][1]):
      groups[key] = (list(c), list(x))
  reps = sorted(groups.values(), key=lambda p: (-len(p[0] + p[1]), tuple(p[0] + p[1])))
  lengths = [len((c + x)[-(max_len + 1):][:-1]) for c, x in reps]
  slots = sum(len(lengths[i:i + batch_size]) * max(lengths[i:i + batch_size])
              for i in range(0, len(lengths), batch_size))
  return {"slots": slots, "tokens": sum(lengths), "logit_rows": slots}


# --- scoring only ---

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


def score_all(args, restored, hf_dir: str, requests, previous) -> dict:
  """Times {side: [s]}, results {side: [(loglik, greedy)]}, first-call times and compiles, token counts."""
  import jax  # pylint: disable=import-outside-toplevel
  from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
  from mile_jax.evaluation import lm as lm_lib  # pylint: disable=import-outside-toplevel
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, duration, **_: compiles.append(duration) if event == COMPILE_EVENT else None)
  pairs = [tuple(r.args) for r in requests]
  models = {"eval.py": lm_lib.LanguageModel(restored, batch_size=args.batch_size, progress=False)}
  if previous is not None:
    models["previous"] = previous.LanguageModel(restored, batch_size=args.batch_size, progress=False)
  theirs = HFLM(pretrained=hf_dir, batch_size=args.batch_size, device="cpu", dtype="float32")
  calls = {side: (lambda m=m: m.loglikelihood(pairs)) for side, m in models.items()}
  calls["lm_eval hf"] = lambda: theirs.loglikelihood(requests, disable_tqdm=True)
  first = {}
  for side, model in models.items():
    before = len(compiles)
    start = time.perf_counter()
    model.loglikelihood(pairs)
    first[side] = {"seconds": time.perf_counter() - start, "compiles": len(compiles) - before,
                   "compile_seconds": sum(compiles[before:])}
  times = {side: [] for side in calls}
  results = {}
  for rep in range(args.reps):
    order = list(calls)[rep % len(calls):] + list(calls)[:rep % len(calls)]
    for side in order:
      start = time.perf_counter()
      results[side] = calls[side]()
      times[side].append(time.perf_counter() - start)
  token_pairs = [models["eval.py"].encode_pair(c, x) for c, x in pairs]
  stats = models["eval.py"].stats
  tokens = {"eval.py": {k: stats[k] for k in ("slots", "tokens", "logit_rows")},
            "previous": previous_tokens(token_pairs, models["eval.py"].batch_size, restored.max_seq_len),
            "lm_eval hf": hf_tokens(token_pairs, args.batch_size, restored.max_seq_len)}
  return {"times": times, "results": results, "first": first, "tokens": tokens, "scored": stats["scored"],
          "shape": (stats["width"], stats["scored_width"], stats["batches"])}


# --- commands and stages, in fresh processes ---

def _run(cmd: list[str], env: dict, cwd: str = ROOT) -> tuple[float, str]:
  start = time.perf_counter()
  done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
  return time.perf_counter() - start, done.stdout


def run_commands(args, run: str, hf_dir: str, root: str, docs_dir: str, tree: str | None) -> tuple[dict, dict]:
  """(times {side: [s]}, metrics {side: {task: {metric: value}}}), the commands alternating."""
  env = {**os.environ, "HF_DATASETS_CACHE": os.path.join(root, "hf_cache")}
  out = {"eval.py": os.path.join(root, "eval_py.json"), "previous": os.path.join(root, "eval_py_previous.json"),
         "lm_eval hf": os.path.join(root, "lm_eval_out")}
  flags = ["--workdir", run, "--tasks", ",".join(TASKS), "--task_data_dir", docs_dir, "--batch_size",
           str(args.batch_size), "--mesh_shape", "1,1,1"]
  cache = os.path.join(root, "jax_cache")  # the first eval.py command fills it: later ones load their programs
  shutil.rmtree(cache, ignore_errors=True)
  commands = {"eval.py": ([sys.executable, "eval.py", *flags, "--output", out["eval.py"],
                           "--compilation_cache_dir", cache], ROOT),
              COLD: ([sys.executable, "eval.py", *flags, "--output", out["eval.py"] + ".cold",
                      "--compilation_cache_dir="], ROOT),
              "lm_eval hf": ([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                              f"pretrained={hf_dir},dtype=float32", "--tasks", ",".join(f"vs_{n}" for n in TASKS),
                              "--include_path", os.path.join(root, "yaml"), "--batch_size", str(args.batch_size),
                              "--device", "cpu", "--output_path", out["lm_eval hf"]], ROOT)}
  if tree:
    commands["previous"] = ([sys.executable, "eval.py", *flags, "--output", out["previous"]], tree)
  times = {side: [] for side in commands}
  for rep in range(args.reps):
    order = list(commands)[rep % len(commands):] + list(commands)[:rep % len(commands)]
    for side in order:
      times[side].append(_run(commands[side][0], env, commands[side][1])[0])
  metrics = {}
  for side in ("eval.py", "previous"):
    if side in commands:
      with open(out[side], encoding="utf-8") as f:
        metrics[side] = {n: {m: v["value"] for m, v in t["metrics"].items()} for n, t in json.load(f)["tasks"].items()}
  newest = max(glob.glob(os.path.join(out["lm_eval hf"], "**", "results_*.json"), recursive=True),
               key=os.path.getmtime)
  with open(newest, encoding="utf-8") as f:
    results = json.load(f)["results"]
  metrics["lm_eval hf"] = {n: {m: results[f"vs_{n}"][f"{m},none"] for m in METRICS} for n in TASKS}
  return times, metrics


def stages_child(args) -> None:
  """A fresh process: one side's steps, timed; prints them as JSON."""
  start = STARTED
  out = {}
  if args._stages == "lm_eval hf":  # pylint: disable=protected-access
    import lm_eval.evaluator  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    from lm_eval.models.huggingface import HFLM  # pylint: disable=import-outside-toplevel
    out["import"] = time.perf_counter() - start
    model = HFLM(pretrained=os.path.join(args.dir, "hf"), batch_size=args.batch_size, device="cpu", dtype="float32")
    out["load model"] = time.perf_counter() - start - sum(out.values())
    requests = harness_requests(args.dir)
    out["build requests"] = time.perf_counter() - start - sum(out.values())
    model.loglikelihood(requests, disable_tqdm=True)
    out["score"] = time.perf_counter() - start - sum(out.values())
  else:
    import jax  # pylint: disable=import-outside-toplevel
    from mile_jax.evaluation import lm as lm_lib, restore as restore_lib  # pylint: disable=import-outside-toplevel
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compiles.append(duration) if event == COMPILE_EVENT else None)
    from mile_jax.evaluation import task_eval, tasks as tasks_lib  # pylint: disable=import-outside-toplevel
    lm_module = lm_lib if args._stages == "eval.py" else previous_lm_module(os.path.join(args.dir, "previous"))  # pylint: disable=protected-access
    out["import"] = time.perf_counter() - start
    restored = restore_lib.restore(args.workdir, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
    lm = lm_module.LanguageModel(restored, batch_size=args.batch_size, progress=False)
    out["load model"] = time.perf_counter() - start - sum(out.values())
    prepared = [task_eval.prepare(tasks_lib.TASKS[n], num_fewshot=0, limit=0, task_source="local",
                                  task_data_dir=os.path.join(args.dir, "docs"), tfds_data_dir="") for n in TASKS]
    out["build requests"] = time.perf_counter() - start - sum(out.values())
    if args._stages == "eval.py":  # pylint: disable=protected-access
      task_eval.score_all(lm, prepared)  # as eval.py: every task's requests in one call
    else:
      for p in prepared:  # as the previous eval.py: task by task
        task_eval.score(lm, p)
    out["score"] = time.perf_counter() - start - sum(out.values())
    out["of which compile"] = sum(compiles)
    out["compiles"] = len(compiles)
  print(json.dumps(out))


def run_stages(args, run: str, root: str, sides) -> dict:
  """{side: {stage: median seconds}}, fresh processes alternating; "process" is the whole process's wall time."""
  this = os.path.abspath(__file__)
  got = {side: [] for side in sides}
  for rep in range(args.reps):
    order = list(sides)[rep % len(sides):] + list(sides)[:rep % len(sides)]
    for side in order:
      cmd = [sys.executable, this, f"--_stages={side}", "--dir", root, "--workdir", run,
             "--batch_size", str(args.batch_size)]
      seconds, stdout = _run(cmd, {**os.environ, "HF_DATASETS_CACHE": os.path.join(root, "hf_cache")})
      got[side].append({**json.loads(stdout.strip().splitlines()[-1]), "process": seconds})
  return {side: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for side, runs in got.items()}


# --- report ---

def _median_range(times) -> str:
  return f"{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f})"


def report(args, restored, requests, scoring, totals, metrics, stages, loads) -> bool:
  import jax, lm_eval, torch, transformers  # pylint: disable=import-outside-toplevel,multiple-imports
  params = sum(x.size for x in jax.tree.leaves(restored.params))
  print(f"\njax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, transformers {transformers.__version__}, lm-eval "
        f"{lm_eval.__version__}; {os.cpu_count()} CPU cores; load average (1 min) {loads[0]:.2f} before, "
        f"{loads[1]:.2f} after")
  print(f"checkpoint {restored.workdir} step {restored.step} ({params / 1e6:.2f}M parameters, vocabulary "
        f"{restored.config.model.vocab_size}); {len(requests)} requests ({', '.join(f'{args.docs} {n}' for n in TASKS)}"
        f" documents, 0-shot{', distinct PIQA goals' if args.unique_contexts else ''}), batch {args.batch_size} rows; previous = revision {args.previous or '(skipped)'}; "
        f"{args.reps} alternating repetitions, medians (min-max)\n")
  ok = True
  if metrics:
    sides = [s for s in SIDES if s in metrics]
    print("| task | metric | " + " | ".join(sides) + " | equal |")
    print("|---|---|" + "---|" * len(sides) + "---|")
    for name in TASKS:
      for m in METRICS:
        values = [metrics[s][name][m] for s in sides]
        ok &= len(set(values)) == 1
        print(f"| {name} | {m} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {'yes' if len(set(values)) == 1 else 'NO'} |")
    print()
  if scoring:
    ours = scoring["results"]["eval.py"]
    for side in ("previous", "lm_eval hf"):
      if side in scoring["results"]:
        other = scoring["results"][side]
        worst = max(abs(a[0] - b[0]) for a, b in zip(ours, other))
        flags = sum(a[1] != b[1] for a, b in zip(ours, other))
        ok &= worst <= args.tol and flags == 0
        print(f"eval.py against {side}: largest per-request |log-likelihood difference| {worst:.2e} "
              f"(tolerance {args.tol:g}), {flags} greedy flags differ, over {len(ours)} requests")
    width, s, batches = scoring["shape"]
    print(f"\neval.py's batches: {batches} of {args.batch_size} rows x {width} slots, {s} unembedded positions "
          f"per row group; {scoring['scored']} continuation tokens scored\n")
    print("| tokens | row slots computed | real input tokens | positions unembedded |")
    print("|---|---|---|---|")
    for side, t in scoring["tokens"].items():
      if side in scoring["results"]:
        print(f"| {side} | {t['slots']:,} | {t['tokens']:,} | {t['logit_rows']:,} |")
    print("\n| scoring only (s) | " + " | ".join(s for s in SIDES if s in scoring["times"]) + " |")
    print("|---|" + "---|" * len(scoring["times"]))
    print("| log-likelihood call | " + " | ".join(_median_range(scoring["times"][s]) for s in SIDES
                                                 if s in scoring["times"]) + " |")
    print("| first call (compiles) | " + " | ".join(
        f"{scoring['first'][s]['seconds']:.2f} ({scoring['first'][s]['compiles']} compiles, "
        f"{scoring['first'][s]['compile_seconds']:.2f} s)" if s in scoring["first"] else "" for s in SIDES
        if s in scoring["times"]) + " |")
    base = statistics.median(scoring["times"]["eval.py"])
    print("\nscoring speed-up of eval.py: " + ", ".join(
        f"{statistics.median(t) / base:.2f}x against {s}" for s, t in scoring["times"].items() if s != "eval.py"))
  if totals:
    sides = [s for s in (SIDES[0], COLD, *SIDES[1:]) if s in totals]
    print("\n| command, total (s) | " + " | ".join(sides) + " |")
    print("|---|" + "---|" * len(sides))
    print("| wall time | " + " | ".join(_median_range(totals[s]) for s in sides) + " |")
    print(f"(eval.py: the first of the {args.reps} runs compiles and fills the persistent compilation cache, "
          f"{totals['eval.py'][0]:.2f} s; the others load from it)")
    base = statistics.median(totals["eval.py"])
    print("\nend-to-end speed-up of eval.py: " + ", ".join(
        f"{statistics.median(t) / base:.2f}x against {s}" for s, t in totals.items() if s != "eval.py"))
  if stages:
    names = ["import", "load model", "build requests", "score", "of which compile", "process"]
    print("\n| stage, fresh process (s) | " + " | ".join(stages) + " |")
    print("|---|" + "---|" * len(stages))
    for name in names:
      print(f"| {name} | " + " | ".join(f"{stages[s][name]:.2f}" if name in stages[s] else "" for s in stages) + " |")
    print("| compiles | " + " | ".join(str(int(stages[s].get("compiles", 0))) if "compiles" in stages[s] else ""
                                       for s in stages) + " |")
  return ok


def main(argv=None):
  args = parse_args(argv)
  if args._stages:  # pylint: disable=protected-access
    stages_child(args)
    return
  import jax  # pylint: disable=import-outside-toplevel
  from mile_jax.evaluation import restore as restore_lib  # pylint: disable=import-outside-toplevel
  from mile_jax.hf import convert as hf  # pylint: disable=import-outside-toplevel
  skip = set(filter(None, args.skip.split(",")))
  root = args.dir or tempfile.mkdtemp(prefix="eval_vs_hf_")
  run = args.workdir or os.path.join(root, "run")
  if not args.workdir and not os.path.isdir(os.path.join(run, "checkpoints")):
    print(f"training the {args.model} model for {MODELS[args.model][2]} steps in {run}")
    train(run, args.model)
  hf_dir = os.path.join(root, "hf")
  if not os.path.isdir(hf_dir):
    hf.export(run, hf_dir)
  docs_dir = write_documents(root, args.docs, args.unique_contexts)
  tree = previous_tree(args.previous, root) if args.previous else None
  restored = restore_lib.restore(run, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  requests = harness_requests(root)
  loads = [os.getloadavg()[0]]
  scoring = (None if "scoring" in skip else
             score_all(args, restored, hf_dir, requests, previous_lm_module(tree) if tree else None))
  totals, metrics = (None, None) if "commands" in skip else run_commands(args, restored.workdir, hf_dir, root,
                                                                         docs_dir, tree)
  sides = [s for s in SIDES if s != "previous" or tree]
  stages = None if "stages" in skip else run_stages(args, restored.workdir, root, sides)
  loads.append(os.getloadavg()[0])
  ok = report(args, restored, requests, scoring, totals, metrics, stages, loads)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"scoring": scoring and {k: v for k, v in scoring.items() if k != "results"}, "totals": totals,
                 "metrics": metrics, "stages": stages, "load": loads}, f, indent=1, default=str)
  if not ok:
    raise SystemExit("eval.py, its previous version and lm_eval's hf backend disagree")


if __name__ == "__main__":
  main()
