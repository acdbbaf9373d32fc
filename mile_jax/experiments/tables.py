"""A comparison's numbers: per-seed metrics, paired differences to cross-entropy, curves, Markdown tables.

Every loss of a comparison trains with the same initialisation, data order
and validation documents for a given seed, so each loss is judged by paired
differences to cross-entropy on the same seed (stats.py): a t interval and
test over seeds, and a bootstrap over seeds x validation documents. On the
synthetic language the paired difference of cross-entropy is also the
difference of the excess over the optimum (the same tokens have the same
optimum), reported as well as a share of cross-entropy's excess.
"""

import math
from typing import Mapping, Sequence

import numpy as np

from mile_jax.evaluation.buckets import BUCKET_NAMES
from mile_jax.experiments import stats

BASELINE = "cross_entropy"
PARTS = ("all",) + BUCKET_NAMES  # "all": every validation token


def key(part: str, metric: str = "ce") -> str:
  """The flat metric name of a part: "ce", "excess", "low_ce", "high_excess", ..."""
  return metric if part == "all" else f"{part}_{metric}"


def flat_metrics(summary: Mapping) -> dict[str, float]:
  """{metric: value} of one checkpoint's token_stats summary: ce, perplexity,
  excess, and `<bucket>_<ce|perplexity|entropy|excess>` where present."""
  flat = {"ce": summary["ce"], "perplexity": summary["perplexity"]}
  if "excess" in summary:
    flat["excess"] = summary["excess"]
  for bucket, values in summary["buckets"].items():
    for name in ("ce", "perplexity", "entropy", "excess"):
      if name in values:
        flat[f"{bucket}_{name}"] = values[name]
  return flat


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n - 1); std is 0 for one value."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def metric_rows(final: Mapping[str, Sequence[Mapping]]) -> dict[str, dict[str, tuple[float, float]]]:
  """{label: {metric: (mean, std)}} from {label: [per-seed final summaries]} (`flat_metrics` names)."""
  rows = {}
  for label, runs in final.items():
    metrics: dict[str, list[float]] = {}
    for summary in runs:
      for name, value in flat_metrics(summary).items():
        metrics.setdefault(name, []).append(value)
    rows[label] = {k: mean_std(v) for k, v in metrics.items()}
  return rows


def _document_sums(summary: Mapping, part: str) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [D], summed ce [D]) of one part of a summary's per-document sums."""
  docs = summary["documents"]
  buckets = BUCKET_NAMES if part == "all" else (part,)
  tokens = sum(np.asarray(docs[b]["tokens"], np.float64) for b in buckets)
  ce = sum(np.asarray(docs[b]["ce"], np.float64) for b in buckets)
  return tokens, ce


def paired(histories: Mapping[str, Mapping[int, Mapping[int, Mapping]]], *, replicates: int = 2000,
           seed: int = 0, level: float = 0.95) -> dict[str, dict[str, dict]]:
  """Paired differences to cross-entropy at the last common checkpoint, per part.

  Args:
    histories: {label: {seed: {step: token_stats summary}}}; the final
      summaries carry `documents` (token_stats.summarize(documents=True)).

  Returns:
    {label: {part: {"step", "per_seed": {seed: difference}, "t": stats.paired_t,
    "bootstrap": stats.bootstrap_paired, and with an optimum "excess_share":
    mean difference / cross-entropy's mean excess}}} for every label but
    cross-entropy, over the seeds both have.
  """
  if BASELINE not in histories:
    return {}
  base = histories[BASELINE]
  out = {}
  for label, runs in histories.items():
    if label == BASELINE:
      continue
    seeds = sorted(set(runs) & set(base))
    if not seeds:
      continue
    step = max(set.intersection(*(set(runs[s]) & set(base[s]) for s in seeds)))
    out[label] = {}
    loss_final = {s: flat_metrics(runs[s][step]) for s in seeds}
    base_final = {s: flat_metrics(base[s][step]) for s in seeds}
    for part in PARTS:
      name = key(part)
      if not all(name in loss_final[s] and name in base_final[s] for s in seeds):
        continue  # a bucket without validation tokens
      per_seed = {s: loss_final[s][name] - base_final[s][name] for s in seeds}
      entry = {"step": step, "per_seed": per_seed, "t": stats.paired_t(list(per_seed.values()), level)}
      if all("documents" in runs[s][step] and "documents" in base[s][step] for s in seeds):
        counts, sums = [], []
        for s in seeds:
          tokens, loss_ce = _document_sums(runs[s][step], part)
          base_tokens, base_ce = _document_sums(base[s][step], part)
          if not np.array_equal(tokens, base_tokens):
            raise ValueError(f"{label} seed {s} step {step} was measured on other validation tokens than "
                             f"{BASELINE}; delete their token_stats.json to measure both again")
          counts.append(tokens)
          sums.append(loss_ce - base_ce)
        entry["bootstrap"] = stats.bootstrap_paired(np.stack(sums), np.stack(counts), replicates=replicates,
                                                    seed=seed, level=level)
      excess = [base_final[s].get(key(part, "excess")) for s in seeds]
      if all(e is not None for e in excess):
        entry["excess_share"] = entry["t"]["mean"] / float(np.mean(excess))
      out[label][part] = entry
  return out


