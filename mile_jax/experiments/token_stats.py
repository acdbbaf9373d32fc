"""Per-token cross-entropy and entropy of a checkpoint on validation data, summarised by frequency bucket."""

import functools
from typing import Any

import jax
import numpy as np

from mile_jax.core import losses
from mile_jax.core import sharding
from mile_jax.data import synthetic
from mile_jax.evaluation import buckets as buckets_lib

ENTROPY_BINS = 40
WEIGHT_EDGES = np.linspace(0.0, 4.0, 41)  # alpha * w, whose mean is 1


@functools.partial(jax.jit, static_argnames=("model",))
def _token_losses(params, batch, model):
  logits = model.apply({"params": params}, batch["inputs"], positions=batch.get("positions"),
                       segment_ids=batch.get("segment_ids"))
  return losses.token_cross_entropy(logits, batch["targets"]), losses.token_entropy(logits)


def per_token(trainer: Any, params: Any, num_batches: int) -> dict[str, np.ndarray]:
  """ce, entropy, inputs, targets, mask and document of the first `num_batches` validation batches.

  Every array is [num_batches * B * T] (flattened), float64 or int.
  `document` numbers the validation documents in reading order: the
  validation split is read in order, so a target whose input is EOS starts
  the next one (a document cut by a row boundary continues in the next row).
  """
  data = trainer.load_data()
  out = {k: [] for k in ("ce", "entropy", "inputs", "targets", "mask")}
  with sharding.mesh_context(trainer.mesh, trainer.rules):
    for i in range(num_batches):
      local = trainer.local_batch(data.validation, i)
      ce, entropy = _token_losses(params, sharding.make_global_batch(local, trainer.mesh), trainer.model)
      out["ce"].append(np.asarray(ce, np.float64).ravel())
      out["entropy"].append(np.asarray(entropy, np.float64).ravel())
      for k in ("inputs", "targets", "mask"):
        out[k].append(np.asarray(local[k]).ravel())
  out = {k: np.concatenate(v) for k, v in out.items()}
  out["document"] = document_ids(out["inputs"], data.validation.eos_id)
  return out


def document_ids(inputs: np.ndarray, eos_id: int | None) -> np.ndarray:
  """int64 [N]: the document of each target, counting the EOS inputs up to it (inclusive), so that
  an EOS target belongs to the document it ends. Without EOS every target is in document 0."""
  inputs = np.asarray(inputs)
  if eos_id is None:
    return np.zeros(inputs.shape, np.int64)
  return np.cumsum(inputs == eos_id)


def loss_weights(loss_config: Any, ce: np.ndarray, entropy: np.ndarray) -> np.ndarray:
  """alpha * w per token for the run's loss (mean 1), float64."""
  w = np.asarray(losses.token_weights(loss_config.name, ce.astype(np.float32), entropy.astype(np.float32),
                                      gamma=loss_config.gamma, sigma=loss_config.sigma), np.float64)
  return w / w.mean()


def summarize(tokens: dict[str, np.ndarray], bucket_of_id: np.ndarray, vocab_size: int, loss_config: Any,
              log_prob_table: np.ndarray | None = None, documents: bool = False) -> dict:
  """Overall and per-bucket statistics of `per_token` output (JSON-ready).

  Per bucket: tokens, mean ce, perplexity, mean entropy, an entropy histogram
  over [0, log V]; with a synthetic language's `log_prob_table`, also the
  optimal loss and the excess ce - optimal. With `documents`, also
  `documents[bucket]`: per validation document (in order), its number of
  the bucket's tokens and their summed ce (and optimum), the unit of the
  paired bootstrap (stats.bootstrap_paired).
  """
  valid = tokens["mask"] > 0
  ce, entropy, targets = tokens["ce"][valid], tokens["entropy"][valid], tokens["targets"][valid]
  optimal = None
  if log_prob_table is not None:
    optimal = synthetic.optimal_losses(log_prob_table, tokens["inputs"][valid], targets)
  entropy_edges = np.linspace(0.0, np.log(vocab_size), ENTROPY_BINS + 1)
  weights = loss_weights(loss_config, ce, entropy)
  out = {"tokens": int(valid.sum()), "ce": float(ce.mean()), "perplexity": float(np.exp(ce.mean())),
         "entropy": float(entropy.mean()), "entropy_edges": entropy_edges.tolist(),
         "weight_edges": WEIGHT_EDGES.tolist(),
         "weight_hist": np.histogram(np.clip(weights, 0, WEIGHT_EDGES[-1]), WEIGHT_EDGES)[0].tolist(),
         "buckets": {}}
  if optimal is not None:
    out["optimal"] = float(optimal.mean())
    out["excess"] = out["ce"] - out["optimal"]
  bucket = bucket_of_id[targets]
  for index, name in enumerate(buckets_lib.BUCKET_NAMES):
    sel = bucket == index
    stats = {"tokens": int(sel.sum())}
    if sel.any():
      stats.update(ce=float(ce[sel].mean()), perplexity=float(np.exp(ce[sel].mean())),
                   entropy=float(entropy[sel].mean()),
                   entropy_hist=np.histogram(entropy[sel], entropy_edges)[0].tolist())
      if optimal is not None:
        stats.update(optimal=float(optimal[sel].mean()), excess=float(ce[sel].mean() - optimal[sel].mean()))
    out["buckets"][name] = stats
  if documents:
    doc = np.unique(tokens["document"][valid], return_inverse=True)[1]  # [N_valid]: 0..D-1
    num_docs = int(doc.max()) + 1
    out["documents"] = {}
    for index, name in enumerate(buckets_lib.BUCKET_NAMES):
      sel = bucket == index

      def sums(values, sel=sel):  # rounded to 1e-6: per-token float32 losses carry ~1e-7 already
        return [round(float(v), 6) for v in np.bincount(doc[sel], values[sel], num_docs)]
      per_doc = {"tokens": np.bincount(doc[sel], minlength=num_docs).tolist(), "ce": sums(ce)}
      if optimal is not None:
        per_doc["optimal"] = sums(optimal)
      out["documents"][name] = per_doc
  return out
