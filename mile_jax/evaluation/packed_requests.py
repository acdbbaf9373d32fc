"""Log-likelihood requests laid out in packed rows that share their contexts.

A request is (context tokens, continuation tokens). It is cut to the model's
length as a single sequence would be: `(context + continuation)[-(L + 1):]`
for `max_len` L, of which the continuation's part (at most all but the first
token) is scored and the rest is its context. Requests with equal (cut)
contexts form a group, the choices of one multiple-choice document, laid out
once as a unit: the context, then the continuations' input tokens (all but
each one's last, which is only a target) as a prefix tree, depth first:

    context c_0 .. c_{C-1} | x1_0 x1_1 .. | x2_1 ..  (x2_0 = x1_0: shared) | x3_0 ..

A tree node at depth j has position C + j, as in the continuation alone.
Attention: a token reads the tokens before it that it descends from (the
context and its own path), never a sibling branch's. In depth-first order
a node's descendants are the slots right after it, so one number per slot
says who reads it: key s is read by the queries t with s <= t <=
`visible_until[s]` (the last slot of its subtree; of its unit for context
tokens). Token j of a continuation is predicted from the hidden state at the
context's last token (j = 0) or at its path's node j - 1; only those
"sources" are unembedded. Identical requests are scored once.

All batches of one call have one shape: (B, W) inputs and, per group of rows
that one data-parallel shard holds, S sources. The row width W is the
candidate (`candidate_widths`) of least estimated cost (`Cost`) for the whole
call; a group longer than W is split between its continuations into units
that each repeat the context. Each row is filled greedily with the longest
unit that still fits; S is the most scored tokens of any row group, rounded
up to a multiple of 8. Slots past a row's units are padding, read only by
themselves.

The segment layout (`segments=True`) gives every request a unit of its own
(its context repeated, its input tokens one path) and says who reads whom
with `segment_ids` instead: unit k of a row is segment k, padding segment 0.
Causal attention within a segment is then the mask, which flash kernels
(splash on TPU, cuDNN on GPU) take without a (W, W) mask in memory; the
price is the repeated contexts. `layouts.choose` picks between the two.
"""

import bisect
import collections
import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

SCORED_MULTIPLE = 8


class Unit:
  """A context and continuations scored after it, their input tokens held as a prefix tree.

  A tree is {token: (children tree)}; `slots` counts the context and the tree's nodes.
  """

  def __init__(self, context: tuple[int, ...]):
    self.context = context
    self.members: list[tuple[int, tuple[int, ...]]] = []  # (request index, continuation), each non-empty
    self.tree: dict = {}
    self.length = len(context)  # row slots taken
    self.scored = 0

  def new_slots(self, continuation: Sequence[int]) -> int:
    """Slots that adding `continuation` would take: its input tokens not already in the tree."""
    tree, shared = self.tree, 0
    for token in continuation[:-1]:
      if token not in tree:
        break
      tree, shared = tree[token], shared + 1
    return len(continuation) - 1 - shared

  def add(self, request: int, continuation: tuple[int, ...]) -> None:
    self.length += self.new_slots(continuation)
    self.scored += len(continuation)
    self.members.append((request, continuation))
    tree = self.tree
    for token in continuation[:-1]:
      tree = tree.setdefault(token, {})


@dataclasses.dataclass
class Batch:
  """One forward pass: `arrays` for the device, `owner` for the host.

  arrays: inputs, positions, and visible_until (tree) or segment_ids
    (segments): (B, W) int32; sources, targets:
    (G, S) int32 for G groups of B / G rows: the slot, in the group's rows
    flattened to (B / G * W), whose hidden state predicts the target.
  owner: (G, S) int64, the request each scored slot belongs to, -1 for unused slots.
  """
  arrays: dict[str, np.ndarray]
  owner: np.ndarray
  tokens: int  # real (non-padding) input tokens


@dataclasses.dataclass(frozen=True)
class Cost:
  """Relative cost of a forward pass, in FLOPs: per row slot (projections and
  feed-forward), per (query slot, key slot) pair (attention) and per
  unembedded position."""
  slot: float
  pair: float
  logit: float

  # XLA's attention forms and masks the (B, N, W, W) scores in memory, so a
  # FLOP of it costs more time than one of the projections; the weight is
  # measured by benchmarks/attention_cost_bench.py (BENCHMARKS.md, "Evaluation").
  ATTENTION_WEIGHT = 2.0

  @classmethod
  def of(cls, cfg) -> "Cost":
    """The estimate for a `model.DecoderConfig`."""
    d, h = cfg.d_model, cfg.head_dim
    per_layer = 2 * d * (cfg.n_heads + 2 * cfg.n_kv_heads) * h + 2 * cfg.n_heads * h * d + 6 * d * cfg.d_ff
    return cls(slot=cfg.n_layers * per_layer, pair=cls.ATTENTION_WEIGHT * 4 * cfg.n_layers * cfg.n_heads * h,
               logit=2 * d * cfg.vocab_size)

  def of_plan(self, batches: int, batch_size: int, width: int, logit_rows: float) -> float:
    """Estimated cost of `batches` batches of `batch_size` rows of `width`, with `logit_rows` each."""
    return batches * (batch_size * width * (self.slot + self.pair * width) + logit_rows * self.logit)


