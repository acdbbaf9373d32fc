"""The chunked loss with the vocabulary split over the devices that split the
unembedding's d (FSDP), so that no device holds a [d, V] array.

Under FSDP the kernel [d, V] is stored as [d / F, V / T] slices (d over the
fsdp axes, F devices; V over the tensor axes, T devices) and the tokens are
split over data x fsdp. Gathering the kernel over fsdp for the matmuls, as
the replicated path of `fused_loss` does, leaves a whole [d, V / T] kernel
and a [d, V / T] float32 gradient accumulator on every device. Here instead,
inside `shard_map` (as Megatron's vocabulary-parallel cross-entropy):

1. one all-to-all over fsdp turns each device's [d / F, V / T] slice into a
   [d, V / (F T)] one: all of d, 1 / F of its vocabulary columns;
2. for each token block, the block's hidden states are all-gathered over
   fsdp ([F Bt, d], small next to the kernel) and each device computes the
   logits of its columns, [F Bt, V / (F T)];
3. the per-token statistics of `loss_blocks.stats_update` over each device's
   columns are combined over fsdp x tensor (`loss_blocks.stats_merge`: the
   global maximum by pmax, the rescaled sums and the target's logit, which
   exactly one device holds, by psum), so every device has the exact
   log-normaliser, entropy and cross-entropy of every token of the block,
   and hence the same weights and dz = w mask (softmax(z) - onehot(y)) on
   its columns as the replicated path;
4. d hidden over the device's columns, dz @ w^T [F Bt, d], is reduce-scattered
   over fsdp (each token's owner receives it) and summed over tensor;
5. d kernel accumulates h^T @ dz into the device's own [d, V / (F T)] float32
   slice; after the loop the slices are summed over the data axes and a
   second all-to-all returns them to the parameter's [d / F, V / T] layout.

Per device the kernel, its gradient accumulator and the block's logits thus
fall as 1 / F, and the loss is the same function with the same gradient.
"""

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mile_jax.core import loss_blocks


def axes_of(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry, as a tuple."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def layout(shard_axes: tuple[str, ...], kernel_grad, tokens: int, d: int, vocab: int
           ) -> loss_blocks.VocabParallel | None:
  """The vocabulary-parallel layout on the current mesh, or None where it
  does not apply: no mesh or kernel sharding, the kernel's d split over no
  token axis of size > 1 (no FSDP: the replicated path is then the same
  computation), its V over a token axis, or sizes that the mesh's axes do
  not divide (tokens by data x fsdp, d by fsdp, V by fsdp x tensor)."""
  mesh = jax.sharding.get_abstract_mesh()
  if kernel_grad is None or mesh.empty:
    return None
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)  # noqa: E731
  token_axes = tuple(a for a in shard_axes if a in mesh.axis_names)
  d_axes, v_axes = axes_of(kernel_grad[0]), axes_of(kernel_grad[1])
  if not set(d_axes) <= set(token_axes) or set(v_axes) & set(token_axes):
    return None
  gather = tuple(a for a in d_axes if mesh.shape[a] > 1)
  if not gather or tokens % size(token_axes) or d % size(d_axes) or vocab % (size(d_axes) * size(v_axes)):
    return None
  return loss_blocks.VocabParallel(
      token_axes=token_axes, kernel_spec=P(kernel_grad[0], kernel_grad[1]), gather_axes=gather,
      vocab_axes=tuple(a for a in v_axes if mesh.shape[a] > 1),
      sum_axes=tuple(a for a in token_axes if a not in d_axes and mesh.shape[a] > 1))


