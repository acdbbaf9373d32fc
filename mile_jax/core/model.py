"""A LLaMA-style decoder in Flax Linen.

RMSNorm, rotary position embeddings, SwiGLU feed-forward, causal attention
with optional grouped-query heads, no biases, untied input and output
embeddings. Every parameter carries logical axis names; activations are
constrained by logical names too, and `mile_jax.core.sharding` maps both to mesh
axes. Parameters are float32; the compute dtype is configurable.
"""

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mile_jax.core import attention as attention_lib

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# `model.scan_layers` unset: the blocks are scanned from this depth on.
SCAN_LAYERS_FROM = 16


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Decoder hyper-parameters (a frozen, hashable copy of `config.model`)."""
  vocab_size: int = 1024
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 4
  d_ff: int = 384
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  init_std: float = 0.01
  dtype: str = "float32"
  remat: str = "none"
  attention: str = "auto"  # One of attention.IMPLEMENTATIONS.
  scan_layers: bool = False  # The blocks as one nn.scan over stacked parameters (see `Decoder`).

  @classmethod
  def from_config(cls, model_config: Any) -> "DecoderConfig":
    # A field missing from an older run's config.json takes its default.
    fields = {f.name: model_config[f.name] for f in dataclasses.fields(cls) if f.name in model_config}
    if fields.get("scan_layers", False) is None:
      fields["scan_layers"] = fields.get("n_layers", cls.n_layers) >= SCAN_LAYERS_FROM
    return cls(**fields)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def _init(std: float, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, computed in float32."""
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x):  # (B, T, D)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotating the two halves of the head dimension.

  Args:
    x: (B, T, N, H) queries or keys.
    positions: (B, T) integer positions.
  """
  half = x.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (H/2,)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, H/2)
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Einsum(nn.Module):
  """A bias-free projection: einsum(`equation`, x, kernel) with a float32 kernel.

  Inputs and kernel are cast to `dtype`; the output has `dtype`, or with
  `preferred_element_type` that dtype, accumulated in it.
  """
  shape: tuple[int, ...]
  names: tuple[str | None, ...]
  equation: str
  init_std: float
  dtype: Any
  preferred_element_type: Any = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", _init(self.init_std, self.names), self.shape, jnp.float32)
    return jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype),
                      preferred_element_type=self.preferred_element_type)


def _projection(cfg: DecoderConfig, shape, names, equation: str, name: str) -> Einsum:
  """A layer's projection in the compute dtype, initialised with `init_std`."""
  return Einsum(shape, names, equation, cfg.init_std, cfg.compute_dtype, name=name)