def cut(context: Sequence[int], continuation: Sequence[int], max_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(context, continuation) of one request after cutting it to `max_len` inputs from the left."""
  seq = (list(context) + list(continuation))[-(max_len + 1):]
  scored = max(0, min(len(continuation), len(seq) - 1))
  return tuple(seq[:len(seq) - scored]), tuple(seq[len(seq) - scored:])


def make_groups(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int) -> tuple[list[Unit], np.ndarray]:
  """(one unit per distinct cut context, `same_as`): request i takes the score
  of request `same_as[i]`, itself unless an earlier request is identical once
  cut (a choice listed twice gets the very same number), -1 when it has
  nothing to score."""
  groups: dict[tuple[int, ...], Unit] = {}
  seen: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
  same_as = np.full(len(pairs), -1, np.int64)
  for i, (context, continuation) in enumerate(pairs):
    context, continuation = cut(context, continuation, max_len)
    if not continuation:
      continue
    same_as[i] = seen.setdefault((context, continuation), i)
    if same_as[i] == i:
      if context not in groups:
        groups[context] = Unit(context)
      groups[context].add(i, continuation)
  return list(groups.values()), same_as


def split(groups: Sequence[Unit], capacity: int) -> list[Unit]:
  """Units of at most `capacity` slots: a group that fits as it is, else its
  continuations in order, a new unit (repeating the context) where the next
  would not fit."""
  units = []
  for group in groups:
    if group.length <= capacity:
      units.append(group)
      continue
    unit = Unit(group.context)
    for request, continuation in group.members:
      if unit.members and unit.length + unit.new_slots(continuation) > capacity:
        units.append(unit)
        unit = Unit(group.context)
      unit.add(request, continuation)
    units.append(unit)
  return units


def one_per_request(groups: Sequence[Unit]) -> list[Unit]:
  """The segment layout's units: one per request of `groups`, each repeating its context."""
  units = []
  for group in groups:
    for request, continuation in group.members:
      unit = Unit(group.context)
      unit.add(request, continuation)
      units.append(unit)
  return units


def plan(units: Sequence[Unit], batch_size: int, width: int) -> list[list[list[Unit]]]:
  """Batches of `batch_size` rows of at most `width` slots, holding every unit
  once: each row takes the longest unit left that fits, until none does."""
  queues: dict[int, collections.deque] = {}
  for unit in units:
    queues.setdefault(unit.length, collections.deque()).append(unit)
  lengths = sorted(queues)
  if lengths and lengths[-1] > width:
    raise ValueError(f"a unit of {lengths[-1]} slots is longer than the row, {width}")
  batches = []
  while lengths:
    rows: list[list[Unit]] = []
    for _ in range(batch_size):
      row, free = [], width
      while lengths:
        k = bisect.bisect_right(lengths, free) - 1
        if k < 0:
          break
        n = lengths[k]
        row.append(queues[n].popleft())
        if not queues[n]:
          del lengths[k], queues[n]
        free -= n
      rows.append(row)
    batches.append(rows)
  return batches


def scored_width(batches: Sequence[Sequence[Sequence[Unit]]], groups: int) -> int:
  """S: the most scored slots of any row group (`groups` equal runs of a
  batch's rows), rounded up to a multiple of SCORED_MULTIPLE."""
  most = 1
  for rows in batches:
    per_group = len(rows) // groups
    for g in range(groups):
      most = max(most, sum(u.scored for row in rows[g * per_group:(g + 1) * per_group] for u in row))
  return -(-most // SCORED_MULTIPLE) * SCORED_MULTIPLE


def candidate_widths(longest: int, max_len: int, smallest: int = 16) -> list[int]:
  """Row widths to try: 2^k and 3 * 2^(k-1) from `smallest` up, from the first
  that holds `longest` slots to the first that holds `max_len`."""
  out, w = [], smallest
  while not out or out[-1] < max_len:
    for width in (w, w * 3 // 2):
      if width >= longest and (not out or out[-1] < max_len):
        out.append(width)
    w *= 2
  return out


def longest_request(groups: Sequence[Unit]) -> int:
  """Slots of the longest request alone: its context and its input tokens."""
  return max((len(g.context) + len(x) - 1 for g in groups for _, x in g.members), default=1)


def candidates(groups, batch_size: int, row_groups: int, max_len: int, segments: bool = False):
  """(width, scored width, batches) for every `candidate_widths` width: `make_groups`'s
  groups in batches of `batch_size` rows, `row_groups` shards; the segment layout's
  units (`one_per_request`) when `segments`."""
  per_request = one_per_request(groups) if segments else None
  for width in candidate_widths(longest_request(groups), max_len):
    batches = plan(per_request if segments else split(groups, width), batch_size, width)
    yield width, scored_width(batches, row_groups), batches


def choose(groups, batch_size: int, row_groups: int, max_len: int, cost: Cost, segments: bool = False):
  """(width, scored width, batches) of least estimated cost among `candidates`."""
  best = None
  for width, s, batches in candidates(groups, batch_size, row_groups, max_len, segments):
    estimate = cost.of_plan(len(batches), batch_size, width, s * row_groups)
    if best is None or estimate < best[0]:
      best = (estimate, width, s, batches)
  return best[1:]


def _place_tree(tree: dict, at: int, depth: int, inputs, positions, until, slot_of: dict) -> int:
  """Writes `tree` depth first from column `at` of one row (1-D views); records
  each node's column under the id of its children's dict; returns the next free column."""
  for token, children in tree.items():
    slot_of[id(children)] = at
    inputs[at], positions[at] = token, depth
    end = _place_tree(children, at + 1, depth + 1, inputs, positions, until, slot_of)
    until[at] = end - 1
    at = end
  return at


def layout(rows: Sequence[Sequence[Unit]], width: int, groups: int, scored: int, segments: bool = False) -> Batch:
  """The device arrays of one planned batch: `rows` of units of at most
  `width` slots each, split into `groups` equal runs of rows that each have
  at most `scored` scored slots. With `segments` (units of one request each)
  the arrays hold `segment_ids` (B, W) int32 instead of `visible_until`."""
  b = len(rows)
  per_group = b // groups
  inputs, positions = np.zeros((b, width), np.int32), np.zeros((b, width), np.int32)
  until = np.tile(np.arange(width, dtype=np.int32), (b, 1))  # Padding: read by itself only.
  segment_ids = np.zeros((b, width), np.int32)
  sources, targets = np.zeros((groups, scored), np.int32), np.zeros((groups, scored), np.int32)
  owner = np.full((groups, scored), -1, np.int64)
  real, slot = 0, 0
  for r, row in enumerate(rows):
    g, local = divmod(r, per_group)
    if local == 0:
      slot = 0  # next free scored column of the group
    at = 0  # next free column of the row
    base = local * width  # the row's first slot in its group's flattened (rows x width) hidden states
    for k, unit in enumerate(row):
      if segments and len(unit.members) != 1:
        raise ValueError(f"the segment layout takes units of one request each, got {len(unit.members)}")
      segment_ids[r, at:at + unit.length] = k + 1
      c = len(unit.context)
      inputs[r, at:at + c] = unit.context
      positions[r, at:at + c] = np.arange(c)
      until[r, at:at + c] = at + unit.length - 1
      slot_of: dict[int, int] = {}
      end = _place_tree(unit.tree, at + c, c, inputs[r], positions[r], until[r], slot_of)
      for request, continuation in unit.members:
        n = len(continuation)
        sources[g, slot] = base + at + c - 1
        tree = unit.tree
        for j in range(1, n):  # target j is read off the node of input token j - 1
          tree = tree[continuation[j - 1]]
          sources[g, slot + j] = base + slot_of[id(tree)]
        targets[g, slot:slot + n] = continuation
        owner[g, slot:slot + n] = request
        slot += n
      at = end
    real += at
  arrays = {"inputs": inputs, "positions": positions, "sources": sources, "targets": targets}
  if segments:
    arrays["segment_ids"] = segment_ids
  else:
    arrays["visible_until"] = until
  return Batch(arrays, owner, real)


def attention_mask(visible_until):
  """(B, 1, W, W) bool: query t reads key s where s <= t <= visible_until[s].

  Args:
    visible_until: (B, W) integer array, as `Batch.arrays`.
  """
  w = visible_until.shape[1]
  slots = jnp.arange(w)
  causal = slots[None, :] <= slots[:, None]  # (W, W): [t, s]
  return (causal[None] & (slots[None, :, None] <= visible_until[:, None, :]))[:, None]


def totals(owners: Sequence[np.ndarray], logps: Sequence[np.ndarray], greedy: Sequence[np.ndarray],
           same_as: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per request: (sum of its scored log-probabilities in float64, whether each was the argmax).

  owners, logps, greedy: per batch, `Batch.owner` and the device's (G, S)
  log-probabilities and argmax hits. Requests with nothing to score
  (`same_as` -1) get (0.0, True).
  """
  count = len(same_as)
  owner = np.concatenate([np.ravel(o) for o in owners] + [np.zeros(0, np.int64)])
  used = owner >= 0
  logp = np.concatenate([np.ravel(x).astype(np.float64) for x in logps] + [np.zeros(0)])[used]
  hits = np.concatenate([np.ravel(x).astype(bool) for x in greedy] + [np.zeros(0, bool)])[used]
  sums = np.append(np.bincount(owner[used], weights=logp, minlength=count), 0.0)
  misses = np.append(np.bincount(owner[used], weights=~hits, minlength=count), 0.0)
  return sums[same_as], misses[same_as] == 0
