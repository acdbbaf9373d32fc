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

With `kernel_shardings` (the kernel's sharding for the matmuls and its
parameter sharding) and the parameter's d split over a token axis of more
than one device (FSDP), the loss runs vocabulary-parallel
(`vocab_parallel`): each device keeps all of d and 1 / fsdp of the
vocabulary, the token blocks' hidden states are gathered instead of the
kernel, and the per-token statistics are combined across devices, so that
neither the kernel nor its float32 gradient accumulator is ever [d, V / tensor]
on a device. Otherwise (no FSDP, or sizes the mesh does not divide) the
kernel is constrained to the matmuls' sharding inside the custom VJP, once per
call, and the P partial sums of d kernel are reduce-scattered to the
parameter's sharding (`_sum_partials`). (Gathered outside the custom VJP, the
gather's transpose would constrain the cotangent to the gathered layout and
hold the whole gradient on every device.)

The per-block arithmetic is in `loss_blocks`.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from mile_jax.core import loss_blocks
from mile_jax.core import losses
from mile_jax.core import vocab_parallel


def _token_shards(shard_axes: tuple[str, ...], block_rows: int) -> tuple[int, tuple[str, ...]]:
  """(P, axes): how many shards of the current mesh the tokens of a block
  fall into; (1, ()) without a mesh or when a block does not divide evenly."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = tuple(a for a in shard_axes if not mesh.empty and a in mesh.axis_names)
  count = math.prod(mesh.shape[a] for a in axes) if axes else 1
  if count == 1 or block_rows % count:
    return 1, ()
  return count, axes


def _forward(hidden, kernel, targets, mask, spec: loss_blocks.Spec, with_grads: bool):
  """Loops over token blocks. Returns float32 (ce [N], entropy [N]) and, with
  `with_grads`, the numerator's (d hidden [N, d], d kernel [d, V])."""
  targets, mask = targets.astype(jnp.int32), mask.astype(jnp.float32)
  if spec.vocab_parallel is not None:
    return vocab_parallel.forward(hidden, kernel, targets, mask, spec, with_grads)
  n, vocab = hidden.shape[0], kernel.shape[1]
  kernel = loss_blocks.constrain(kernel, spec.kernel_compute)
  h_split = loss_blocks.split(hidden, spec.token_blocks, 0)  # (Bt, nb, d)
  y_split = loss_blocks.split(targets.astype(jnp.int32), spec.token_blocks, 0)  # (Bt, nb)
  # Padded tokens have mask 0, so they add nothing to the gradients.
  mask_split = loss_blocks.split(mask.astype(jnp.float32), spec.token_blocks, 0)  # (Bt, nb)
  # (d, Bv, nvb); kept as [d, V] without vocabulary blocks so that d kernel
  # accumulates in place.
  w_split = kernel if spec.vocab_blocks == 1 else loss_blocks.split(kernel, spec.vocab_blocks, 1)
  per_token = (jnp.zeros(y_split.shape, jnp.float32),) * 2

  def body(i, carry):
    args = [loss_blocks.take(x, i, 1) for x in (h_split, y_split, mask_split)]
    if not with_grads:
      ce, entropy = loss_blocks.token_block(*args, w_split, vocab, spec)
      return tuple(loss_blocks.put(out, x, i, 1) for out, x in zip(carry, (ce, entropy)))
    (ce_all, entropy_all), (dh_all, d_kernel) = carry
    ce, entropy, dh, d_kernel = loss_blocks.token_block(*args, w_split, vocab, spec, d_kernel)
    return ((loss_blocks.put(ce_all, ce, i, 1), loss_blocks.put(entropy_all, entropy, i, 1)),
            (loss_blocks.put(dh_all, dh, i, 1), d_kernel))

  if not with_grads:
    ce, entropy = jax.lax.fori_loop(0, spec.token_blocks, body, per_token)
    return ce.reshape(-1)[:n], entropy.reshape(-1)[:n]
  d_kernel = loss_blocks.constrain_shards(jnp.zeros((spec.token_shards, *w_split.shape), jnp.float32), spec)
  grads = (jnp.zeros(h_split.shape, hidden.dtype), d_kernel)
  (ce, entropy), (d_hidden, d_kernel) = jax.lax.fori_loop(0, spec.token_blocks, body, (per_token, grads))
  d_hidden = d_hidden.reshape(-1, hidden.shape[1])[:n]
  d_kernel = _sum_partials(d_kernel.reshape(spec.token_shards, kernel.shape[0], -1)[:, :, :vocab], spec)
  d_kernel = loss_blocks.constrain(d_kernel.astype(kernel.dtype), spec.kernel_grad)
  return (ce.reshape(-1)[:n], entropy.reshape(-1)[:n]), (d_hidden, d_kernel)


def _sum_partials(partials: jax.Array, spec: loss_blocks.Spec) -> jax.Array:
  """[P, d, V] float32 partial sums of d kernel, P over the token shards -> their sum [d, V].

  With the kernel's gradient sharded over some of the token axes along d
  (FSDP: `embed` over `fsdp`), the sum over those axes is a reduce-scatter
  (`psum_scatter`) and each device keeps only its [d / fsdp, V] slice; the
  other token axes (`data`) are summed whole. XLA's CPU compiler does not
  turn an all-reduce and a slice into a reduce-scatter, so it is written out.
  """
  if spec.kernel_grad is None or spec.token_shards == 1 or jax.sharding.get_abstract_mesh().empty:
    return partials.sum(0)
  d_axes, v_axes = vocab_parallel.axes_of(spec.kernel_grad[0]), vocab_parallel.axes_of(spec.kernel_grad[1])
  if not set(d_axes) <= set(spec.shard_axes) or v_axes != vocab_parallel.axes_of(spec.kernel_compute[1]):
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


def _numerator(ce, entropy, mask, spec: loss_blocks.Spec):
  return losses.reduce_token_losses(spec.name, ce, entropy, mask, gamma=spec.gamma,
                                    sigma=spec.sigma)["loss_numerator"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(hidden, kernel, targets, mask, spec: loss_blocks.Spec):
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
  (n, d), vocab = flat.shape, kernel.shape[1]
  kernel_compute, kernel_grad = kernel_shardings or (None, None)
  settings = (name, float(gamma), float(sigma))
  dtype = jnp.dtype(hidden.dtype if dtype is None else dtype)
  parallel = vocab_parallel.layout(shard_axes, kernel_grad, n, d, vocab)
  if parallel is not None:
    blocks = vocab_parallel.local_counts(parallel, n, vocab, block_size, vocab_block_size)
    spec = loss_blocks.Spec(*settings, *blocks, dtype, vocab_parallel=parallel)
  else:
    token_blocks = loss_blocks.num_blocks(n, block_size)
    spec = loss_blocks.Spec(*settings, token_blocks, loss_blocks.num_blocks(vocab, vocab_block_size), dtype,
                            *_token_shards(shard_axes, -(-n // token_blocks)), kernel_compute, kernel_grad)
  targets, mask = targets.reshape(-1), mask.reshape(-1).astype(jnp.float32)
  numerator, ce, entropy = _fused(flat, kernel, targets, mask, spec)
  sums = losses.reduce_token_losses(name, jax.lax.stop_gradient(ce), jax.lax.stop_gradient(entropy), mask,
                                    gamma=gamma, sigma=sigma)
  sums["loss_numerator"] = numerator
  return sums
