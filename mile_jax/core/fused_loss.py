"""The losses of `losses.py` computed blockwise from hidden states, never
holding a [tokens, vocab] array.

`chunked_loss_sums(name, hidden, kernel, targets, mask, ...)` is the same
function as `losses.loss_sums(name, hidden @ kernel, targets, mask, ...)`
(logits computed with float32 accumulation) and returns the same dict of sums.
It walks over blocks of tokens and, optionally, blocks of the vocabulary, and
keeps per token only what the loss needs:

* the log-normaliser lse = m + log s, with a running maximum m and a running
  sum s = sum_i exp(z_i - m) (online logsumexp);
* the entropy H = log s - u / s with u = sum_i exp(z_i - m) (z_i - m). This is
  m + log s - t / s with t = sum_i exp(z_i - m) z_i rewritten relative to the
  running maximum (as `losses.token_entropy` shifts by the maximum), which
  keeps the entropy exact when the logits themselves are large;
* the target's logit.

The gradient comes from a `jax.custom_vjp` on (hidden, kernel) ->
loss_numerator = sum_t mask_t w_t ce_t. The weights are stop-gradient and
each depends only on its own token, so once a token block's statistics are
known its gradient is fixed up to the scalar cotangent:
dz = mask w (softmax(z) - onehot(y)), d hidden = dz @ kernel^T and
d kernel += hidden^T @ dz. The forward pass under differentiation therefore
computes these gradients block by block and saves them ([N, d] and [d, V],
the size of the inputs); the backward pass only scales them. Without vocabulary
blocks each block's logits are computed once (three matmuls in all, as for
the naive loss); with vocabulary blocks a second sweep recomputes them after
the statistics (four). Outside differentiation (evaluation) only the
statistics are computed. Cross-entropy, entropy and weight are per-token
vectors [N], reduced by `losses.reduce_token_losses` as in the naive path; the
global normalisation needs no extra pass, since the caller divides by the
global `loss_denominator` as for the naive loss.

Blocks are strided: token block b holds the tokens n with n % num_blocks == b
(and likewise for vocabulary columns). Splitting [N, d] into [N / nb, nb, d]
is then a free reshape, no copy of the hidden states or of the unembedding is
made, and when tokens are sharded in contiguous runs over the data-parallel
devices (and the vocabulary over the tensor axis), every block stays spread
over all devices while the loop indexes an unsharded axis.

With `shard_axes` (the mesh axes the tokens are split over) the running
d kernel keeps one partial sum per token shard, [P, d, V] with P sharded like
the tokens: each device adds its own tokens' hidden^T @ dz, and the P partial
sums are added once after the loop, where a single [d, V] contraction per
block would be all-reduced over the devices in every block.

With `kernel_shardings` (the kernel's sharding for the matmuls, typically
gathered over fsdp, and its parameter sharding) the gather happens inside the
custom VJP, once per call, and the summed d kernel is constrained to the
parameter's sharding where the P partial sums are added: a reduce-scatter, so
the float32 [d, V] gradient is never whole on a device. (Gathered outside,
the gather's transpose would constrain the cotangent to the gathered layout
and hold the whole gradient on every device.)
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from mile_jax.core import losses


def _num_blocks(size: int, block: int) -> int:
  """Number of blocks: a divisor of `size` near ceil(size / block) when there
  is one (no padding), else ceil(size / block) (the last rows are padded)."""
  if block <= 0 or block >= size:
    return 1
  least = math.ceil(size / block)
  for count in range(least, 2 * least + 1):
    if size % count == 0:
      return count
  return least


def _split(x: jax.Array, count: int, axis: int) -> jax.Array:
  """Splits `axis` (size S) into (ceil(S / count), count), padding with zeros:
  block b is x[..., b::count, ...]. Without padding this is a free reshape."""
  size = x.shape[axis]
  per_block = -(-size // count)
  if per_block * count != size:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, per_block * count - size)
    x = jnp.pad(x, pad)
  return x.reshape(*x.shape[:axis], per_block, count, *x.shape[axis + 1:])


def _take(x: jax.Array, index, axis: int) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(x, index, axis, keepdims=False)


def _put(x: jax.Array, value: jax.Array, index, axis: int) -> jax.Array:
  return jax.lax.dynamic_update_index_in_dim(x, value.astype(x.dtype), index, axis)


def _token_shards(shard_axes: tuple[str, ...], block_rows: int) -> tuple[int, tuple[str, ...]]:
  """(P, axes): how many shards of the current mesh the tokens of a block
  fall into; (1, ()) without a mesh or when a block does not divide evenly."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in shard_axes if not mesh.empty and a in mesh.axis_names)
  count = math.prod(mesh.shape[a] for a in axes) if axes else 1
  if count == 1 or block_rows % count:
    return 1, ()
  return count, axes