def local_counts(parallel: loss_blocks.VocabParallel, tokens: int, vocab: int, block_size: int,
                 vocab_block_size: int) -> tuple[int, int]:
  """(token blocks, vocabulary blocks) per device: each device's logits block
  is [F Bt, V / (F T nvb)], the size of the replicated path's per-device block."""
  mesh = jax.sharding.get_abstract_mesh()
  shards = math.prod(mesh.shape[a] for a in parallel.token_axes)
  local_vocab = vocab // math.prod(mesh.shape[a] for a in parallel.gather_axes + parallel.vocab_axes)
  token_blocks = loss_blocks.num_blocks(tokens // shards, -(-block_size // shards))
  global_vocab_blocks = loss_blocks.num_blocks(vocab, vocab_block_size)
  return token_blocks, loss_blocks.num_blocks(local_vocab, -(-local_vocab // global_vocab_blocks))


def forward(hidden, kernel, targets, mask, spec: loss_blocks.Spec, with_grads: bool):
  """`fused_loss._forward` on the vocabulary-parallel layout `spec.vocab_parallel`.

  Args:
    hidden: [N, d]; kernel: [d, V]; targets: [N] int32; mask: [N] float32.

  Returns:
    float32 (ce [N], entropy [N]) and, with `with_grads`, the numerator's
    (d hidden [N, d] in hidden's dtype, d kernel [d, V] float32 in the
    kernel's parameter sharding).
  """
  par = spec.vocab_parallel
  mesh = jax.sharding.get_abstract_mesh()
  fsdp = math.prod(mesh.shape[a] for a in par.gather_axes)
  tokens = P(par.token_axes)
  outs = (tokens, tokens) + ((P(par.token_axes, None), par.kernel_spec) if with_grads else ())

  def local(h, w, y, m):  # (n, d), (d / F, V / T), (n,), (n,): this device's shards.
    n, d = h.shape
    # (d, V / (F T)): all of d, 1 / (F T) of the vocabulary.
    w = jax.lax.all_to_all(w.astype(spec.dtype), par.gather_axes, 1, 0, tiled=True)
    local_vocab = w.shape[1]
    fsdp_index = jax.lax.axis_index(par.gather_axes)
    column_shard = fsdp_index
    if par.vocab_axes:
      column_shard = jax.lax.axis_index(par.vocab_axes) * fsdp + fsdp_index
    h_split = loss_blocks.split(h.astype(spec.dtype), spec.token_blocks, 0)  # (Bt, nb, d)
    y_split = loss_blocks.split(y, spec.token_blocks, 0)  # (Bt, nb)
    m_split = loss_blocks.split(m, spec.token_blocks, 0)  # (Bt, nb); padded tokens have mask 0.
    w_split = w if spec.vocab_blocks == 1 else loss_blocks.split(w, spec.vocab_blocks, 1)  # (d, Bv, nvb)
    kwargs = {"offset": column_shard * local_vocab,
              "merge": lambda stats: loss_blocks.stats_merge(stats, par.gather_axes + par.vocab_axes)}

    def gather(x, i):  # Block i of every fsdp device's tokens, in fsdp order: (F Bt, ...).
      return jax.lax.all_gather(loss_blocks.take(x, i, 1), par.gather_axes, axis=0, tiled=True)

    def own(x):  # (F Bt, ...) -> (Bt, ...): this device's tokens.
      return loss_blocks.take(x.reshape(fsdp, -1, *x.shape[1:]), fsdp_index, 0)

    def body(i, carry):
      block = (gather(h_split, i), gather(y_split, i), gather(m_split, i))  # (F Bt, d), (F Bt,), (F Bt,)
      if not with_grads:
        ce, entropy = loss_blocks.token_block(*block, w_split, local_vocab, spec, **kwargs)
        return tuple(loss_blocks.put(out, own(x), i, 1) for out, x in zip(carry, (ce, entropy)))
      (ce_all, entropy_all), (dh_all, d_kernel) = carry
      ce, entropy, dh, d_kernel = loss_blocks.token_block(*block, w_split, local_vocab, spec, d_kernel, **kwargs)
      dh = jax.lax.psum_scatter(dh, par.gather_axes, scatter_dimension=0, tiled=True)  # (Bt, d) own tokens
      if par.vocab_axes:
        dh = jax.lax.psum(dh, par.vocab_axes)
      return ((loss_blocks.put(ce_all, own(ce), i, 1), loss_blocks.put(entropy_all, own(entropy), i, 1)),
              (loss_blocks.put(dh_all, dh, i, 1), d_kernel))

    per_token = (jnp.zeros(y_split.shape, jnp.float32),) * 2
    if not with_grads:
      ce, entropy = jax.lax.fori_loop(0, spec.token_blocks, body, per_token)
      return ce.reshape(-1)[:n], entropy.reshape(-1)[:n]
    init = (per_token, (jnp.zeros(h_split.shape, hidden.dtype), jnp.zeros((1, *w_split.shape), jnp.float32)))
    (ce, entropy), (dh, d_kernel) = jax.lax.fori_loop(0, spec.token_blocks, body, init)
    d_kernel = d_kernel.reshape(d, -1)[:, :local_vocab]  # (d, V / (F T)) float32
    if par.sum_axes:
      d_kernel = jax.lax.psum(d_kernel, par.sum_axes)
    d_kernel = jax.lax.all_to_all(d_kernel, par.gather_axes, 0, 1, tiled=True)  # (d / F, V / T)
    return ce.reshape(-1)[:n], entropy.reshape(-1)[:n], dh.reshape(-1, d)[:n], d_kernel.astype(kernel.dtype)

  out = jax.shard_map(local, in_specs=(P(par.token_axes, None), par.kernel_spec, tokens, tokens), out_specs=outs,
                      check_vma=False)(hidden, kernel, targets, mask)
  return out[:2] if not with_grads else (out[:2], out[2:])
