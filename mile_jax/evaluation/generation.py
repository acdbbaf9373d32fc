"""Greedy decoding, with a key/value cache or by recomputing the whole prefix.

Prompts of one batch are left-padded to a common length: padding slots get
segment id 0 and real tokens segment id 1, so no real token attends to
padding, and every row's positions count from its first real token. With the
cache, the prompt is run once (prefill) and each later step feeds one token
per row; without it, each step runs the model on the whole sequence so far
(the reference the cached path is tested against).
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mile_jax.core import model as model_lib
from mile_jax.core import sharding


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
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), variables["cache"]

  def _step_fn(self, params, cache, batch):
    token, position = batch["token"][:, None], batch["position"][:, None]
    logits, variables = self.cached_model.apply(
        {"params": params, "cache": cache}, token, positions=position,
        segment_ids=jnp.ones_like(token), mutable=["cache"])
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), variables["cache"]

  def _full_fn(self, params, batch):
    logits = self.model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"])  # (B, T, V)
    last = jnp.take_along_axis(logits, batch["last"][:, None, None], axis=1)[:, 0]  # (B, V)
    return jnp.argmax(last, axis=-1).astype(jnp.int32)

  def _global(self, arrays: dict[str, np.ndarray]):
    return sharding.make_global_batch(arrays, self.mesh)

  def generate(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
               prompt_len: int | None = None, done: Callable[[list[int]], bool] = lambda out: False,
               use_cache: bool = True) -> list[list[int]]:
    """Greedy tokens after each prompt: at most `max_new_tokens`, fewer once
    `done(tokens so far)` holds for a row (that row's last token included).

    Call inside the mesh context. `len(prompts)` must divide over the mesh's
    data-parallel axes; `prompt_len` (default the longest prompt) fixes the
    compiled shape.
    """
    prompt_len = prompt_len or max(len(p) for p in prompts)
    tokens, positions, segments = left_pad(prompts, prompt_len)
    lengths = np.array([len(p) for p in prompts], np.int32)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = np.zeros(len(prompts), bool)
    if use_cache:
      next_tokens, cache = self._prefill(
          params, self._global({"tokens": tokens, "positions": positions, "segment_ids": segments}),
          slots=prompt_len + max_new_tokens)
    else:
      # One fixed-width buffer: the empty slots after the sequence so far are
      # invisible to it under the causal mask, so one compile serves every step.
      widen = lambda x: np.pad(x, ((0, 0), (0, max_new_tokens)))
      tokens, positions, segments = widen(tokens), widen(positions), widen(segments)
      next_tokens = self._full(params, self._global(
          {"tokens": tokens, "positions": positions, "segment_ids": segments, "last": np.full(len(prompts), prompt_len - 1)}))
    for t in range(max_new_tokens):
      host = np.asarray(jax.device_get(next_tokens))
      for i in np.flatnonzero(~finished):
        outputs[i].append(int(host[i]))
        finished[i] = done(outputs[i])
      if finished.all() or t == max_new_tokens - 1:
        break
      if use_cache:
        next_tokens, cache = self._step(params, cache, self._global({"token": host, "position": lengths + t}))
      else:
        column = prompt_len + t
        tokens[:, column], positions[:, column], segments[:, column] = host, lengths + t, 1
        next_tokens = self._full(params, self._global(
            {"tokens": tokens, "positions": positions, "segment_ids": segments,
             "last": np.full(len(prompts), column)}))
    return outputs
