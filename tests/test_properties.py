"""Randomised properties of the trickiest code against simple references (hypothesis, derandomised):
packed log-likelihood requests against one plain forward pass per request, the layout's visibility
against each request's own prefix, the mixture schedule's windows and inverse, and the keyed
permutation's bijection. The hand-derived cases live in test_eval_packing.py, test_mixture.py and
test_data_packing.py; these are their randomised complement."""

import functools
import types

import jax
import numpy as np
from flax import linen as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conftest
from mile_jax.core import model as model_lib
from mile_jax.core import sharding
from mile_jax.data.mixture import UNITS, MixtureSchedule, apportion
from mile_jax.data.permutation import KeyedPermutation
from mile_jax.evaluation import lm as lm_lib
from mile_jax.evaluation import packed_requests as pr
from mile_jax.evaluation.model_on_mesh import ModelOnMesh


def _settings(examples: int):
  """A fixed number of examples drawn the same way on every run (no example database)."""
  return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- packed log-likelihood requests ---------------------------------------------------------------

MAX_LEN = 64  # the model's max_seq_len
ALPHABET = 8  # tokens 0..7: shared prefixes, duplicates and greedy continuations are common
MAX_REQUESTS = 16  # 4 documents of at most 4 choices
SCORED_PAD = 256  # the scored positions of any row group of the requests below (asserted)


@st.composite
def requests(draw, long_contexts: int = 80):
  """(context, continuation) token lists: 1-4 documents of 1-4 choices sharing their context; a choice
  may be new, a prefix or an extension of another, a duplicate, or empty; a context may be empty,
  longer than the model, or another document's; the first document may instead hold 1-2
  continuations longer than the model (as rolling log-likelihood windows)."""
  token = st.integers(0, ALPHABET - 1)
  tokens = lambda lo, hi: st.integers(lo, hi).flatmap(lambda n: st.lists(token, min_size=n, max_size=n))
  pairs, contexts = [], []
  for doc in range(draw(st.integers(1, 4))):
    if doc == 0 and draw(st.integers(0, 5)) == 0:
      context = draw(tokens(0, 3))
      pairs += [(context, draw(tokens(MAX_LEN - 4, MAX_LEN + 6))) for _ in range(draw(st.integers(1, 2)))]
      continue
    if contexts and draw(st.booleans()):
      context = draw(st.sampled_from(contexts))
    else:
      context = draw(tokens(0, draw(st.sampled_from([3, 12, long_contexts]))))
    contexts.append(context)
    choices: list[list[int]] = []
    for _ in range(draw(st.integers(1, 4))):
      how = draw(st.sampled_from(["new", "prefix", "extension", "duplicate", "empty"])) if choices else "new"
      if how == "new":
        choice = draw(tokens(1, 6))
      elif how == "empty":
        choice = []
      else:
        base = draw(st.sampled_from(choices))
        if how == "prefix":
          choice = base[:draw(st.integers(0, len(base)))]
        elif how == "extension":
          choice = base + draw(tokens(1, 3))
        else:
          choice = list(base)
      choices.append(choice)
    pairs += [(context, choice) for choice in choices]
  return pairs


@functools.lru_cache(maxsize=None)
def _tiny_model():
  """(ModelOnMesh of a random 2-layer decoder on one device, jitted reference log-softmax).

  Weights of std 0.1 make attention matter (a wrong mask moves the log-probabilities far beyond the
  tolerance); the unembedding of tokens >= ALPHABET is scaled down so that the argmax usually
  lies in the alphabet and some continuations are greedy.
  """
  config = conftest.make_tiny_config(**{"model.vocab_size": 256})
  cfg = model_lib.DecoderConfig.from_config(config.model)
  model = model_lib.Decoder(cfg)
  rng = np.random.default_rng(7)
  # The initializer's distributions (normal weights, unit norm scales) drawn on the host: no compile.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: np.ones(x.shape, np.float32) if "scale" in jax.tree_util.keystr(path)
      else (0.1 * rng.standard_normal(x.shape)).astype(np.float32), nn.unbox(model_lib.abstract_params(cfg)))
  params["lm_head"]["kernel"][:, ALPHABET:] *= 0.25
  params = jax.device_put(params, jax.devices()[0])
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  loaded = ModelOnMesh(config=config, model=model, params=params, mesh=mesh,
                       rules=sharding.rules_tuple(config.mesh.rules),
                       tokenizer=types.SimpleNamespace(bos_id=1, eos_id=2))

  @jax.jit
  def reference(params, tokens):  # (N, L) int32 -> (N, L, V) float32 log-softmax, one sequence per row
    return jax.nn.log_softmax(model.apply({"params": params}, tokens), axis=-1)

  return loaded, reference


