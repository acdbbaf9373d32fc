"""Evaluation results: one JSON file per run, a Markdown table, runs side by side.

A result is a dict:

    {"workdir", "step", "config_hash", "created", "devices", "harness",
     "tasks": {task: {"version", "num_examples", "num_fewshot",
                      "metrics": {metric: {"value", "stderr"}},
                      "subtasks": {...same layout...}   # MMLU only
                      }}}

With `--log_samples`, each benchmark's scored documents go to JSON Lines
beside that file (`samples_path`): one line per document, as the harness's
samples files hold them (`task_eval.score_all` builds the records).
"""

import glob
import json
import math
import os
import tempfile
from typing import Any, Sequence

from mile_jax.evaluation.errors import EvalError
from mile_jax.run import workdir as workdir_lib


def default_path(result: dict) -> str:
  stamp = result["created"].replace(":", "").replace("-", "")
  return workdir_lib.join(result["workdir"], "eval", f"step{result['step']}_{stamp}.json")


def check_output(path: str, flag: str = "--output") -> None:
  """Raises EvalError, naming `flag`, unless a file can be written at the local
  `path`: not a directory, and the nearest existing directory on its way takes
  a new file (tried with a file created and removed there). Remote paths are
  not checked."""
  if workdir_lib.is_remote(path):
    return
  path = os.path.abspath(path)
  if os.path.isdir(path):
    raise EvalError(f"{flag}: {path} is a directory; give the path of a JSON file to write")
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise EvalError(f"{flag}: cannot write {path}: {parent} is a file, not a directory")
  try:
    fd, probe = tempfile.mkstemp(dir=parent, prefix=".mile_eval_probe_")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise EvalError(f"{flag}: cannot write {path}: {parent} does not take new files "
                    f"({e.strerror or type(e).__name__})") from None


def samples_path(result_path: str, task: str) -> str:
  """Where `--log_samples` writes `task`'s documents: beside the result file,
  `<result path without .json>_samples_<task>.jsonl`."""
  stem = result_path[:-len(".json")] if result_path.endswith(".json") else result_path
  return f"{stem}_samples_{task}.jsonl"


def _jsonable(value: Any) -> Any:
  """A document's NumPy scalars and arrays or bytes as JSON values (TFDS records may hold them)."""
  if hasattr(value, "tolist"):
    return value.tolist()
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return str(value)


def write_samples(samples: dict[str, list[dict]], result_path: str) -> list[str]:
  """Writes each task's records (`task_eval.score_all`'s `samples`) as JSON
  Lines to `samples_path(result_path, task)`; returns the paths."""
  paths = []
  for task, records in samples.items():
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=True, default=_jsonable) + "\n" for r in records)
    paths.append(_write_text(samples_path(result_path, task), text))
  return paths


def write_json(result: dict, path: str) -> str:
  """Writes `result` to `path` (local, or a gs:// / s3:// URI, written whole)."""
  return _write_text(path, json.dumps(result, indent=2, sort_keys=True, allow_nan=True))


def _write_text(path: str, text: str) -> str:
  """`text` to `path`: locally through a temporary file renamed over it (never half written)."""
  if workdir_lib.is_remote(path):
    target = workdir_lib.path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return path
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
  return path


def _read_result(path: str) -> dict | None:
  """The eval.py result in the JSON file `path`, or None if it holds something else."""
  try:
    with open(path, encoding="utf-8") as f:
      result = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return None
  return result if isinstance(result, dict) and isinstance(result.get("tasks"), dict) else None


def load_run(path: str) -> dict:
  """A result from its JSON file, or the newest one under `<workdir>/eval/` (or
  directly in the directory given); other JSON files there (the workdir's
  `config.json`) are passed over."""
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "eval", "*.json")) + glob.glob(os.path.join(path, "*.json")),
                   key=os.path.getmtime, reverse=True)
    for file in files:
      result = _read_result(file)
      if result is not None:
        result.setdefault("source", file)
        return result
    raise EvalError(f"--compare: {path} has no eval.py results yet (none in {os.path.join(path, 'eval')}); "
                    f"run eval.py --workdir {path} first")
  if not os.path.isfile(path):
    raise EvalError(f"--compare: no such file or directory {path}")
  result = _read_result(path)
  if result is None:
    raise EvalError(f"--compare: {path} is not an eval.py result (a JSON file that eval.py wrote)")
  result.setdefault("source", path)
  return result


def _fmt(value: Any) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "-"
  if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) >= 2:
    return str(int(value))
  return f"{value:.4f}"


def _rows(result: dict):
  for task, entry in result["tasks"].items():
    for metric, m in entry["metrics"].items():
      yield (task, metric), m, entry.get("num_examples")


def markdown(result: dict) -> str:
  """The run's metrics as a Markdown table."""
  lines = [f"checkpoint step {result['step']} of {result['workdir']} (config {result['config_hash']})", "",
           "| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
  for (task, metric), m, n in _rows(result):
    lines.append(f"| {task} | {metric} | {_fmt(m['value'])} | {_fmt(m.get('stderr'))} | {n} |")
  return "\n".join(lines)


def compare(results: Sequence[dict]) -> str:
  """Runs side by side; each run after the first also shows its difference
  from the first with the combined standard error sqrt(se_a^2 + se_b^2)."""
  names = [f"{os.path.basename(r['workdir'].rstrip('/'))}@{r['step']}" for r in results]
  header = ["task", "metric"] + [names[0]] + [x for n in names[1:] for x in (n, f"{n} - {names[0]}")]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
  keys = list(dict.fromkeys(k for r in results for k, _, _ in _rows(r)))
  tables = [{k: m for k, m, _ in _rows(r)} for r in results]
  for key in keys:
    base = tables[0].get(key)
    cells = [key[0], key[1], _cell(base)]
    for table in tables[1:]:
      other = table.get(key)
      cells.append(_cell(other))
      if base is None or other is None:
        cells.append("-")
      else:
        diff = other["value"] - base["value"]
        se = math.sqrt((base.get("stderr") or 0.0) ** 2 + (other.get("stderr") or 0.0) ** 2)
        cells.append(f"{diff:+.4f} ± {se:.4f}" if math.isfinite(se) else f"{diff:+.4f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _cell(m: dict | None) -> str:
  if m is None:
    return "-"
  se = m.get("stderr")
  if se is None or (isinstance(se, float) and math.isnan(se)):
    return _fmt(m["value"])
  return f"{_fmt(m['value'])} ± {_fmt(se)}"