def _constrain_shards(x: jax.Array, spec: "_Spec") -> jax.Array:
  """Places the leading (P) axis of `x` on the token shards' mesh axes."""
  if spec.token_shards == 1:
    return x
  rest = (jax.sharding.PartitionSpec.UNCONSTRAINED,) * (x.ndim - 1)
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(spec.shard_axes, *rest))


@dataclasses.dataclass(frozen=True)
class _Spec:
  """The static settings of one fused loss (hashable, for custom_vjp)."""
  name: str
  gamma: float
  sigma: float
  token_blocks: int
  vocab_blocks: int
  dtype: Any
  token_shards: int = 1  # P: partial sums of d kernel, one per token shard.
  shard_axes: tuple[str, ...] = ()  # Mesh axes the tokens (and P) are split over.
  kernel_compute: Any = None  # PartitionSpec of the kernel for the matmuls, or None.
  kernel_grad: Any = None  # PartitionSpec of d kernel (the parameter's), or None.


def _constrain(x: jax.Array, partition_spec) -> jax.Array:
  if partition_spec is None or jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, partition_spec)


def _stats_update(carry, z: jax.Array, cols: jax.Array, y: jax.Array):
  """Folds one vocabulary block's logits z [Bt, Bv] into the running
  (max m, sum s, u = sum exp(z - m)(z - m), target logit), each [Bt]."""
  m, s, u, target_logit = carry
  m_new = jnp.maximum(m, jnp.max(z, axis=-1))
  shift = z - m_new[:, None]
  e = jnp.exp(shift)
  # Rescale the running sums to the new maximum; the first block starts from
  # s = u = 0 and m = -inf, where the wheres avoid 0 * inf.
  scale = jnp.exp(m - m_new)
  u = scale * (u + jnp.where(s > 0, (m - m_new) * s, 0.0))
  u = u + jnp.sum(jnp.where(e > 0, e * shift, 0.0), axis=-1)
  s = scale * s + jnp.sum(e, axis=-1)
  target_logit = target_logit + jnp.sum(jnp.where(cols[None, :] == y[:, None], z, 0.0), axis=-1)
  return m_new, s, u, target_logit


def _stats_init(bt: int):
  return jnp.full((bt,), -jnp.inf), jnp.zeros((bt,)), jnp.zeros((bt,)), jnp.zeros((bt,))


def _token_block(h, y, mask, w_split, vocab: int, spec: _Spec, d_kernel=None):
  """Statistics of one token block, and with `d_kernel` its gradients.

  Args:
    h: [Bt, d] hidden states; y, mask: [Bt].
    w_split: [d, Bv, nvb] the unembedding split into strided vocabulary
      blocks, or [d, V] with a single block.
    d_kernel: None, or the running d numerator / d kernel float32, shaped as
      [P, *w_split.shape]: one partial sum per token shard.

  Returns:
    (ce [Bt], entropy [Bt]) float32, and with `d_kernel` also
    (d hidden [Bt, d] float32, updated d_kernel).
  """
  bv, nvb = w_split.shape[1], spec.vocab_blocks

  def logits(j):
    cols = jnp.arange(bv) * nvb + j  # (Bv,) vocabulary ids of block j
    w = (w_split if nvb == 1 else _take(w_split, j, 2)).astype(spec.dtype)  # (d, Bv)
    z = jnp.dot(h.astype(spec.dtype), w, preferred_element_type=jnp.float32)  # (Bt, Bv)
    return jnp.where(cols[None, :] < vocab, z, -jnp.inf), cols, w

  if nvb == 1:
    z0 = logits(0)
    m, s, u, target_logit = _stats_update(_stats_init(h.shape[0]), z0[0], z0[1], y)
  else:
    m, s, u, target_logit = jax.lax.fori_loop(
        0, nvb, lambda j, c: _stats_update(c, *logits(j)[:2], y), _stats_init(h.shape[0]))
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
    dw = _constrain_shards(dw, spec)
    if nvb == 1:
      return dh, d_kernel + dw
    return dh, _put(d_kernel, _take(d_kernel, j, 3) + dw, j, 3)

  init = (jnp.zeros(h.shape, jnp.float32), d_kernel)
  if nvb == 1:
    dh, d_kernel = grads(0, init, z0)
  else:
    dh, d_kernel = jax.lax.fori_loop(0, nvb, grads, init)
  return ce, entropy, dh, d_kernel


