"""Packing: every token once per epoch, shifts, masks, segment ids, determinism, process shares,
and the keyed row permutation against a plain-Python Feistel network."""

import collections

import numpy as np
import pytest

from mile_jax.config_lib import ConfigError
from mile_jax.data.packing import PackedDataset
from mile_jax.data.permutation import KeyedPermutation

EOS, BOS = 0, 99999  # BOS far outside the document ids, so it is never confused with one


def tiny_docs():
  """Documents whose tokens are all distinct, so every token is traceable."""
  lengths = [3, 7, 1, 12, 5, 9, 2, 6, 4, 8, 11, 3]
  return np.split(np.arange(1, 1 + sum(lengths), dtype=np.int32), np.cumsum(lengths)[:-1])


def reference_permutation(n, key):
  """permutation.py's module docstring in Python ints: a 6-round Feistel network on the
  smallest even bit width holding n, SplitMix64 round functions, cycle-walking."""
  keys = [int(k) for k in np.random.SeedSequence(list(key)).generate_state(6, np.uint64)]
  half = max(1, ((n - 1).bit_length() + 1) // 2)
  mask = (1 << half) - 1

  def mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)

  def feistel(x):
    left, right = x >> half, x & mask
    for k in keys:
      left, right = right, left ^ (mix(right ^ k) & mask)
    return (left << half) | right

  out = []
  for i in range(n):
    y = feistel(i)
    while y >= n:
      y = feistel(y)
    out.append(y)
  return np.array(out, dtype=np.int64)


def reference_epoch(docs, order, bos, eos):
  """The documents in `order` laid end to end with plain lists: (tokens, document of each token, offset in it)."""
  tokens, owner, offset = [], [], []
  for d in order:
    doc = ([bos] if bos is not None else []) + list(docs[d]) + ([eos] if eos is not None else [])
    tokens += doc
    owner += [d] * len(doc)
    offset += list(range(len(doc)))
  return np.array(tokens), np.array(owner), np.array(offset)


def reference_rows(docs, seq_len, bos, eos, seed, epoch, shuffle=True):
  """Epoch `epoch`'s rows: (tokens, document of each token), [rows_per_epoch, seq_len + 1] each,
  cut from the documents in storage order and read in the order of the keyed permutation."""
  tokens, owner, _ = reference_epoch(docs, range(len(docs)), bos, eos)
  rows = len(tokens) // (seq_len + 1)
  order = reference_permutation(rows, (seed, 0, epoch)) if shuffle else np.arange(rows)
  cut = lambda a: a[: rows * (seq_len + 1)].reshape(rows, seq_len + 1)[order]  # noqa: E731
  return cut(tokens), cut(owner)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16, 17, 100, 1000])
def test_keyed_permutation_is_a_bijection_matching_the_reference(n):
  perm = KeyedPermutation(n, (3, 1, 4))
  images = perm(np.arange(n))
  np.testing.assert_array_equal(np.sort(images), np.arange(n))
  np.testing.assert_array_equal(images, reference_permutation(n, (3, 1, 4)))
  np.testing.assert_array_equal(perm.inverse(images), np.arange(n))
  np.testing.assert_array_equal(perm(np.array([[n - 1, 0]])), images[[[n - 1, 0]]])  # shape kept


def test_keyed_permutation_images_are_uniform_over_keys():
  """Chi-square of the image of 0 over 2000 keys, n = 97 (walks out of 256): with 96 degrees of
  freedom the statistic has mean 96 and sd 13.9; 170 has probability about 1e-6 under uniformity."""
  n, trials = 97, 2000
  seen = np.bincount([int(KeyedPermutation(n, (key,))(np.zeros(1, np.int64))[0]) for key in range(trials)],
                     minlength=n)
  expected = trials / n
  assert ((seen - expected) ** 2 / expected).sum() < 170


@pytest.mark.parametrize("shuffle,bos,eos", [(False, None, EOS), (True, None, EOS), (True, BOS, EOS),
                                             (True, BOS, None), (True, None, None)])
def test_epoch_covers_documents_exactly(shuffle, bos, eos):
  docs, seq_len, seed = tiny_docs(), 6, 3
  ds = PackedDataset(docs, seq_len, eos, seed, shuffle=shuffle, bos_id=bos)
  total = sum(len(d) for d in docs) + len(docs) * ((bos is not None) + (eos is not None))
  assert ds.rows_per_epoch == total // (seq_len + 1)
  epochs = [reference_rows(docs, seq_len, bos, eos, seed, e, shuffle)[0] for e in range(2)]
  if shuffle:
    assert not np.array_equal(*epochs)  # so epoch 1 is checked against a new order
  stream = reference_epoch(docs, range(len(docs)), bos, eos)[0]
  kept = ds.rows_per_epoch * (seq_len + 1)
  for epoch, want in enumerate(epochs):
    first = epoch * ds.rows_per_epoch
    rows = ds.rows(np.arange(first, first + ds.rows_per_epoch))
    assert rows.dtype == np.int32 and rows.shape == (ds.rows_per_epoch, seq_len + 1)
    np.testing.assert_array_equal(rows, want)
    tail = stream[kept:]
    assert len(tail) == total % (seq_len + 1)
    everything = collections.Counter(np.concatenate(docs).tolist())
    for special in (bos, eos):
      if special is not None:
        everything[special] += len(docs)
    covered = collections.Counter(rows.ravel().tolist()) + collections.Counter(tail.tolist())
    assert covered == everything


