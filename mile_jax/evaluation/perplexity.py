"""Token-level perplexity, overall and per frequency bucket, on packed text.

Every batch is reduced on device to sums per bucket (cross-entropy, its
square, entropy, token count) and to each row's cross-entropy sum and token
count; the host adds them up in float64 and divides once, so the result is
exact over any number of batches and devices. On a mesh of one process's
devices in a multi-process run (eval.py's), process p scores the batches
p, p + P, ... alone and the processes exchange each batch's float64 sums
(`processes.combine`), which every process then adds in batch order: the
same sums, bit for bit, as one process scoring every batch on that mesh.

Two standard errors of the mean cross-entropy ce = sum_i y_i / sum_i n_i
(row i holds n_i target tokens whose cross-entropies sum to y_i):
- `ce_stderr_rows`, the one eval.py reports: rows are the independent units
  (a ratio estimator over clusters, by the delta method):
  var = m / (m - 1) * sum_i (y_i - ce * n_i)^2 / (sum_i n_i)^2 over the m rows
  evaluated (rows without a token of a bucket count, with y_i = n_i = 0).
  Tokens of one row are correlated (same document, same context), so this is
  larger than the token-level error; rows cut from one long document are still
  correlated, so it too can err low.
- `ce_stderr`: tokens as independent draws, sd(ce_t) / sqrt(N), a lower bound.
The perplexity's errors are their delta-method images, exp(ce) * se(ce).
"""

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from mile_jax.core import losses
from mile_jax.core import sharding
from mile_jax.evaluation import buckets as buckets_lib
from mile_jax.evaluation import processes as processes_lib
from mile_jax.evaluation.errors import EvalError
from mile_jax.evaluation.model_on_mesh import ModelOnMesh


