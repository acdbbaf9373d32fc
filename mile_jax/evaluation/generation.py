"""Greedy decoding and sampling, with a key/value cache or by recomputing the whole prefix.

Prompts of one batch are left-padded to a common length: padding slots get
segment id 0 and real tokens segment id 1, so no real token attends to
padding, and every row's positions count from its first real token. With the
cache, the prompt is run once (prefill) and each later step feeds one token
per row; without it, each step runs the model on the whole sequence so far
(the reference the cached path is tested against).

`Sampler` draws each token instead of taking the argmax, from the
distribution `filter_logits` makes: the logits divided by the temperature,
cut to the `top_k` most probable ids, then to the nucleus (the fewest most
probable ids whose probability reaches `top_p`), in the order transformers'
warpers apply them. The key of the token drawn at step t for prompt r is
`fold_in(fold_in(key(seed), r), t)`, so a prompt's sample depends on the seed
and its row id, not on which other prompts share its batch.
"""

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mile_jax.core import model as model_lib
from mile_jax.core import sharding
from mile_jax.evaluation import processes


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
  """(tokens, positions, segment_ids), each int32 (B, length); prompts right-aligned."""
  b = len(prompts)
  tokens = np.full((b, length), pad_id, np.int32)
  segments = np.zeros((b, length), np.int32)
  positions = np.zeros((b, length), np.int32)
  for i, prompt in enumerate(prompts):
    n = len(prompt)
    tokens[i, length - n:] = prompt
    segments[i, length - n:] = 1
    positions[i, length - n:] = np.arange(n)
  return tokens, positions, segments


