"""Token-frequency buckets: the paper's high / medium / low split of the vocabulary.

Token ids are ranked by their training-split count, most frequent first
(ties by id). With `share_before(i)` the fraction of all training
occurrences taken by the ids ranked before id i:

* high:   share_before < high_coverage (the most frequent ids that together
          reach high_coverage; the id that crosses the line is included),
* low:    share_before >= 1 - low_coverage (the rarest ids, which together
          make up at most the last low_coverage; never-seen ids are here),
* medium: everything else.
"""

import numpy as np

from mile_jax.evaluation.errors import EvalError

BUCKET_NAMES = ("high", "medium", "low")
HIGH, MEDIUM, LOW = range(3)


def frequency_buckets(counts: np.ndarray, high_coverage: float = 0.8, low_coverage: float = 0.05) -> np.ndarray:
  """Bucket of every token id.

  Args:
    counts: int [V] training occurrences per id.
    high_coverage: share of occurrences the high bucket covers, in (0, 1).
    low_coverage: share the low bucket covers at most, in [0, 1 - high_coverage].

  Returns:
    int32 [V]: HIGH (0), MEDIUM (1) or LOW (2) per id.
  """
  counts = np.asarray(counts, dtype=np.int64)
  if counts.ndim != 1 or counts.size == 0 or counts.min() < 0 or counts.sum() == 0:
    raise EvalError("token counts must be a non-empty 1-D array of non-negative counts with a positive sum")
  if not 0.0 < high_coverage < 1.0:
    raise EvalError(f"--bucket_high: must be in (0, 1), got {high_coverage}")
  if not 0.0 <= low_coverage <= 1.0 - high_coverage:
    raise EvalError(f"--bucket_low: must be in [0, 1 - bucket_high = {1.0 - high_coverage:g}], got {low_coverage}")
  order = np.lexsort((np.arange(counts.size), -counts))  # by count descending, then id
  sorted_counts = counts[order]
  before = np.concatenate([[0], np.cumsum(sorted_counts)[:-1]])
  total = int(counts.sum())
  share_before = before.astype(np.float64) / total
  ranked = np.full(counts.size, MEDIUM, dtype=np.int32)
  ranked[share_before < high_coverage] = HIGH
  ranked[share_before >= 1.0 - low_coverage] = LOW
  out = np.empty_like(ranked)
  out[order] = ranked
  return out
