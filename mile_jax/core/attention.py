"""Causal attention with packed-document masks, by one of three kernels.

`attend(q, k, v, segment_ids, implementation)` computes, for every query
position t of every head n (grouped-query: head n reads key/value head
n // (N / K)),

  out[t] = sum_s p[t, s] v[s],  p[t, :] = softmax_s(q[t] . k[s] / sqrt(H))

over the keys s <= t of the same segment (`segment_ids[s] == segment_ids[t]`,
packed documents; all of the row when `segment_ids` is None). Implementations
(`model.attention`):

* "xla": `jax.nn.dot_product_attention` as XLA lowers it. It forms the
  (B, N, T, T) float32 scores, and the backward pass keeps the probabilities:
  O(T^2) memory per head.
* "splash": the Pallas TPU kernel `splash_attention` (blockwise online
  softmax; the backward pass recomputes the blocks from the saved per-row
  logsumexp), O(T) memory. Fully masked blocks are skipped, which halves the
  causal work. Its conventions, from the kernel's source: it does not scale
  the logits, so q is multiplied by 1/sqrt(H) first (in float32, then cast
  back to the compute dtype); it takes one example, (N, T, H) queries and
  (K, T, H) keys and values, and maps query head n to key head n // (N / K)
  itself, so grouped-query heads are never repeated in memory; the batch is
  vmapped. Blocks are multiples of the TPU's 128 lanes: T is padded up to a
  multiple of 128 and the block is the largest of 512, 256, 128 that divides
  the padded length. Padding is harmless under the causal mask: a real query
  (t < T) never sees a padded key (s >= T), each padded query sees at least
  itself, and the padded rows' outputs, cut off afterwards, get a zero
  cotangent, so they add nothing to any gradient. Under a mesh the kernel
  runs in `jax.shard_map`, batch over the axes of `activation_batch` and
  heads over those of `activation_heads` (the logical rules of
  `mile_jax.core.sharding`), each device on its own heads and rows. When the
  heads' axes divide the query heads but not the key/value heads, each
  key/value head is repeated just enough times for them to divide those too;
  an axis that does not divide the batch or the query heads is left
  replicated. On any backend but TPU it runs in Pallas interpret mode: the
  same kernel code as plain XLA operations, slow, for tests and planning.
* "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's
  fused flash attention on NVIDIA GPUs. It needs bfloat16 or float16 inputs
  and a head dimension that is a multiple of 8 and at most 128 (256 from
  Hopper on). JAX turns the segment mask into an additive (B, 1, T, T) bias
  in the compute dtype, with which cuDNN needs an even T.
* "auto": splash on TPU, cudnn on a CUDA GPU where its conditions hold, xla
  otherwise. The choice and its reason are logged once per distinct choice
  (INFO; WARNING for splash in interpret mode).

The key/value-cache decode path of the model stays on XLA (one query row per
step: no T x T tensor to avoid).
"""

import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from mile_jax.errors import ConfigError

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
CUDNN_DTYPES = ("bfloat16", "float16")
SPLASH_LANES = 128  # Splash blocks are multiples of the TPU vector unit's 128 lanes.
SPLASH_BLOCKS = (512, 256, 128)  # Largest first: fewer grid steps per kernel.

_logged: set[tuple[str, str, str]] = set()


def cudnn_max_head_dim() -> int:
  """cuDNN flash attention's largest head dimension on this machine's GPU (256 from Hopper on)."""
  capability = getattr(jax.devices()[0], "compute_capability", None)
  major = int(str(capability).split(".", 1)[0]) if capability else 0
  return 256 if major >= 9 else 128


def cudnn_unsupported(dtype, head_dim: int, seq_len: int, segmented: bool, max_head_dim: int = 256) -> str | None:
  """Why cuDNN flash attention cannot take these inputs, or None when it can."""
  if jnp.dtype(dtype).name not in CUDNN_DTYPES:
    return f"cuDNN needs {' or '.join(CUDNN_DTYPES)} inputs, got {jnp.dtype(dtype).name}"
  if head_dim % 8 or head_dim > max_head_dim:
    return f"cuDNN needs a head dimension that is a multiple of 8 and <= {max_head_dim}, got {head_dim}"
  if segmented and seq_len % 2:
    return f"cuDNN with a segment mask needs an even sequence length, got {seq_len}"
  return None


