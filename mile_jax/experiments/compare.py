"""Cross-entropy vs focal vs MiLe, a gamma sweep, several seeds: train, measure, tabulate, plot.

  python -m mile_jax.experiments.compare --config configs/compare.py --workdir DIR

Every run trains in `DIR/runs/<label>/seed<k>` with the same initialisation
and data order for a given seed (only the loss differs), keeping a checkpoint
every `run.checkpoint.every_steps`. Each checkpoint is then measured on the
validation split (per-token cross-entropy and entropy, by frequency bucket,
on `eval_batches` batches; at the last step on `final_eval_batches`, and also
per validation document, for the bootstrap).
Finished runs and measured checkpoints are reused, so an interrupted
comparison continues where it stopped. Outputs in DIR: `results.json`
(per-seed numbers, paired differences to cross-entropy with t and bootstrap
intervals, curves), `results.md` and `plots/*.png`.
"""

import dataclasses
import json
import numbers
import os
import re
import sys
import time

from mile_jax import requirements_check
requirements_check.require("scipy", "matplotlib")  # Before the imports below: a missing package is one line.
import ml_collections
import numpy as np

from mile_jax import config_files
from mile_jax import config_lib
from mile_jax import train_lib
from mile_jax.data import synthetic
from mile_jax.data.tokenizer import write_atomic
from mile_jax.evaluation import buckets as buckets_lib
from mile_jax.experiments import plots
from mile_jax.experiments import tables
from mile_jax.experiments import token_stats
from mile_jax.run import checkpoint as checkpoint_lib


@dataclasses.dataclass(frozen=True)
class RunSpec:
  label: str
  loss: str
  gamma: float
  seed: int


def _label(loss: str, gamma: float) -> str:
  return loss if loss == "cross_entropy" else f"{loss}_g{gamma:g}"


def run_specs(config: ml_collections.ConfigDict) -> list[RunSpec]:
  """The runs of a comparison, seed-major so that a partial comparison covers every loss.

  `config.losses` holds "cross_entropy", "focal:<gamma>" or "mile:<gamma>";
  `config.mile_gammas` adds MiLe runs; duplicates are dropped.
  """
  pairs = []
  for entry in list(config.losses) + [f"mile:{g}" for g in config.mile_gammas]:
    name, _, gamma = entry.partition(":")
    if name not in ("cross_entropy", "focal", "mile"):
      raise config_lib.ConfigError(f"losses: unknown loss {name!r} in {entry!r}")
    pair = (name, float(gamma) if gamma else 0.0)
    if pair not in pairs:
      pairs.append(pair)
  return [RunSpec(_label(n, g), n, g, seed) for seed in config.seeds for n, g in pairs]


def run_config(config: ml_collections.ConfigDict, spec: RunSpec) -> ml_collections.ConfigDict:
  run = ml_collections.ConfigDict(config.run.to_dict())
  run.seed = spec.seed
  run.loss.name = spec.loss
  run.loss.gamma = spec.gamma
  return run


def _read_json(path: str, default):
  if not os.path.isfile(path):
    return default
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _write_json(path: str, value) -> None:
  write_atomic(path, json.dumps(value, indent=1).encode("utf-8"))


def eval_curve(run_dir: str) -> list[tuple[int, float]]:
  records = []
  path = os.path.join(run_dir, "metrics.jsonl")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      records = [json.loads(line) for line in f if line.strip()]
  return [(r["step"], r["ce"]) for r in records if r.get("split") == "eval"]


def steps_to_measure(steps, history: dict, final: int, config: ml_collections.ConfigDict) -> list[int]:
  """The checkpoints of `steps` to measure: those not in `history`, measured on another number of
  validation batches than `eval_batches` (`final_eval_batches` for `final`), or, for `final`,
  without per-document sums."""
  out = []
  for step in steps:
    wanted = config.final_eval_batches if step == final else config.eval_batches
    if (step not in history or history[step].get("eval_batches") != wanted
        or (step == final and "documents" not in history[step])):
      out.append(step)
  return out


def train_and_measure(config, spec: RunSpec, workdir: str, echo=print) -> dict:
  """Trains one run (unless finished) and measures each checkpoint once. Returns
  {"curve": [(step, ce)], "history": {step: summary}}."""
  run_dir = os.path.join(workdir, "runs", spec.label, f"seed{spec.seed}")
  cfg = run_config(config, spec)
  trainer = train_lib.Trainer(cfg, run_dir, echo=echo)
  if trainer.checkpointer.latest_step() != cfg.train.steps:
    start = time.perf_counter()
    trainer.run()
    echo(f"[compare] trained {spec.label} seed {spec.seed} in {time.perf_counter() - start:.0f} s")
  results_path = os.path.join(run_dir, "token_stats.json")
  history = {int(k): v for k, v in _read_json(results_path, {}).items()}
  final = cfg.train.steps
  wanted = lambda step: config.final_eval_batches if step == final else config.eval_batches  # noqa: E731
  missing = steps_to_measure(trainer.checkpointer.all_steps(), history, final, config)
  if missing:
    rows = trainer.load_data().validation.rows_per_epoch // cfg.data.global_batch_size
    counts = np.load(os.path.join(run_dir, "token_counts.npy"))
    bucket_of_id = buckets_lib.frequency_buckets(counts, config.bucket_high, config.bucket_low)
    table = None
    if cfg.data.source == synthetic.SOURCE:
      table = synthetic.language(cfg.data, cfg.model.vocab_size).log_prob_table()
    target = checkpoint_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
    for step in missing:
      state = trainer.checkpointer.restore(step, target)
      tokens = token_stats.per_token(trainer, state.params, min(wanted(step), rows) if wanted(step) else rows)
      history[step] = token_stats.summarize(tokens, bucket_of_id, cfg.model.vocab_size, cfg.loss, table,
                                            documents=step == final)
      history[step]["eval_batches"] = wanted(step)
    _write_json(results_path, {str(k): v for k, v in sorted(history.items())})
  trainer.checkpointer.close()
  return {"curve": eval_curve(run_dir), "history": history}


