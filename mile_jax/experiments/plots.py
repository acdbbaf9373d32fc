"""PNG plots of a comparison: per-bucket curves, paired differences per seed, gamma sensitivity,
entropy and weight dynamics."""

import os
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402

from mile_jax.evaluation.buckets import BUCKET_NAMES  # noqa: E402
from mile_jax.experiments.tables import PARTS  # noqa: E402

_TITLES = {"all": "all tokens", "high": "high-frequency tokens", "medium": "medium-frequency tokens",
           "low": "low-frequency tokens"}


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def bucket_curves(curves: Mapping[str, Mapping[str, dict]], path: str, ylabel: str) -> str:
  """One panel per part (all, high, medium, low): mean over seeds against step, shaded 95% t interval.

  Args:
    curves: tables.curves output, {label: {part: {"steps", "mean", "low", "high"}}}.
  """
  fig, axes = plt.subplots(1, len(PARTS), figsize=(4.2 * len(PARTS), 4), squeeze=False)
  for ax, part in zip(axes[0], PARTS):
    for index, (label, parts) in enumerate(curves.items()):
      if part not in parts:
        continue
      c = parts[part]
      color = plt.cm.tab10(index % 10)
      ax.plot(c["steps"], c["mean"], label=label, color=color)
      ax.fill_between(c["steps"], c["low"], c["high"], alpha=0.15, color=color)
    ax.set(xlabel="step", ylabel=ylabel, title=_TITLES[part])
  axes[0][0].legend(fontsize=7)
  fig.suptitle("Validation learning curves: mean over seeds, shaded 95% t interval")
  return _save(fig, path)


def paired_seed_lines(differences: Mapping[str, Mapping[str, dict]], path: str) -> str:
  """Paired differences (loss - cross-entropy, same seed) against step: one row per loss, one
  column per part, one line per seed (so that a single outlying seed shows as such) and their mean
  with its 95% t interval.

  Args:
    differences: tables.curves(..., difference=True) output.
  """
  labels = list(differences)
  fig, axes = plt.subplots(len(labels), len(PARTS), figsize=(3.6 * len(PARTS), 2.4 * len(labels)),
                           squeeze=False, sharex=True)
  for row, label in enumerate(labels):
    for col, part in enumerate(PARTS):
      ax = axes[row][col]
      ax.axhline(0.0, color="black", linewidth=0.6)
      c = differences[label].get(part)
      if c is None:
        continue
      for index, (seed, values) in enumerate(c["per_seed"].items()):
        ax.plot(c["steps"], values, color=plt.cm.tab10(index % 10), linewidth=0.9, label=f"seed {seed}")
      ax.plot(c["steps"], c["mean"], color="black", linewidth=1.8, label="mean, 95% t interval")
      ax.fill_between(c["steps"], c["low"], c["high"], color="black", alpha=0.12)
      if row == 0:
        ax.set_title(_TITLES[part], fontsize=9)
      if col == 0:
        ax.set_ylabel(f"{label} − CE\n(nats)", fontsize=8)
      if row == len(labels) - 1:
        ax.set_xlabel("step", fontsize=8)
  if labels:
    axes[0][0].legend(fontsize=6, ncol=2)
  fig.suptitle("Paired difference of validation cross-entropy to cross-entropy, per seed")
  return _save(fig, path)


def gamma_sensitivity(paired: Mapping[str, Mapping[str, dict]], path: str) -> str:
  """MiLe's paired difference to cross-entropy against gamma per part, with 95% t intervals
  (and bootstrap intervals where measured), focal loss as a separate marker.

  Args:
    paired: tables.paired output.
  """
  fig, axes = plt.subplots(1, len(PARTS), figsize=(4 * len(PARTS), 3.8), squeeze=False)
  sweep = sorted((float(l[len("mile_g"):]), l) for l in paired if l.startswith("mile_g"))
  others = [l for l in paired if not l.startswith("mile_g")]
  for ax, part in zip(axes[0], PARTS):
    ax.axhline(0.0, color="black", linewidth=0.6)
    points = [(g, paired[l][part]) for g, l in sweep if part in paired[l]]
    for offset, method, color in ((-0.02, "t", "tab:blue"), (0.02, "bootstrap", "tab:orange")):
      shown = [(g, e[method]) for g, e in points if method in e and e[method].get("low") is not None]
      if not shown:
        continue
      gammas = np.array([g for g, _ in shown])
      mean = np.array([m["mean"] for _, m in shown])
      err = np.array([[m["mean"] - m["low"] for _, m in shown], [m["high"] - m["mean"] for _, m in shown]])
      ax.errorbar(gammas + offset, mean, yerr=err, fmt="o-" if method == "t" else "s", color=color,
                  capsize=3, markersize=4, label=f"MiLe, {method} interval")
    for index, label in enumerate(others):
      e = paired[label].get(part)
      if e is None or e["t"]["low"] is None:
        continue
      gamma = float(label.rsplit("_g", 1)[1]) if "_g" in label else 0.0
      ax.errorbar([gamma + 0.05], [e["t"]["mean"]], yerr=[[e["t"]["mean"] - e["t"]["low"]],
                                                         [e["t"]["high"] - e["t"]["mean"]]],
                  fmt="D", color=plt.cm.Dark2(index % 8), capsize=3, markersize=5, label=f"{label}, t interval")
    ax.set(xlabel="gamma", ylabel="loss − cross-entropy (nats)", title=_TITLES[part])
  axes[0][0].legend(fontsize=7)
  fig.suptitle("Gamma sensitivity: paired difference of validation cross-entropy, 95% intervals")
  return _save(fig, path)


def entropy_dynamics(histories: Mapping[str, Mapping[int, dict]], path: str) -> str:
  """Entropy histograms per frequency bucket (rows) at each checkpoint (columns).

  Args:
    histories: {label: {step: token_stats.summarize(...) output}}.
  """
  steps = sorted(set.intersection(*(set(h) for h in histories.values())))
  if len(steps) > 6:  # at most six columns: evenly spaced checkpoints, the last included
    steps = [steps[i] for i in np.linspace(0, len(steps) - 1, 6).round().astype(int)]
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


def all_plots(out_dir: str, level_curves, difference_curves, paired, histories, weight_label: str,
              excess: bool) -> list[str]:
  """Writes every plot under `out_dir`; returns their paths.

  Args:
    level_curves: tables.curves of excess (synthetic language) or ce.
    difference_curves: tables.curves(..., difference=True) of ce.
    paired: tables.paired output.
    histories: {label: {step: summary}} of the runs whose entropy is shown.
    excess: whether `level_curves` holds the excess over the optimum.
  """
  os.makedirs(out_dir, exist_ok=True)
  ylabel = "excess over the optimum (nats)" if excess else "validation cross-entropy (nats)"
  paths = [bucket_curves(level_curves, os.path.join(out_dir, "bucket_curves.png"), ylabel)]
  if difference_curves:
    paths.append(paired_seed_lines(difference_curves, os.path.join(out_dir, "paired_seeds.png")))
  if sum(l.startswith("mile_g") for l in paired) >= 2:
    paths.append(gamma_sensitivity(paired, os.path.join(out_dir, "gamma.png")))
  paths.append(entropy_dynamics(histories, os.path.join(out_dir, "entropy_dynamics.png")))
  if weight_label in histories:
    paths.append(weight_dynamics(histories[weight_label], weight_label, os.path.join(out_dir, "weights.png")))
  return paths
