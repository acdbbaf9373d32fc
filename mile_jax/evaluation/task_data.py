"""Task documents: from local JSON Lines files, or from the TFDS catalog (`tfds_tasks`).

Local files are `<task_data_dir>/<task>/<split>.jsonl`, one document per line
with the fields of the Hugging Face dataset the harness reads (e.g. `goal`,
`sol1`, `sol2`, `label` for PIQA). MMLU is one pair of files,
`mmlu/test.jsonl` and `mmlu/dev.jsonl`, with the `subject` field of the
dataset's "all" configuration.

The source (`--task_source`) is "local", "tfds", or "auto": the local files
where all that the task needs are there, else TFDS.
"""

import json
import os

from mile_jax.evaluation import tasks as tasks_lib
from mile_jax.evaluation import tfds_tasks
from mile_jax.evaluation.errors import EvalError

SOURCES = ("local", "tfds", "auto")


def split_path(task_data_dir: str, task: tasks_lib.Task, split: str) -> str:
  return os.path.join(task_data_dir, task.name, f"{split}.jsonl")


def check_files(task_data_dir: str, task: tasks_lib.Task, num_fewshot: int) -> None:
  """Raises EvalError naming the first file the task needs that is missing."""
  splits = [task.eval_split] + ([task.fewshot_split] if num_fewshot > 0 else [])
  for split in splits:
    path = split_path(task_data_dir, task, split)
    if not os.path.isfile(path):
      raise EvalError(
          f"task {task.name!r}: no file {path}; write the {split!r} split of the Hugging Face dataset "
          f"there as JSON Lines, or point --task_data_dir at the directory that holds {task.name}/")


def load_split(task_data_dir: str, task: tasks_lib.Task, split: str, limit: int = 0) -> list[dict]:
  """Processed documents of one split, the first `limit` only when limit > 0."""
  path = split_path(task_data_dir, task, split)
  docs = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        doc = json.loads(line)
      except json.JSONDecodeError as e:
        raise EvalError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
      try:
        docs.append(task.process_doc(doc))
      except (KeyError, TypeError, ValueError) as e:
        raise EvalError(f"{path}:{line_number}: not a {task.harness_name} document ({type(e).__name__}: {e})") from None
  if not docs:
    raise EvalError(f"{path}: holds no documents")
  return docs[:limit] if limit > 0 and task.subtask_field is None else docs


def _has_files(task_data_dir: str, task: tasks_lib.Task, num_fewshot: int) -> bool:
  splits = [task.eval_split] + ([task.fewshot_split] if num_fewshot > 0 else [])
  return bool(task_data_dir) and all(os.path.isfile(split_path(task_data_dir, task, s)) for s in splits)


def resolve(source: str, task_data_dir: str, task: tasks_lib.Task, num_fewshot: int) -> str:
  """"local" or "tfds": where `task`'s documents come from under `--task_source=source`."""
  if source not in SOURCES:
    raise EvalError(f"--task_source: must be one of {', '.join(SOURCES)}, got {source!r}")
  if source == "auto":
    return "local" if _has_files(task_data_dir, task, num_fewshot) else "tfds"
  return source


def check(source: str, task_data_dir: str, tfds_data_dir: str, task: tasks_lib.Task, num_fewshot: int) -> None:
  """Raises EvalError naming the flag or file to fix unless `task`'s documents can be read."""
  if resolve(source, task_data_dir, task, num_fewshot) == "local":
    check_files(task_data_dir, task, num_fewshot)
  else:
    tfds_tasks.check(task, tfds_data_dir, num_fewshot)


def load(source: str, task_data_dir: str, tfds_data_dir: str, task: tasks_lib.Task, split: str,
         num_fewshot: int, limit: int = 0) -> tuple[list[dict], str]:
  """(processed documents of `split`, where they came from: a path or 'tfds:<dataset>:<split>')."""
  if resolve(source, task_data_dir, task, num_fewshot) == "local":
    return load_split(task_data_dir, task, split, limit), split_path(task_data_dir, task, split)
  return (tfds_tasks.load_split(task, tfds_data_dir, split, limit),
          tfds_tasks.describe(task, tfds_data_dir, split))
