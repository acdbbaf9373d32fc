"""Weighted mixtures: parsing and its errors, the schedule's proportions and order, batches as a
function of (seed, step), process shares, and make_data and in-training evaluation on a real mixture."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import conftest
from mile_jax import config_lib, train_lib
from mile_jax.data import mixture, pipeline, tokenizer as tokenizer_lib
from mile_jax.data.mixture import UNITS, MixedDataset, MixtureSchedule
from mile_jax.data.packing import PackedDataset
from mile_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS, BOS = 0, 5  # below every document token


def test_parse_names_weights_and_globs_with_at():
  got = mixture.parse("mix:builtin:pydocs@0.7, web=files:/data/a@b/*.txt@3e-1")
  assert got == [mixture.Component("pydocs", "builtin:pydocs", 0.7),
                 mixture.Component("web", "files:/data/a@b/*.txt", 0.3)]
  assert mixture.parse("mix:tfds:c4/en:3.1.0@1")[0].name == "c4_en_3.1.0"
  config_lib.validate(conftest.make_tiny_config(**{"data.source": "mix:builtin:pydocs@2,files:/x/*.txt@1"}))


BAD = {
    "zero weight": ("mix:builtin:pydocs@0,files:/x@1",
                    "the weight of mixture component 'builtin:pydocs' must be a positive finite number, got 0"),
    "negative weight": ("mix:builtin:pydocs@1,files:/x@-2", "the weight of mixture component 'files:/x' must be"),
    "infinite weight": ("mix:builtin:pydocs@inf,files:/x@1", "the weight of mixture component 'builtin:pydocs' must"),
    "weight not a number": ("mix:builtin:pydocs@0.7,files:/x@3O%", "the weight '3O%' of mixture component 'files:/x' "
                                                                  "is not a number"),
    "no weight": ("mix:builtin:pydocs,files:/x@1", "mixture component 'builtin:pydocs' has no weight"),
    "unknown component": ("mix:builtin:pydocs@1,nosuch:x@1", "mixture component 'nosuch:x' is not a source"),
    "empty component": ("mix:builtin:pydocs@1,", "'mix:builtin:pydocs@1,' has an empty component"),
    "no components": ("mix:", "'mix:' has an empty component"),
    "unmixable": ("mix:builtin:pydocs@1,synthetic:zipf@1", "mixture component 'synthetic:zipf' cannot be mixed"),
    "same source twice": ("mix:a=builtin:pydocs@1,b=builtin:pydocs@1", "mixture component source 'builtin:pydocs' "
                                                                       "appears twice"),
    "same name twice": ("mix:x=files:/a@1,x=files:/b@1", "mixture component name 'x' appears twice"),
    "bad name": ("mix:a/b=files:/a@1", "mixture component name 'a/b' may hold only"),
    "weight below 2**-20": ("mix:builtin:pydocs@1,files:/x@1e-7", "mixture component 'x' has weight 1e-07"),
    "weights that overflow": ("mix:builtin:pydocs@1e308,files:/x@1e308", "the mixture weights (1e+308, 1e+308) add "
                                                                        "up to more than the largest float"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_mixture_strings_are_one_config_error(case):
  source, message = BAD[case]
  with pytest.raises(ConfigError) as info:
    config_lib.validate(conftest.make_tiny_config(**{"data.source": source}))
  assert str(info.value).startswith("data.source: " + message), str(info.value)
  assert "\n" not in str(info.value)


def test_train_py_prints_the_mixture_error_in_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", "configs/default.py",
                         "--workdir", str(tmp_path / "w"), "--config.data.source=mix:builtin:pydocs@0.7,files:/x@abc"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "Config error: data.source: the weight 'abc' of mixture component 'files:/x' is not a number; write "
      "mix:[name=]source@weight,... e.g. mix:builtin:pydocs@0.7,web=files:/data/web/*.txt@0.3"]


WEIGHTS = [0.61, 0.27, 0.12]


@pytest.fixture(scope="module")
def schedule_rows():
  """A schedule and its (component, row) of global rows [0, 2 UNITS + 5000)."""
  schedule = MixtureSchedule(WEIGHTS, seed=5)
  return schedule, *schedule.assign(np.arange(2 * UNITS + 5000))


def test_components_read_their_rows_in_order_each_once(schedule_rows):
  schedule, component, row = schedule_rows
  for k in range(len(WEIGHTS)):
    np.testing.assert_array_equal(row[component == k], np.arange(np.sum(component == k)))
  for n in (0, 1, 17, UNITS + 3, 2 * UNITS + 4999):
    np.testing.assert_array_equal(schedule.counts(n), np.bincount(component[:n], minlength=len(WEIGHTS)))
  for k, j in ((0, 0), (1, 12345), (2, UNITS // 10 + 7)):
    g = schedule.position(k, j)
    assert (component[g], row[g]) == (k, j)


def test_proportions_match_the_weights(schedule_rows):
  """Over 1000 steps of 16 rows, counts within 3 binomial standard deviations of n w (the
  issue's criterion) and within k + 1 rows (the module docstring's bound); each UNITS rows
  exactly the rounded units, within 1/UNITS of the weights."""
  schedule, component, _ = schedule_rows
  w = np.array(WEIGHTS) / sum(WEIGHTS)
  assert np.all(np.abs(schedule.units / UNITS - w) <= 1 / UNITS) and schedule.units.sum() == UNITS
  for start in (0, 777_777):
    n = 1000 * 16
    counts = np.bincount(component[start:start + n], minlength=3)
    assert np.all(np.abs(counts - n * w) <= 3 * np.sqrt(n * w * (1 - w))), counts
    assert np.all(np.abs(counts - n * schedule.units / UNITS) < np.arange(1, 4)), counts
  for period in range(2):
    np.testing.assert_array_equal(np.bincount(component[period * UNITS:(period + 1) * UNITS]), schedule.units)
  other = MixtureSchedule(WEIGHTS, seed=6).assign(np.arange(64))[0]
  assert not np.array_equal(other, component[:64])  # the seed moves the phases


def docs(first_token, count, seed):
  """Documents whose tokens are distinct and >= first_token: every token names its component and place."""
  lengths = np.random.default_rng(seed).integers(1, 12, size=count)
  return np.split(np.arange(first_token, first_token + lengths.sum(), dtype=np.int32), np.cumsum(lengths)[:-1])


def tiny_mixture(segment_documents=False, seed=3):
  """Three components whose token ranges [1000 (k + 1), 1000 (k + 2)) tell them apart."""
  parts = {name: PackedDataset(docs(1000 * (k + 1), n, k), 5, EOS, seed, bos_id=BOS,
                               segment_documents=segment_documents, stream=k + 1)
           for k, (name, n) in enumerate((("small", 12), ("mid", 40), ("big", 140)))}
  return MixedDataset(parts, [0.2, 0.5, 0.3], seed)


def test_batches_draw_each_component_in_its_own_order():
  """Concatenating a component's rows over steps 0..S gives its own row stream, epochs included;
  a batch's components follow the schedule."""
  mix, steps, batch = tiny_mixture(), 60, 16
  seen = {name: [] for name in mix.components}
  for step in range(steps):
    b = mix.batch(step, batch)
    rows = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
    owner = np.max(rows, axis=1) // 1000 - 1  # every row holds a document token (no row is only BOS/EOS)
    expected = mix.schedule.assign(np.arange(step * batch, (step + 1) * batch))[0]
    np.testing.assert_array_equal(owner, expected)
    np.testing.assert_array_equal(mix.rows(np.arange(step * batch, (step + 1) * batch)), rows)
    for k, name in enumerate(mix.components):
      seen[name].append(rows[owner == k])
  for name, c in mix.components.items():
    got = np.concatenate(seen[name])
    assert len(got) > c.rows_per_epoch  # into a second epoch
    np.testing.assert_array_equal(got, c.rows(np.arange(len(got))))


