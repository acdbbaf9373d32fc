"""Task documents from local JSON Lines files in the Hugging Face datasets' field layout.

`<task_data_dir>/<task>/<split>.jsonl`, one document per line with the fields
of the dataset the harness reads (e.g. `goal`, `sol1`, `sol2`, `label` for
PIQA). MMLU is one pair of files, `mmlu/test.jsonl` and `mmlu/dev.jsonl`, with
the `subject` field of the dataset's "all" configuration.
"""

import json
import os

from mile_jax.evaluation import tasks as tasks_lib
from mile_jax.evaluation.errors import EvalError


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