def _pad_batch(batch, width: int, scored: int) -> dict[str, np.ndarray]:
  """A packed batch's arrays widened to (B, width) rows and (G, scored) sources, so that one
  compiled shape serves every call: extra slots are padding read only by themselves, and a
  source's slot in its group's flattened rows is re-indexed for the wider rows."""
  x = {k: np.asarray(v) for k, v in batch.items()}
  (b, w), (g, s) = x["inputs"].shape, x["sources"].shape
  out = {k: np.zeros((b, width), np.int32) for k in ("inputs", "positions")}
  for k in out:
    out[k][:, :w] = x[k]
  out["visible_until"] = np.tile(np.arange(width, dtype=np.int32), (b, 1))
  out["visible_until"][:, :w] = x["visible_until"]
  row, column = np.divmod(x["sources"], w)
  out["sources"], out["targets"] = np.zeros((g, scored), np.int32), np.zeros((g, scored), np.int32)
  out["sources"][:, :s] = row * width + column
  out["targets"][:, :s] = x["targets"]
  return out


def _language_model(row_groups: int, rows_per_group: int) -> lm_lib.LanguageModel:
  """A LanguageModel whose rows form `row_groups` groups of `rows_per_group` rows (the layout of as many
  data shards, on one device), its scorer compiled once for (B, MAX_LEN) rows and (G, SCORED_PAD) sources."""
  loaded, _ = _tiny_model()
  lm = lm_lib.LanguageModel(loaded, batch_size=row_groups * rows_per_group, progress=False)
  lm._row_groups = row_groups  # pylint: disable=protected-access
  compiled = lm._score  # pylint: disable=protected-access

  def score(params, batch):
    s = batch["sources"].shape[1]
    assert s <= SCORED_PAD
    logp, hits = compiled(params, _pad_batch(batch, MAX_LEN, SCORED_PAD))
    return logp[:, :s], hits[:, :s]

  lm._score = score  # pylint: disable=protected-access
  return lm


_LMS: dict[tuple[int, int], lm_lib.LanguageModel] = {}


def _reference(pairs):
  """Per request, one plain forward pass of its own tokens (cut to the model's length from the left):
  (sum of its continuation's float32 log-probabilities in float64, greedy flag, largest |logit - logsumexp|
  seen, smallest top-1 minus top-2 log-probability margin over its scored tokens)."""
  loaded, reference = _tiny_model()
  tokens = np.zeros((MAX_REQUESTS, MAX_LEN), np.int32)  # right padding: causal, so it changes nothing
  cuts = []
  for i, (context, continuation) in enumerate(pairs):
    seq = (list(context) + list(continuation))[-(MAX_LEN + 1):]
    scored = min(len(continuation), len(seq) - 1)
    tokens[i, :max(len(seq) - 1, 0)] = seq[:-1]
    cuts.append((seq, scored))
  with loaded.context():
    logp = np.asarray(reference(loaded.params, tokens))  # (N, L, V)
  out = []
  for i, (seq, scored) in enumerate(cuts):
    if scored <= 0:
      out.append((0.0, True, 0.0, np.inf))
      continue
    at = np.arange(len(seq) - 1 - scored, len(seq) - 1)  # the positions that predict the scored tokens
    rows, targets = logp[i, at], np.array(seq[len(seq) - scored:])
    top2 = np.sort(rows, axis=-1)[:, -2:]
    out.append((float(np.sum(rows[np.arange(scored), targets].astype(np.float64))),
                bool(np.all(np.argmax(rows, axis=-1) == targets)), float(np.max(np.abs(rows))),
                float(np.min(top2[:, 1] - top2[:, 0]))))
  return out


