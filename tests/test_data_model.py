"""Segment ids and positions from the packer, checked through the model and the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mile_jax import train_lib
from mile_jax.core import model as model_lib
from mile_jax.core import sharding
from mile_jax.core import step as step_lib
from mile_jax.data.packing import PackedDataset

EOS = 3


@pytest.fixture(scope="module")
def model_and_params():
  cfg = model_lib.DecoderConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                                max_seq_len=64, init_std=0.2)
  model = model_lib.Decoder(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32), jnp.int32))["params"]
  return params, jax.jit(lambda p, x, pos, seg: model.apply({"params": p}, x, positions=pos, segment_ids=seg))


def test_segment_ids_stop_attention_across_documents(model_and_params):
  """Each document's logits inside a packed row equal those of the document run alone."""
  params, apply = model_and_params
  rng = np.random.default_rng(0)
  docs = [rng.integers(4, 512, size=n) for n in rng.integers(3, 20, size=30)]
  ds = PackedDataset(docs, 32, EOS, seed=0, segment_documents=True)
  batch = ds.batch(1, 4)
  full = np.asarray(apply(params, batch["inputs"], batch["positions"], batch["segment_ids"]))
  unsegmented = np.asarray(apply(params, batch["inputs"], None, None))
  checked = crossed = 0
  for r in range(4):
    for seg in np.unique(batch["segment_ids"][r]):
      cols = np.nonzero(batch["segment_ids"][r] == seg)[0]
      # Run alone, padded at the end to the row length (causal: padding after it changes nothing).
      alone_tokens = np.zeros((1, 32), np.int32)
      alone_tokens[0, :len(cols)] = batch["inputs"][r, cols]
      alone = np.asarray(apply(params, alone_tokens, None, None))[0, :len(cols)]
      np.testing.assert_allclose(full[r, cols], alone, atol=2e-5, rtol=2e-5)
      checked += 1
      if cols[0] > 0:  # a later document: without segment ids it sees the ones before it
        crossed += not np.allclose(unsegmented[r, cols], alone, atol=2e-5, rtol=2e-5)
  assert checked > 8 and crossed > 4


@pytest.mark.slow
def test_trainer_feeds_segments_to_the_train_step(tiny_config, tmp_path):
  trainer = train_lib.Trainer(tiny_config(**{"data.segment_documents": True}), str(tmp_path))
  data = trainer.load_data()
  # A step whose rows hold several documents (built-in documents are long).
  step = next(s for s in range(1000) if data.train.batch(s, 8)["segment_ids"].max() > 1)
  local = trainer.local_batch(data.train, step)
  assert sorted(local) == ["inputs", "mask", "positions", "segment_ids", "targets"]
  # Documents end with EOS: a segment starts at the row start and after each EOS input, and
  # positions count from each segment's start.
  eos = data.tokenizer.eos_id
  for inputs, segments, positions in zip(local["inputs"], local["segment_ids"], local["positions"]):
    starts = np.concatenate([[True], inputs[:-1] == eos])
    np.testing.assert_array_equal(segments, np.cumsum(starts))
    np.testing.assert_array_equal(positions, np.arange(32) - np.maximum.accumulate(np.where(starts, np.arange(32), 0)))
  assert local["segment_ids"].max() > 1
  ce, state = {}, trainer.initial_state()
  for segment in (False, True):
    batch = local if segment else {k: local[k] for k in ("inputs", "targets", "mask")}
    fresh = jax.tree.map(jnp.copy, state)  # the step donates its state
    _, metrics = trainer.train_step(fresh, sharding.make_global_batch(batch, trainer.mesh))
    ce[segment] = step_lib.host_metrics(metrics)["ce"]
  # Same tokens and parameters: only the attention pattern (and positions) differ.
  assert ce[True] != pytest.approx(ce[False], rel=1e-6)
  assert abs(ce[True] - ce[False]) < 0.05