def _forward(hidden, kernel, targets, mask, spec: _Spec, with_grads: bool):
  """Loops over token blocks. Returns float32 (ce [N], entropy [N]) and, with
  `with_grads`, the numerator's (d hidden [N, d], d kernel [d, V])."""
  n, vocab = hidden.shape[0], kernel.shape[1]
  kernel = _constrain(kernel, spec.kernel_compute)
  h_split = _split(hidden, spec.token_blocks, 0)  # (Bt, nb, d)
  y_split = _split(targets.astype(jnp.int32), spec.token_blocks, 0)  # (Bt, nb)
  # Padded tokens have mask 0, so they add nothing to the gradients.
  mask_split = _split(mask.astype(jnp.float32), spec.token_blocks, 0)  # (Bt, nb)
  # (d, Bv, nvb); kept as [d, V] without vocabulary blocks so that d kernel
  # accumulates in place.
  w_split = kernel if spec.vocab_blocks == 1 else _split(kernel, spec.vocab_blocks, 1)
  per_token = (jnp.zeros(y_split.shape, jnp.float32),) * 2

  def body(i, carry):
    args = [_take(x, i, 1) for x in (h_split, y_split, mask_split)]
    if not with_grads:
      ce, entropy = _token_block(*args, w_split, vocab, spec)
      return tuple(_put(out, x, i, 1) for out, x in zip(carry, (ce, entropy)))
    (ce_all, entropy_all), (dh_all, d_kernel) = carry
    ce, entropy, dh, d_kernel = _token_block(*args, w_split, vocab, spec, d_kernel)
    return (_put(ce_all, ce, i, 1), _put(entropy_all, entropy, i, 1)), (_put(dh_all, dh, i, 1), d_kernel)

  if not with_grads:
    ce, entropy = jax.lax.fori_loop(0, spec.token_blocks, body, per_token)
    return ce.reshape(-1)[:n], entropy.reshape(-1)[:n]
  d_kernel = _constrain_shards(jnp.zeros((spec.token_shards, *w_split.shape), jnp.float32), spec)
  grads = (jnp.zeros(h_split.shape, hidden.dtype), d_kernel)
  (ce, entropy), (d_hidden, d_kernel) = jax.lax.fori_loop(0, spec.token_blocks, body, (per_token, grads))
  d_hidden = d_hidden.reshape(-1, hidden.shape[1])[:n]
  d_kernel = _sum_partials(d_kernel.reshape(spec.token_shards, kernel.shape[0], -1)[:, :, :vocab], spec)
  d_kernel = _constrain(d_kernel.astype(kernel.dtype), spec.kernel_grad)
  return (ce.reshape(-1)[:n], entropy.reshape(-1)[:n]), (d_hidden, d_kernel)


def _axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry, as a tuple."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _sum_partials(partials: jax.Array, spec: _Spec) -> jax.Array:
  """[P, d, V] float32 partial sums of d kernel, P over the token shards -> their sum [d, V].

  With the kernel's gradient sharded over some of the token axes along d
  (FSDP: `embed` over `fsdp`), the sum over those axes is a reduce-scatter
  (`psum_scatter`) and each device keeps only its [d / fsdp, V] slice; the
  other token axes (`data`) are summed whole. XLA's CPU compiler does not
  turn an all-reduce and a slice into a reduce-scatter, so it is written out.
  """
  if spec.kernel_grad is None or spec.token_shards == 1 or jax.sharding.get_abstract_mesh().empty:
    return partials.sum(0)
  d_axes, v_axes = _axes(spec.kernel_grad[0]), _axes(spec.kernel_grad[1])
  if not set(d_axes) <= set(spec.shard_axes) or v_axes != _axes(spec.kernel_compute[1]):
    return partials.sum(0)
  mesh = jax.sharding.get_abstract_mesh()
  # An axis of one device adds nothing, and a collective over it would still copy the whole array.
  scatter = tuple(a for a in spec.shard_axes if a in d_axes and mesh.shape[a] > 1)
  whole = tuple(a for a in spec.shard_axes if a not in d_axes and mesh.shape[a] > 1)
  v_spec = v_axes or None

  def local(x):  # (1, d, V / |v_axes|): this device's token shard's partial sum.
    x = x[0]
    if whole:
      x = jax.lax.psum(x, whole)
    if scatter:
      x = jax.lax.psum_scatter(x, scatter, scatter_dimension=0, tiled=True)
    return x
  P = jax.sharding.PartitionSpec  # noqa: N806
  return jax.shard_map(local, in_specs=P(spec.shard_axes, None, v_spec), out_specs=P(scatter or None, v_spec),
                       check_vma=False)(partials)