@_settings(60)
@given(pairs=requests(), row_groups=st.integers(1, 3), rows_per_group=st.integers(1, 2), narrow=st.booleans())
def test_packed_scores_match_one_forward_pass_per_request(pairs, row_groups, rows_per_group, narrow):
  shape = (row_groups, rows_per_group)
  if shape not in _LMS:
    _LMS[shape] = _language_model(*shape)
  lm = _LMS[shape]
  # A cost of attention alone makes the narrowest rows the cheapest: many batches, and groups split.
  lm._cost = pr.Cost(0.0, 1.0, 0.0) if narrow else pr.Cost.of(lm.loaded.model.cfg)  # pylint: disable=protected-access
  results = lm.loglikelihood_tokens(pairs)
  d_model = lm.loaded.model.cfg.d_model
  for (context, continuation), (logp, greedy), (want, want_greedy, largest, margin) in zip(
      pairs, results, _reference(pairs)):
    # Both sides form each log-probability from float32 dot products of up to d_ff = 2 d_model
    # terms through 2 layers and the unembedding; the packed pass differs only in its rounding
    # (other shapes, masked keys). Rounding a sum of n terms is about sqrt(n) 2^-24 relative to
    # its largest term; a factor 8 covers the layers and the softmax. The n scored tokens' errors
    # add up at most linearly.
    n = min(len(continuation), MAX_LEN)
    per_token = 8 * np.sqrt(2 * d_model) * 2.0 ** -24 * max(largest, 1.0)
    assert abs(logp - want) <= n * per_token, (context, continuation, logp, want)
    if margin > 2 * per_token:  # a near tie may flip the argmax within the rounding
      assert greedy == want_greedy, (context, continuation)
  for i, pair in enumerate(pairs):  # a request listed twice gets the very same number
    for j in range(i):
      if list(pairs[j][0]) == list(pair[0]) and list(pairs[j][1]) == list(pair[1]):
        assert results[i] == results[j]


@_settings(100)
@given(pairs=requests(long_contexts=40), max_len=st.integers(4, 48), rows_per_group=st.integers(1, 3),
       row_groups=st.integers(1, 3), weights=st.tuples(*[st.sampled_from([0.0, 1.0, 50.0])] * 3))
def test_packed_layout_shows_each_scored_token_exactly_its_prefix(pairs, max_len, rows_per_group, row_groups,
                                                                  weights):
  """Model-free: for every scored slot, the keys its source reads, as (position, token), are exactly
  the request's cut input tokens up to the predicted one, and its target is the next token; every
  distinct request's tokens are scored once, and duplicates point to the first copy."""
  groups, same_as = pr.make_groups(pairs, max_len)
  batch_size = rows_per_group * row_groups
  width, scored, batches = pr.choose(groups, batch_size, row_groups, max_len, pr.Cost(*weights))
  assert width >= 1 and scored % pr.SCORED_MULTIPLE == 0
  seen: dict[int, list[tuple[tuple, int]]] = {}
  for rows in batches:
    batch = pr.layout(rows, width, row_groups, scored)
    x = batch.arrays
    assert x["inputs"].shape == (batch_size, width) and x["sources"].shape == (row_groups, scored)
    mask = np.asarray(pr.attention_mask(x["visible_until"]))[:, 0]  # (B, W, W): [row, query, key]
    for g in range(row_groups):
      for s in np.flatnonzero(batch.owner[g] >= 0):
        row, column = divmod(int(x["sources"][g, s]), width)
        row += g * rows_per_group
        keys = np.flatnonzero(mask[row, column])
        prefix = sorted(zip(x["positions"][row, keys].tolist(), x["inputs"][row, keys].tolist()))
        seen.setdefault(int(batch.owner[g, s]), []).append((tuple(t for _, t in prefix), int(x["targets"][g, s])))
        assert [p for p, _ in prefix] == list(range(len(prefix)))  # one key per position, none missing
  for i, (context, continuation) in enumerate(pairs):
    seq = (list(context) + list(continuation))[-(max_len + 1):]
    k = min(len(continuation), len(seq) - 1)
    if k <= 0:
      assert same_as[i] == -1 and i not in seen
      continue
    first = next(j for j in range(i + 1) if
                 (list(pairs[j][0]) + list(pairs[j][1]))[-(max_len + 1):] == seq and
                 min(len(pairs[j][1]), len(seq) - 1) == k)
    assert same_as[i] == first
    if first != i:
      assert i not in seen
      continue
    want = [(tuple(seq[:t]), seq[t]) for t in range(len(seq) - k, len(seq))]
    assert sorted(seen[i]) == sorted(want), (context, continuation)


