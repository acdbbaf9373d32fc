"""The size of the train step's program: each layer's computation traced once,
whatever the number of micro-batches (counted in the lowered StableHLO)."""

import pytest

from conftest import make_tiny_config
from mile_jax import plan
from mile_jax import train_lib


def _dot_generals(microbatches: int, tmp_path, **overrides) -> int:
  config = make_tiny_config(**{"train.microbatches": microbatches, **overrides})
  trainer = train_lib.Trainer(config, str(tmp_path / f"mb{microbatches}"))
  text = trainer.lower_train_step(plan.abstract_batch(config)).as_text()
  return text.count("stablehlo.dot_general")


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_microbatches_do_not_repeat_the_model_in_the_program(tmp_path, impl):
  counts = {mb: _dot_generals(mb, tmp_path, **{"loss.impl": impl}) for mb in (1, 2, 8)}
  # 2 layers x (4 attention projections + 2 attention matmuls + 3 feed-forward) forward alone.
  assert counts[1] >= 2 * 9, counts
  assert counts[2] == counts[8] == counts[1], counts


def test_scanned_layers_keep_the_program_the_same_size_at_any_depth(tmp_path):
  counts = {(scan, layers): _dot_generals(2, tmp_path / f"{scan}{layers}",
                                          **{"model.scan_layers": scan, "model.n_layers": layers})
            for scan in (True, False) for layers in (2, 6)}
  assert counts[True, 2] == counts[True, 6], counts
  assert counts[False, 6] > 2 * counts[False, 2], counts  # Unrolled: the blocks' matmuls three times over.