def bucket_sums(params, batch, bucket_of_id, *, model, num_buckets: int) -> dict[str, jax.Array]:
  """Sums per bucket of the targets' ids, each float32 (num_buckets,), and per
  row and bucket, `row_ce` and `row_tokens` float32 (B, num_buckets).

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
          "tokens": jnp.sum(weights, axis=(0, 1)), "row_ce": jnp.einsum("btk,bt->bk", weights, ce),
          "row_tokens": jnp.sum(weights, axis=1)}


def row_moments(row_ce: np.ndarray, row_tokens: np.ndarray, rows: int | None = None) -> dict[str, np.ndarray]:
  """The additive row statistics `summarize` needs: float64 (K, K) cross-bucket
  products summed over rows (so that any set of buckets, whose row sums are
  sums over its buckets, gets its own), and the row count (K,).

  Args:
    row_ce: (rows, K) each row's cross-entropy sum per bucket.
    row_tokens: (rows, K) each row's token count per bucket.
    rows: the rows to count, default all; padding rows (all zeros, so they add
      nothing to the sums) are left out of the count this way.
  """
  y, n = np.asarray(row_ce, np.float64), np.asarray(row_tokens, np.float64)
  return {"row_ce_sq_sum": y.T @ y, "row_ce_tokens_sum": y.T @ n, "row_tokens_sq_sum": n.T @ n,
          "rows": np.full(y.shape[1], float(y.shape[0] if rows is None else rows))}


@functools.lru_cache(maxsize=8)
def _sums_fn(model, num_buckets: int, mesh: jax.sharding.Mesh):
  """`bucket_sums` jitted once per model, bucket count and mesh (a later
  `evaluate` reuses the compiled function)."""
  # Replicated outputs: every process can read the per-row arrays.
  return jax.jit(functools.partial(bucket_sums, model=model, num_buckets=num_buckets),
                 out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _process_share(mesh: jax.sharding.Mesh) -> tuple[int, int]:
  """(index, count) of this process among the processes whose devices make up
  `mesh`: each feeds its share of every batch; a mesh of one process's devices
  (eval.py's) gets the whole batch from it."""
  processes = sorted({int(d.process_index) for d in mesh.devices.flat})
  return processes.index(jax.process_index()), len(processes)


def evaluate(loaded: ModelOnMesh, dataset: Any, *, batch_size: int, max_batches: int = 0,
             bucket_of_id: np.ndarray | None = None, num_buckets: int = 1, desc: str = "ppl",
             progress: bool = True) -> dict[str, np.ndarray]:
  """Sums (float64) over `dataset.batch(0..)` of `batch_size` rows: those of
  `bucket_sums`, (num_buckets,), and in place of its per-row arrays, `row_moments`.

  One pass over every row of the dataset (`dataset.rows_per_epoch`), or the
  first `max_batches` batches of that pass when `max_batches` is positive. A
  last batch that the rows do not fill is padded with rows of mask 0 (read
  from the next epoch, so of the same shape; they add no token and are not
  counted as rows). `progress`: show a progress bar (on process 0).
  In a multi-process run every process of the run calls it (see the module
  docstring for how they share the batches).
  """
  dp = sharding.data_parallel_size(loaded.mesh)
  if batch_size % dp:
    raise EvalError(f"--batch_size={batch_size} must be a multiple of the data-parallel size {dp}")
  rows = dataset.rows_per_epoch
  if rows < batch_size:
    raise EvalError(f"--batch_size={batch_size}: the text packs into only {rows} rows; lower --batch_size")
  available = -(-rows // batch_size)
  count = min(available, max_batches) if max_batches > 0 else available
  if bucket_of_id is None:
    bucket_of_id = np.zeros(loaded.config.model.vocab_size, np.int32)
  fn = _sums_fn(loaded.model, num_buckets, loaded.mesh)
  buckets = jnp.asarray(bucket_of_id, jnp.int32)
  index, processes = _process_share(loaded.mesh)
  per_process = batch_size // processes
  alone = processes == 1 and jax.process_count() > 1  # One of several processes, on its own devices.
  steps = range(jax.process_index(), count, jax.process_count()) if alone else range(count)
  per_step = {}
  with loaded.context():
    for step in tqdm.tqdm(steps, desc=desc, disable=not progress or jax.process_index() != 0,
                          dynamic_ncols=True, leave=False):
      local = dataset.batch(step, batch_size, index, processes)
      # Global row of each local row: step * B + index * B/P + i (the shares concatenated in process order).
      first = step * batch_size + index * per_process
      beyond = first + np.arange(per_process) >= rows  # (B/P,): padding rows, past the last real row
      if beyond.any():
        local["mask"] = np.where(beyond[:, None], 0.0, local["mask"]).astype(local["mask"].dtype)
      sums = jax.device_get(fn(loaded.params, sharding.make_global_batch(local, loaded.mesh), buckets))
      sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
      sums.update(row_moments(sums.pop("row_ce"), sums.pop("row_tokens"),
                              rows=min(batch_size, rows - step * batch_size)))
      per_step[step] = sums
  if alone:
    per_step = _every_batch(per_step, count, num_buckets)
  totals = per_step[0]
  for step in range(1, count):  # In batch order, however the batches were shared out.
    totals = {k: totals[k] + per_step[step][k] for k in totals}
  return totals


def _every_batch(mine: dict[int, dict[str, np.ndarray]], count: int,
                 num_buckets: int) -> dict[int, dict[str, np.ndarray]]:
  """{step: sums} of all `count` batches from each process's {step: sums} of
  its own (float64 arrays shaped as `evaluate` adds them, K = `num_buckets`).
  A collective: every process of the run calls it."""
  k = num_buckets
  shapes = {"ce_sum": (k,), "ce_sq_sum": (k,), "entropy_sum": (k,), "tokens": (k,), "row_ce_sq_sum": (k, k),
            "row_ce_tokens_sum": (k, k), "row_tokens_sq_sum": (k, k), "rows": (k,)}
  width = sum(math.prod(shape) for shape in shapes.values())
  flat = np.zeros((count, width), np.float64)  # (batches, width): this process's batches filled in
  for step, sums in mine.items():
    assert set(sums) == set(shapes), sorted(sums)
    flat[step] = np.concatenate([np.asarray(sums[key], np.float64).ravel() for key in shapes])
  scored = np.zeros((count, width), bool)
  scored[list(mine)] = True
  every, _ = processes_lib.combine(flat.ravel(), np.zeros(flat.size, bool), scored.ravel())
  every = every.reshape(count, width)
  out = {}
  for step in range(count):
    parts = np.split(every[step], np.cumsum([math.prod(shape) for shape in shapes.values()])[:-1])
    out[step] = {key: part.reshape(shape) for (key, shape), part in zip(shapes.items(), parts)}
  return out


def summarize(sums: dict[str, np.ndarray], index: int | slice = slice(None)) -> dict[str, float]:
  """Perplexity, mean cross-entropy, mean entropy, the token count and the
  standard errors (see the module docstring) of bucket `index` (default all):
  `ce_stderr`/`perplexity_stderr` with tokens independent,
  `ce_stderr_rows`/`perplexity_stderr_rows` with rows independent."""
  total = lambda key: float(np.sum(sums[key][index]))
  chosen = np.atleast_1d(np.arange(len(sums["tokens"]))[index])
  cross = lambda key: float(np.sum(sums[key][np.ix_(chosen, chosen)]))
  tokens = total("tokens")
  if tokens == 0:
    return {"tokens": 0.0, "ce": math.nan, "ce_stderr": math.nan, "ce_stderr_rows": math.nan,
            "perplexity": math.nan, "perplexity_stderr": math.nan, "perplexity_stderr_rows": math.nan,
            "entropy": math.nan}
  ce = total("ce_sum") / tokens
  variance = max(total("ce_sq_sum") / tokens - ce * ce, 0.0)
  ce_se = math.sqrt(variance * tokens / max(tokens - 1, 1) / tokens)
  ce_se_rows = _ratio_stderr(ce, tokens, cross("row_ce_sq_sum"), cross("row_ce_tokens_sum"),
                             cross("row_tokens_sq_sum"), float(np.max(sums["rows"])))
  ppl = math.exp(min(ce, 700.0))
  return {"tokens": tokens, "ce": ce, "ce_stderr": ce_se, "ce_stderr_rows": ce_se_rows, "perplexity": ppl,
          "perplexity_stderr": ppl * ce_se, "perplexity_stderr_rows": ppl * ce_se_rows,
          "entropy": total("entropy_sum") / tokens}


def _ratio_stderr(ratio: float, tokens: float, yy: float, yn: float, nn: float, rows: float) -> float:
  """se of ratio = sum y_i / sum n_i over `rows` clusters from sum y^2, sum y n, sum n^2."""
  if rows < 2:
    return math.nan
  # sum_i (y_i - ratio * n_i)^2, expanded so that batches add up; float64 keeps the cancellation small.
  residual = max(yy - 2.0 * ratio * yn + ratio * ratio * nn, 0.0)
  return math.sqrt(rows / (rows - 1) * residual) / tokens


def per_bucket(sums: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, dict[str, float]]:
  return {name: summarize(sums, k) for k, name in enumerate(names)}


def bucket_metrics(sums: dict[str, np.ndarray], bucket_of_id: np.ndarray) -> dict[str, dict]:
  """`<bucket>.perplexity`, `.entropy`, `.tokens` and `.ids`, each {value, stderr},
  per frequency bucket (`buckets.BUCKET_NAMES`), from `evaluate`'s sums with
  `bucket_of_id` int32 (V,)."""
  metrics = {}
  for k, name in enumerate(buckets_lib.BUCKET_NAMES):
    s = summarize(sums, k)
    metrics[f"{name}.perplexity"] = {"value": s["perplexity"], "stderr": s["perplexity_stderr_rows"]}
    metrics[f"{name}.entropy"] = {"value": s["entropy"], "stderr": None}
    metrics[f"{name}.tokens"] = {"value": s["tokens"], "stderr": None}
    metrics[f"{name}.ids"] = {"value": float((bucket_of_id == k).sum()), "stderr": None}
  return metrics
