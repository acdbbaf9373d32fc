"""PNG plots of a comparison: loss curves, per-bucket perplexity, entropy and weight dynamics."""

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402

from mile_jax.evaluation.buckets import BUCKET_NAMES  # noqa: E402


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def loss_curves(curves: Mapping[str, Sequence[Sequence[tuple[int, float]]]], path: str) -> str:
  """Validation cross-entropy against step: mean over seeds, shaded +-1 std.

  Args:
    curves: {label: [per-seed [(step, ce), ...]]}.
  """
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, runs in curves.items():
    steps = sorted(set.intersection(*(set(s for s, _ in run) for run in runs)))
    values = np.array([[dict(run)[s] for s in steps] for run in runs])
    mean, std = values.mean(0), values.std(0)
    ax.plot(steps, mean, label=label)
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
  ax.set(xlabel="step", ylabel="validation cross-entropy (nats)", title="Validation loss")
  ax.legend(fontsize=8)
  return _save(fig, path)


def bucket_bars(rows: Mapping[str, Mapping[str, tuple[float, float]]], path: str,
                metric: str = "perplexity") -> str:
  """Grouped bars of `<bucket>_<metric>` per loss with std error bars."""
  labels = list(rows)
  fig, axes = plt.subplots(1, len(BUCKET_NAMES), figsize=(4 * len(BUCKET_NAMES), 4))
  for ax, bucket in zip(axes, BUCKET_NAMES):
    key = f"{bucket}_{metric}"
    means = [rows[l][key][0] if key in rows[l] else np.nan for l in labels]
    stds = [rows[l][key][1] if key in rows[l] else 0.0 for l in labels]
    ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color=plt.cm.tab10(np.arange(len(labels)) % 10))
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    finite = [m for m in means if np.isfinite(m)]
    if finite:
      ax.set_ylim(min(finite) * 0.97, max(m + s for m, s in zip(means, stds) if np.isfinite(m)) * 1.02)
    ax.set_title(f"{bucket}-frequency tokens: {metric}")
  return _save(fig, path)


def entropy_dynamics(histories: Mapping[str, Mapping[int, dict]], path: str) -> str:
  """Entropy histograms per frequency bucket (rows) at each checkpoint (columns).

  Args:
    histories: {label: {step: token_stats.summarize(...) output}}.
  """
  steps = sorted(set.intersection(*(set(h) for h in histories.values())))
  fig, axes = plt.subplots(len(BUCKET_NAMES), len(steps), figsize=(3 * len(steps), 2.4 * len(BUCKET_NAMES)),
                           squeeze=False, sharex=True)
  for col, step in enumerate(steps):
    for row, bucket in enumerate(BUCKET_NAMES):
      ax = axes[row][col]
      for label, history in histories.items():
        summary = history[step]
        stats = summary["buckets"][bucket]
        if "entropy_hist" not in stats:
          continue
        edges = np.array(summary["entropy_edges"])
        hist = np.array(stats["entropy_hist"], np.float64)
        ax.stairs(hist / max(hist.sum(), 1.0), edges, label=label)
      if row == 0:
        ax.set_title(f"step {step}", fontsize=9)
      if col == 0:
        ax.set_ylabel(f"{bucket}\nshare of tokens", fontsize=8)
      if row == len(BUCKET_NAMES) - 1:
        ax.set_xlabel("entropy (nats)", fontsize=8)
  axes[0][0].legend(fontsize=7)
  fig.suptitle("Predictive entropy by token-frequency bucket during training")
  return _save(fig, path)


def weight_dynamics(history: Mapping[int, dict], label: str, path: str) -> str:
  """Histograms of the normalised weight alpha * w at each checkpoint of one run."""
  fig, ax = plt.subplots(figsize=(7, 4))
  for step in sorted(history):
    summary = history[step]
    hist = np.array(summary["weight_hist"], np.float64)
    ax.stairs(hist / max(hist.sum(), 1.0), np.array(summary["weight_edges"]), label=f"step {step}")
  ax.set(xlabel="alpha * w (mean 1)", ylabel="share of tokens", title=f"Token weights during training: {label}")
  ax.legend(fontsize=8)
  return _save(fig, path)


def all_plots(out_dir: str, curves, rows, histories, weight_label: str) -> list[str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = [loss_curves(curves, os.path.join(out_dir, "val_loss.png")),
           bucket_bars(rows, os.path.join(out_dir, "bucket_perplexity.png"))]
  if any("high_excess" in r for r in rows.values()):
    paths.append(bucket_bars(rows, os.path.join(out_dir, "bucket_excess.png"), metric="excess"))
  paths.append(entropy_dynamics(histories, os.path.join(out_dir, "entropy_dynamics.png")))
  if weight_label in histories:
    paths.append(weight_dynamics(histories[weight_label], weight_label, os.path.join(out_dir, "weights.png")))
  return paths