class GreedyGenerator:
  """Greedy continuation of token prompts with one model configuration.

  Args:
    model_config: the decoder's `DecoderConfig`.
    mesh: where the parameters live; batches are split over its data axes.
  """

  def __init__(self, model_config: model_lib.DecoderConfig, mesh):
    self.cached_model = model_lib.Decoder(model_config, decode=True)
    self.model = model_lib.Decoder(model_config)
    self.mesh = mesh
    self._spanning = len(processes.mesh_processes(mesh)) > 1
    self._prefill = jax.jit(self._prefill_fn, static_argnames="slots")
    self._step = jax.jit(self._step_fn, donate_argnums=1)
    self._full = jax.jit(self._full_fn)

  def _prefill_fn(self, params, batch, slots: int):
    tokens = batch["tokens"]
    shapes = jax.eval_shape(lambda: self.cached_model.init(
        jax.random.key(0), jnp.zeros((tokens.shape[0], slots), jnp.int32)))["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    logits, variables = self.cached_model.apply(
        {"params": params, "cache": cache}, tokens, positions=batch["positions"],
        segment_ids=batch["segment_ids"], mutable=["cache"])
    return self._choose(logits[:, -1], batch), variables["cache"]

  def _step_fn(self, params, cache, batch):
    token, position = batch["token"][:, None], batch["position"][:, None]
    logits, variables = self.cached_model.apply(
        {"params": params, "cache": cache}, token, positions=position,
        segment_ids=jnp.ones_like(token), mutable=["cache"])
    return self._choose(logits[:, -1], batch), variables["cache"]

  def _full_fn(self, params, batch):
    logits = self.model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"])  # (B, T, V)
    last = jnp.take_along_axis(logits, batch["last"][:, None, None], axis=1)[:, 0]  # (B, V)
    return self._choose(last, batch)

  def _choose(self, logits, batch):
    """int32 (B,): the next token of each row from its (B, V) logits: the argmax."""
    del batch
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def _choice_inputs(self, rows: int, draw: int) -> dict[str, np.ndarray]:
    """Per-row (B,) arrays `_choose` reads for the `draw`-th token; greedy needs none."""
    del rows, draw
    return {}

  def _global(self, arrays: dict[str, np.ndarray]):
    """Global (B, ...) arrays from the whole batch, which every process holds: on a mesh that spans
    processes each feeds the rows of its own devices."""
    if not self._spanning:
      return sharding.make_global_batch(arrays, self.mesh)
    rows = len(next(iter(arrays.values())))
    lo, hi = processes.local_rows(self.mesh, rows)
    return processes.global_batch({k: v[lo:hi] for k, v in arrays.items()}, self.mesh, rows, rows)

  def _host(self, tokens: jax.Array) -> np.ndarray:
    """Every row's next token on every process (a collective on a mesh that spans processes)."""
    if self._spanning:
      return np.asarray(multihost_utils.process_allgather(tokens, tiled=True))
    return np.asarray(jax.device_get(tokens))

  def generate(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               prompt_len: int | None = None, done: Callable[[list[int]], bool] = lambda out: False,
               use_cache: bool = True) -> list[list[int]]:
    """Greedy tokens after each prompt: at most `max_new_tokens`, fewer once
    `done(tokens so far)` holds for a row (that row's last token included).

    Call inside the mesh context. `len(prompts)` must divide over the mesh's
    data-parallel axes; `prompt_len` (default the longest prompt) fixes the
    compiled shape. On a mesh that spans processes every process calls it with
    the same prompts and gets every row's tokens.
    """
    prompt_len = prompt_len or max(len(p) for p in prompts)
    tokens, positions, segments = left_pad(prompts, prompt_len)
    lengths = np.array([len(p) for p in prompts], np.int32)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = np.zeros(len(prompts), bool)
    if use_cache:
      next_tokens, cache = self._prefill(
          params, self._global({"tokens": tokens, "positions": positions, "segment_ids": segments,
                                **self._choice_inputs(len(prompts), 0)}),
          slots=prompt_len + max_new_tokens)
    else:
      # One fixed-width buffer: the empty slots after the sequence so far are
      # invisible to it under the causal mask, so one compile serves every step.
      widen = lambda x: np.pad(x, ((0, 0), (0, max_new_tokens)))
      tokens, positions, segments = widen(tokens), widen(positions), widen(segments)
      next_tokens = self._full(params, self._global(
          {"tokens": tokens, "positions": positions, "segment_ids": segments,
           "last": np.full(len(prompts), prompt_len - 1), **self._choice_inputs(len(prompts), 0)}))
    for t in range(max_new_tokens):
      host = self._host(next_tokens)
      for i in np.flatnonzero(~finished):
        outputs[i].append(int(host[i]))
        finished[i] = done(outputs[i])
      if finished.all() or t == max_new_tokens - 1:
        break
      if use_cache:
        next_tokens, cache = self._step(params, cache, self._global(
            {"token": host, "position": lengths + t, **self._choice_inputs(len(prompts), t + 1)}))
      else:
        column = prompt_len + t
        tokens[:, column], positions[:, column], segments[:, column] = host, lengths + t, 1
        next_tokens = self._full(params, self._global(
            {"tokens": tokens, "positions": positions, "segment_ids": segments,
             "last": np.full(len(prompts), column), **self._choice_inputs(len(prompts), t + 1)}))
    return outputs


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How `Sampler` draws each token."""
  temperature: float = 1.0  # > 0: the logits are divided by it (0 is greedy decoding: use GreedyGenerator)
  top_k: int = 0  # keep the k most probable ids; 0 = all
  top_p: float = 1.0  # in (0, 1]: keep the nucleus of this much probability; 1 = all
  seed: int = 0  # the same seed, prompts and row ids give the same samples


def filter_logits(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """float32 (B, V): `logits` (B, V) divided by `temperature` (> 0), with -inf
  at every id outside the top-k and then outside the nucleus; a softmax of the
  result is the distribution tokens are drawn from.

  top-k keeps the `top_k` largest logits (ties go to the lower id, as argmax
  breaks them); the nucleus keeps an id when the probability of the ids ranked
  above it (after top-k, renormalised) is below `top_p`, so the most probable
  id always stays and the kept set is the smallest whose probability reaches
  `top_p`.
  """
  x = logits.astype(jnp.float32) / temperature  # (B, V)
  order = jnp.argsort(-x, axis=-1, stable=True)  # (B, V): ids, most probable first
  ranked = jnp.take_along_axis(x, order, axis=-1)  # (B, V), descending
  keep = jnp.ones(ranked.shape, bool)
  if top_k:
    keep &= jnp.arange(ranked.shape[-1])[None] < top_k
  if top_p < 1.0:
    probs = jax.nn.softmax(jnp.where(keep, ranked, -jnp.inf), axis=-1)  # (B, V)
    keep &= jnp.cumsum(probs, axis=-1) - probs < top_p  # probability ranked above each id
  ranked = jnp.where(keep, ranked, -jnp.inf)
  return jnp.take_along_axis(ranked, jnp.argsort(order, axis=-1), axis=-1)  # back to id order


def draw_tokens(logits: jax.Array, seed: jax.Array, row: jax.Array, draw: jax.Array, sampling: Sampling) -> jax.Array:
  """int32 (B,): one token per row drawn from softmax(`filter_logits`(logits (B, V))), row b with the key
  fold_in(fold_in(key(seed[b]), row[b]), draw[b]); seed, row and draw are int32 (B,)."""
  filtered = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)  # (B, V)
  keys = jax.vmap(lambda s, r, d: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), r), d))(seed, row, draw)
  return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


class Sampler(GreedyGenerator):
  """Sampled continuation of token prompts (see `Sampling` and `filter_logits`).

  Args:
    model_config: the decoder's `DecoderConfig`.
    mesh: where the parameters live; batches are split over its data axes.
    sampling: temperature, top-k, top-p and seed; temperature 0 decodes greedily.
  """

  def __init__(self, model_config: model_lib.DecoderConfig, mesh, sampling: Sampling):
    super().__init__(model_config, mesh)
    self.sampling = sampling
    self._row_ids, self._seed = np.zeros(0, np.int32), sampling.seed

  def _choose(self, logits, batch):
    if self.sampling.temperature == 0:
      return super()._choose(logits, batch)
    return draw_tokens(logits, batch["seed"], batch["row"], batch["draw"], self.sampling)

  def _choice_inputs(self, rows: int, draw: int) -> dict[str, np.ndarray]:
    return {"seed": np.full(rows, self._seed, np.int32), "row": self._row_ids[:rows],
            "draw": np.full(rows, draw, np.int32)}

  def generate(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               row_ids: Sequence[int] | None = None, seed: int | None = None, **kwargs) -> list[list[int]]:
    """Sampled tokens after each prompt, as `GreedyGenerator.generate` (same
    keywords); `row_ids` (default 0, 1, ...) name the prompts' random streams,
    `seed` (default `sampling.seed`; an input of the compiled programs, so
    changing it compiles nothing) picks the draws."""
    self._row_ids = np.asarray(range(len(prompts)) if row_ids is None else row_ids, np.int32)
    if self._row_ids.shape != (len(prompts),):
      raise ValueError(f"row_ids: {len(self._row_ids)} ids for {len(prompts)} prompts")
    self._seed = self.sampling.seed if seed is None else seed
    return super().generate(params, prompts, max_new_tokens, **kwargs)
