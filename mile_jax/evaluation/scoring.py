"""Per-example metrics and their aggregation, as lm-evaluation-harness 0.4 defines them.

* acc: the choice with the highest summed log-likelihood is the gold one.
* acc_norm: the same after dividing each log-likelihood by the length of the
  choice text in characters (the choice as the task lists it, without the
  leading target delimiter).
* exact_match (TriviaQA): the generation, stripped of surrounding whitespace,
  equals one of the reference aliases after lower-casing both and deleting
  ASCII punctuation, done as the harness does it: on NumPy fixed-width string
  arrays (`np.char.lower`, `np.char.translate`), the aliases in one array and
  the generation repeated in another. An array keeps its width, the length of
  its longest string, when lower-casing makes a string longer ("İ" becomes
  "i" + U+0307), so the lower-cased string is cut to that width: both sides
  are cut alike only when they are equally wide, and the score can differ
  from Python's `str.lower` either way.
* Standard error of a mean: sample standard deviation (ddof=1) / sqrt(n).
  A size-weighted group mean (MMLU) gets the pooled standard error.
"""

import math
import string
from typing import Sequence

import numpy as np

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def multiple_choice(logliks: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
  """acc and acc_norm of one example. Ties go to the first choice, as numpy's argmax."""
  lls = np.asarray(logliks, dtype=np.float64)
  lengths = np.array([float(len(c)) for c in choices])
  return {"acc": float(int(np.argmax(lls)) == gold), "acc_norm": float(int(np.argmax(lls / lengths)) == gold)}


def normalize_answers(texts: Sequence[str]) -> np.ndarray:
  """The texts as one NumPy string array (dtype width: the longest text),
  lower-cased and without ASCII punctuation, each cut to that width."""
  return np.char.translate(np.char.lower(np.asarray(list(texts))), table=_PUNCTUATION)


def exact_match(prediction: str, aliases: Sequence[str]) -> float:
  """1.0 if the stripped prediction matches any alias (case and punctuation
  ignored), on the harness's arrays: the aliases in one, the prediction
  repeated once per alias in the other (see the module docstring)."""
  aliases = list(aliases)
  if not aliases:
    return 0.0
  pred = prediction.strip()
  return float(np.any(normalize_answers([pred] * len(aliases)) == normalize_answers(aliases)))


def truncate_at_stop(text: str, until: Sequence[str]) -> str:
  """The text before the first occurrence of any stop sequence."""
  for stop in until:
    if stop:
      text = text.split(stop)[0]
  return text


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
  """(mean, standard error of the mean); the error is nan for fewer than 2 values."""
  values = np.asarray(values, dtype=np.float64)
  if values.size == 0:
    return math.nan, math.nan
  if values.size == 1:
    return float(values[0]), math.nan
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def pooled_mean_stderr(means: Sequence[float], stderrs: Sequence[float], sizes: Sequence[int]) -> tuple[float, float]:
  """Size-weighted mean of sub-task means and its pooled standard error."""
  means, stderrs, sizes = (np.asarray(x, dtype=np.float64) for x in (means, stderrs, sizes))
  mean = float(np.sum(means * sizes) / np.sum(sizes))
  if len(sizes) == 1:
    return mean, float(stderrs[0])
  pooled_var = np.sum((sizes - 1) * stderrs ** 2 * sizes) / (np.sum(sizes) - len(sizes))
  return mean, float(np.sqrt(pooled_var / np.sum(sizes)))
