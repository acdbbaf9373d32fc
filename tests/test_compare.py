"""The loss comparison: seed statistics, resuming, results and plots."""

import json
import os

import numpy as np
import pytest

from mile_jax import train_lib
from mile_jax.experiments import compare
from mile_jax.experiments import tables
from conftest import make_tiny_config


def summary(ce, high, low):
  return {"ce": ce, "perplexity": float(np.exp(ce)),
          "buckets": {"high": {"perplexity": high, "entropy": 1.0}, "medium": {"tokens": 0},
                      "low": {"perplexity": low, "entropy": 2.0}}}


def test_table_statistics_by_hand():
  final = {"cross_entropy": [summary(2.0, 5.0, 50.0), summary(2.2, 7.0, 70.0), summary(2.4, 6.0, 60.0)],
           "mile_g1": [summary(1.0, 5.0, 40.0), summary(1.1, 5.0, 40.0), summary(1.2, 5.0, 40.0)]}
  rows = tables.metric_rows(final)
  mean, std = rows["cross_entropy"]["ce"]
  assert mean == pytest.approx(2.2) and std == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
  assert rows["cross_entropy"]["high_perplexity"] == pytest.approx((6.0, 1.0))
  assert rows["mile_g1"]["low_perplexity"] == (40.0, 0.0)
  assert "medium_perplexity" not in rows["mile_g1"]
  diff = tables.differences(rows)["mile_g1"]
  assert diff["difference"] == pytest.approx(-1.1) and diff["spread"] == pytest.approx(0.3)
  assert diff["exceeds_spread"]
  close = tables.differences({"cross_entropy": {"ce": (2.0, 0.1)}, "x": {"ce": (2.15, 0.1)}})["x"]
  assert not close["exceeds_spread"]
  md = tables.markdown(rows, 3)
  assert "| mile_g1 | 1.1000 ± 0.1000 |" in md and "over 3 seeds" in md


def test_run_specs_dedupe_and_order():
  import ml_collections  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict({"losses": ("cross_entropy", "focal:1.0", "mile:1.0"),
                                   "mile_gammas": (0.5, 1.0), "seeds": (0, 1)})
  specs = compare.run_specs(cfg)
  assert [s.label for s in specs[:4]] == ["cross_entropy", "focal_g1", "mile_g1", "mile_g0.5"]
  assert [s.seed for s in specs] == [0] * 4 + [1] * 4
  cfg.losses = ("mse",)
  with pytest.raises(ValueError, match="losses"):
    compare.run_specs(cfg)


def comparison_config():
  from configs.compare import get_config  # pylint: disable=import-outside-toplevel
  c = get_config()
  c.run = make_tiny_config(**{"train.steps": 6, "train.eval_every": 3, "train.log_every": 3,
                              "optim.warmup_steps": 2, "checkpoint.every_steps": 3,
                              "checkpoint.max_to_keep": 10, "data.source": "synthetic:zipf",
                              "data.synthetic_train_tokens": 20_000, "data.synthetic_val_tokens": 4_000})
  c.losses, c.mile_gammas, c.seeds, c.eval_batches = ("cross_entropy", "mile:1.0"), (), (0,), 2
  return c


def test_compare_resumes_and_writes_results(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  config = comparison_config()
  real_run = train_lib.Trainer.run
  calls = []

  def interrupted(self, *args, **kwargs):
    calls.append(self.config.loss.name)
    if self.config.loss.name == "mile":
      raise KeyboardInterrupt  # the comparison is stopped during the second run
    return real_run(self, *args, **kwargs)

  monkeypatch.setattr(train_lib.Trainer, "run", interrupted)
  with pytest.raises(KeyboardInterrupt):
    compare.compare(config, workdir, echo=lambda *_: None)
  monkeypatch.setattr(train_lib.Trainer, "run", lambda self, *a, **k: (calls.append(self.config.loss.name),
                                                                       real_run(self, *a, **k))[1])
  results = compare.compare(config, workdir, echo=lambda *_: None)
  assert calls == ["cross_entropy", "mile", "mile"]  # the finished run was not retrained

  run = results["runs"]["mile_g1/seed0"]
  assert [s for s, _ in run["curve"]] == [3, 6]
  final = run["final"]
  assert final["tokens"] == 2 * 8 * 32
  # The optimum is below the model's loss, and per bucket too.
  assert 0 < final["optimal"] < final["ce"]
  assert all(b["excess"] > 0 for b in final["buckets"].values() if b["tokens"])
  assert sum(b["tokens"] for b in final["buckets"].values()) == final["tokens"]
  assert sum(final["weight_hist"]) == final["tokens"]
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["rows"]["mile_g1"]["ce"][0] == pytest.approx(final["ce"])
  assert saved["rows"]["mile_g1"]["ce"][1] == 0.0  # one seed
  for path in results["plots"]:
    assert os.path.getsize(path) > 5_000 and open(path, "rb").read(4) == b"\x89PNG"

  monkeypatch.setattr(train_lib.Trainer, "run", lambda *a, **k: pytest.fail("retrained a finished run"))
  again = compare.compare(config, workdir, echo=lambda *_: None)
  assert again["rows"] == results["rows"]