def choose(requested: str, *, backend: str, dtype, head_dim: int, seq_len: int, segmented: bool,
           cuda: bool = True, max_head_dim: int = 256) -> tuple[str, str]:
  """(implementation, reason) that `requested` (one of IMPLEMENTATIONS) runs as.

  `backend` is `jax.default_backend()`; `cuda` whether its GPU has cuDNN (an
  NVIDIA one). Only "auto" is resolved; an explicit name is returned as is.
  """
  if requested not in IMPLEMENTATIONS:
    raise ConfigError(f"model.attention: must be one of {IMPLEMENTATIONS}, got {requested!r}")
  if requested == "splash":
    mode = "compiled by Mosaic" if backend == "tpu" else f"Pallas interpret mode on {backend}"
    return "splash", mode
  if requested != "auto":
    return requested, "as configured"
  if backend == "tpu":
    return "splash", "auto on TPU"
  if backend == "gpu" and cuda:
    why_not = cudnn_unsupported(dtype, head_dim, seq_len, segmented, max_head_dim)
    if why_not is None:
      return "cudnn", "auto on a CUDA GPU"
    return "xla", f"auto on GPU: {why_not}"
  return "xla", f"auto on {backend}"


def resolve(requested: str, *, dtype, head_dim: int, seq_len: int, segmented: bool) -> tuple[str, str]:
  """`choose` for this process's backend and first device."""
  backend = jax.default_backend()
  cuda = backend == "gpu" and getattr(jax.devices()[0], "compute_capability", None) is not None
  return choose(requested, backend=backend, dtype=dtype, head_dim=head_dim, seq_len=seq_len, segmented=segmented,
                cuda=cuda, max_head_dim=cudnn_max_head_dim() if cuda else 256)


def _log_choice(requested: str, chosen: str, reason: str) -> None:
  key = (requested, chosen, reason)
  if key not in _logged:
    _logged.add(key)
    # Interpreted splash is orders of magnitude slower than the compiled kernel: say so louder.
    level = logging.WARNING if chosen == "splash" and "interpret" in reason else logging.INFO
    logging.log(level, "model.attention=%s: %s (%s)", requested, chosen, reason)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
           implementation: str = "auto") -> jax.Array:
  """Causal attention within segments.

  Args:
    q: (B, T, N, H) queries, rotary embedding applied.
    k, v: (B, T, K, H) keys and values, K dividing N; the dtype of q.
    segment_ids: (B, T) integers, or None for one segment per row.
    implementation: one of IMPLEMENTATIONS.
  Returns:
    (B, T, N, H) in q's dtype.
  """
  chosen, reason = resolve(implementation, dtype=q.dtype, head_dim=q.shape[-1], seq_len=q.shape[1],
                           segmented=segment_ids is not None)
  _log_choice(implementation, chosen, reason)
  if chosen == "splash":
    return splash_attention(q, k, v, segment_ids, interpret=jax.default_backend() != "tpu")
  return dot_product_attention(q, k, v, segment_ids, implementation=chosen)


def dot_product_attention(q, k, v, segment_ids=None, implementation: str = "xla") -> jax.Array:
  """`jax.nn.dot_product_attention`, causal, with the segment mask; `implementation` xla or cudnn.

  Shapes as `attend`.
  """
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # (B, 1, T, T)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)


