"""What `eval.py` runs: checks every input, restores the checkpoint, runs the
requested tasks, writes the JSON result and prints the Markdown table."""

import dataclasses
import datetime
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from mile_jax import data as data_lib
from mile_jax.errors import ConfigError
from mile_jax.evaluation import buckets as buckets_lib
from mile_jax.evaluation import lm as lm_lib
from mile_jax.evaluation import perplexity
from mile_jax.evaluation import report
from mile_jax.evaluation import restore as restore_lib
from mile_jax.evaluation import task_eval
from mile_jax.evaluation import tasks as tasks_lib
from mile_jax.evaluation.errors import EvalError
from mile_jax.run import workdir as workdir_lib


@dataclasses.dataclass
class EvalOptions:
  """Everything eval.py's flags set (see eval.py for each one's meaning)."""
  workdir: str
  step: int | None = None
  tasks: str = "ppl"
  num_fewshot: int | None = None  # None: each task's default (0; MMLU 5)
  limit: int = 0  # 0: every document
  task_data_dir: str = ""
  task_source: str = "local"  # "local", "tfds" or "auto" (see task_data)
  tfds_data_dir: str = ""  # "": TFDS's default data directory
  batch_size: int = 32
  ppl_batches: int = 0  # 0: one pass over the validation rows
  ppl_source: str = ""  # "": the run's data.source
  bucket_high: float = 0.8
  bucket_low: float = 0.05
  max_gen_toks: int = 256
  mesh_shape: Sequence[int] = restore_lib.DEFAULT_MESH_SHAPE
  output: str = ""  # "": <workdir>/eval/step<N>_<time>.json
  log_samples: bool = False  # also write each benchmark document's record beside the output (report.samples_path)
  devices: Sequence[Any] | None = None  # None: this process's devices


def _check(opts: EvalOptions) -> list[str]:
  """Every check that needs no model: task names, task files, numeric flags, bucket settings."""
  names = tasks_lib.parse_task_names(opts.tasks)
  if opts.num_fewshot is not None and opts.num_fewshot < 0:
    raise EvalError(f"--num_fewshot: must be >= 0, got {opts.num_fewshot}")
  if opts.limit < 0:
    raise EvalError(f"--limit: must be >= 0, got {opts.limit}")
  if opts.batch_size < 1:
    raise EvalError(f"--batch_size: must be >= 1, got {opts.batch_size}")
  if opts.ppl_batches < 0:
    raise EvalError(f"--ppl_batches: must be >= 0 (0 = the whole validation split), got {opts.ppl_batches}")
  if opts.max_gen_toks < 1:
    raise EvalError(f"--max_gen_toks: must be >= 1, got {opts.max_gen_toks}")
  shape = tuple(opts.mesh_shape)
  if len(shape) != 3 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise EvalError(f"--mesh_shape: expected three sizes (data, fsdp, tensor), positive or one -1, "
                    f"got {','.join(map(str, shape))}")
  if opts.log_samples and not any(n in tasks_lib.TASKS for n in names):
    raise EvalError(f"--log_samples: writes benchmark documents, but --tasks={opts.tasks} has no benchmark")
  task_eval.check([n for n in names if n in tasks_lib.TASKS], num_fewshot=opts.num_fewshot,
                  task_source=opts.task_source, task_data_dir=opts.task_data_dir, tfds_data_dir=opts.tfds_data_dir)
  if "buckets" in names:
    buckets_lib.frequency_buckets([1], opts.bucket_high, opts.bucket_low)
  return names


def _text_dataset(restored: restore_lib.Restored, opts: EvalOptions):
  """The validation split of the run's corpus (or of `--ppl_source`), tokenized
  with the run's own tokenizer."""
  data_config = ml_collections.ConfigDict(restored.config.data.to_dict())
  data_config.tokenizer_path = workdir_lib.join(restored.workdir, "tokenizer.model")
  data_config.global_batch_size = 1  # perplexity.evaluate checks the rows against --batch_size, naming it.
  if opts.ppl_source:
    data_config.source = opts.ppl_source
  try:
    return data_lib.make_data(data_config, restored.config.model.vocab_size, restored.config.data.seq_len,
                              restored.config.seed).validation
  except ConfigError as e:
    where = (f"--ppl_source={opts.ppl_source!r}" if opts.ppl_source
             else workdir_lib.join(restored.workdir, "config.json"))
    raise EvalError(f"{where}: {e}") from None