def curves(histories: Mapping[str, Mapping[int, Mapping[int, Mapping]]], metric: str = "ce",
           level: float = 0.95, difference: bool = False) -> dict[str, dict[str, dict]]:
  """Per label and part, `metric` against step over seeds: {"steps", "per_seed": {seed: [values]},
  "mean", "low", "high"} (t interval). With `difference`, the paired
  difference to cross-entropy on the same seed (cross-entropy itself left out)."""
  base = histories.get(BASELINE, {})
  out = {}
  for label, runs in histories.items():
    if difference and (label == BASELINE or not base):
      continue
    seeds = sorted(set(runs) & set(base)) if difference else sorted(runs)
    if not seeds:
      continue
    steps = sorted(set.intersection(*(set(runs[s]) & (set(base[s]) if difference else set(runs[s]))
                                      for s in seeds)))
    out[label] = {}
    for part in PARTS:
      name = key(part, metric)
      if not all(name in flat_metrics(runs[s][steps[-1]]) for s in seeds):
        continue
      value = lambda s, t, n=name: (flat_metrics(runs[s][t])[n]  # noqa: E731
                                    - (flat_metrics(base[s][t])[n] if difference else 0.0))
      per_seed = {s: [value(s, t) for t in steps] for s in seeds}
      bands = [stats.t_interval([per_seed[s][i] for s in seeds], level) for i in range(len(steps))]
      out[label][part] = {"steps": steps, "per_seed": per_seed, "mean": [b[0] for b in bands],
                          "low": [b[1] for b in bands], "high": [b[2] for b in bands]}
  return out


def _interval(low, high) -> str:
  return "–" if low is None else f"[{low:+.4f}, {high:+.4f}]"


def _gamma_order(labels: Sequence[str]) -> list[str]:
  """Labels with MiLe's gamma sweep in increasing gamma, baselines first."""
  sweep = sorted((l for l in labels if l.startswith("mile_g")), key=lambda l: float(l[len("mile_g"):]))
  return [l for l in labels if not l.startswith("mile_g")] + sweep


def paired_markdown(results: Mapping[str, Mapping[str, Mapping]]) -> str:
  """Tables of `paired` output: t intervals with p, bootstrap intervals, and shares of the excess."""
  if not results:
    return ""
  labels = _gamma_order(list(results))
  first = results[labels[0]]["all"]
  header = "| loss − cross-entropy | " + " | ".join(PARTS) + " |\n|" + "---|" * (len(PARTS) + 1) + "\n"
  lines = [f"Paired difference of validation cross-entropy at step {first['step']} (loss − cross-entropy, "
           f"same seed; negative favours the loss), mean over {first['t']['n']} seeds, 95% t interval over "
           "seeds and the paired t test's p:\n", header.rstrip("\n")]
  def t_cell(entry):
    t = entry["t"]
    return f"{t['mean']:+.4f} {_interval(t['low'], t['high'])}" + ("" if t["p"] is None else f" p={t['p']:.2g}")

  def bootstrap_cell(entry):
    b = entry["bootstrap"]
    return f"{b['mean']:+.4f} {_interval(b['low'], b['high'])}"

  def table(cell, field):
    rows = []
    for label in labels:
      entries = [results[label].get(part) for part in PARTS]
      rows.append(f"| {label} | " + " | ".join(cell(e) if e and field in e else "–" for e in entries) + " |")
    return rows

  lines += table(t_cell, "t")
  boot = [results[l][p]["bootstrap"] for l in labels for p in PARTS if "bootstrap" in results[l].get(p, {})]
  if boot:
    lines += ["", f"The same differences with 95% bootstrap intervals over seeds × validation documents "
              f"({boot[0]['replicates']} replicates):\n", header.rstrip("\n")] + table(bootstrap_cell, "bootstrap")
  if any("excess_share" in results[l].get(p, {}) for l in labels for p in PARTS):
    lines += ["", "The mean difference as a share of cross-entropy's excess over the optimum (−10% = a tenth "
              "of the gap to the best possible loss closed):\n", header.rstrip("\n")]
    lines += table(lambda e: f"{100 * e['excess_share']:+.1f}%", "excess_share")
  return "\n".join(lines) + "\n"


def levels_markdown(rows: Mapping[str, Mapping[str, tuple[float, float]]], seeds: int) -> str:
  """The levels: mean ± standard deviation over seeds per loss."""
  columns = ["ce", "high_ce", "medium_ce", "low_ce", "perplexity", "low_perplexity"]
  if any("excess" in r for r in rows.values()):
    columns += ["excess", "high_excess", "medium_excess", "low_excess"]
  header = ["loss"] + columns
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for label in _gamma_order(list(rows)):
    row = rows[label]
    lines.append("| " + " | ".join([label] + [f"{row[c][0]:.4f} ± {row[c][1]:.4f}" if c in row else "–"
                                               for c in columns]) + " |")
  return "\n".join(lines) + f"\n\nMean ± standard deviation over {seeds} seeds, validation split.\n"
