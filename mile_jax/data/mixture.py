"""Weighted mixtures of sources: ``data.source="mix:[name=]source@weight,..."``.

Syntax: ``mix:`` then comma-separated components, each a source of
``corpus.py`` (``builtin:pydocs``, ``files:<glob>``, ``tfds:<name>``) followed
by ``@`` and a positive weight, optionally preceded by ``name=``, e.g.
``mix:builtin:pydocs@0.7,web=files:/data/web/*.txt@0.3``. Weights are
relative (normalised by their sum). The weight is what follows the last
``@``, so a glob may hold ``@`` but not ``,``. A component's name labels its
logs (``eval/<name>/ce``); without ``name=`` it is the source without its
kind, each run of other characters than letters, digits, ``_ . -`` replaced by
``_`` (``builtin:pydocs`` -> ``pydocs``).

Each global row comes from one component, by a fixed schedule rather than a
random draw. The weights are rounded to integer units ``q_k`` of
``UNITS = 2**20`` (``apportion``; a weight below 2**-20 of the total is
refused). Component 0 takes rows of the global row stream by a Beatty
sequence: among the first ``r`` rows,

    before_0(r) = floor((r * q_0 + phi_0) / D_0),   D_0 = UNITS,

are component 0's: row ``r`` is one if ``before_0(r + 1) > before_0(r)``, and
reads component 0's row ``before_0(r)``. The other rows, renumbered ``r - before_0(r)``, form
the stream of level 1, split the same way between component 1
(``q_1 / D_1``, ``D_1 = D_0 - q_0``) and the rest, and so on; the last
component takes what is left. The phases ``phi_i`` in ``[0, D_i)`` come from
the seed. So:

- the component and the component row of a global row take O(K) integer
  operations on ``(seed, g)`` alone: batch ``s`` is a pure function of
  ``(seed, s)``; shares per process and exact resume work as for one source;
- component k reads its rows ``0, 1, 2, ...`` in order, each once, and its
  own ``PackedDataset`` (key ``(seed, k + 1, epoch)``) maps them to its
  epochs: each component keeps its own epochs;
- any ``n`` consecutive rows hold ``n * q_k / UNITS`` rows of component k
  within ``k + 1`` (a Beatty sequence's count in a window is within one of
  its share, and each level adds at most one row to the error of the
  stream it passes on): the
  proportions hold in every batch, not only on average, and each ``UNITS``
  rows hold exactly ``q_k``.

Validation is the same mixture over the components' validation splits (in
order, not shuffled), and each component's validation split on its own.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from mile_jax.data import corpus as corpus_lib
from mile_jax.data.packing import PackedDataset
from mile_jax.errors import ConfigError

PREFIX = "mix:"
UNITS = 1 << 20  # weights are rounded to multiples of 1 / UNITS of their sum
_SCHEDULE_STREAM = 0x6D6978  # "mix": the phases' key differs from the components' (seed, k + 1, epoch)
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SYNTAX = "write mix:[name=]source@weight,... e.g. mix:builtin:pydocs@0.7,web=files:/data/web/*.txt@0.3"


@dataclasses.dataclass(frozen=True)
class Component:
  name: str  # labels its logs
  source: str  # a source of corpus.py
  weight: float  # relative: normalised by the sum over components


def is_mixture(source: str) -> bool:
  return source.startswith(PREFIX)


def _fail(message: str):
  raise ConfigError(f"data.source: {message}")


def _default_name(source: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", source.split(":", 1)[1]).strip("_")


def _component(part: str) -> Component:
  if "@" not in part:
    _fail(f"mixture component {part!r} has no weight; {_SYNTAX}")
  spec, text = part.rsplit("@", 1)
  name, source = "", spec.strip()
  if "=" in source.split(":", 1)[0]:
    name, source = (x.strip() for x in source.split("=", 1))
    if not _NAME.fullmatch(name):
      _fail(f"mixture component name {name!r} may hold only letters, digits, '_', '.' and '-'")
  if is_mixture(source) or source in corpus_lib.GENERATED:
    _fail(f"mixture component {source!r} cannot be mixed; mix builtin:pydocs, files:<glob> or tfds:<name>")
  try:
    corpus_lib.check_source(source)
  except ConfigError:
    _fail(f"mixture component {source!r} is not a source; use builtin:pydocs, files:<glob> or "
          f"tfds:<name>[/<config>]; {_SYNTAX}")
  try:
    weight = float(text)
  except ValueError:
    _fail(f"the weight {text.strip()!r} of mixture component {source!r} is not a number; {_SYNTAX}")
  if not math.isfinite(weight) or weight <= 0:
    _fail(f"the weight of mixture component {source!r} must be a positive finite number, got {text.strip()}")
  return Component(name or _default_name(source) or "component", source, weight)


def parse(source: str) -> list[Component]:
  """The components of a ``mix:`` source; raises ConfigError naming data.source."""
  parts = source[len(PREFIX):].split(",")
  if not source[len(PREFIX):].strip() or any(not p.strip() for p in parts):
    _fail(f"{source!r} has an empty component; {_SYNTAX}")
  components = [_component(p) for p in parts]
  for attr in ("source", "name"):
    seen = [getattr(c, attr) for c in components]
    twice = sorted({x for x in seen if seen.count(x) > 1})
    if twice:
      _fail(f"mixture component {attr} {twice[0]!r} appears twice"
            + ("; tell them apart with name=source@weight" if attr == "name" else ""))
  total = sum(c.weight for c in components)
  if not math.isfinite(total):
    _fail(f"the mixture weights ({', '.join(f'{c.weight:g}' for c in components)}) add up to more than the "
          "largest float; scale them down (only their ratios matter)")
  for c in components:
    if c.weight / total < 1.0 / UNITS:
      _fail(f"mixture component {c.name!r} has weight {c.weight:g} of a total {total:g}, below 2**-20 of it; "
            "raise it or leave the component out")
  return components


def components(source: str) -> list[Component]:
  """The components of ``source``: those of a mixture, or the source itself with weight 1."""
  if is_mixture(source):
    return parse(source)
  corpus_lib.check_source(source)
  return [Component(_default_name(source) or "component", source, 1.0)]


def check_source(source: str) -> None:
  """Raises ConfigError unless ``source`` is a source or a well-formed mixture of sources."""
  components(source)


def apportion(weights: Sequence[float], total: int) -> np.ndarray:
  """Integers proportional to ``weights`` summing to ``total``: the floors of
  the exact shares, the rest to the largest remainders (ties to the earlier): int64 [K]."""
  exact = np.asarray(weights, dtype=np.float64) / np.sum(weights) * total
  out = np.floor(exact).astype(np.int64)
  out[np.argsort(out - exact, kind="stable")[:total - int(out.sum())]] += 1
  return out


def tokenizer_corpus(corpora: Sequence[corpus_lib.Corpus], weights: Sequence[float],
                     limit: int) -> corpus_lib.Corpus:
  """The corpus the shared tokenizer learns from (its train texts; no validation).

  One source's own corpus; for a mixture, the first ``n_k`` train documents
  of component k, ``n = apportion(weights, limit)``: the components in
  proportion to their weights, by documents, ``limit`` in all (fewer where a
  component has fewer).
  """
  if len(corpora) == 1:
    return corpora[0]
  texts, keys = [], []
  for corpus, quota in zip(corpora, apportion(weights, limit)):
    part = list(itertools.islice(iter(corpus.train), int(quota)))
    texts += part
    keys.append(f"{corpus.train_key}|first{len(part)}")
  return corpus_lib.Corpus(train=texts, validation=[], train_key="mix|" + "|".join(keys), validation_key="")


class MixtureSchedule:
  """Which component, and which of its rows, each global row reads (see the module docstring).

  Args:
    weights: float [K], positive, each at least 2**-20 of their sum.
    seed: draws the phases.
  """

  def __init__(self, weights: Sequence[float], seed: int):
    units = apportion(weights, UNITS)
    self.units = units  # int64 [K]: rows of each component in every UNITS rows
    self.levels = UNITS - np.concatenate([[0], np.cumsum(units)[:-1]])  # int64 [K]: D_i
    entropy = np.random.SeedSequence([seed, _SCHEDULE_STREAM]).generate_state(len(units), np.uint64)
    self.phases = (entropy % self.levels.astype(np.uint64)).astype(np.int64)  # int64 [K]: phi_i in [0, D_i)

  def _before(self, i: int, r: np.ndarray) -> np.ndarray:
    """Component i's rows among the first ``r`` of level i's stream; exact in int64 for any r < 2**63."""
    d, q = self.levels[i], self.units[i]
    return (r // d) * q + ((r % d) * q + self.phases[i]) // d

  def assign(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(component int64 [n], row of that component int64 [n]) of global rows int64 [n]."""
    r = np.array(rows, dtype=np.int64).reshape(-1)
    component = np.full(r.shape, len(self.units) - 1, dtype=np.int64)
    row = r.copy()
    todo = np.arange(len(r))  # rows not yet assigned, and their index in the level's stream
    for i in range(len(self.units) - 1):
      before = self._before(i, r[todo])
      mine = self._before(i, r[todo] + 1) > before
      component[todo[mine]], row[todo[mine]] = i, before[mine]
      r[todo] -= before  # the others' index in the next level's stream
      todo = todo[~mine]
    row[todo] = r[todo]
    return component, row

  def counts(self, rows: int) -> np.ndarray:
    """Rows of each component among global rows ``[0, rows)``: int64 [K]."""
    out, r = np.zeros(len(self.units), dtype=np.int64), np.array([rows], dtype=np.int64)
    for i in range(len(self.units) - 1):
      out[i] = self._before(i, r)[0]
      r = r - out[i]
    out[-1] = r[0]
    return out

  def position(self, component: int, row: int) -> int:
    """The global row at which ``component`` reads its row ``row``: the
    smallest g with ``counts(g + 1)[component] > row`` (a binary search)."""
    # Every UNITS rows hold exactly units[component]: g = high satisfies the condition.
    low, high = 0, -(-(row + 1) // int(self.units[component])) * UNITS - 1
    while low < high:
      mid = (low + high) // 2
      if self.counts(mid + 1)[component] > row:
        high = mid
      else:
        low = mid + 1
    return low


class MixedDataset:
  """Rows of several ``PackedDataset`` s drawn by a ``MixtureSchedule``, with
  the interface of ``PackedDataset`` that training and evaluation use.

  Args:
    components: name -> dataset, in the mixture's order; all with the same
      ``seq_len``, ``bos_id`` and ``segment_documents``.
    weights: float [K], relative.
    seed: keys the schedule.
  """

  def __init__(self, components: Mapping[str, PackedDataset], weights: Sequence[float], seed: int):
    self.components = dict(components)
    self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)  # [K], normalised
    self.schedule = MixtureSchedule(weights, seed)
    first = next(iter(self.components.values()))
    for name, c in self.components.items():
      if (c.seq_len, c.bos_id, c.segment_documents) != (first.seq_len, first.bos_id, first.segment_documents):
        raise ValueError(f"mixture component {name!r} is packed differently from the first")
    self.seq_len, self.row_len, self.bos_id = first.seq_len, first.row_len, first.bos_id
    self.segment_documents = first.segment_documents
    self.seed = seed
    self.num_documents = sum(c.num_documents for c in self.components.values())
    self.num_tokens = sum(c.num_tokens for c in self.components.values())
    # Rows before any component's row is read a second time: one pass, as rows_per_epoch is for one source.
    self.rows_per_epoch = min(self.schedule.position(k, c.rows_per_epoch)
                              for k, c in enumerate(self.components.values()))

  def token_counts(self, vocab_size: int) -> np.ndarray:
    """Expected occurrences of each id, rounded up, in as many tokens as the
    components hold together, drawn from the mixture: int64 [vocab_size]."""
    counts = [c.token_counts(vocab_size).astype(np.float64) for c in self.components.values()]
    total = sum(c.sum() for c in counts)
    expected = sum(w * total * c / c.sum() for w, c in zip(self.weights, counts))
    return np.ceil(expected).astype(np.int64)

  def check_batch(self, global_batch_size: int, process_count: int = 1) -> None:
    """Raises ConfigError unless one global batch can be made and split.

    A component may hold fewer rows than a batch: its rows then repeat.
    """
    if global_batch_size < 1 or global_batch_size % process_count != 0:
      raise ConfigError(f"data.global_batch_size={global_batch_size} must be a positive multiple "
                        f"of the process count {process_count}")
    for name, c in self.components.items():
      if c.rows_per_epoch == 0:
        raise ConfigError(f"data.seq_len: mixture component {name!r} ({c.tokens_per_epoch} tokens) is shorter "
                          f"than one row of data.seq_len + 1 = {c.row_len} tokens")

  def rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Global rows by index: int32 [len(indices), seq_len + 1]."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    self.check_batch(1)
    component, row = self.schedule.assign(indices)
    out = np.empty((len(indices), self.row_len), dtype=np.int32)
    for k, c in enumerate(self.components.values()):
      sel = component == k
      out[sel] = c.rows(row[sel])
    return out

  def batch(self, step: int, global_batch_size: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's share of the global batch at ``step``, as ``PackedDataset.batch``."""
    self.check_batch(global_batch_size, process_count)
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    per_process = global_batch_size // process_count
    first = step * global_batch_size + process_index * per_process
    component, row = self.schedule.assign(np.arange(first, first + per_process, dtype=np.int64))
    out = {}
    for k, c in enumerate(self.components.values()):
      sel = np.nonzero(component == k)[0]
      if not sel.size:
        continue
      for key, value in c.batch_of_rows(row[sel]).items():
        if key not in out:
          out[key] = np.empty((per_process,) + value.shape[1:], dtype=value.dtype)
        out[key][sel] = value
    return out
