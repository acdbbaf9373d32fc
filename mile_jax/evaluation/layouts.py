"""Which packed layout a log-likelihood call runs, by time and by memory.

Two layouts of the same requests (`packed_requests`):

* tree: the choices of a document share one copy of its context in a prefix
  tree; who reads whom is an arbitrary (W, W) mask, which only XLA's
  attention takes: it forms the (rows, heads, W, W) float32 scores and
  probabilities in memory.
* segments: every request its own segment, its context repeated; causal
  attention within segments, which the configured kernel runs (splash on
  TPU and cuDNN on GPU need no (W, W) scores; XLA still forms them).

`choose` estimates, for every layout and row width, the FLOPs of the whole
call (`packed_requests.Cost`) and the bytes one device holds at the peak of
a forward pass (`working_bytes`), and takes the cheapest in FLOPs among those
that fit the device's free memory, or the smallest when none fits. Where no
limit is known (a CPU) everything fits, and the tree, which computes fewer
tokens, wins wherever it has fewer FLOPs.

The byte estimate counts, per device: one layer's activations (the residual
stream, its norm, q/k/v and the attention output, 4 d values per slot, and
the feed-forward's gate, up and product, 3 d_ff), in the compute dtype; the
attention kernel's buffers (XLA: float32 scores and probabilities per local
head plus the boolean mask; cuDNN: the segment mask as an additive bias in
the compute dtype; splash: a float32 logsumexp per query and head); and the
gathered logits with their log-softmax in float32. Compiled peaks, which
`python -m mile_jax.plan --eval` reports, are the reference for it.
"""

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from mile_jax.core import attention as attention_lib
from mile_jax.core import sharding
from mile_jax.evaluation import packed_requests

LAYOUTS = ("auto", "tree", "segments")


@dataclasses.dataclass(frozen=True)
class Device:
  """What one device of the scoring mesh offers.

  memory_bytes: bytes free for the scoring program, or None when unknown (no limit).
  rows_shards, heads_shards: data-parallel and tensor-parallel sizes of the mesh.
  segment_attention: the kernel the segment layout runs ("xla", "splash" or "cudnn");
    the tree layout always runs XLA's.
  """
  memory_bytes: float | None
  rows_shards: int
  heads_shards: int
  segment_attention: str


@dataclasses.dataclass
class Choice:
  """One layout and row width for a call: its batches and estimates."""
  segments: bool
  width: int
  scored: int  # unembedded positions per row group (S)
  batches: list  # `packed_requests.plan` output
  flops: float  # `packed_requests.Cost.of_plan` of the whole call
  working_bytes: float  # `working_bytes` per device

  @property
  def name(self) -> str:
    return "segments" if self.segments else "tree"


def working_bytes(cfg, *, attention: str, rows: int, width: int, scored: int, heads_shards: int = 1) -> float:
  """Estimated bytes one device holds at the peak of a scoring forward pass,
  parameters excepted (module docstring).

  Args:
    cfg: a `model.DecoderConfig`.
    attention: the kernel that runs ("xla", "splash" or "cudnn").
    rows: rows per device (the batch over the data-parallel size).
    width: slots per row (W).
    scored: unembedded positions per device (S).
    heads_shards: tensor-parallel size (query heads per device: n_heads / it).
  """
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  heads = math.ceil(cfg.n_heads / heads_shards)
  activations = rows * width * (4 * cfg.d_model + 3 * cfg.d_ff) * itemsize
  if attention == "xla":
    kernel = rows * heads * width * width * 2 * 4 + rows * width * width
  elif attention == "cudnn":
    kernel = rows * width * width * itemsize
  else:
    kernel = rows * heads * width * 4
  return activations + kernel + scored * cfg.vocab_size * 2 * 4


def device_of(mesh, cfg, width_hint: int) -> Device:
  """The `Device` of `mesh`'s first local device: free memory from its
  `memory_stats()` (None on a CPU), the segment kernel as `attention.resolve`
  resolves `cfg.attention` on this backend."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  stats = None
  try:
    stats = local[0].memory_stats() if local else None
  except Exception:  # pylint: disable=broad-except
    stats = None  # Backends without memory statistics.
  free = None
  if stats and "bytes_limit" in stats:
    free = float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  kernel, _ = attention_lib.resolve(cfg.attention, dtype=cfg.compute_dtype, head_dim=cfg.head_dim,
                                    seq_len=width_hint, segmented=True)
  return Device(memory_bytes=free, rows_shards=sharding.data_parallel_size(mesh),
                heads_shards=int(mesh.shape.get("tensor", 1)), segment_attention=kernel)


def candidates(groups: Sequence[packed_requests.Unit], batch_size: int, max_len: int, cfg: Any, device: Device,
               layout: str = "auto") -> list[Choice]:
  """Every (layout, width) of `layout` ("auto": both) for `make_groups`'s groups, with its estimates."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout: must be one of {', '.join(LAYOUTS)}, got {layout!r}")
  cost = packed_requests.Cost.of(cfg)
  rows = batch_size // device.rows_shards
  out = []
  for segments in (False, True):
    if layout != "auto" and segments != (layout == "segments"):
      continue
    attention = device.segment_attention if segments else "xla"
    for width, scored, batches in packed_requests.candidates(groups, batch_size, device.rows_shards, max_len,
                                                             segments):
      flops = cost.of_plan(len(batches), batch_size, width, scored * device.rows_shards)
      peak = working_bytes(cfg, attention=attention, rows=rows, width=width, scored=scored,
                           heads_shards=device.heads_shards)
      out.append(Choice(segments, width, scored, batches, flops, peak))
  return out


def choose(groups: Sequence[packed_requests.Unit], batch_size: int, max_len: int, cfg: Any, device: Device,
           layout: str = "auto") -> Choice:
  """The `candidates` entry of least FLOPs among those whose `working_bytes`
  fit `device.memory_bytes`; the one of least bytes when none fits."""
  if layout == "auto" and device.memory_bytes is None:
    # Everything fits, and at any width the segments hold every slot of the tree and more.
    layout = "tree"
  options = candidates(groups, batch_size, max_len, cfg, device, layout)
  fitting = [c for c in options if device.memory_bytes is None or c.working_bytes <= device.memory_bytes]
  if fitting:
    return min(fitting, key=lambda c: c.flops)
  return min(options, key=lambda c: c.working_bytes)
