"""Mean and spread over seeds, differences to cross-entropy, and the Markdown table."""

import math
from typing import Mapping, Sequence

BASELINE = "cross_entropy"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (n - 1); std is 0 for one value."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def metric_rows(final: Mapping[str, Sequence[Mapping]]) -> dict[str, dict[str, tuple[float, float]]]:
  """{label: {metric: (mean, std)}} from {label: [per-seed final summaries]}.

  Metrics: ce, perplexity, and per bucket `<bucket>_perplexity`,
  `<bucket>_entropy` and, where present, `excess` and `<bucket>_excess`.
  """
  rows = {}
  for label, runs in final.items():
    metrics: dict[str, list[float]] = {}
    for summary in runs:
      flat = {"ce": summary["ce"], "perplexity": summary["perplexity"]}
      if "excess" in summary:
        flat["excess"] = summary["excess"]
      for bucket, stats in summary["buckets"].items():
        for key in ("perplexity", "entropy", "excess"):
          if key in stats:
            flat[f"{bucket}_{key}"] = stats[key]
      for key, value in flat.items():
        metrics.setdefault(key, []).append(value)
    rows[label] = {k: mean_std(v) for k, v in metrics.items()}
  return rows


def differences(rows: Mapping[str, Mapping[str, tuple[float, float]]], metric: str = "ce") -> dict[str, dict]:
  """Per label: mean difference to the baseline and whether it exceeds the seed spread
  (|difference| > std(label) + std(baseline))."""
  if BASELINE not in rows:
    return {}
  base_mean, base_std = rows[BASELINE][metric]
  out = {}
  for label, row in rows.items():
    mean, std = row[metric]
    diff = mean - base_mean
    out[label] = {"difference": diff, "spread": std + base_std, "exceeds_spread": abs(diff) > std + base_std}
  return out


def markdown(rows: Mapping[str, Mapping[str, tuple[float, float]]], seeds: int) -> str:
  """The results table: mean ± std over `seeds` seeds per loss."""
  columns = ["ce", "perplexity", "high_perplexity", "medium_perplexity", "low_perplexity"]
  if any("excess" in r for r in rows.values()):
    columns += ["excess", "high_excess", "medium_excess", "low_excess"]
  diffs = differences(rows)
  header = ["loss"] + columns + ["Δce vs CE", "beyond seed spread"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for label, row in rows.items():
    cells = [label] + [f"{row[c][0]:.4f} ± {row[c][1]:.4f}" if c in row else "–" for c in columns]
    d = diffs.get(label)
    cells += [f"{d['difference']:+.4f}", "yes" if d["exceeds_spread"] else "no"] if d else ["–", "–"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + f"\n\nMean ± standard deviation over {seeds} seeds, validation split.\n"
