"""Evaluation results: one JSON file per run, a Markdown table, runs side by side.

A result is a dict:

    {"workdir", "step", "config_hash", "created", "devices", "harness",
     "tasks": {task: {"version", "num_examples", "num_fewshot",
                      "metrics": {metric: {"value", "stderr"}},
                      "subtasks": {...same layout...}   # MMLU only
                      }}}
"""

import glob
import json
import math
import os
from typing import Any, Sequence

from mile_jax.evaluation.errors import EvalError
from mile_jax.run import workdir as workdir_lib


def default_path(result: dict) -> str:
  stamp = result["created"].replace(":", "").replace("-", "")
  return workdir_lib.join(result["workdir"], "eval", f"step{result['step']}_{stamp}.json")


def write_json(result: dict, path: str) -> str:
  """Writes `result` to `path` (local, or a gs:// / s3:// URI, written whole)."""
  text = json.dumps(result, indent=2, sort_keys=True, allow_nan=True)
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


def load_run(path: str) -> dict:
  """A result from its JSON file, or the newest one under `<workdir>/eval/`."""
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "eval", "*.json")) + glob.glob(os.path.join(path, "*.json")),
                   key=os.path.getmtime)
    if not files:
      raise EvalError(f"--compare: no evaluation results (*.json) in {path} or {os.path.join(path, 'eval')}")
    path = files[-1]
  if not os.path.isfile(path):
    raise EvalError(f"--compare: no such file or directory {path}")
  with open(path, encoding="utf-8") as f:
    result = json.load(f)
  if "tasks" not in result:
    raise EvalError(f"--compare: {path} is not an eval.py result")
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
