"""Token-level perplexity, overall and per frequency bucket, on packed text.

Every batch is reduced on device to sums per bucket (cross-entropy, its
square, entropy, token count); the host adds them up and divides once, so
the result is exact over any number of batches and devices. The standard
error of the mean cross-entropy treats tokens as independent (neighbouring
tokens are correlated, so it is a lower bound); the perplexity's error is
its delta-method image, exp(ce) * se(ce).
"""

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from mile_jax import losses
from mile_jax import sharding
from mile_jax.evaluation.errors import EvalError
from mile_jax.evaluation.restore import Restored


def bucket_sums(params, batch, bucket_of_id, *, model, num_buckets: int) -> dict[str, jax.Array]:
  """Sums per bucket of the targets' ids, each float32 (num_buckets,).

  Args:
    batch: `inputs`, `targets` int32 (B, T), `mask` float32 (B, T), optional
      `positions` and `segment_ids` (B, T).
    bucket_of_id: int32 (V,) bucket of every token id.
  """
  logits = model.apply({"params": params}, batch["inputs"], positions=batch.get("positions"),
                       segment_ids=batch.get("segment_ids"))  # (B, T, V)
  ce = losses.token_cross_entropy(logits, batch["targets"])  # (B, T) float32
  entropy = losses.token_entropy(logits)
  onehot = jax.nn.one_hot(bucket_of_id[batch["targets"]], num_buckets, dtype=jnp.float32)  # (B, T, K)
  weights = onehot * batch["mask"].astype(jnp.float32)[..., None]
  total = lambda x: jnp.einsum("btk,bt->k", weights, x)
  return {"ce_sum": total(ce), "ce_sq_sum": total(ce * ce), "entropy_sum": total(entropy),
          "tokens": jnp.sum(weights, axis=(0, 1))}


def evaluate(restored: Restored, dataset: Any, *, batch_size: int, max_batches: int = 0,
             bucket_of_id: np.ndarray | None = None, num_buckets: int = 1, desc: str = "ppl") -> dict[str, np.ndarray]:
  """Sums (float64, (num_buckets,)) over `dataset.batch(0..)` of `batch_size` rows.

  One pass over the dataset's rows (whole batches only), or `max_batches`
  batches when that is positive.
  """
  dp = sharding.data_parallel_size(restored.mesh)
  if batch_size % dp:
    raise EvalError(f"--batch_size={batch_size} must be a multiple of the data-parallel size {dp}")
  available = dataset.rows_per_epoch // batch_size
  if available == 0:
    raise EvalError(f"--batch_size={batch_size}: the text packs into only {dataset.rows_per_epoch} rows; "
                    f"lower --batch_size")
  count = min(available, max_batches) if max_batches > 0 else available
  if bucket_of_id is None:
    bucket_of_id = np.zeros(restored.config.model.vocab_size, np.int32)
  fn = jax.jit(functools.partial(bucket_sums, model=restored.model, num_buckets=num_buckets))
  buckets = jnp.asarray(bucket_of_id, jnp.int32)
  totals = None
  with restored.context():
    for step in tqdm.trange(count, desc=desc, dynamic_ncols=True, leave=False):
      local = dataset.batch(step, batch_size, jax.process_index(), jax.process_count())
      sums = jax.device_get(fn(restored.params, sharding.make_global_batch(local, restored.mesh), buckets))
      sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
      totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  return totals


def summarize(sums: dict[str, np.ndarray], index: int | slice = slice(None)) -> dict[str, float]:
  """Perplexity, mean cross-entropy, mean entropy, their standard errors and the token count."""
  tokens = float(np.sum(sums["tokens"][index]))
  if tokens == 0:
    return {"tokens": 0.0, "ce": math.nan, "ce_stderr": math.nan, "perplexity": math.nan,
            "perplexity_stderr": math.nan, "entropy": math.nan}
  ce = float(np.sum(sums["ce_sum"][index])) / tokens
  variance = max(float(np.sum(sums["ce_sq_sum"][index])) / tokens - ce * ce, 0.0)
  ce_se = math.sqrt(variance * tokens / max(tokens - 1, 1) / tokens)
  ppl = math.exp(min(ce, 700.0))
  return {"tokens": tokens, "ce": ce, "ce_stderr": ce_se, "perplexity": ppl, "perplexity_stderr": ppl * ce_se,
          "entropy": float(np.sum(sums["entropy_sum"][index])) / tokens}


def per_bucket(sums: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, dict[str, float]]:
  return {name: summarize(sums, k) for k, name in enumerate(names)}
