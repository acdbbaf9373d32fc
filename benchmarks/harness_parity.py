"""mile_jax's benchmark tasks against lm-evaluation-harness's own task definitions.

Writes invented documents for every task (benchmarks/parity_docs.py), points
the harness's own task files at them (a local YAML per task that `include:`s
the installed harness's file and replaces only where the data comes from, so
its templates and `process_docs` run unchanged), and runs each task both ways
on one checkpoint, with the harness driving `harness.HarnessLM`:

* requests: each harness request (document, choice index, arguments) against
  mile_jax's `tasks.build_examples` for the same documents and few-shot count;
* metrics: the harness's acc / acc_norm / exact_match and their standard
  errors against `runner.score_tasks` (MMLU: the size-weighted group of its
  subjects).

TriviaQA's scored documents get a variant of the model's own answer as an
extra alias: in other case with punctuation added (a match) for every fourth
document, padded with spaces (no match) for another fourth, so that exact
match is neither 0 nor 1 (the scored document that is also in the few-shot
pool is the first one, which keeps its aliases). Nothing is downloaded. Needs lm-eval and
torch beside mile_jax's requirements (requirements-eval.txt):

    python benchmarks/harness_parity.py --workdir /tmp/mile_run --shots 0,3
    python benchmarks/harness_parity.py        # trains a 40-step tiny run first
"""

import argparse
import json
import logging
import math
import os
import sys
import tempfile

for _var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
  os.environ[_var] = "1"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

import parity_docs  # noqa: E402
from mile_jax.evaluation import harness  # noqa: E402
from mile_jax.evaluation import lm as lm_lib  # noqa: E402
from mile_jax.evaluation import restore as restore_lib  # noqa: E402
from mile_jax.evaluation import runner  # noqa: E402
from mile_jax.evaluation import task_data  # noqa: E402
from mile_jax.evaluation import tasks as tasks_lib  # noqa: E402

# mile_jax task -> the harness's task file, relative to lm_eval/tasks/.
HARNESS_FILES = {
    "hellaswag": "hellaswag/hellaswag.yaml", "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "siqa": "siqa/siqa.yaml", "boolq": "super_glue/boolq/default.yaml",
    "triviaqa": "triviaqa/default.yaml",
}
HARNESS_FILTER = {"triviaqa": "remove_whitespace"}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="", help="a training workdir; default: train a tiny run in a temporary one")
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--tasks", default=",".join(tasks_lib.TASKS))
  p.add_argument("--shots", default="0,3", help="few-shot counts to compare, comma-separated")
  p.add_argument("--data_dir", default="", help="where to write documents and task files; default a temporary one")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--max_gen_toks", type=int, default=16, help="TriviaQA generation length, on both sides")
  p.add_argument("--json", default="", help="also write the rows here")
  return p.parse_args(argv)


def train_tiny(workdir: str) -> None:
  from mile_jax import config_lib  # pylint: disable=import-outside-toplevel
  from mile_jax import train_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config()
  c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256)
  c.data.update(seq_len=64, global_batch_size=8)
  c.train.update(steps=40, log_every=20, eval_every=0)
  c.checkpoint.update(every_steps=40, async_save=False)
  c.mesh.update(shape=(-1, 1, 1), num_devices=1)
  train_lib.Trainer(c, workdir, devices=jax.devices()[:1], echo=lambda *a: None).run()


# --- task files ------------------------------------------------------------

def _harness_tasks_dir() -> str:
  import lm_eval.tasks  # pylint: disable=import-outside-toplevel
  return os.path.dirname(os.path.abspath(lm_eval.tasks.__file__))


def _task_file(include: str, name: str, data_dir: str) -> dict:
  files = {f[:-len(".jsonl")]: os.path.join(data_dir, f) for f in sorted(os.listdir(data_dir))}
  return {"include": include, "task": name, "tag": [], "dataset_path": "json", "dataset_name": None,
          "dataset_kwargs": {"data_files": files}}