def splash_blocks(seq_len: int, block: int | None = None) -> tuple[int, int]:
  """(padded length, block size) of the splash kernel for a sequence of `seq_len`.

  By default the padding is below 128 and the block the largest of
  SPLASH_BLOCKS dividing the padded length; a given `block` (a multiple of
  128) pads to a multiple of itself.
  """
  if block is not None:
    if block <= 0 or block % SPLASH_LANES:
      raise ValueError(f"splash block size must be a positive multiple of {SPLASH_LANES}, got {block}")
    return -(-seq_len // block) * block, block
  padded = -(-seq_len // SPLASH_LANES) * SPLASH_LANES
  return padded, next(b for b in SPLASH_BLOCKS if padded % b == 0)


def _splash_kernel(num_heads: int, seq_len: int, block: int, interpret: bool):
  """A causal splash kernel over (num_heads, seq_len, H) queries, blocks of `block` in every pass."""
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * num_heads)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_per_device(q, k, v, segment_ids=None, *, block: int, interpret: bool):
  """The kernel over one device's rows and heads: (b, N, T, H) queries, (b, K, T, H)
  keys and values, (b, T) segment ids or None; T a multiple of `block`."""
  kernel = _splash_kernel(q.shape[1], q.shape[2], block, interpret)
  if segment_ids is None:
    return jax.vmap(kernel)(q, k, v)
  return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(q, k, v, segment_ids)


def _mesh_axes(logical: str, mesh, *sizes: int):
  """The mesh axes that the rules in force give `logical`, or None when they
  do not divide every one of `sizes` (the dimension stays replicated)."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  if axes is None:
    return None
  axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.axis_names)
  count = math.prod(mesh.shape[a] for a in axes)
  if not axes or any(size % count for size in sizes):
    return None
  return axes


def _repeat_kv_heads(x: jax.Array, shards: int) -> jax.Array:
  """(B, K, T, H) keys or values with each head repeated f = shards / gcd(K, shards)
  times in place, so that `shards` divides the head count.

  Query head n reads key head n // (N / K); after the repeat it reads head
  n // (N / (K f)), a copy of the same head, since floor(floor(n / (G / f)) / f)
  = floor(n / G) for a group size G = N / K. f divides G whenever `shards`
  divides N, so every device holds its query heads and the key heads they read.
  """
  repeat = shards // math.gcd(x.shape[1], shards)
  return x if repeat == 1 else jnp.repeat(x, repeat, axis=1)


def splash_attention(q, k, v, segment_ids=None, *, interpret: bool = False, block: int | None = None) -> jax.Array:
  """Causal splash attention, sharded over the current mesh (`jax.set_mesh`) when there is one.

  Shapes as `attend`. `interpret` runs the kernel in Pallas interpret mode
  (any backend); otherwise it compiles for TPU. `block`: see `splash_blocks`.
  """
  b, t, n, h = q.shape
  padded, block = splash_blocks(t, block)
  q = (q.astype(jnp.float32) * (1.0 / math.sqrt(h))).astype(q.dtype)  # The kernel does not scale.
  q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # (B, N or K, T, H)
  if padded != t:
    q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, padded - t), (0, 0))) for x in (q, k, v))
    if segment_ids is not None:
      segment_ids = jnp.pad(segment_ids, ((0, 0), (0, padded - t)))
  segments = () if segment_ids is None else (segment_ids.astype(jnp.int32),)
  local = functools.partial(_splash_per_device, block=block, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    out = local(q, k, v, *segments)
  else:
    batch = _mesh_axes("activation_batch", mesh, b)
    heads = _mesh_axes("activation_heads", mesh, n)
    if heads is not None:
      k, v = (_repeat_kv_heads(x, math.prod(mesh.shape[a] for a in heads)) for x in (k, v))
    spec = jax.sharding.PartitionSpec(batch, heads, None, None)
    specs = (spec, spec, spec) + (() if segment_ids is None else (jax.sharding.PartitionSpec(batch, None),))
    # check_vma=False: the kernel's pallas_call outputs declare no varying mesh axes, which the check requires.
    out = jax.shard_map(local, in_specs=specs, out_specs=spec, check_vma=False)(q, k, v, *segments)
  return jnp.swapaxes(out[:, :, :t], 1, 2)  # (B, T, N, H)