class Attention(nn.Module):
  """Causal multi-head attention with grouped-query key/value heads, by the
  kernel `cfg.attention` names (see `mile_jax.core.attention`).

  With `decode=True` keys and values are kept in a "cache" collection of
  (B, S, K, H) slots: the first call (at `init`) sizes the cache from its
  input (B, S), every later call writes its T new keys at the next T slots and
  attends to all filled slots of the same segment.
  """
  cfg: DecoderConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, attention_mask=None):  # x: (B, T, D)
    cfg = self.cfg
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    proj = functools.partial(_projection, cfg)
    q = proj((d, n, h), ("embed", "heads", "kv"), "BTD,DNH->BTNH", "query")(x)
    key = proj((d, k, h), ("embed", "kv_heads", "kv"), "BTD,DKH->BTKH", "key")(x)
    value = proj((d, k, h), ("embed", "kv_heads", "kv"), "BTD,DKH->BTKH", "value")(x)
    q = nn.with_logical_constraint(apply_rope(q, positions, cfg.rope_theta),
                                   ("activation_batch", "activation_length", "activation_heads", None))
    key = apply_rope(key, positions, cfg.rope_theta)
    if self.decode and self.has_variable("cache", "cached_key"):
      key, value, mask = self._update_cache(key, value, segment_ids)
      out = jax.nn.dot_product_attention(q, key, value, mask=mask)  # (B, T, N, H)
    elif attention_mask is not None:  # Any mask, causality included: on XLA, whatever cfg.attention says.
      out = jax.nn.dot_product_attention(q, key, value, mask=attention_mask)  # (B, T, N, H)
    else:
      if self.decode:  # init: create the cache with the input's shape
        self._cache_variables(key, value)
      # The decoding model stays on XLA (init only: later calls take the cache branch).
      impl = "xla" if self.decode else cfg.attention
      out = attention_lib.attend(q, key, value, segment_ids, impl)  # (B, T, N, H)
    out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads", None))
    return proj((n, h, d), ("heads", "kv", "embed"), "BTNH,NHD->BTD", "out")(out)

  def _cache_variables(self, key, value):
    return (self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype),
            self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype),
            self.variable("cache", "cached_segment_ids", jnp.zeros, key.shape[:2], jnp.int32),
            self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32)))

  def _update_cache(self, key, value, segment_ids):
    """Writes (B, T, K, H) keys/values at the next T slots; returns the cached
    (B, S, K, H) keys and values and the (B, 1, T, S) attention mask."""
    cached_key, cached_value, cached_segments, index = self._cache_variables(key, value)
    b, t = key.shape[:2]
    start = index.value
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype),
                                                    (0, start, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(
        cached_value.value, value.astype(cached_value.value.dtype), (0, start, 0, 0))
    cached_segments.value = jax.lax.dynamic_update_slice(
        cached_segments.value, segment_ids.astype(jnp.int32), (0, start))
    index.value = start + t
    slots = cached_segments.value.shape[1]
    causal = jnp.arange(slots)[None, :] <= (start + jnp.arange(t))[:, None]  # (T, S)
    same = segment_ids[:, :, None] == cached_segments.value[:, None, :]  # (B, T, S)
    return cached_key.value, cached_value.value, (causal[None] & same)[:, None]


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x):  # (B, T, D)
    cfg = self.cfg
    d, f = cfg.d_model, cfg.d_ff
    proj = functools.partial(_projection, cfg)
    gate = proj((d, f), ("embed", "mlp"), "BTD,DF->BTF", "gate")(x)
    up = proj((d, f), ("embed", "mlp"), "BTD,DF->BTF", "up")(x)
    hidden = nn.with_logical_constraint(nn.silu(gate) * up,
                                        ("activation_batch", "activation_length", "activation_mlp"))
    return proj((f, d), ("mlp", "embed"), "BTF,FD->BTD", "down")(hidden)


class Block(nn.Module):
  """Pre-norm residual block: attention then feed-forward."""
  cfg: DecoderConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, attention_mask=None):  # (B, T, D)
    cfg = self.cfg
    x = x + Attention(cfg, self.decode, name="attention")(
        RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="attention_norm")(x), positions, segment_ids, attention_mask)
    x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="mlp_norm")(x))
    return nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))


# Elementwise and layout primitives: cheap to recompute from their operands. Unrolled, XLA fuses them into
# their consumers in the backward pass instead of storing them; a scan's backward can read only what the
# forward stored in its stacked buffers, so without a policy it would store (and zero-fill) every one.
_ELEMENTWISE = frozenset({
    "abs", "add", "and", "broadcast_in_dim", "concatenate", "convert_element_type", "cos", "div", "eq", "exp",
    "expand_dims", "ge", "gt", "integer_pow", "iota", "le", "log", "logistic", "lt", "max", "min", "mul", "ne",
    "neg", "not", "or", "pow", "reshape", "rsqrt", "select_n", "sin", "split", "sqrt", "square", "squeeze",
    "stop_gradient", "sub", "tanh", "transpose"})


def _save_all_but_elementwise(prim, *_, **__) -> bool:
  """The remat policy of `remat="none"` for scanned blocks: every matmul's (and kernel's) output is
  saved, so nothing costly is computed twice; elementwise results are recomputed, as XLA does unrolled."""
  return prim.name not in _ELEMENTWISE


def _remat_block(policy: str, scanned: bool):
  if policy == "none" and not scanned:
    return Block
  policies = {
      "none": _save_all_but_elementwise,
      "full": None,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }
  # Inside a scan the loop already keeps XLA from merging the recomputation with the forward pass.
  return nn.remat(Block, policy=policies[policy], prevent_cse=not scanned)


