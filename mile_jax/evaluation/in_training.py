"""Evaluation inside the training loop, through eval.py's own functions.

* At every validation evaluation (`train.eval_every`): perplexity per
  token-frequency bucket, the paper's split (high: the most frequent ids that
  cover 80% of the training split's occurrences, low: the rarest 5%), on the
  rows the `[eval]` loss estimate scores (the first `train.eval_batches`
  global batches of the validation split, in micro-batch-sized pieces), by
  `perplexity.evaluate` and `perplexity.bucket_metrics`: eval.py's `buckets`.
* Every `train.eval_tasks_every` steps and at the last step: the benchmarks of
  `train.eval_tasks`, by `task_eval.score_all` on a `lm.LanguageModel`: eval.py's
  benchmark scoring. In a multi-process run every process scores, and
  generates, its rows of each batch on the run's mesh (`processes`).

Both read the parameters the train step just produced, where they are (the
run's mesh and shardings): nothing is copied or written. With eval.py's
`--batch_size`, `--limit`, `--num_fewshot` and `--mesh_shape` set to the run's
values, eval.py on the checkpoint of step N gives the same numbers, bit for
bit (tests/test_train_tasks.py).

The task documents are read and their prompts built when the trainer is
built, before anything compiles: a missing or malformed file is a
ConfigError naming the setting.
"""

import time
from typing import Any, Callable

from mile_jax.errors import ConfigError
from mile_jax.evaluation import buckets as buckets_lib
from mile_jax.evaluation import lm as lm_lib
from mile_jax.evaluation import perplexity
from mile_jax.evaluation import task_eval
from mile_jax.evaluation import tasks as tasks_lib
from mile_jax.evaluation.errors import EvalError
from mile_jax.evaluation.model_on_mesh import ModelOnMesh

# eval.py's flags that messages from the shared checks name, and the settings that stand for them here.
_SETTINGS = {"--tasks": "train.eval_tasks", "--num_fewshot": "train.eval_tasks_shots",
             "--limit": "train.eval_tasks_limit", "--task_source": "train.eval_tasks_source",
             "--task_data_dir": "train.eval_tasks_data_dir", "--tfds_data_dir": "train.eval_tasks_tfds_data_dir",
             "--batch_size": "train.eval_tasks_batch_size"}


def _config_error(error: EvalError) -> ConfigError:
  message = str(error)
  for flag, setting in _SETTINGS.items():
    message = message.replace(flag, setting)
  return ConfigError(message)


def prepare_tasks(train_config: Any) -> list[task_eval.PreparedTask]:
  """The prepared benchmarks of `train_config.eval_tasks` (none when empty).

  Raises:
    ConfigError: naming the train.eval_tasks* setting or the file to fix.
  """
  t = train_config
  if not t.eval_tasks.strip():
    return []
  shots = None if t.eval_tasks_shots < 0 else t.eval_tasks_shots
  try:
    names = tasks_lib.parse_task_names(t.eval_tasks)
    text = [n for n in names if n not in tasks_lib.TASKS]
    if text:
      raise ConfigError(f"train.eval_tasks: {', '.join(map(repr, text))} is not a benchmark; the validation loss "
                        f"and the perplexity per frequency bucket are logged at every train.eval_every steps")
    task_eval.check(names, num_fewshot=shots, task_source=t.eval_tasks_source, task_data_dir=t.eval_tasks_data_dir,
                    tfds_data_dir=t.eval_tasks_tfds_data_dir)
    return [task_eval.prepare(tasks_lib.TASKS[n], num_fewshot=task_eval.fewshot_for(tasks_lib.TASKS[n], shots),
                              limit=t.eval_tasks_limit, task_source=t.eval_tasks_source,
                              task_data_dir=t.eval_tasks_data_dir, tfds_data_dir=t.eval_tasks_tfds_data_dir)
            for n in names]
  except EvalError as e:
    raise _config_error(e) from None