def text_metrics(restored, names: Sequence[str], opts: EvalOptions,
                 token_counts: np.ndarray | None = None) -> dict[str, dict]:
  """The entries of `ppl` and `buckets` (`token_counts`: default the workdir's)."""
  dataset = _text_dataset(restored, opts)
  out = {}
  if "buckets" in names:
    counts = restored.token_counts() if token_counts is None else token_counts
    bucket_of_id = buckets_lib.frequency_buckets(counts, opts.bucket_high, opts.bucket_low)
    sums = perplexity.evaluate(restored, dataset, batch_size=opts.batch_size, max_batches=opts.ppl_batches,
                               bucket_of_id=bucket_of_id, num_buckets=len(buckets_lib.BUCKET_NAMES),
                               desc="ppl+buckets")
  else:
    bucket_of_id = None
    sums = perplexity.evaluate(restored, dataset, batch_size=opts.batch_size, max_batches=opts.ppl_batches)
  overall = perplexity.summarize(sums)
  if "ppl" in names:
    out["ppl"] = {"version": "1", "num_examples": int(overall["tokens"]), "num_fewshot": 0,
                  "rows": int(np.max(sums["rows"])), "metrics": {
        "perplexity": {"value": overall["perplexity"], "stderr": overall["perplexity_stderr_rows"]},
        "ce": {"value": overall["ce"], "stderr": overall["ce_stderr_rows"]},
        "tokens": {"value": overall["tokens"], "stderr": None}}}
  if bucket_of_id is not None:
    metrics = perplexity.bucket_metrics(sums, bucket_of_id)
    out["buckets"] = {"version": "1", "num_examples": int(overall["tokens"]), "num_fewshot": 0,
                      "thresholds": {"high": opts.bucket_high, "low": opts.bucket_low}, "metrics": metrics}
  return out


def score_tasks(lm: lm_lib.LanguageModel, names: Sequence[str], opts: EvalOptions,
                samples: dict[str, list[dict]] | None = None) -> dict[str, dict]:
  """Runs the benchmarks `names` (all their sub-tasks); {name: result entry}.
  `samples`: see `task_eval.score_all`."""
  tasks = [tasks_lib.TASKS[n] for n in names]
  prepared = [task_eval.prepare(t, num_fewshot=task_eval.fewshot_for(t, opts.num_fewshot), limit=opts.limit,
                                task_source=opts.task_source, task_data_dir=opts.task_data_dir,
                                tfds_data_dir=opts.tfds_data_dir) for t in tasks]
  return dict(zip(names, task_eval.score_all(lm, prepared, opts.max_gen_toks, samples)))


def evaluate(opts: EvalOptions, samples: dict[str, list[dict]] | None = None, check_output: bool = False) -> dict:
  """Checks the inputs, restores the checkpoint, runs the tasks; returns the
  result dict (and fills `samples`, when given, as `task_eval.score_all` does).
  `check_output`: also check, before loading anything, that the result file
  can be written (`--output`, default under `<workdir>/eval/`)."""
  names = _check(opts)
  workdir, _, step = restore_lib.locate(opts.workdir, opts.step)
  if check_output:
    report.check_output(opts.output or workdir_lib.join(workdir, "eval", f"step{step}_<time>.json"))
  counts = None
  if "buckets" in names:  # Read and checked before the model is loaded.
    counts = restore_lib.load_token_counts(workdir, restore_lib.load_config(workdir)[0].model.vocab_size)
  restored = restore_lib.restore(opts.workdir, opts.step, opts.mesh_shape, opts.devices)
  result = {"workdir": restored.workdir, "step": restored.step, "config_hash": restored.config_hash,
            "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "devices": f"{restored.mesh.size} x {jax.devices()[0].device_kind}",
            "harness": tasks_lib.HARNESS_VERSION, "tasks": {}}
  text = [n for n in names if n in tasks_lib.TEXT_METRICS]
  if text:
    result["tasks"].update(text_metrics(restored, text, opts, counts))
  benchmarks = [n for n in names if n in tasks_lib.TASKS]
  if benchmarks:
    lm = lm_lib.LanguageModel(restored, batch_size=opts.batch_size)
    result["tasks"].update(score_tasks(lm, benchmarks, opts, samples))
  return result


def evaluate_and_report(opts: EvalOptions, echo=print) -> str:
  """`evaluate`, then writes the JSON file (and with `log_samples`, the
  samples files beside it) and prints the table; returns the file's path
  ("" on a process other than 0 of a multi-process run, which writes nothing)."""
  samples = {} if opts.log_samples else None
  result = evaluate(opts, samples, check_output=True)
  if jax.process_index() != 0:  # Every process has the same result; one writes it.
    return ""
  path = report.write_json(result, opts.output or report.default_path(result))
  echo(report.markdown(result))
  echo(f"\nWrote {path}")
  for samples_file in report.write_samples(samples or {}, path):
    echo(f"Wrote {samples_file}")
  return path