def write_task_files(root: str) -> dict[str, str]:
  """One YAML per task under <root>/yaml (JSON is YAML); returns mile_jax name -> harness name."""
  base, out_dir = _harness_tasks_dir(), os.path.join(root, "yaml")
  os.makedirs(out_dir, exist_ok=True)
  names, configs = {}, {}
  for name, rel in HARNESS_FILES.items():
    names[name] = f"parity_{name}"
    configs[names[name]] = _task_file(os.path.join(base, rel), names[name], os.path.join(root, name))
  subjects = []
  for subject in parity_docs.MMLU_SUBJECTS:
    sub = f"parity_mmlu_{subject}"
    subjects.append(sub)
    configs[sub] = _task_file(os.path.join(base, "mmlu", "default", f"mmlu_{subject}.yaml"), sub,
                              os.path.join(root, f"mmlu_{subject}"))
  names["mmlu"] = "parity_mmlu"
  configs["parity_mmlu"] = {"group": "parity_mmlu", "task": subjects,
                            "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                            "metadata": {"version": 2}}
  for file_name, config in configs.items():
    with open(os.path.join(out_dir, f"{file_name}.yaml"), "w", encoding="utf-8") as f:
      json.dump(config, f, indent=1)
  return names


# --- the two sides ---------------------------------------------------------

class RecordingLM(harness.HarnessLM):
  """HarnessLM that keeps every request it is given and its answer as
  (task, doc id, choice index, args, log-likelihood or generated text)."""

  def __init__(self, lm, max_gen_toks):
    super().__init__(lm=lm)
    self.seen, self.max_gen_toks = [], max_gen_toks

  def loglikelihood(self, requests, disable_tqdm=False):
    answers = super().loglikelihood(requests, disable_tqdm)
    self.seen.extend((r.task_name, r.doc_id, r.idx, r.args, ll) for r, (ll, _) in zip(requests, answers))
    return answers

  def generate_until(self, requests, disable_tqdm=False):
    args = [r.args for r in requests]  # before the length limit is added
    for r in requests:  # the same length limit as the mile_jax side
      r.arguments[1].setdefault("max_gen_toks", self.max_gen_toks)
    answers = super().generate_until(requests, disable_tqdm)
    self.seen.extend((r.task_name, r.doc_id, r.idx, a, t) for r, a, t in zip(requests, args, answers))
    return answers


def run_harness(model: RecordingLM, harness_name: str, shots: int, yaml_dir: str):
  import lm_eval  # pylint: disable=import-outside-toplevel
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  model.seen = []
  out = lm_eval.simple_evaluate(model=model, tasks=[harness_name], num_fewshot=shots,
                                task_manager=TaskManager(include_path=yaml_dir), bootstrap_iters=100,
                                log_samples=False, verbosity="ERROR")
  return out["results"], list(model.seen)


def mile_requests(task: tasks_lib.Task, data_dir: str, shots: int) -> dict[tuple[str, int], list[tuple]]:
  """(sub-task, doc index) -> the request arguments, in the harness's form."""
  docs = task_data.load_split(data_dir, task, task.eval_split)
  pool = task_data.load_split(data_dir, task, task.fewshot_split) if shots else []
  out = {}
  for sub, sub_docs, sub_pool in tasks_lib.split_subtasks(task, docs, pool):
    for i, e in enumerate(tasks_lib.build_examples(task, sub_docs, sub_pool, shots)):
      out[(sub, i)] = ([(e.prompt, {"until": list(task.until)})] if task.output == "generate_until"
                       else [tuple(r) for r in e.requests])
  return out


def harness_requests(seen, names: dict[str, str]):
  """(sub-task, doc id) -> request arguments, and (sub-task, doc id, choice index) -> answer."""
  back = {v: k for k, v in names.items()}
  grouped: dict[tuple[str, int], dict[int, tuple]] = {}
  answers = {}
  for task_name, doc_id, idx, args, answer in seen:
    sub = back.get(task_name) or task_name.replace("parity_", "", 1)
    if len(args) > 1 and isinstance(args[1], dict):  # keep what decides the output
      args = (args[0], {"until": list(args[1].get("until", []))})
    grouped.setdefault((sub, doc_id), {})[idx] = tuple(args)
    answers[(sub, doc_id, idx)] = answer
  return {k: [v[i] for i in sorted(v)] for k, v in grouped.items()}, answers


def mile_answers(lm, task: tasks_lib.Task, ours: dict, max_gen_toks: int) -> dict[tuple[str, int, int], object]:
  """The model's answer to each mile_jax request, in one call as runner.score_tasks makes it."""
  keys = [(sub, i, j) for (sub, i), reqs in ours.items() for j in range(len(reqs))]
  flat = [ours[(sub, i)][j] for sub, i, j in keys]
  if task.output == "generate_until":
    answers = lm.generate_until([ctx for ctx, _ in flat], task.until, max_gen_toks)
  else:
    answers = [ll for ll, _ in lm.loglikelihood(flat)]
  return dict(zip(keys, answers))


def _answers_agree(task, theirs: dict, ours: dict) -> str:
  if task.output == "generate_until":
    return f"{sum(theirs.get(k) == v for k, v in ours.items())}/{len(ours)} same text"
  worst = max((abs(theirs[k] - v) if k in theirs else math.inf for k, v in ours.items()), default=0.0)
  return f"{worst:.2g}"


def compare(name: str, shots: int, lm, model: RecordingLM, names: dict[str, str], root: str, max_gen_toks: int):
  task = tasks_lib.TASKS[name]
  results, seen = run_harness(model, names[name], shots, os.path.join(root, "yaml"))
  (theirs, their_answers), ours = harness_requests(seen, names), mile_requests(task, root, shots)
  same = sum(theirs.get(k) == v for k, v in ours.items())
  first_diff = next(((k, theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v), None)
  entry = runner.score_tasks(lm, [name], runner.EvalOptions(workdir="", task_data_dir=root, num_fewshot=shots,
                                                            max_gen_toks=max_gen_toks))[name]
  res = results[names[name]]
  filt = HARNESS_FILTER.get(name, "none")
  metrics = {}
  for m in task.metrics:
    h_value, h_se = res.get(f"{m},{filt}"), res.get(f"{m}_stderr,{filt}")
    metrics[m] = {"harness": (h_value, h_se),
                  "mile_jax": (entry["metrics"][m]["value"], entry["metrics"][m]["stderr"])}
  return {"task": name, "shots": shots, "docs": len(ours), "requests_same": same,
          "extra_harness_docs": len(set(theirs) - set(ours)), "metrics": metrics, "first_diff": first_diff,
          "answers": _answers_agree(task, their_answers, mile_answers(lm, task, ours, max_gen_toks))}


def _number(x) -> float:
  """The harness writes "N/A" where mile_jax writes nan (a standard error of one value)."""
  return float("nan") if x in ("N/A", None) else float(x)


def _diff(a, b) -> float:
  a, b = _number(a), _number(b)
  return 0.0 if math.isnan(a) and math.isnan(b) else abs(a - b)


def print_table(rows) -> None:
  print("| task | shots | requests identical | max abs diff log-lik / generations | metric | harness | mile_jax "
        "| max abs diff |")
  print("|---|---|---|---|---|---|---|---|")
  for row in rows:
    same = f"{row['requests_same']}/{row['docs']}" + (f" (+{row['extra_harness_docs']})" if row["extra_harness_docs"] else "")
    for m, v in row["metrics"].items():
      (hv, hs), (mv, ms) = v["harness"], v["mile_jax"]
      fmt = lambda x: f"{x:.6f}" if isinstance(x, float) else str(x)
      print(f"| {row['task']} | {row['shots']} | {same} | {row['answers']} | {m} | {fmt(hv)} ± {fmt(hs)} "
            f"| {fmt(mv)} ± {fmt(ms)} "
            f"| {max(_diff(hv, mv), _diff(hs, ms)):.2g} |")
  same, docs = sum(r["requests_same"] for r in rows), sum(r["docs"] for r in rows)
  worst = max((_diff(a, b) for r in rows for v in r["metrics"].values() for a, b in zip(v["harness"], v["mile_jax"])),
              default=0.0)
  print(f"\nall: requests identical for {same}/{docs} documents; largest metric difference {worst:.2g}")
  for row in rows:
    if row["first_diff"]:
      key, theirs, ours = row["first_diff"]
      print(f"\n{row['task']} {row['shots']}-shot, first differing document {key}:\n  harness:  {theirs!r}\n"
            f"  mile_jax: {ours!r}")


def add_triviaqa_answers(lm, root: str, docs, shots: list[int], max_gen_toks: int) -> None:
  """Appends a variant of the model's answer to every other scored document's aliases."""
  task = tasks_lib.TASKS["triviaqa"]
  scored = docs["triviaqa"]["validation"]
  for k in shots:
    examples = tasks_lib.build_examples(task, scored, docs["triviaqa"]["train"] if k else [], k)
    outputs = lm.generate_until([e.prompt for e in examples], task.until, max_gen_toks)
    for i, (doc, out) in enumerate(zip(scored, outputs)):
      if i % 4 == 1:  # an empty answer matches "!", which is empty once punctuation is ignored
        doc["answer"]["aliases"].append(out.strip().upper() + "!")
      elif i % 4 == 3:  # aliases keep their spaces: no match
        doc["answer"]["aliases"].append(f" {out.strip()} ")
  parity_docs.write_jsonl(os.path.join(root, "triviaqa", "validation.jsonl"), scored)


def main(argv=None):
  args = parse_args(argv)
  logging.getLogger("lm_eval").setLevel(logging.ERROR)
  import datasets  # pylint: disable=import-outside-toplevel
  datasets.disable_progress_bars()
  names_wanted = [n.strip() for n in args.tasks.split(",") if n.strip()]
  shots = [int(s) for s in args.shots.split(",")]
  root = args.data_dir or tempfile.mkdtemp(prefix="harness_parity_")
  os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(root, "hf_cache"))
  workdir = args.workdir
  if not workdir:
    workdir = os.path.join(root, "run")
    print(f"training a tiny run in {workdir}")
    train_tiny(workdir)
  restored = restore_lib.restore(workdir, args.step, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
  lm = lm_lib.LanguageModel(restored, batch_size=args.batch_size, progress=False)
  docs = parity_docs.documents()
  parity_docs.write(root, docs)
  if "triviaqa" in names_wanted:
    add_triviaqa_answers(lm, root, docs, shots, args.max_gen_toks)
  names = write_task_files(root)
  model = RecordingLM(lm, args.max_gen_toks)
  rows = [compare(n, k, lm, model, names, root, args.max_gen_toks) for n in names_wanted for k in shots]
  print(f"\ncheckpoint {restored.workdir} step {restored.step}; documents and task files in {root}\n")
  print_table(rows)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
  main()