def test_resume_mid_epoch_gives_the_same_batches():
  mix = tiny_mixture(segment_documents=True)
  steps = [0, 1, 2, 3, 7, 8, 23, 50]  # 16-row batches: the small component is mid-epoch in most
  want = {s: mix.batch(s, 16) for s in steps}
  for s in steps[::-1]:  # a fresh dataset, asked out of order, as after a restart
    got = tiny_mixture(segment_documents=True).batch(s, 16)
    for key in want[s]:
      np.testing.assert_array_equal(got[key], want[s][key])
  other = tiny_mixture(seed=4).batch(3, 16)["inputs"]
  assert not np.array_equal(other, want[3]["inputs"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_are_disjoint_and_make_the_single_process_batch(process_count):
  mix = tiny_mixture(segment_documents=True)
  for step in (0, 5, 31):
    whole = mix.batch(step, 16)
    shares = [tiny_mixture(segment_documents=True).batch(step, 16, p, process_count) for p in range(process_count)]
    for key in whole:
      assert all(s[key].shape[0] == 16 // process_count for s in shares)
      np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), whole[key])


def test_rows_per_epoch_is_the_first_repeat_and_token_counts_are_weighted():
  mix = tiny_mixture()
  component, row = mix.schedule.assign(np.arange(mix.rows_per_epoch + 1))
  sizes = np.array([c.rows_per_epoch for c in mix.components.values()])
  assert np.all(row[:-1] < sizes[component[:-1]])  # one pass: no component row read twice
  assert row[-1] == sizes[component[-1]]
  vocab = 4000
  counts = [c.token_counts(vocab).astype(np.float64) for c in mix.components.values()]
  total = sum(c.sum() for c in counts)
  want = np.zeros(vocab)
  for weight, c in zip([0.2, 0.5, 0.3], counts):
    want += weight * total * c / c.sum()
  np.testing.assert_array_equal(mix.token_counts(vocab), np.ceil(want))
  assert mix.token_counts(vocab)[EOS] == np.ceil(want[EOS]) and want[BOS] > 0


def test_a_component_shorter_than_a_row_is_named():
  parts = {"a": PackedDataset(docs(1000, 5, 0), 5, EOS, 0), "b": PackedDataset([np.array([7])], 5, EOS, 0)}
  with pytest.raises(ConfigError, match=r"^data.seq_len: mixture component 'b' \(2 tokens\) is shorter"):
    MixedDataset(parts, [1, 1], 0).batch(0, 4)


@pytest.fixture(scope="module")
def mixture_config(tmp_path_factory):
  """A tiny config mixing the built-in corpus with local files of words the built-in one lacks."""
  root = tmp_path_factory.mktemp("mix")
  rng = np.random.default_rng(0)
  words = ["qzxv", "wqjk", "zzyq", "xkcd", "jqvw"]
  for f in range(2):
    (root / f"f{f}.txt").write_text("\n\n".join(" ".join(rng.choice(words, size=rng.integers(20, 80)))
                                                for _ in range(40)))
  return conftest.make_tiny_config(**{
      "data.source": f"mix:builtin:pydocs@0.75,web=files:{root}/*.txt@0.25", "data.txt_documents": "blank_line",
      "data.val_fraction": 0.2, "data.tokenizer_train_documents": 40, "data.global_batch_size": 4,
      "data.seq_len": 16, "data.data_dir": str(root / "prepared")})


def test_make_data_shares_one_tokenizer_and_splits_validation_by_component(mixture_config, monkeypatch):
  trained_on = []
  real = tokenizer_lib.train_tokenizer
  monkeypatch.setattr(pipeline, "train_tokenizer", lambda texts, *a, **k: trained_on.append(texts) or real(
      texts, *a, **k))
  d = mixture_config.data
  data = pipeline.make_data(d, mixture_config.model.vocab_size, d.seq_len, mixture_config.seed)
  (texts,) = trained_on
  web = [t for t in texts if "qzxv" in t or "wqjk" in t]
  assert len(texts) == 40 and len(web) == math.ceil(40 * 0.25)  # ceil(limit * w_k) of each
  assert isinstance(data.train, MixedDataset) and isinstance(data.validation, MixedDataset)
  assert list(data.validation_components) == ["pydocs", "web"]
  assert data.validation_components["web"] is data.validation.components["web"]
  assert not data.validation_components["web"].shuffle
  again = pipeline.make_data(d, mixture_config.model.vocab_size, d.seq_len, mixture_config.seed)  # from the cache
  np.testing.assert_array_equal(again.train.batch(9, 4)["inputs"], data.train.batch(9, 4)["inputs"])
  small = data.validation_components["web"].rows_per_epoch
  big = mixture_config.copy_and_resolve_references()
  big.data.global_batch_size = small + 1
  with pytest.raises(ConfigError, match=r"^data.val_fraction: the validation split of mixture component 'web' "):
    pipeline.make_data(big.data, big.model.vocab_size, d.seq_len, big.seed)


@pytest.mark.slow
def test_training_logs_validation_per_component(mixture_config, tmp_path):
  config = mixture_config.copy_and_resolve_references()
  config.train.update(steps=2, eval_every=2, eval_batches=1, log_every=2)
  config.optim.warmup_steps = 1
  train_lib.Trainer(config, str(tmp_path)).run()
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = {r["split"]: r for r in records if r["split"].startswith("eval")}
  assert sorted(evals) == ["eval", "eval/pydocs", "eval/web"]
  for r in evals.values():
    assert r["step"] == 2 and math.isfinite(r["ce"]) and r["tokens"] == 4 * 16