# --- the mixture schedule -------------------------------------------------------------------------

@st.composite
def mixture_weights(draw):
  """1-5 positive weights, within a factor 2**17 of each other, or one of them at the smallest
  share allowed (2**-20 of the total)."""
  weights = draw(st.lists(st.floats(1.0, 2.0 ** 17), min_size=1, max_size=5))
  if len(weights) > 1 and draw(st.booleans()):
    at = draw(st.integers(0, len(weights) - 1))
    weights[at] = (sum(weights) - weights[at]) / (UNITS - 1)  # share 1 / UNITS
  return weights


@_settings(150)
@given(weights=mixture_weights())
def test_apportioned_units_sum_to_the_total_and_round_each_share(weights):
  units = apportion(weights, UNITS)
  exact = np.array(weights, np.float64) / sum(weights) * UNITS
  assert units.sum() == UNITS and np.all(np.abs(units - exact) < 1) and np.all(units >= 1)


@_settings(150)
@given(weights=mixture_weights(), seed=st.integers(0, 2 ** 32), start=st.integers(0, 2 ** 50),
       n=st.integers(1, 4000))
def test_mixture_windows_hold_each_share_and_read_rows_in_order(weights, seed, start, n):
  """Any n consecutive rows hold n q_k / UNITS rows of component k within k + 1; they are its rows
  counts(start)[k], counts(start)[k] + 1, ... in order; any UNITS consecutive rows hold exactly q_k."""
  schedule = MixtureSchedule(weights, seed)
  k_all = len(weights)
  component, row = schedule.assign(np.arange(start, start + n, dtype=np.int64))
  got = np.bincount(component, minlength=k_all)
  assert np.all(np.abs(got - n * schedule.units / UNITS) < np.arange(1, k_all + 1)), got
  before = schedule.counts(start)
  np.testing.assert_array_equal(schedule.counts(start + n) - before, got)
  for k in range(k_all):
    np.testing.assert_array_equal(row[component == k], before[k] + np.arange(got[k]))
  np.testing.assert_array_equal(schedule.counts(start + UNITS) - before, schedule.units)


@_settings(100)
@given(weights=mixture_weights(), seed=st.integers(0, 2 ** 32), g=st.integers(0, 2 ** 50),
       k=st.integers(0, 4), j=st.integers(0, 2 ** 40))
def test_mixture_position_inverts_assign(weights, seed, g, k, j):
  schedule = MixtureSchedule(weights, seed)
  component, row = (int(x[0]) for x in schedule.assign(np.array([g])))
  assert schedule.position(component, row) == g
  k = k % len(weights)
  at = schedule.position(k, j)
  assert tuple(int(x[0]) for x in schedule.assign(np.array([at]))) == (k, j)
  assert schedule.counts(at)[k] == j  # the first row that reads it: j of its rows come before


# --- the keyed permutation ------------------------------------------------------------------------

keys = st.lists(st.integers(0, 2 ** 64 - 1), min_size=1, max_size=3)


@_settings(100)
@given(n=st.integers(1, 3000), key=keys)
def test_keyed_permutation_is_a_bijection_with_its_inverse(n, key):
  perm = KeyedPermutation(n, key)
  every = np.arange(n)
  images = perm(every)
  np.testing.assert_array_equal(np.sort(images), every)
  np.testing.assert_array_equal(perm.inverse(images), every)
  np.testing.assert_array_equal(perm(perm.inverse(every)), every)


@_settings(200)
@given(n=st.integers(1, 2 ** 62), key=keys, data=st.data())
def test_keyed_permutation_inverts_at_any_size(n, key, data):
  indices = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=64)
                               .map(lambda xs: xs + [0, n - 1])), np.int64)
  perm = KeyedPermutation(n, key)
  images = perm(indices)
  assert images.dtype == np.int64 and np.all((images >= 0) & (images < n))
  np.testing.assert_array_equal(perm.inverse(images), indices)
  np.testing.assert_array_equal(perm(perm.inverse(indices)), indices)
