"""Benchmarks end to end: their documents to prompts (`prepare`), the prompts'
scores to the result entries eval.py writes (`score_all`: the requests of all
tasks in one log-likelihood call; `score`: one task).

eval.py runs both at once; training prepares its tasks once, before its first
step, and scores them at each evaluation with the live parameters.
"""

import dataclasses
from typing import Sequence

from mile_jax.evaluation import scoring
from mile_jax.evaluation import task_data
from mile_jax.evaluation import tasks as tasks_lib
from mile_jax.evaluation.errors import EvalError


@dataclasses.dataclass
class PreparedTask:
  """A benchmark's prompts, ready to score."""
  task: tasks_lib.Task
  num_fewshot: int
  source: str  # where the scored documents came from: a path or 'tfds:<dataset>:<split>'
  subtasks: list[tuple[str, list[tasks_lib.Example]]]  # (name, examples); one, the task's name, if no subtasks


def fewshot_for(task: tasks_lib.Task, requested: int | None) -> int:
  """`requested`, or the task's default (0; MMLU 5) when None."""
  return task.default_num_fewshot if requested is None else requested


def check(names: Sequence[str], *, num_fewshot: int | None, task_source: str, task_data_dir: str,
          tfds_data_dir: str) -> None:
  """Raises EvalError, naming the flag or file to fix, unless the documents of
  the benchmarks `names` can be read from `task_source`."""
  if task_source not in task_data.SOURCES:
    raise EvalError(f"--task_source: must be one of {', '.join(task_data.SOURCES)}, got {task_source!r}")
  if names and not task_data_dir and task_source == "local":
    raise EvalError(f"--task_data_dir: needed for {', '.join(names)} (a directory with <task>/<split>.jsonl), "
                    "or read the tasks TFDS has with --task_source=tfds")
  for name in names:
    task = tasks_lib.TASKS[name]
    task_data.check(task_source, task_data_dir, tfds_data_dir, task, fewshot_for(task, num_fewshot))


def prepare(task: tasks_lib.Task, *, num_fewshot: int, limit: int, task_source: str, task_data_dir: str,
            tfds_data_dir: str) -> PreparedTask:
  """Loads `task`'s documents (the first `limit` of each sub-task when > 0) and
  builds their prompts with `num_fewshot` examples each.

  Raises:
    EvalError: naming the flag or file to fix (a missing or malformed file, too
      few few-shot examples).
  """
  where = (task_source, task_data_dir, tfds_data_dir, task)
  docs, source = task_data.load(*where, task.eval_split, num_fewshot, limit)
  pool = task_data.load(*where, task.fewshot_split, num_fewshot)[0] if num_fewshot > 0 else []
  subtasks = []
  for sub_name, sub_docs, sub_pool in tasks_lib.split_subtasks(task, docs, pool):
    if limit > 0:
      sub_docs = sub_docs[:limit]
    subtasks.append((sub_name, _build_examples(task, sub_docs, sub_pool, num_fewshot, source)))
  return PreparedTask(task=task, num_fewshot=num_fewshot, source=source, subtasks=subtasks)


def _build_examples(task: tasks_lib.Task, docs, pool, num_fewshot: int, source: str) -> list[tasks_lib.Example]:
  """`tasks.build_examples`; EvalError naming the first document it cannot make a prompt of."""
  try:
    return tasks_lib.build_examples(task, docs, pool, num_fewshot)
  except EvalError:
    raise
  except (KeyError, TypeError, ValueError, IndexError):
    for i, doc in enumerate(docs):  # Which one: each alone, without few-shot examples.
      try:
        tasks_lib.build_examples(task, [doc], [], 0)
      except (KeyError, TypeError, ValueError, IndexError) as e:
        raise EvalError(f"{source}: document {i + 1} is not a {task.harness_name} document "
                        f"({type(e).__name__}: {e})") from None
    raise  # A few-shot example's fault: the documents alone make prompts.


def _metric(values) -> dict[str, float]:
  mean, se = scoring.mean_stderr(values)
  return {"value": mean, "stderr": se}


def score(lm, prepared: PreparedTask, max_gen_toks: int = 256) -> dict:
  """`score_all` of one task: its result entry."""
  return score_all(lm, [prepared], max_gen_toks)[0]


