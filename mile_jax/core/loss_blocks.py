"""The per-block arithmetic of the chunked loss (`fused_loss`): splitting into
strided blocks, the online softmax statistics of one block of logits, their
combination across devices, and one token block's losses and gradients.

The derivation (online logsumexp and entropy, why the gradient is formed in
the forward pass) is in `fused_loss`'s docstring.
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mile_jax.core import losses


def num_blocks(size: int, block: int) -> int:
  """Number of blocks: a divisor of `size` near ceil(size / block) when there
  is one (no padding), else ceil(size / block) (the last rows are padded)."""
  if block <= 0 or block >= size:
    return 1
  least = math.ceil(size / block)
  for count in range(least, 2 * least + 1):
    if size % count == 0:
      return count
  return least


def split(x: jax.Array, count: int, axis: int) -> jax.Array:
  """Splits `axis` (size S) into (ceil(S / count), count), padding with zeros:
  block b is x[..., b::count, ...]. Without padding this is a free reshape."""
  size = x.shape[axis]
  per_block = -(-size // count)
  if per_block * count != size:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, per_block * count - size)
    x = jnp.pad(x, pad)
  return x.reshape(*x.shape[:axis], per_block, count, *x.shape[axis + 1:])


def take(x: jax.Array, index, axis: int) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(x, index, axis, keepdims=False)


def put(x: jax.Array, value: jax.Array, index, axis: int) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(x, value.astype(x.dtype), index, axis)


@dataclasses.dataclass(frozen=True)
class VocabParallel:
  """Where the vocabulary-parallel loss (`vocab_parallel`) runs: mesh axes
  (each a tuple of names) of the tokens and the kernel's parameter sharding.

  token_axes: all axes the tokens are split over (in the tokens' spec).
  kernel_spec: the kernel's PartitionSpec (d over `gather_axes`, V over `vocab_axes`).
  gather_axes: token axes that also split the kernel's d (fsdp), of size > 1:
    the tokens are gathered over them and the vocabulary split over them.
  vocab_axes: axes that split the kernel's V (tensor), of size > 1.
  sum_axes: the other token axes (data), of size > 1: the kernel gradient's
    partial sums over them are added once at the end.
  """
  token_axes: tuple[str, ...]
  kernel_spec: Any
  gather_axes: tuple[str, ...]
  vocab_axes: tuple[str, ...]
  sum_axes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static settings of one fused loss (hashable, for custom_vjp)."""
  name: str
  gamma: float
  sigma: float
  token_blocks: int  # Per device with `vocab_parallel`, else over all tokens.
  vocab_blocks: int  # Per device with `vocab_parallel`, else over the vocabulary.
  dtype: Any
  token_shards: int = 1  # P: partial sums of d kernel, one per token shard.
  shard_axes: tuple[str, ...] = ()  # Mesh axes the tokens (and P) are split over.
  kernel_compute: Any = None  # PartitionSpec of the kernel for the matmuls, or None.
  kernel_grad: Any = None  # PartitionSpec of d kernel (the parameter's), or None.
  vocab_parallel: VocabParallel | None = None  # Set: the vocabulary-parallel loss.


def constrain(x: jax.Array, partition_spec) -> jax.Array:
  if partition_spec is None or jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, partition_spec)


def constrain_shards(x: jax.Array, spec: Spec) -> jax.Array:
  """Places the leading (P) axis of `x` on the token shards' mesh axes."""
  if spec.token_shards == 1:
    return x
  rest = (jax.sharding.PartitionSpec.UNCONSTRAINED,) * (x.ndim - 1)
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(spec.shard_axes, *rest))


def stats_update(carry, z: jax.Array, cols: jax.Array, y: jax.Array):
  """Folds one vocabulary block's logits z [Bt, Bv] (columns `cols` [Bv])
  into the running (max m, sum s, u = sum exp(z - m)(z - m), target logit),
  each [Bt] float32."""
  m, s, u, target_logit = carry
  m_new = jnp.maximum(m, jnp.max(z, axis=-1))
  shift = z - m_new[:, None]
  e = jnp.exp(shift)
  s, u = _rescale(m, s, u, m_new)
  u = u + jnp.sum(jnp.where(e > 0, e * shift, 0.0), axis=-1)
  s = s + jnp.sum(e, axis=-1)
  target_logit = target_logit + jnp.sum(jnp.where(cols[None, :] == y[:, None], z, 0.0), axis=-1)
  return m_new, s, u, target_logit


