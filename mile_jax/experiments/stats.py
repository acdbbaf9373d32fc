"""Paired statistics of a comparison: t intervals over seeds and a bootstrap over seeds x documents.

Every loss of a comparison sees the same initialisation, data order and
validation documents for a given seed, so a loss is judged by its paired
differences d_s = metric(loss, seed s) - metric(cross-entropy, seed s):

* t interval: mean(d) +- t_{(1+level)/2, n-1} * sd(d) / sqrt(n), sd with
  n - 1; the paired t test's two-sided p-value P(|T_{n-1}| >= |mean| / se).
* bootstrap: the difference of one bucket's mean loss is a ratio over
  validation documents, d_s = sum_j D_sj / sum_j N_sj, with D_sj the summed
  per-token difference of document j's tokens in the bucket and N_sj their
  number. A replicate draws n seeds with replacement and, once, the
  documents with replacement; every drawn seed is scored on those same
  documents (the validation set is one sample shared by all seeds, so its
  sampling noise is common to them, not independent per seed), and the
  replicate's statistic is the mean of the drawn seeds' ratios. The interval
  is the replicates' (1-level)/2 and (1+level)/2 percentiles.
"""

import math
from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats


def t_abs_cdf(t: float, df: int) -> float:
  """P(|T| <= t) for Student's t with `df` (integer >= 1) degrees of freedom."""
  if df < 1 or int(df) != df:
    raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
  return float(1.0 - 2.0 * scipy_stats.t.sf(abs(float(t)), df))  # sf keeps small tail probabilities exact


def t_quantile(p: float, df: int) -> float:
  """The p-quantile (0.5 <= p < 1) of Student's t with `df` degrees of freedom."""
  if not 0.5 <= p < 1.0:
    raise ValueError(f"p must be in [0.5, 1), got {p}")
  return float(scipy_stats.t.ppf(p, df))


def paired_t(differences: Sequence[float], level: float = 0.95) -> dict:
  """Mean, t interval and paired t test of per-seed differences.

  Returns {"n", "mean", "sd", "low", "high", "p"}; with one seed the interval
  and p are None (nothing to estimate the spread from), with a zero spread
  they collapse to the mean (p 0 unless the mean is 0).
  """
  d = np.asarray(differences, np.float64)
  n = d.size
  mean = float(d.mean())
  out = {"n": n, "mean": mean, "sd": None, "low": None, "high": None, "p": None}
  if n < 2:
    return out
  sd = float(d.std(ddof=1))
  se = sd / math.sqrt(n)
  half = t_quantile(0.5 + level / 2.0, n - 1) * se
  if se > 0:
    p = 1.0 - t_abs_cdf(abs(mean) / se, n - 1)
  else:
    p = 1.0 if mean == 0 else 0.0
  out.update(sd=sd, low=mean - half, high=mean + half, p=max(p, 0.0))
  return out


def ratio_differences(diff_sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """Per-seed mean difference sum_j D_sj / sum_j N_sj: float64 [S] from [S, D] and [S, D] or [D]."""
  diff_sums = np.asarray(diff_sums, np.float64)
  counts = np.broadcast_to(np.asarray(counts, np.float64), diff_sums.shape)
  return diff_sums.sum(1) / counts.sum(1)


def bootstrap_paired(diff_sums: np.ndarray, counts: np.ndarray, *, replicates: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
  """Bootstrap interval of the mean paired difference over seeds x shared documents.

  Args:
    diff_sums: float [S, D]: per seed and validation document, the summed
      per-token difference (loss - baseline) over the document's tokens in
      the measured bucket.
    counts: [S, D] or [D]: those tokens' number (0 where the document has none).
    replicates: bootstrap replicates; one `np.random.default_rng(seed)` draws
      the seeds ([replicates, S] integers) and then the documents
      ([replicates, D] integers), in that order.

  Returns:
    {"mean", "low", "high", "replicates"}: the statistic on the data, the
    percentile interval, and the replicates used (those whose drawn
    documents hold no token of the bucket for some drawn seed are left out).
  """
  diff_sums = np.asarray(diff_sums, np.float64)
  num_seeds, num_docs = diff_sums.shape
  counts = np.broadcast_to(np.asarray(counts, np.float64), diff_sums.shape)
  mean = float(ratio_differences(diff_sums, counts).mean())
  rng = np.random.default_rng(seed)
  seed_draws = rng.integers(0, num_seeds, size=(replicates, num_seeds))
  doc_draws = rng.integers(0, num_docs, size=(replicates, num_docs))
  # Multiplicities of each document in each replicate: [R, D].
  weights = np.zeros((replicates, num_docs))
  np.add.at(weights, (np.repeat(np.arange(replicates), num_docs), doc_draws.ravel()), 1.0)
  num = weights @ diff_sums.T  # [R, S]
  den = weights @ counts.T  # [R, S]
  rows = np.arange(replicates)[:, None]
  num, den = num[rows, seed_draws], den[rows, seed_draws]  # [R, S]: the drawn seeds
  usable = (den > 0).all(axis=1)
  stats = (num[usable] / den[usable]).mean(axis=1)
  if stats.size == 0:
    return {"mean": mean, "low": None, "high": None, "replicates": 0}
  low, high = np.percentile(stats, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
  return {"mean": mean, "low": float(low), "high": float(high), "replicates": int(stats.size)}


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high) of a t interval over seeds; low = high = mean for one value."""
  out = paired_t(values, level)
  if out["low"] is None:
    return out["mean"], out["mean"], out["mean"]
  return out["mean"], out["low"], out["high"]