def score_all(lm, prepared: Sequence[PreparedTask], max_gen_toks: int = 256,
              samples: dict[str, list[dict]] | None = None) -> list[dict]:
  """Runs the prepared tasks (all their sub-tasks) on `lm` (a `lm.LanguageModel`)
  and returns one result entry per task: `version`, `num_examples`,
  `num_fewshot`, `metrics` {name: {value, stderr}}, `source`, and `subtasks` for
  MMLU.

  The log-likelihood requests of every multiple-choice task and sub-task go
  through one `lm.loglikelihood` call: one row width, so one compile for all of
  them, and rows packed across tasks.

  `samples`, when given, receives {task name: one record per scored document}
  (`sample_record`).
  """
  choice = [e for p in prepared if p.task.output != "generate_until" for _, examples in p.subtasks for e in examples]
  names = ", ".join(p.task.name for p in prepared if p.task.output != "generate_until")
  flat = [r for e in choice for r in e.requests]
  results = iter(lm.loglikelihood(flat, desc=names) if flat else [])
  entries = []
  for p in prepared:
    task, subtasks = p.task, {}
    records = samples.setdefault(task.name, []) if samples is not None else None
    for sub_name, examples in p.subtasks:
      per_doc: dict[str, list[float]] = {m: [] for m in task.metrics}
      if task.output == "generate_until":
        outputs = lm.generate_until([e.prompt for e in examples], task.until, max_gen_toks, desc=sub_name)
        per_doc["exact_match"] = [scoring.exact_match(o, e.gold) for o, e in zip(outputs, examples)]
        if records is not None:
          records += [sample_record(sub_name, i, e, {"exact_match": score}, generation=o)
                      for i, (e, o, score) in enumerate(zip(examples, outputs, per_doc["exact_match"]))]
      else:
        for i, e in enumerate(examples):
          answers = [next(results) for _ in e.requests]
          scores = scoring.multiple_choice([logp for logp, _ in answers], e.choices, e.gold)
          for m in task.metrics:
            per_doc[m].append(scores[m])
          if records is not None:
            records.append(sample_record(sub_name, i, e, {m: scores[m] for m in task.metrics}, answers=answers))
      subtasks[sub_name] = {"version": task.version, "num_examples": len(examples), "num_fewshot": p.num_fewshot,
                            "metrics": {m: _metric(v) for m, v in per_doc.items()}}
    entries.append(_entry(p, subtasks))
  return entries


def sample_record(task: str, doc_id: int, example: tasks_lib.Example, scores: dict[str, float], *,
                  answers: Sequence[tuple[float, bool]] = (), generation: str | None = None) -> dict:
  """What `--log_samples` writes for one document (the fields of the harness's
  samples files, named for what they hold): `task` (MMLU: the subject's
  sub-task), `doc_id` (its index in the sub-task), `doc`, `target` (the gold
  choice's index, or the reference answers), then for multiple choice
  `arguments` ([context, continuation] per choice), `choices`,
  `loglikelihoods` and `is_greedy` per choice; for generation `prompt`,
  `generation` (cut before the first stop sequence) and `answer` (stripped:
  what is compared); and the document's score per metric."""
  record: dict = {"task": task, "doc_id": doc_id, "doc": example.doc, "target": example.gold}
  if generation is None:
    record.update(arguments=[list(r) for r in example.requests], choices=list(example.choices),
                  loglikelihoods=[float(logp) for logp, _ in answers],
                  is_greedy=[bool(greedy) for _, greedy in answers])
  else:
    record.update(prompt=example.prompt, generation=generation, answer=generation.strip())
  record.update(scores)
  return record


def _entry(prepared: PreparedTask, subtasks: dict) -> dict:
  """The task's result entry from its sub-tasks' (MMLU: pooled over subjects)."""
  task = prepared.task
  if task.subtask_field is None:
    return dict(subtasks[task.name], source=prepared.source)
  sizes = [s["num_examples"] for s in subtasks.values()]
  metrics = {}
  for m in task.metrics:
    mean, se = scoring.pooled_mean_stderr([s["metrics"][m]["value"] for s in subtasks.values()],
                                          [s["metrics"][m]["stderr"] for s in subtasks.values()], sizes)
    metrics[m] = {"value": mean, "stderr": se}
  return {"version": task.version, "num_examples": sum(sizes), "num_fewshot": prepared.num_fewshot,
          "metrics": metrics, "subtasks": subtasks, "source": prepared.source}
