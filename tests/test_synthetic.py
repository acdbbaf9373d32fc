"""`synthetic:zipf`: the known language, its exact optimal loss, its tokenizer."""

import numpy as np
import pytest

from mile_jax.data import synthetic


def test_optimal_loss_hand_computed():
  """One successor per symbol: after a symbol the next token is its successor with
  probability 1 - stop or EOS with probability stop; after EOS, symbol k with q_k."""
  lang = synthetic.ZipfBigram(num_symbols=3, zipf_exponent=1.0, successors=1, stop_prob=0.25, seed=3)
  q = np.array([1.0, 1 / 2, 1 / 3]) / (1 + 1 / 2 + 1 / 3)
  np.testing.assert_allclose(lang.unigram(), q)
  table = lang.log_prob_table()
  successor = lang.transitions()[0][:, 0] + synthetic.NUM_SPECIAL  # token id of each symbol's successor
  eos = synthetic.EOS_ID
  first = 4 + 1
  inputs = np.array([eos, first, successor[1]])
  targets = np.array([first, successor[1], eos])
  expected = [-np.log(q[1]), -np.log(0.75), -np.log(0.25)]
  np.testing.assert_allclose(synthetic.optimal_losses(table, inputs, targets), expected, rtol=1e-12)
  # Every row that can occur is a distribution.
  np.testing.assert_allclose(np.exp(table).sum(axis=1), 1.0, rtol=1e-12)


def test_samples_follow_the_table():
  lang = synthetic.ZipfBigram(num_symbols=20, successors=4, stop_prob=0.05, seed=1)
  docs = lang.sample_documents(200_000, stream=0)
  stream = np.concatenate([np.append(d, synthetic.EOS_ID) for d in docs])
  table = np.exp(lang.log_prob_table())
  counts = np.zeros_like(table)
  np.add.at(counts, (stream[:-1], stream[1:]), 1.0)
  for prev in (synthetic.EOS_ID, 4, 5, 10):
    empirical = counts[prev] / counts[prev].sum()
    assert np.abs(empirical - table[prev]).max() < 0.03, prev
  assert np.all(table[stream[:-1], stream[1:]] > 0)  # no impossible transition was sampled
  assert all(len(d) > 0 and (d >= synthetic.NUM_SPECIAL).all() for d in docs)


def test_unigram_profile_is_zipfian():
  lang = synthetic.ZipfBigram(seed=0)
  stream = np.concatenate(lang.sample_documents(300_000, stream=0))
  counts = np.sort(np.bincount(stream))[::-1]
  share = np.cumsum(counts) / counts.sum()
  ids_for_80 = np.searchsorted(share, 0.8) + 1
  assert ids_for_80 < 0.3 * lang.num_symbols  # a head of frequent ids...
  assert (counts[counts > 0] <= 5).sum() > 20  # ...and a tail of rare ones


def test_streams_differ_and_repeat():
  lang = synthetic.ZipfBigram(num_symbols=50, seed=2)
  a, b = lang.sample_documents(5_000, 0), lang.sample_documents(5_000, 0)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  c = lang.sample_documents(5_000, 1)
  assert not np.array_equal(np.concatenate(a)[:100], np.concatenate(c)[:100])


def test_symbol_tokenizer_ids(tmp_path):
  tok = synthetic.symbol_tokenizer(24, str(tmp_path))
  assert tok.vocab_size == 24 and tok.eos_id == synthetic.EOS_ID
  assert tok.encode("s0 s17 s19") == [4, 21, 23]
  assert tok.decode([4, 21]) == "s0 s17"


def test_make_data_synthetic(tiny_config, tmp_path):
  from mile_jax.data import make_data  # pylint: disable=import-outside-toplevel
  config = tiny_config(**{"data.source": "synthetic:zipf", "data.synthetic_train_tokens": 20_000,
                          "data.synthetic_val_tokens": 5_000, "data.cache_dir": str(tmp_path)})
  data = make_data(config.data, config.model.vocab_size, config.data.seq_len, config.seed)
  batch = data.train.batch(0, 8)
  assert batch["inputs"].shape == (8, 32) and batch["inputs"].max() < 512
  table = synthetic.language(config.data, 512).log_prob_table()
  assert np.isfinite(synthetic.optimal_losses(table, batch["inputs"], batch["targets"])).all()
  with pytest.raises(ValueError, match="model.vocab_size"):
    synthetic.language(config.data, 5)
