"""Packed log-likelihood rows (evaluation/packed_requests.py) against hand-derived layouts."""

import numpy as np
import pytest

from mile_jax.evaluation import packed_requests as pr


def _unit(context, *members):
  unit = pr.Unit(tuple(context))
  for request, continuation in members:
    unit.add(request, tuple(continuation))
  return unit


def test_layout_of_a_shared_context_with_a_prefix_tree_by_hand():
  # Context 5 6 7 and four continuations: inputs (8,), (), (11, 12), (11, 14); 11 is shared.
  a = _unit([5, 6, 7], (0, [8, 9]), (1, [10]), (2, [11, 12, 13]), (3, [11, 14, 15]))
  b = _unit([20], (4, [21, 22]))
  assert (a.length, a.scored, b.length, b.scored) == (7, 9, 2, 2)
  batch = pr.layout([[a, b]], width=12, groups=1, scored=16)
  x = batch.arrays
  #                                   ctx      8  11 12 14 | 20 21 | padding
  np.testing.assert_array_equal(x["inputs"][0], [5, 6, 7, 8, 11, 12, 14, 20, 21, 0, 0, 0])
  np.testing.assert_array_equal(x["positions"][0], [0, 1, 2, 3, 3, 4, 4, 0, 1, 0, 0, 0])
  np.testing.assert_array_equal(x["visible_until"][0], [6, 6, 6, 3, 6, 5, 6, 8, 8, 9, 10, 11])
  pad = [0] * 5
  np.testing.assert_array_equal(x["sources"][0], [2, 3, 2, 2, 4, 5, 2, 4, 6, 7, 8] + pad)
  np.testing.assert_array_equal(x["targets"][0], [8, 9, 10, 11, 12, 13, 11, 14, 15, 21, 22] + pad)
  np.testing.assert_array_equal(batch.owner[0], [0, 0, 1, 2, 2, 2, 3, 3, 3, 4, 4] + [-1] * 5)
  assert batch.tokens == 9


def test_attention_mask_reads_ancestors_only():
  until = np.array([[6, 6, 6, 3, 6, 5, 6, 8, 8, 9, 10, 11]])  # the row above
  mask = np.asarray(pr.attention_mask(until))[0, 0]
  visible = {t: set(np.flatnonzero(mask[t])) for t in range(12)}
  assert visible[3] == {0, 1, 2, 3}
  assert visible[4] == {0, 1, 2, 4}  # not the sibling branch at 3
  assert visible[5] == {0, 1, 2, 4, 5}
  assert visible[6] == {0, 1, 2, 4, 6}  # the shared node 4, not its other child 5
  assert visible[7] == {7} and visible[8] == {7, 8}  # the next unit sees none of the first
  assert all(visible[t] == {t} for t in (9, 10, 11))  # padding


def test_row_groups_index_their_flattened_rows():
  a, b = _unit([1, 2], (0, [3, 4])), _unit([5], (1, [6, 7]))
  one = pr.layout([[a], [b]], width=4, groups=1, scored=8)
  np.testing.assert_array_equal(one.arrays["sources"][0, :4], [1, 2, 4, 5])  # row 1 starts at slot 4
  two = pr.layout([[a], [b]], width=4, groups=2, scored=8)
  np.testing.assert_array_equal(two.arrays["sources"][:, :2], [[1, 2], [0, 1]])
  np.testing.assert_array_equal(two.owner[:, :3], [[0, 0, -1], [1, 1, -1]])


def test_requests_are_cut_grouped_and_deduplicated():
  pairs = [((1, 2, 3), (4,)), ((1, 2, 3), (5, 6)),
           ((1, 2, 3), (5, 6, 7)),  # 6 tokens > max_len + 1 = 5: loses token 1, context (2, 3)
           ((1, 2, 3), (4,)),  # a duplicate of request 0
           ((9,), ()),  # nothing to score
           ((), (7, 8)),  # no context: the first token is context
           ((1,), (1, 2, 3, 4, 5, 6, 7))]  # scored: the last 4 tokens
  groups, same_as = pr.make_groups(pairs, max_len=4)
  np.testing.assert_array_equal(same_as, [0, 1, 2, 0, -1, 5, 6])
  assert {g.context: g.members for g in groups} == {
      (1, 2, 3): [(0, (4,)), (1, (5, 6))], (2, 3): [(2, (5, 6, 7))], (7,): [(5, (8,))], (3,): [(6, (4, 5, 6, 7))]}


def test_a_group_longer_than_the_row_is_split_between_continuations():
  group = _unit([1, 2], (0, [3, 4, 5]), (1, [6, 7, 8]), (2, [3, 4, 9]))  # (3, 4) shared: 2 + 4 slots
  assert group.length == 6
  assert pr.split([group], 6) == [group]
  units = pr.split([group], 5)
  assert [(u.context, [m[0] for m in u.members], u.length) for u in units] == [
      ((1, 2), [0], 4), ((1, 2), [1], 4), ((1, 2), [2], 4)]


def test_plan_places_every_unit_once_within_the_width():
  rng = np.random.default_rng(0)
  units = [_unit([1] * int(n), (i, [2])) for i, n in enumerate(rng.integers(1, 20, 60))]
  batches = pr.plan(units, batch_size=3, width=24)
  placed = [u for rows in batches for row in rows for u in row]
  assert sorted(id(u) for u in placed) == sorted(id(u) for u in units)
  assert all(len(rows) == 3 and all(sum(u.length for u in row) <= 24 for row in rows) for rows in batches)
  # Greedy: no unit placed in a later batch would have fitted the free space of an earlier row.
  for k, rows in enumerate(batches):
    later = min((u.length for r in batches[k + 1:] for row in r for u in row), default=99)
    assert all(24 - sum(u.length for u in row) < later for row in rows)
  with pytest.raises(ValueError, match="longer than the row"):
    pr.plan(units, 3, 10)


def test_candidate_widths_and_scored_width():
  assert pr.candidate_widths(50, 256) == [64, 96, 128, 192, 256]
  assert pr.candidate_widths(10, 64) == [16, 24, 32, 48, 64]
  assert pr.candidate_widths(100, 200) == [128, 192, 256]
  rows = [[_unit([1], (0, [2] * 8))], [_unit([1], (1, [2] * 3)), _unit([3], (2, [2] * 4))]]
  assert pr.scored_width([rows], groups=1) == 16  # 15 scored, up to a multiple of 8
  assert pr.scored_width([rows], groups=2) == 8  # 8 and 7


def test_totals_sum_per_request_and_copy_duplicates():
  owners = [np.array([[0, 0, 1, -1]]), np.array([[1, -1, -1, -1]])]
  logps = [np.array([[-1.0, -2.0, -0.5, -9.0]], np.float32), np.array([[-0.25, -9, -9, -9]], np.float32)]
  hits = [np.array([[True, False, True, True]]), np.array([[True, False, False, False]])]
  sums, greedy = pr.totals(owners, logps, hits, np.array([0, 1, 0, -1]))
  np.testing.assert_array_equal(sums, [-3.0, -0.75, -3.0, 0.0])
  np.testing.assert_array_equal(greedy, [False, True, False, True])
