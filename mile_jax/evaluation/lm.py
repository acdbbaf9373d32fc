"""Text in, scores or generations out: the three request types of a harness.

Every request is scored as the start of a new document: the context is
preceded by the token that starts documents in training (BOS where the run
adds one, else EOS, which ends the previous document). Contexts and
continuations are tokenized as lm-evaluation-harness's causal models do:
whitespace at the end of the context moves to the continuation, the pair is
encoded together and the continuation is what follows the context's tokens.
Sequences longer than the model's `max_seq_len` lose tokens from the left.

Log-likelihood requests are scored in packed rows (`packed_requests`): the
choices of one document share a single copy of its context (and of their
common first tokens), several documents share a row, and logits are formed
only where a continuation token is predicted. All batches of one call have
one shape, so each call compiles at most once (never again for a shape seen
before). Each call runs the layout (`layouts`: a prefix tree with its mask on
XLA's attention, or one segment per request for the flash kernels) and row
width of least estimated FLOPs that fits the device's free memory. In a
multi-process run every process scores a share of the requests
(`processes`). Generation runs one prompt per row, left-padded to one of a few
lengths (`length_buckets`); on process-local meshes each process generates a
share of the batches.
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from mile_jax.core import losses
from mile_jax.core import model as model_lib
from mile_jax.core import sharding
from mile_jax.evaluation import generation
from mile_jax.evaluation import layouts
from mile_jax.evaluation import packed_requests
from mile_jax.evaluation import processes
from mile_jax.evaluation import scoring
from mile_jax.evaluation.model_on_mesh import ModelOnMesh


def length_buckets(max_len: int, smallest: int = 32) -> tuple[int, ...]:
  """Padded input lengths: powers of two from `smallest` below `max_len`, then `max_len`."""
  out, n = [], smallest
  while n < max_len:
    out.append(n)
    n *= 2
  return tuple(out) + (max_len,)


def _score_packed(params, batch, *, model):
  """Log-probability of every scored slot's target and whether it is the argmax:
  (G, S) float32 and (G, S) bool, for a `packed_requests.Batch`'s arrays (either layout)."""
  if "segment_ids" in batch:  # Causal within segments: the configured kernel.
    hidden = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"], return_hidden=True)  # (B, W, D)
  else:
    mask = packed_requests.attention_mask(batch["visible_until"])  # (B, 1, W, W)
    hidden = model.apply({"params": params}, batch["inputs"], positions=batch["positions"], attention_mask=mask,
                         return_hidden=True)  # (B, W, D)
  (b, w, d), g = hidden.shape, batch["sources"].shape[0]
  hidden = hidden.reshape(g, b // g * w, d)  # Each group's rows stay on its shard.
  picked = jnp.take_along_axis(hidden, batch["sources"][:, :, None], axis=1)  # (G, S, D)
  logits = model_lib.unembedding(model.cfg).apply({"params": params["lm_head"]}, picked)  # (G, S, V) float32
  logp = -losses.token_cross_entropy(logits, batch["targets"])  # (G, S)
  # The first index of the largest logit, as argmax: two plain reductions run faster on a CPU than argmax's.
  top = jnp.max(logits, axis=-1, keepdims=True)
  first = jnp.min(jnp.where(logits == top, jnp.arange(logits.shape[-1]), logits.shape[-1]), axis=-1)
  return logp, first == batch["targets"]


def scoring_program(model, mesh):
  """`_score_packed` of `model` jitted, its outputs split over `mesh`'s data-parallel
  axes (each process reads back the scores of its own rows)."""
  out = sharding.batch_sharding(mesh)
  return jax.jit(functools.partial(_score_packed, model=model), out_shardings=(out, out))


class LanguageModel:
  """Scores and continues text with a model on its mesh.

  Args:
    loaded: a restored checkpoint (`restore.restore`) or a training run's live
      parameters (`in_training`); its `params` are read at every call.
    batch_size: rows per forward pass (rounded up to the data-parallel size).
    progress: show a progress bar per call.
    layout: "auto" (by `layouts.choose`), "tree" or "segments".
    memory_bytes: free bytes per device that a call may use; None: the
      device's `memory_stats()` at each call (no limit where it has none).

  `stats` holds the last log-likelihood call's shape and counts: layout,
  requests, batches (of the whole call, every process's), width (row slots), scored_width (unembedded positions per row
  group), slots (row slots computed, padding included), tokens (real input
  tokens), logit_rows (positions unembedded, padding included) and scored
  (continuation tokens scored).
  """

  def __init__(self, loaded: ModelOnMesh, batch_size: int = 32, progress: bool = True, layout: str = "auto",
               memory_bytes: float | None = None):
    if layout not in layouts.LAYOUTS:
      raise ValueError(f"layout: must be one of {', '.join(layouts.LAYOUTS)}, got {layout!r}")
    self.loaded = loaded
    self.layout = layout
    self.memory_bytes = memory_bytes
    self.tokenizer = loaded.tokenizer
    dp = sharding.data_parallel_size(loaded.mesh)
    self.batch_size = -(-max(batch_size, 1) // dp) * dp
    self._row_groups = dp  # The scored positions are gathered per data-parallel shard.
    self.max_len = loaded.max_seq_len
    self.buckets = length_buckets(self.max_len)
    data = loaded.config.data
    self.prefix = [self.tokenizer.bos_id] if data.get("add_bos", False) else [self.tokenizer.eos_id]
    self.progress = progress and jax.process_index() == 0
    self._processes = processes.mesh_processes(loaded.mesh)
    self._score = scoring_program(loaded.model, loaded.mesh)
    self.stats: dict[str, int] = {}
    self._generator = generation.GreedyGenerator(loaded.model.cfg, loaded.mesh)

  # --- tokenization -------------------------------------------------------

  def encode_pair(self, context: str, continuation: str,
                  known: dict[str, list[int]] | None = None) -> tuple[list[int], list[int]]:
    """(context tokens with the document prefix, continuation tokens); `known`
    keeps each context's tokens, for the choices that share it."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      continuation = context[-spaces:] + continuation
      context = context[:-spaces]
    whole = self.tokenizer.encode(context + continuation)
    known = {} if known is None else known
    if context not in known:
      known[context] = self.tokenizer.encode(context) if context else []
    context_ids = known[context]
    return self.prefix + context_ids, whole[len(context_ids):]

  # --- scoring ------------------------------------------------------------

  def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                           desc: str = "loglikelihood") -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), continuation is the greedy one) per pair."""
    groups, same_as = packed_requests.make_groups(pairs, self.max_len)
    cfg = self.loaded.model.cfg
    device = layouts.device_of(self.loaded.mesh, cfg, self.max_len)
    if self.memory_bytes is not None:
      device = dataclasses.replace(device, memory_bytes=self.memory_bytes)
    choice = layouts.choose(groups, self.batch_size, self.max_len, cfg, device, self.layout)
    width, scored, plans = choice.width, choice.scored, choice.batches
    self.stats = dict(layout=choice.name, requests=len(pairs), batches=len(plans), width=width,
                      scored_width=scored, slots=len(plans) * self.batch_size * width, tokens=0,
                      logit_rows=len(plans) * self._row_groups * scored,
                      scored=sum(u.scored for rows in plans for row in rows for u in row))
    spanning = len(self._processes) > 1  # One global batch fed by every process.
    lo, hi = processes.local_rows(self.loaded.mesh, self.batch_size) if spanning else (0, self.batch_size)
    per_group = self.batch_size // self._row_groups
    groups_here = (hi - lo) // per_group
    if not spanning and jax.process_count() > 1:  # Each process alone on its devices: a share of the batches.
      plans = plans[jax.process_index()::jax.process_count()]
    owners, outputs = [], []
    with self.loaded.context():
      for rows in tqdm.tqdm(plans, desc=desc, disable=not self.progress, dynamic_ncols=True, leave=False):
        # Laid out while the device still runs the batch before (dispatch returns at once).
        batch = packed_requests.layout(rows[lo:hi], width, groups_here, scored, choice.segments)
        self.stats["tokens"] += batch.tokens
        owners.append(batch.owner)
        if spanning:
          arrays = processes.global_batch(batch.arrays, self.loaded.mesh, self.batch_size, self._row_groups)
        else:
          arrays = sharding.make_global_batch(batch.arrays, self.loaded.mesh)
        outputs.append(self._score(self.loaded.params, arrays))
        if len(outputs) > 1:  # The batch before has had the time of this one's layout to finish.
          outputs[-2] = self._fetch(outputs[-2], spanning)
      outputs = [self._fetch(o, spanning) for o in outputs]
    logps, greedy = zip(*outputs) if outputs else ((), ())
    sums, all_greedy = packed_requests.totals(owners, logps, greedy, same_as)
    if jax.process_count() > 1:
      mine = np.zeros(len(pairs) + 1, bool)  # the last entry stands for "nothing to score" (same_as -1)
      for owner in owners:
        mine[owner[owner >= 0]] = True
      sums, all_greedy = processes.combine(sums, all_greedy, mine[same_as])
    return [(float(x), bool(g)) for x, g in zip(sums, all_greedy)]

  @staticmethod
  def _fetch(output, spanning: bool):
    """A batch's (logp, greedy) on the host: this process's rows of them when `spanning`."""
    if isinstance(output[0], np.ndarray):
      return output
    if spanning:
      return tuple(processes.local_part(x) for x in output)
    return tuple(jax.device_get(output))

  def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str = "loglikelihood"):
    """(log p(continuation | context), is greedy) per (context, continuation) string pair."""
    known: dict[str, list[int]] = {}
    return self.loglikelihood_tokens([self.encode_pair(c, x, known) for c, x in requests], desc=desc)

  def loglikelihood_rolling(self, texts: Sequence[str], desc: str = "loglikelihood_rolling") -> list[float]:
    """Log-probability of each whole text, in windows of at most `max_seq_len` predicted
    tokens, each window conditioned on as much preceding text as fits."""
    pairs, owner = [], []
    for k, text in enumerate(texts):
      full = self.prefix + self.tokenizer.encode(text)
      for start in range(1, len(full), self.max_len):
        end = min(start + self.max_len, len(full))
        context_start = max(0, end - self.max_len - 1)
        pairs.append((full[context_start:start], full[start:end]))
        owner.append(k)
    totals = [0.0] * len(texts)
    for k, (logp, _) in zip(owner, self.loglikelihood_tokens(pairs, desc=desc)):
      totals[k] += logp
    return totals

  # --- generation ---------------------------------------------------------

  def generate_until(self, contexts: Sequence[str], until: Sequence[str], max_gen_toks: int = 256,
                     desc: str = "generate_until", use_cache: bool = True) -> list[str]:
    """Greedy continuation of each context, cut before the first stop sequence.

    Generation also stops at EOS and after `max_gen_toks` tokens (at most
    half the model's length); the context keeps its last
    `max_seq_len - max_gen_toks` tokens.
    """
    max_new = max(1, min(max_gen_toks, self.max_len // 2))
    max_prompt = self.max_len - max_new
    prompts = [(self.prefix + self.tokenizer.encode(c))[-max_prompt:] for c in contexts]
    eos = self.tokenizer.eos_id
    stops = [s for s in until if s]

    def done(tokens: list[int]) -> bool:
      if tokens[-1] == eos:
        return True
      text = self.tokenizer.decode(tokens)
      return any(s in text for s in stops)

    outputs = []
    for tokens in self.generate_tokens(prompts, max_new, done, desc=desc, use_cache=use_cache):
      ids = tokens[:-1] if tokens and tokens[-1] == eos else tokens
      outputs.append(scoring.truncate_at_stop(self.tokenizer.decode(ids), stops))
    return outputs

  def generate_tokens(self, prompts: Sequence[Sequence[int]], max_new: int, done, desc: str = "generate",
                      use_cache: bool = True) -> list[list[int]]:
    """Greedy tokens after each prompt (at most `max_len - max_new` tokens long): at most `max_new`,
    fewer once `done(tokens so far)` holds. Rows of one batch are prompts of similar length.

    In a multi-process run on each process's own devices (eval.py), process p generates the
    batches p, p + P, ... and every process gets every prompt's tokens; on a mesh that spans the
    processes every batch is generated by all of them together.
    """
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int] | None] = [None] * len(prompts)
    batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
    shared = len(self._processes) == 1 and jax.process_count() > 1
    if shared:
      batches = batches[jax.process_index()::jax.process_count()]
    with self.loaded.context():
      for batch_ids in tqdm.tqdm(batches, desc=desc, disable=not self.progress, dynamic_ncols=True, leave=False):
        width = next(b for b in self.buckets if b >= len(prompts[batch_ids[0]]))
        width = min(width, self.max_len - max_new)
        rows = [prompts[i] for i in batch_ids]
        rows += [rows[-1]] * (self.batch_size - len(rows))  # filler rows, discarded
        tokens = self._generator.generate(self.loaded.params, rows, max_new, prompt_len=width, done=done,
                                          use_cache=use_cache)
        for r, i in enumerate(batch_ids):
          outputs[i] = tokens[r]
    if shared:
      return processes.gather_sequences(outputs, max_new)
    return outputs