class InTrainingEval:
  """Bucket perplexity and benchmarks on a training run's live parameters.

  Args:
    config: the run's config.
    mesh, rules, model: the run's mesh, logical-axis rules and `Decoder`.
  Raises:
    ConfigError: from `prepare_tasks`.
  """

  def __init__(self, config: Any, mesh, rules: tuple, model):
    self.config = config
    self.tasks = prepare_tasks(config.train)
    # params and tokenizer are set per call: the parameters are the train step's latest, never held on to.
    self.loaded = ModelOnMesh(config=config, model=model, params=None, mesh=mesh, rules=rules, tokenizer=None)
    self._lm = None
    self._bucket_of_id = None

  def tasks_due(self, step: int, final: bool) -> bool:
    return bool(self.tasks) and (step % self.config.train.eval_tasks_every == 0 or final)

  def _with_params(self, params, data, fn: Callable[[], dict]) -> dict:
    """`fn()` with `self.loaded` holding `params` (dropped after) and the run's tokenizer."""
    self.loaded.params, self.loaded.tokenizer = params, data.tokenizer
    try:
      return fn()
    finally:
      self.loaded.params = None

  def bucket_scalars(self, params, data, eval_batches: int) -> dict[str, float]:
    """`<bucket>/perplexity`, `/entropy`, `/tokens` of the first `eval_batches`
    global batches of `data.validation` under `params`."""
    if self._bucket_of_id is None:
      counts = data.train.token_counts(self.config.model.vocab_size)
      self._bucket_of_id = buckets_lib.frequency_buckets(counts)
    d, micro = self.config.data, self.config.train.microbatches
    sums = self._with_params(params, data, lambda: perplexity.evaluate(
        self.loaded, data.validation, batch_size=d.global_batch_size // micro, max_batches=eval_batches * micro,
        bucket_of_id=self._bucket_of_id, num_buckets=len(buckets_lib.BUCKET_NAMES), progress=False))
    metrics = perplexity.bucket_metrics(sums, self._bucket_of_id)
    return {key.replace(".", "/"): entry["value"] for key, entry in metrics.items()
            if key.rsplit(".", 1)[1] in ("perplexity", "entropy", "tokens")}

  def write_buckets(self, step: int, params, data, eval_batches: int, writer) -> None:
    """Writes `bucket_scalars` as split `buckets` (`metrics.MetricWriter`)."""
    rows = eval_batches * self.config.data.global_batch_size
    writer.write(step, self.bucket_scalars(params, data, eval_batches), "buckets",
                 f"high: the ids of 80% of training occurrences, low: the rarest 5%; the first {rows} validation rows")

  def task_scalars(self, params, data) -> dict[str, float]:
    """`<task>/<metric>` and `<task>/<metric>_stderr` of every task under `params`."""
    if self._lm is None:
      self.loaded.tokenizer = data.tokenizer
      self._lm = lm_lib.LanguageModel(self.loaded, batch_size=self.config.train.eval_tasks_batch_size,
                                      progress=False)
    out = {}
    entries = self._with_params(params, data, lambda: task_eval.score_all(self._lm, self.tasks))
    for prepared, entry in zip(self.tasks, entries):
      for metric, value in entry["metrics"].items():
        out[f"{prepared.task.name}/{metric}"] = value["value"]
        out[f"{prepared.task.name}/{metric}_stderr"] = value["stderr"]
    return out

  def write_tasks(self, step: int, params, data, writer) -> float:
    """Scores every task, writes split `tasks`; returns the seconds it took."""
    began = time.perf_counter()
    scalars = self.task_scalars(params, data)
    seconds = time.perf_counter() - began
    counts = ", ".join(f"{p.task.name} {sum(len(e) for _, e in p.subtasks)} documents {p.num_fewshot}-shot"
                       for p in self.tasks)
    writer.write(step, scalars, "tasks", f"{counts}; {seconds:.1f} s")
    return seconds