def _numerator(ce, entropy, mask, spec: _Spec):
  return losses.reduce_token_losses(spec.name, ce, entropy, mask, gamma=spec.gamma,
                                    sigma=spec.sigma)["loss_numerator"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(hidden, kernel, targets, mask, spec: _Spec):
  """(hidden [N, d], kernel [d, V], targets [N], mask [N]) -> (loss numerator
  scalar, ce [N], entropy [N]), float32; only the numerator has a gradient."""
  ce, entropy = _forward(hidden, kernel, targets, mask, spec, with_grads=False)
  return _numerator(ce, entropy, mask, spec), ce, entropy


def _fused_fwd(hidden, kernel, targets, mask, spec):
  (ce, entropy), grads = _forward(hidden, kernel, targets, mask, spec, with_grads=True)
  return (_numerator(ce, entropy, mask, spec), ce, entropy), grads


def _fused_bwd(spec, grads, cotangents):
  del spec
  g = cotangents[0]  # ce and entropy are reported without a gradient.
  d_hidden, d_kernel = grads
  return (g * d_hidden).astype(d_hidden.dtype), g * d_kernel, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def chunked_loss_sums(name: str, hidden: jax.Array, kernel: jax.Array, targets: jax.Array, mask: jax.Array,
                      *, gamma: float = 1.0, sigma: float = 1.0, block_size: int = 256,
                      vocab_block_size: int = 0, dtype: Any = None,
                      shard_axes: tuple[str, ...] = (), kernel_shardings=None) -> dict[str, jax.Array]:
  """`losses.loss_sums(name, hidden @ kernel, targets, mask, ...)` without the logits.

  Args:
    name: one of `losses.LOSS_NAMES`.
    hidden: [..., d] final hidden states, any float dtype.
    kernel: [d, V] unembedding.
    targets: [...] integer ids in [0, V); mask: [...] 1 for targets that count.
    gamma, sigma: as in `losses.token_weights`.
    block_size: tokens per block (the block count is rounded to divide the
      token count where possible).
    vocab_block_size: vocabulary columns per block; 0 = the whole vocabulary.
    dtype: dtype of the matmul inputs (accumulation is float32); None = the
      dtype of `hidden`.
    shard_axes: the axes of the current mesh (`jax.set_mesh`) that the
      tokens are split over, in contiguous runs; the kernel gradient then
      accumulates per shard and is summed over devices once. () = one sum.
    kernel_shardings: None, or (PartitionSpec of the kernel for the matmuls,
      PartitionSpec of its gradient) on the current mesh; see the module's
      docstring.

  Returns:
    The dict of float32 scalar sums of `losses.reduce_token_losses`; only
    `loss_numerator` carries a gradient (w.r.t. hidden and kernel).
  """
  if name not in losses.LOSS_NAMES:
    raise ValueError(f"loss.name must be one of {losses.LOSS_NAMES}, got {name!r}")
  flat = hidden.reshape(-1, hidden.shape[-1])
  token_blocks = _num_blocks(flat.shape[0], block_size)
  spec = _Spec(name, float(gamma), float(sigma), token_blocks, _num_blocks(kernel.shape[1], vocab_block_size),
               jnp.dtype(hidden.dtype if dtype is None else dtype),
               *_token_shards(shard_axes, -(-flat.shape[0] // token_blocks)),
               *(kernel_shardings or (None, None)))
  targets, mask = targets.reshape(-1), mask.reshape(-1).astype(jnp.float32)
  numerator, ce, entropy = _fused(flat, kernel, targets, mask, spec)
  sums = losses.reduce_token_losses(name, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(entropy), mask,
                                    gamma=gamma, sigma=sigma)
  sums["loss_numerator"] = numerator
  return sums