def _final_without_documents(history: dict) -> dict:
  return {k: v for k, v in history[max(history)].items() if k != "documents"}


def analyse(config: ml_collections.ConfigDict, histories: dict) -> dict:
  """Levels, paired differences and curves of {label: {seed: {step: summary}}} (JSON-ready)."""
  final = {label: [runs[s][max(runs[s])] for s in sorted(runs)] for label, runs in histories.items()}
  rows = tables.metric_rows(final)
  excess = all("excess" in f for runs in final.values() for f in runs)
  return {
      "rows": rows,
      "paired": tables.paired(histories, replicates=config.bootstrap_replicates, seed=config.bootstrap_seed),
      "curves": {"ce": tables.curves(histories, "ce"),
                 **({"excess": tables.curves(histories, "excess")} if excess else {}),
                 "ce_difference": tables.curves(histories, "ce", difference=True)},
  }


def _markdown(config: ml_collections.ConfigDict, analysis: dict) -> str:
  run = config.run
  head = (f"Source: `{run.data.source}`, vocabulary {run.model.vocab_size}, {run.train.steps} steps of "
          f"{run.data.global_batch_size} x {run.data.seq_len} tokens per run, learning rate "
          f"{run.optim.learning_rate:g} ({run.optim.warmup_steps} warm-up steps), seeds {list(config.seeds)}.\n\n")
  return (head + tables.paired_markdown(analysis["paired"]) + "\nLevels at the last step:\n\n"
          + tables.levels_markdown(analysis["rows"], len(config.seeds)))


def _in_run(message: str, sections) -> str:
  """A message of `config_lib.validate(config.run)` with its settings named as in the comparison config
  (`train.steps` -> `run.train.steps`), where they are set."""
  names = "|".join(re.escape(name) for name in sections)
  return re.sub(rf"(?<![\w./-])({names})\.(?=\w+(?:$|[=:\s,);]))", r"run.\1.", message)


def validate(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises ConfigError (one line, naming the setting as the comparison config has it) before any run.

  Checks that `config` is a comparison config (configs/compare.py), its runs' shared config, the
  losses and seeds, and that `workdir` can be a directory.
  """
  missing = [k for k in ("run", "losses", "mile_gammas", "seeds") if k not in config]
  if missing:
    raise config_lib.ConfigError(
        f"--config: not a comparison config (it has no {', '.join(missing)}; a training config such as "
        f"configs/default.py is not one); use configs/compare.py")
  try:
    config_lib.validate(config.run)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(_in_run(str(e), config.run.keys())) from None
  seeds = config.seeds
  if (isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__") or not len(seeds)
      or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in seeds)
      or len(set(seeds)) != len(seeds)):
    raise config_lib.ConfigError(f"seeds: must be a non-empty tuple of distinct integers, got {seeds!r}")
  if not run_specs(config):
    raise config_lib.ConfigError("losses: no runs to compare; set losses (e.g. ('cross_entropy', 'mile:1.0')) "
                                 "or mile_gammas")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise config_lib.ConfigError(f"--workdir: {workdir} is a file, not a directory; name a directory")


def compare(config: ml_collections.ConfigDict, workdir: str, echo=print) -> dict:
  """Runs the whole comparison and writes results.json, results.md and plots/."""
  validate(config, workdir)
  specs = run_specs(config)
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  measured = {spec: train_and_measure(config, spec, workdir, echo) for spec in specs}
  histories: dict[str, dict[int, dict]] = {}
  for spec, m in measured.items():
    histories.setdefault(spec.label, {})[spec.seed] = m["history"]
  analysis = analyse(config, histories)
  results = {
      "source": config.run.data.source, "steps": config.run.train.steps, "seeds": list(config.seeds),
      **analysis,
      "runs": {f"{s.label}/seed{s.seed}": {"curve": m["curve"], "final": _final_without_documents(m["history"])}
               for s, m in measured.items()},
      "wall_seconds_this_invocation": time.perf_counter() - start,
  }
  _write_json(os.path.join(workdir, "results.json"), results)
  text = _markdown(config, analysis)
  write_atomic(os.path.join(workdir, "results.md"), text.encode("utf-8"))
  first_seed = config.seeds[0]
  weight_label = _label("mile", 1.0)
  shown = {l: histories[l][first_seed] for l in ("cross_entropy", weight_label)
           if first_seed in histories.get(l, {})}
  curves = analysis["curves"]
  excess = "excess" in curves
  results["plots"] = plots.all_plots(os.path.join(workdir, "plots"), curves["excess" if excess else "ce"],
                                     curves["ce_difference"], analysis["paired"], shown, weight_label, excess)
  echo(text)
  return results


def main() -> None:
  """Command line: flags are defined here, not at import, so the module stays importable."""
  from absl import app, flags, logging  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config = config_flags.DEFINE_config_file("config", None, "A comparison config, e.g. configs/compare.py.",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Directory for every run and the results.")
  flags.mark_flags_as_required(["config", "workdir"])

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
      compare(config.value, workdir.value)
    except config_lib.ConfigError as e:
      print(f"Config error: {e}", file=sys.stderr)
      sys.exit(2)

  app.run(run, flags_parser=config_files.exiting_parser())


if __name__ == "__main__":
  main()
