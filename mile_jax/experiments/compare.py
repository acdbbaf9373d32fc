"""Cross-entropy vs focal vs MiLe, a gamma sweep, several seeds: train, measure, tabulate, plot.

  python -m mile_jax.experiments.compare --config configs/compare.py --workdir DIR

Every run trains in `DIR/runs/<label>/seed<k>` with the same initialisation
and data order for a given seed (only the loss differs), keeping a checkpoint
every `run.checkpoint.every_steps`. Each checkpoint is then measured on the
validation split (per-token cross-entropy and entropy, by frequency bucket).
Finished runs and measured checkpoints are reused, so an interrupted
comparison continues where it stopped. Outputs in DIR: `results.json`,
`results.md` and `plots/*.png`.
"""

import dataclasses
import json
import os
import sys
import time

import ml_collections
import numpy as np

from mile_jax import checkpoint as checkpoint_lib
from mile_jax import config_lib
from mile_jax import train_lib
from mile_jax.data import synthetic
from mile_jax.data.tokenizer import write_atomic
from mile_jax.evaluation import buckets as buckets_lib
from mile_jax.experiments import plots
from mile_jax.experiments import tables
from mile_jax.experiments import token_stats


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
  missing = [s for s in trainer.checkpointer.all_steps() if s not in history]
  if missing:
    counts = np.load(os.path.join(run_dir, "token_counts.npy"))
    bucket_of_id = buckets_lib.frequency_buckets(counts, config.bucket_high, config.bucket_low)
    table = None
    if cfg.data.source == synthetic.SOURCE:
      table = synthetic.language(cfg.data, cfg.model.vocab_size).log_prob_table()
    target = checkpoint_lib.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
    for step in missing:
      state = trainer.checkpointer.restore(step, target)
      tokens = token_stats.per_token(trainer, state.params, config.eval_batches)
      history[step] = token_stats.summarize(tokens, bucket_of_id, cfg.model.vocab_size, cfg.loss, table)
    _write_json(results_path, {str(k): v for k, v in sorted(history.items())})
  trainer.checkpointer.close()
  return {"curve": eval_curve(run_dir), "history": history}


def compare(config: ml_collections.ConfigDict, workdir: str, echo=print) -> dict:
  """Runs the whole comparison and writes results.json, results.md and plots/."""
  config_lib.validate(config.run)
  specs = run_specs(config)
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  measured = {spec: train_and_measure(config, spec, workdir, echo) for spec in specs}
  labels = list(dict.fromkeys(s.label for s in specs))
  final = {l: [m["history"][max(m["history"])] for s, m in measured.items() if s.label == l] for l in labels}
  rows = tables.metric_rows(final)
  results = {
      "source": config.run.data.source, "steps": config.run.train.steps, "seeds": list(config.seeds),
      "rows": {l: {k: list(v) for k, v in r.items()} for l, r in rows.items()},
      "differences": tables.differences(rows),
      "runs": {f"{s.label}/seed{s.seed}": {"curve": m["curve"], "final": m["history"][max(m["history"])]}
               for s, m in measured.items()},
      "wall_seconds_this_invocation": time.perf_counter() - start,
  }
  _write_json(os.path.join(workdir, "results.json"), results)
  table = tables.markdown(rows, len(config.seeds))
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(f"Source: `{config.run.data.source}`, {config.run.train.steps} steps per run.\n\n{table}")
  first_seed = config.seeds[0]
  histories = {s.label: m["history"] for s, m in measured.items()
               if s.seed == first_seed and s.label in ("cross_entropy", _label("mile", 1.0))}
  curves = {l: [m["curve"] for s, m in measured.items() if s.label == l] for l in labels}
  results["plots"] = plots.all_plots(os.path.join(workdir, "plots"), curves, rows, histories, _label("mile", 1.0))
  echo(table)
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

  app.run(run)


if __name__ == "__main__":
  main()