def _scan_body(block: nn.Module, x, positions, segment_ids, attention_mask):
  """One step of the layer scan: the residual stream is the carry."""
  return block(x, positions, segment_ids, attention_mask), None


def _scanned_blocks(cfg: "DecoderConfig", block_class):
  """`block_class` applied `cfg.n_layers` times as one `nn.scan`: parameters
  (and the decoding cache) stacked on a leading axis of logical name "layers"."""
  return nn.scan(_scan_body, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                 in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.n_layers,
                 metadata_params={nn.PARTITION_NAME: "layers"})


LAYER_PREFIX = "layer_"  # Unrolled blocks are `layer_0`, `layer_1`, ...; scanned ones one stacked `layers`.
SCANNED = "layers"


def _layer_sharding(sharding, stacked: bool):
  """A NamedSharding of one layer's array for the stacked array (the layer axis whole), or back."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  spec = tuple(sharding.spec)
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*((None, *spec) if stacked else spec[1:])))


def _stack(leaves):
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
    return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype,
                                sharding=_layer_sharding(leaves[0].sharding, stacked=True))
  if all(isinstance(x, jax.Array) for x in leaves):
    return jnp.stack(leaves)
  return np.stack([np.asarray(x) for x in leaves])


def _unstack(x, n_layers: int):
  if isinstance(x, jax.ShapeDtypeStruct):
    return [jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_layer_sharding(x.sharding, stacked=False))] * n_layers
  return [x[i] for i in range(n_layers)]


def _is_layer_dict(x) -> bool:
  return isinstance(x, Mapping) and (f"{LAYER_PREFIX}0" in x or SCANNED in x)


def scanned_layers(tree, n_layers: int):
  """A tree with the unrolled blocks' parameters (`layer_0` ... in any dict of it: the
  parameters, and the optimizer's moments shaped like them) stacked into one `layers`
  entry, each array gaining a leading (n_layers,) axis; a scanned tree is returned as is.
  Leaves may be arrays, NumPy arrays or `jax.ShapeDtypeStruct`s."""
  def convert(node):
    if not _is_layer_dict(node) or SCANNED in node:
      return node
    layers = [node[f"{LAYER_PREFIX}{i}"] for i in range(n_layers)]
    rest = {k: v for k, v in node.items() if not k.startswith(LAYER_PREFIX)}
    return {**rest, SCANNED: jax.tree.map(lambda *xs: _stack(xs), *layers)}
  return jax.tree.map(convert, tree, is_leaf=_is_layer_dict)


def unrolled_layers(tree, n_layers: int):
  """The inverse of `scanned_layers`: `layers` split into `layer_0` ... `layer_{n-1}`."""
  def convert(node):
    if not _is_layer_dict(node) or SCANNED not in node:
      return node
    parts = jax.tree.map(lambda x: _unstack(x, n_layers), node[SCANNED])
    is_split = lambda x: isinstance(x, list)  # noqa: E731
    layers = {f"{LAYER_PREFIX}{i}": jax.tree.map(lambda xs, i=i: xs[i], parts, is_leaf=is_split)
              for i in range(n_layers)}
    return {**{k: v for k, v in node.items() if k != SCANNED}, **layers}
  return jax.tree.map(convert, tree, is_leaf=_is_layer_dict)


def is_scanned(params) -> bool:
  """Whether a parameter tree holds its blocks stacked (`layers`) rather than unrolled."""
  return SCANNED in params


def with_layout(tree, scanned: bool):
  """`tree` (parameters, or a train state whose optimizer moments are shaped like
  them) in the scanned or the unrolled layout, the number of layers read off the tree."""
  nodes = [x for x in jax.tree.leaves(tree, is_leaf=_is_layer_dict) if _is_layer_dict(x)]
  if not nodes or (SCANNED in nodes[0]) == scanned:
    return tree
  node = nodes[0]
  if SCANNED in node:
    return unrolled_layers(tree, jax.tree.leaves(node[SCANNED])[0].shape[0])
  return scanned_layers(tree, sum(1 for k in node if k.startswith(LAYER_PREFIX)))


def unembedding(cfg: DecoderConfig) -> Einsum:
  """The output projection "lm_head": hidden states (B, T, D) -> float32 logits (B, T, V).

  Compute-dtype inputs, float32 accumulation and output: the chunked loss
  (fused_loss.py) forms its block logits the same way, so the two loss paths
  are one function; rounding the logits to bfloat16 would move the loss by
  bfloat16's rounding of the logits (2^-9 of their size), summed over the vocabulary.
  """
  return Einsum((cfg.d_model, cfg.vocab_size), ("embed", "vocab"), "BTD,DV->BTV", cfg.init_std,
                cfg.compute_dtype, preferred_element_type=jnp.float32, name="lm_head")


class Decoder(nn.Module):
  """Token ids (B, T) -> float32 logits (B, T, V), whatever the compute dtype
  (see `unembedding`).

  `positions` defaults to 0..T-1; `segment_ids` (B, T), when given, stops
  attention across packed documents. With `return_hidden=True` the module
  returns the final normalised hidden states (B, T, D) instead of logits,
  for losses that apply the unembedding themselves. `attention_mask`
  (B, 1, T, T) bool, when given, replaces the causal and segment masks:
  query t reads key s where it is True (evaluation's shared-context rows).

  With `cfg.scan_layers` the blocks run as one `nn.scan`, their parameters
  stacked under `layers` with a leading (n_layers,) axis (logical name
  "layers"), and the program holds one block whatever the depth; otherwise
  they are `layer_0` ... `layer_{n-1}`. `scanned_layers` and
  `unrolled_layers` convert a tree between the two; the math is the same.

  With `decode=True` attention keeps a key/value cache (see `Attention`):
  `init` on (B, S) tokens creates a cache of S slots, then each `apply` with
  `mutable=["cache"]` feeds the next tokens with their explicit `positions`.
  """
  cfg: DecoderConfig
  decode: bool = False

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, return_hidden: bool = False, attention_mask=None):
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                     embedding_init=_init(cfg.init_std, ("vocab", "embed")), name="embed")
    x = embed(tokens)  # (B, T, D)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    block = Block if self.decode else _remat_block(cfg.remat, cfg.scan_layers)
    if cfg.scan_layers:
      x, _ = _scanned_blocks(cfg, block)(block(cfg, self.decode, name=SCANNED), x, positions, segment_ids,
                                         attention_mask)
    else:
      for i in range(cfg.n_layers):
        x = block(cfg, self.decode, name=f"{LAYER_PREFIX}{i}")(x, positions, segment_ids, attention_mask)
    x = RMSNorm(cfg.norm_eps, cfg.compute_dtype, name="final_norm")(x)
    if return_hidden:
      return x
    logits = unembedding(cfg)(x)  # (B, T, V) float32
    return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))


def abstract_params(cfg: DecoderConfig, seq_len: int = 8):
  """Parameter shapes with logical-axis boxes, from `jax.eval_shape` (no allocation)."""
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  variables = jax.eval_shape(lambda t: Decoder(cfg).init(jax.random.key(0), t), tokens)
  return variables["params"]


def count_params(params) -> int:
  """Number of scalars in a (possibly abstract or boxed) parameter tree."""
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))


def flops_per_token(cfg: DecoderConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 x (matmul parameters) + causal attention.

  Matmul parameters exclude the input embedding (a gather). Attention adds
  6 * n_layers * d_model * seq_len for QK^T and AV with the causal half
  (forward 2 matmuls x 2 FLOPs x T/2 average length, times 3 for backward).
  """
  per_layer = (2 * cfg.d_model * cfg.n_heads * cfg.head_dim
               + 2 * cfg.d_model * cfg.n_kv_heads * cfg.head_dim
               + 3 * cfg.d_model * cfg.d_ff)
  matmul_params = cfg.n_layers * per_layer + cfg.d_model * cfg.vocab_size
  return 6.0 * matmul_params + 6.0 * cfg.n_layers * cfg.d_model * seq_len