def _rescale(m, s, u, m_new):
  """(s, u) relative to the maximum m, re-expressed relative to m_new >= m.
  Where nothing was summed yet (s = u = 0, m = -inf) the where avoids 0 * inf."""
  scale = jnp.exp(m - m_new)
  return scale * s, scale * (u + jnp.where(s > 0, (m - m_new) * s, 0.0))


def stats_init(bt: int):
  return jnp.full((bt,), -jnp.inf), jnp.zeros((bt,)), jnp.zeros((bt,)), jnp.zeros((bt,))


def stats_merge(stats, axes: tuple[str, ...]):
  """Inside `shard_map`: each device's statistics over its own vocabulary
  columns -> the statistics over all columns of the devices along `axes`
  (a global maximum, then the sums rescaled to it and added)."""
  m, s, u, target_logit = stats
  m_all = jax.lax.pmax(m, axes)
  s, u = _rescale(m, s, u, m_all)
  s, u, target_logit = jax.lax.psum(jnp.stack([s, u, target_logit]), axes)
  return m_all, s, u, target_logit


def token_block(h, y, mask, w_split, vocab: int, spec: Spec, d_kernel=None, *, offset=0,
                merge: Callable | None = None):
  """Statistics of one token block, and with `d_kernel` its gradients.

  Args:
    h: [Bt, d] hidden states; y, mask: [Bt] (ids, float32 0/1).
    w_split: [d, Bv, nvb] the unembedding's columns split into strided
      blocks, or [d, Bv] with a single block.
    vocab: how many of its columns are real (the rest are padding).
    d_kernel: None, or the running d numerator / d kernel float32, shaped as
      [P, *w_split.shape]: one partial sum per token shard.
    offset: the vocabulary id of `w_split`'s first column (int or traced).
    merge: None, or a function of the per-token statistics (m, s, u, target
      logit) over these columns that returns them over the whole vocabulary.

  Returns:
    (ce [Bt], entropy [Bt]) float32, and with `d_kernel` also
    (d hidden [Bt, d] float32 over these columns, updated d_kernel).
  """
  bv, nvb = w_split.shape[1], spec.vocab_blocks

  def logits(j):
    local = jnp.arange(bv) * nvb + j  # (Bv,) column indices of block j in w_split
    w = (w_split if nvb == 1 else take(w_split, j, 2)).astype(spec.dtype)  # (d, Bv)
    z = jnp.dot(h.astype(spec.dtype), w, preferred_element_type=jnp.float32)  # (Bt, Bv)
    return jnp.where(local[None, :] < vocab, z, -jnp.inf), local + offset, w

  if nvb == 1:
    z0 = logits(0)
    stats = stats_update(stats_init(h.shape[0]), z0[0], z0[1], y)
  else:
    stats = jax.lax.fori_loop(0, nvb, lambda j, c: stats_update(c, *logits(j)[:2], y), stats_init(h.shape[0]))
  m, s, u, target_logit = stats if merge is None else merge(stats)
  log_s = jnp.log(s)
  lse, entropy = m + log_s, log_s - u / s
  ce = lse - target_logit
  if d_kernel is None:
    return ce, entropy

  g = losses.token_weights(spec.name, ce, entropy, gamma=spec.gamma, sigma=spec.sigma) * mask  # (Bt,)

  def grads(j, carry, z=None):
    dh, d_kernel = carry
    z, cols, w = logits(j) if z is None else z
    dz = g[:, None] * jnp.exp(z - lse[:, None]) - jnp.where(cols[None, :] == y[:, None], g[:, None], 0.0)
    dz = dz.astype(spec.dtype)  # (Bt, Bv)
    dh = dh + jnp.dot(dz, w.T, preferred_element_type=jnp.float32)  # (Bt, d)
    p = spec.token_shards
    # Each token shard's own contribution: no sum across devices inside the loop.
    dw = jnp.einsum("pnd,pnv->pdv", h.astype(spec.dtype).reshape(p, -1, h.shape[1]), dz.reshape(p, -1, bv),
                    preferred_element_type=jnp.float32)  # (P, d, Bv)
    dw = constrain_shards(dw, spec)
    if nvb == 1:
      return dh, d_kernel + dw
    return dh, put(d_kernel, take(d_kernel, j, 3) + dw, j, 3)

  init = (jnp.zeros(h.shape, jnp.float32), d_kernel)
  if nvb == 1:
    dh, d_kernel = grads(0, init, z0)
  else:
    dh, d_kernel = jax.lax.fori_loop(0, nvb, grads, init)
  return ce, entropy, dh, d_kernel
