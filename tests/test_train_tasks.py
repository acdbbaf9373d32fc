"""Benchmarks and bucket perplexity scored during training: the numbers at step N
are eval.py's on the checkpoint of step N, bit for bit; bad task settings and
files stop the run before its first step, naming the setting."""

import json
import os
import random

import jax
import pytest

from conftest import make_tiny_config
from mile_jax import train_lib
from mile_jax.errors import ConfigError
from mile_jax.evaluation import in_training
from mile_jax.evaluation import runner

WORDS = ("return import module object string format buffer lambda method socket thread parser values result "
         "number folder class value list file name type data path error time code line text test").split()


def _write_tasks(root, count: int = 40) -> str:
  """`count` PIQA and ARC-Easy documents of random words: choices whose scores under a barely
  trained model are close, so that a few steps of training change some of the model's picks."""
  rng = random.Random(0)
  words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
  piqa = [{"goal": words(4), "sol1": words(3), "sol2": words(3), "label": i % 2} for i in range(count)]
  arc = [{"question": words(5) + "?", "choices": {"text": [words(2), words(2), words(2)], "label": ["A", "B", "C"]},
          "answerKey": "ABC"[i % 3]} for i in range(count)]
  for name, split, docs in (("piqa", "validation", piqa), ("arc_easy", "test", arc)):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    with open(os.path.join(root, name, f"{split}.jsonl"), "w", encoding="utf-8") as f:
      f.write("".join(json.dumps(d) + "\n" for d in docs))
  return str(root)


def _records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return {r["step"]: r for r in map(json.loads, f) if r["split"] == split}


def _config(task_dir, **overrides):
  # A learning rate high enough that the model's picks change between steps 2 and 4.
  settings = {"train.steps": 4, "optim.warmup_steps": 1, "optim.learning_rate": 3e-2, "train.log_every": 2,
              "train.eval_every": 2, "train.eval_batches": 2, "train.microbatches": 2,
              "train.eval_tasks": "piqa,arc_easy", "train.eval_tasks_every": 2, "train.eval_tasks_limit": 36,
              "train.eval_tasks_data_dir": task_dir, "train.eval_tasks_batch_size": 4,
              "checkpoint.every_steps": 2, "checkpoint.max_to_keep": 4}
  settings.update(overrides)
  return make_tiny_config(**settings)


@pytest.mark.slow
def test_scores_in_training_equal_eval_py_on_the_checkpoint_of_that_step(tmp_path):
  task_dir = _write_tasks(tmp_path / "tasks")
  workdir = str(tmp_path / "run")
  train_lib.Trainer(_config(task_dir), workdir, devices=jax.devices()[:1]).run()
  tasks, buckets = _records(workdir, "tasks"), _records(workdir, "buckets")
  assert sorted(tasks) == [2, 4] and sorted(buckets) == [2, 4]
  # Step 2, a checkpoint the run trained past, through eval.py's code. Buckets: its batches of --batch_size
  # rows are the micro-batches (8 rows / 2) over the [eval] rows, train.eval_batches * 2 of them. Exact
  # equality: the same function of the same parameters on the same mesh and batches.
  result = runner.evaluate(runner.EvalOptions(
      workdir=workdir, step=2, tasks="buckets,piqa,arc_easy", limit=36, task_data_dir=task_dir, batch_size=4,
      ppl_batches=4, mesh_shape=(1, 1, 1), devices=jax.devices()[:1]))["tasks"]
  expected = {}
  for name in ("piqa", "arc_easy"):
    assert result[name]["num_examples"] == 36
    for metric, entry in result[name]["metrics"].items():
      expected[f"{name}/{metric}"], expected[f"{name}/{metric}_stderr"] = entry["value"], entry["stderr"]
  got = {k: v for k, v in tasks[2].items() if k not in ("step", "split", "time")}
  assert got == expected
  expected = {k.replace(".", "/"): e["value"] for k, e in result["buckets"]["metrics"].items()
              if not k.endswith(".ids")}
  got = {k: v for k, v in buckets[2].items() if k not in ("step", "split", "time")}
  assert got == expected
  assert got["high/tokens"] + got["medium/tokens"] + got["low/tokens"] == 16 * 32  # the [eval] rows' targets
  # Each step's own parameters: training changed both numbers between steps 2 and 4.
  assert buckets[4]["low/perplexity"] != buckets[2]["low/perplexity"]
  assert tasks[4]["piqa/acc"] != tasks[2]["piqa/acc"] or tasks[4]["arc_easy/acc"] != tasks[2]["arc_easy/acc"]


def test_bad_task_settings_stop_before_the_first_step(tmp_path):
  task_dir = _write_tasks(tmp_path / "tasks")
  workdir = str(tmp_path / "run")

  def build(**overrides):
    with pytest.raises(ConfigError) as raised:
      train_lib.Trainer(_config(task_dir, **overrides), workdir, devices=jax.devices()[:1])
    return str(raised.value)

  assert build(**{"train.eval_tasks": "piqa,nope"}).startswith("train.eval_tasks: unknown task 'nope'; known tasks:")
  assert build(**{"train.eval_tasks": "buckets"}).startswith("train.eval_tasks: 'buckets' is not a benchmark")
  assert build(**{"train.eval_tasks_data_dir": ""}) == (
      "train.eval_tasks_data_dir: needed for piqa, arc_easy (a directory with <task>/<split>.jsonl), or read the "
      "tasks TFDS has with train.eval_tasks_source=tfds")
  assert build(**{"train.eval_tasks": "boolq"}).startswith(
      f"task 'boolq': no file {task_dir}/boolq/validation.jsonl; write the 'validation' split")
  assert build(**{"train.eval_tasks_source": "hub"}) == (
      "train.eval_tasks_source: must be one of local, tfds, auto, got 'hub'")
  assert build(**{"train.eval_tasks_shots": 1}).startswith(
      f"task 'piqa': no file {task_dir}/piqa/train.jsonl")  # few-shot examples come from the train split
  assert build(**{"train.eval_tasks_every": 0}) == "train.eval_tasks_every: must be a positive integer, got 0"
  arc = os.path.join(task_dir, "arc_easy", "test.jsonl")
  with open(arc, encoding="utf-8") as f:
    lines = f.readlines()
  lines[4] = '{"question": "Why?", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "B"}\n'
  with open(arc, "w", encoding="utf-8") as f:
    f.write("".join(lines) + '{"question"\n')
  assert build() == f"{arc}:41: not valid JSON (Expecting ':' delimiter)"
  with open(arc, "w", encoding="utf-8") as f:
    f.write("".join(lines))
  assert build() == f"{arc}: document 5 is not a arc_easy document (ValueError: 'B' is not in list)"
  assert [t.task.name for t in in_training.prepare_tasks(
      _config(task_dir, **{"train.eval_tasks": "piqa"}).train)] == ["piqa"]
