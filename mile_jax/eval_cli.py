"""The evaluation command: `mile-eval` or `python eval.py`.

    mile-eval --workdir DIR --tasks ppl,buckets,piqa

Tasks: ppl (validation perplexity), buckets (perplexity per token-frequency
bucket), and the benchmarks hellaswag, piqa, winogrande, arc_easy,
arc_challenge, openbookqa, siqa, boolq, mmlu, triviaqa, scored as
lm-evaluation-harness 0.4 scores them (task documents from --task_data_dir
files or, with --task_source=tfds or auto, from the TFDS catalog).
`mile-eval --compare DIR_A DIR_B ...` prints saved results side by side.
`--log_samples` also writes each benchmark document's prompt, per-choice
log-likelihoods or generation, and score as JSON Lines beside the result.
On several hosts, run the same command on each with --coordinator_address,
--num_processes and --process_id (or $JAX_COORDINATOR_ADDRESS, ... as
train.py; `process_flags`): every process loads the model onto its own
devices and takes a share of the perplexity batches, the log-likelihood
requests and the generation batches; process 0 writes the result.
Exit status 2, with one line naming the flag or file to fix, for bad input.
"""

import os
import sys

from mile_jax import requirements_check
requirements_check.require()  # Before the imports below: a missing package is one line, not a traceback.
from absl import app
from absl import flags
from absl import logging
import jax

from mile_jax import config_files
from mile_jax import process_flags
from mile_jax.evaluation import report
from mile_jax.evaluation import runner
from mile_jax.errors import ConfigError
from mile_jax.evaluation.errors import EvalError

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir, its checkpoints/ or one checkpoints/<step>/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_TASKS = flags.DEFINE_string("tasks", "ppl", "Comma-separated tasks: ppl, buckets and benchmark names.")
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt; default 0 (MMLU 5).")
_LIMIT = flags.DEFINE_integer("limit", 0, "Score only the first N documents of each task (sub-task); 0 = all.")
_TASK_DATA_DIR = flags.DEFINE_string("task_data_dir", "", "Directory of <task>/<split>.jsonl task files.")
_TASK_SOURCE = flags.DEFINE_enum("task_source", "local", ["local", "tfds", "auto"],
                                 "Benchmark documents from local files, the TFDS catalog, or auto: local files "
                                 "where present, else TFDS.")
_TFDS_DATA_DIR = flags.DEFINE_string("tfds_data_dir", "", "TFDS data directory (local or gs://) of prepared "
                                     "benchmark datasets; default TFDS's.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Rows per forward pass.")
_PPL_BATCHES = flags.DEFINE_integer("ppl_batches", 0, "ppl/buckets: batches to score; 0 = the whole validation split.")
_PPL_SOURCE = flags.DEFINE_string("ppl_source", "", "ppl/buckets: a data.source to score instead of the run's.")
_BUCKET_HIGH = flags.DEFINE_float("bucket_high", 0.8, "buckets: share of training occurrences the high bucket covers.")
_BUCKET_LOW = flags.DEFINE_float("bucket_low", 0.05, "buckets: share of training occurrences the low bucket covers.")
_MAX_GEN_TOKS = flags.DEFINE_integer("max_gen_toks", 256, "Generation tasks: most new tokens per answer.")
_MESH_SHAPE = flags.DEFINE_list("mesh_shape", ["1", "-1", "1"], "(data, fsdp, tensor) mesh over this process's devices.")
_OUTPUT = flags.DEFINE_string("output", "", "Result JSON path; default <workdir>/eval/step<N>_<time>.json.")
_LOG_SAMPLES = flags.DEFINE_bool("log_samples", False,
                                 "Also write every scored benchmark document (prompt, choices or generation, "
                                 "log-likelihoods, score) as JSON Lines beside the result: "
                                 "<result without .json>_samples_<task>.jsonl.")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", "~/.cache/mile_jax/jax",
    "JAX's persistent compilation cache: a later eval.py on the same model and shapes loads its programs "
    "instead of compiling them; '' to turn it off.")
process_flags.define_flags(__name__)  # --coordinator_address, --num_processes, --process_id
_COMPARE = flags.DEFINE_multi_string("compare", None, "Print saved results (workdirs or JSON files) side by side.")


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    if _COMPARE.value:
      runs = list(_COMPARE.value) + list(argv[1:])
      print(report.compare([report.load_run(p) for p in runs]))
      return
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
      raise EvalError("--workdir: required (a training workdir with checkpoints)")
    try:
      process_flags.join()
    except ConfigError as e:
      raise EvalError(str(e)) from None
    if _COMPILATION_CACHE_DIR.value:
      jax.config.update("jax_compilation_cache_dir", os.path.expanduser(_COMPILATION_CACHE_DIR.value))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # eval.py's programs compile fast: cache them all
    opts = runner.EvalOptions(
        workdir=_WORKDIR.value, step=_STEP.value, tasks=_TASKS.value, num_fewshot=_NUM_FEWSHOT.value,
        limit=_LIMIT.value, task_data_dir=_TASK_DATA_DIR.value,
        task_source=_TASK_SOURCE.value, tfds_data_dir=_TFDS_DATA_DIR.value, batch_size=_BATCH_SIZE.value,
        ppl_batches=_PPL_BATCHES.value, ppl_source=_PPL_SOURCE.value, bucket_high=_BUCKET_HIGH.value,
        bucket_low=_BUCKET_LOW.value, max_gen_toks=_MAX_GEN_TOKS.value,
        mesh_shape=_mesh_shape(_MESH_SHAPE.value), output=_OUTPUT.value, log_samples=_LOG_SAMPLES.value)
    runner.evaluate_and_report(opts)
  except EvalError as e:
    print(f"Eval error: {e}", file=sys.stderr)
    sys.exit(2)


def _mesh_shape(values: list[str]) -> tuple[int, ...]:
  try:
    return tuple(int(s) for s in values)
  except ValueError:
    raise EvalError(f"--mesh_shape: expected three integers (data, fsdp, tensor) such as 1,-1,1, "
                    f"got {','.join(values)}") from None


def run():
  """The `mile-eval` console script (and what `python eval.py` runs)."""
  config_files.present_as_main(__name__, __doc__)
  app.run(main)


if __name__ == "__main__":
  run()