@pytest.mark.parametrize("bos,eos", [(None, None), (None, EOS), (BOS, EOS)])
def test_empty_documents_and_rows_spanning_many_documents(bos, eos):
  lengths = [0, 3, 0, 0, 1, 1, 0, 9, 2, 0, 1, 1, 1, 0, 5]
  docs = np.split(np.arange(1, 1 + sum(lengths), dtype=np.int32), np.cumsum(lengths)[:-1])
  ds = PackedDataset(docs, 6, eos, seed=2, bos_id=bos)
  for epoch in range(2):
    first = epoch * ds.rows_per_epoch
    np.testing.assert_array_equal(ds.rows(np.arange(first, first + ds.rows_per_epoch)),
                                  reference_rows(docs, 6, bos, eos, 2, epoch)[0])


@pytest.mark.parametrize("bos", [None, BOS])
def test_batches_match_reference_with_segments(bos):
  """inputs/targets/mask/segment_ids/positions against a per-token reference walk,
  over steps that straddle epoch boundaries."""
  docs, seq_len, seed, batch = tiny_docs(), 5, 4, 4
  ds = PackedDataset(docs, seq_len, EOS, seed, bos_id=bos, segment_documents=True)
  assert ds.rows_per_epoch % batch != 0
  epochs = [reference_rows(docs, seq_len, bos, EOS, seed, e) for e in range(4)]
  # Global rows of the first epochs.
  tokens = np.concatenate([e[0] for e in epochs])
  owner = np.concatenate([e[1] for e in epochs])
  for step in range(3 * ds.rows_per_epoch // batch):
    got = ds.batch(step, batch)
    rows = slice(step * batch, (step + 1) * batch)
    np.testing.assert_array_equal(got["inputs"], tokens[rows, :-1])
    np.testing.assert_array_equal(got["targets"], tokens[rows, 1:])
    np.testing.assert_array_equal(got["mask"], (tokens[rows, 1:] != BOS).astype(np.float32))
    for r, row_owner in enumerate(owner[rows]):
      seg, pos = [1], [0]
      for j in range(1, seq_len):
        new = row_owner[j] != row_owner[j - 1]
        seg.append(seg[-1] + new)
        pos.append(0 if new else pos[-1] + 1)
      np.testing.assert_array_equal(got["segment_ids"][r], seg)
      np.testing.assert_array_equal(got["positions"][r], pos)
    assert {k: v.dtype for k, v in got.items()} == {
        "inputs": np.int32, "targets": np.int32, "mask": np.float32, "segment_ids": np.int32,
        "positions": np.int32}


def test_no_segments_by_default_and_mask_ones_without_bos():
  b = PackedDataset(tiny_docs(), 4, EOS, seed=0).batch(2, 3)
  assert sorted(b) == ["inputs", "mask", "targets"]
  assert (b["mask"] == 1).all() and b["mask"].shape == (3, 4)
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])


def test_batches_are_a_function_of_seed_and_step():
  a = PackedDataset(tiny_docs(), 4, EOS, seed=7)
  b = PackedDataset(tiny_docs(), 4, EOS, seed=7)
  c = PackedDataset(tiny_docs(), 4, EOS, seed=8)
  inputs = lambda ds, step: ds.batch(step, 4)["inputs"]  # noqa: E731
  # b is asked out of order, so its epoch cache holds something else each time.
  for step in [5, 0, 11, 3, 17, 1]:
    for key in ("inputs", "targets", "mask"):
      np.testing.assert_array_equal(a.batch(step, 4)[key], b.batch(step, 4)[key])
  assert any(not np.array_equal(inputs(a, s), inputs(c, s)) for s in range(3))


@pytest.mark.parametrize("segment", [False, True])
def test_process_shares_concatenate_to_global_batch(segment):
  ds = PackedDataset(tiny_docs(), 4, EOS, seed=1, bos_id=BOS, segment_documents=segment)
  global_batch = 6
  # Steps 0..5 include batches that straddle an epoch boundary.
  assert ds.rows_per_epoch % global_batch != 0
  for step in range(6):
    fresh = PackedDataset(tiny_docs(), 4, EOS, seed=1, bos_id=BOS, segment_documents=segment)
    whole = fresh.batch(step, global_batch)
    shares = [ds.batch(step, global_batch, p, 2) for p in (1, 0)][::-1]
    for key in whole:
      assert shares[0][key].shape[0] == 3
      np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), whole[key])


def test_token_counts_and_state():
  docs = tiny_docs()
  ds = PackedDataset(docs, 4, EOS, seed=0, bos_id=5000)
  expected = np.zeros(6000, dtype=np.int64)
  for d in docs:
    for t in d:
      expected[t] += 1
  expected[EOS] += len(docs)
  expected[5000] += len(docs)
  np.testing.assert_array_equal(ds.token_counts(6000), expected)
  rows = ds.rows_per_epoch
  assert ds.state(rows, 3) == {"step": rows, "epoch": 3, "row": 0, "seed": 0}
  assert ds.state(1, 3)["row"] == 3


def test_batch_errors():
  ds = PackedDataset(tiny_docs(), 4, EOS, seed=0)
  with pytest.raises(ConfigError, match="data.global_batch_size=3"):
    ds.batch(0, 3, process_index=0, process_count=2)
  with pytest.raises(ConfigError, match="data.global_batch_size: .* fewer than one global batch"):
    ds.batch(0, ds.rows_per_epoch + 1)
  big = PackedDataset(tiny_docs(), 1000, EOS, seed=0)
  with pytest.raises(ConfigError, match="data.seq_len"):
    big.batch(0, 1)
