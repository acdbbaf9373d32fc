"""Tests of the data pipeline: corpus, tokenizer, packing, make_data, prefetching."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm

from mile_jax import config_lib
from mile_jax.data import builtin, pipeline
from mile_jax.data.pipeline import Prefetcher, make_data
from mile_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from mile_jax.errors import ConfigError
import processes  # tests/processes.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VOCAB = 512


@pytest.fixture(scope="module")
def corpus():
  return builtin.pydocs_documents()


@pytest.fixture(scope="module")
def split(corpus):
  return builtin.split_documents(corpus, 0.1)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tokenizers"))


@pytest.fixture(scope="module")
def tokenizer(split, tok_dir):
  return train_tokenizer([t for _, t in split[0]], VOCAB, tok_dir, corpus_key="pydocs-test")


def test_corpus_contents(corpus):
  ids = [doc_id for doc_id, _ in corpus]
  assert ids == sorted(ids) and len(set(ids)) == len(ids)
  assert len(corpus) > 300
  assert sum(len(t) for _, t in corpus) > 1_500_000
  assert all(len(t) >= builtin.MIN_DOCUMENT_CHARS for _, t in corpus)
  assert "json" in ids and "topic:if" in ids
  assert not any(i.startswith(("test.", "idlelib", "lib2to3")) or ".tests" in i for i in ids)
  text = dict(corpus)["json"]
  assert text.startswith("JSON (JavaScript Object Notation)")


def test_corpus_is_deterministic(corpus):
  # Bypass the in-process cache: a second real extraction must be identical.
  assert list(builtin._pydocs_documents_cached.__wrapped__()) == corpus


def test_corpus_walk_rules(tmp_path, monkeypatch):
  prose = "x" * 250
  files = {
      "alpha.py": f'"""{prose} alpha"""\ndef f():\n    """inner doc"""\n',
      "pkg/__init__.py": f'"""{prose} pkg"""\n',
      "pkg/mod.py": f'raise SystemExit("imported!")\nclass C:\n    """{prose} mod"""\n',
      "short.py": '"""too short"""\n',
      "broken.py": f'"""{prose}"""\ndef (:\n',
  }
  for skipped in ("tests/t.py", "idlelib/x.py", "site-packages/y.py", "config-3.11/z.py"):
    files[skipped] = f'"""{prose}"""\n'
  for rel, source in files.items():
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
  monkeypatch.setattr(builtin.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
  docs = dict(builtin._pydocs_documents_cached.__wrapped__())
  modules = {k: v for k, v in docs.items() if not k.startswith("topic:")}
  assert sorted(modules) == ["alpha", "pkg", "pkg.mod"]
  assert modules["alpha"] == f"{prose} alpha\n\ninner doc"
  assert modules["pkg.mod"] == f"{prose} mod"
  assert any(k.startswith("topic:") for k in docs)


def test_split_is_disjoint_complete_and_stable(corpus):
  train, val = builtin.split_documents(corpus, 0.2)
  train_ids, val_ids = {d[0] for d in train}, {d[0] for d in val}
  assert not train_ids & val_ids
  assert train_ids | val_ids == {d[0] for d in corpus}
  assert abs(len(val) / len(corpus) - 0.2) < 0.06
  # Assignment depends on the id only, not on order or the other documents.
  _, val2 = builtin.split_documents(corpus[::-1][:200], 0.2)
  assert {d[0] for d in val2} == val_ids & {d[0] for d in corpus[::-1][:200]}
  assert builtin.split_documents(corpus, 0.0) == (corpus, [])
  with pytest.raises(ValueError, match="data.val_fraction"):
    builtin.split_documents(corpus, 1.0)


def test_tokenizer_round_trip(tokenizer, split):
  train_docs, val_docs = split
  texts = [t for _, t in train_docs[:5] + val_docs[:5]]
  texts += ["  Indented\tcode:\n\n    x = [1,  2]\n", "naïve café — ünïcode ✓ 漢字"]
  for text in texts:
    assert tokenizer.decode(tokenizer.encode(text)) == text
  batch = tokenizer.encode_batch(texts)
  assert batch == [tokenizer.encode(t) for t in texts]
  # It compresses: clearly fewer ids than characters.
  assert sum(map(len, batch)) < 0.75 * sum(map(len, texts))


def test_tokenizer_vocab_and_special_ids(tokenizer, tok_dir):
  assert tokenizer.vocab_size == VOCAB
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
  ids = tokenizer.encode("The quick brown fox.")
  assert all(0 <= i < VOCAB for i in ids) and tokenizer.eos_id not in ids
  assert os.path.dirname(tokenizer.model_path) == tok_dir
  with open(tokenizer.model_path, "rb") as f:
    assert f.read() == tokenizer.serialized_model()
  assert load_tokenizer(tokenizer.model_path).encode("abc def") == tokenizer.encode("abc def")


def test_tokenizer_cache_hit_does_not_retrain(tokenizer, split, tok_dir, monkeypatch):
  mtime = os.stat(tokenizer.model_path).st_mtime_ns

  def no_training(**kwargs):
    raise AssertionError("trained again despite a cached model")

  monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_training)
  texts = [t for _, t in split[0]]  # the same corpus as the fixture
  again = train_tokenizer(texts, VOCAB, tok_dir, corpus_key="pydocs-test")
  assert again.model_path == tokenizer.model_path
  assert again.serialized_model() == tokenizer.serialized_model()
  assert os.stat(tokenizer.model_path).st_mtime_ns == mtime
  # A different key is a different model, so it must train (and here fail).
  with pytest.raises(AssertionError, match="trained again"):
    train_tokenizer(texts, VOCAB, tok_dir, corpus_key="another-corpus")


def test_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="model.vocab_size=5000"):
    train_tokenizer(["hello world, a tiny corpus"] * 5, 5000, str(tmp_path), corpus_key="t")
  assert not list(tmp_path.iterdir())  # nothing half-written
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match="nope.model"):
    load_tokenizer(missing)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
@pytest.mark.parametrize("byte_fallback, smallest", [(True, 261), (False, 5)])
def test_smallest_trainable_vocabulary(tmp_path, monkeypatch, model_type, byte_fallback, smallest):
  # A corpus of one character, U+2581 (what SentencePiece makes of a space), trains at the smallest size...
  tok = train_tokenizer(["\u2581"], smallest, str(tmp_path), corpus_key="one-char", model_type=model_type,
                        byte_fallback=byte_fallback)
  assert tok.vocab_size == smallest
  # ...and one size below, no corpus can: refused naming the setting, before the trainer runs.
  monkeypatch.setattr(spm.SentencePieceTrainer, "train", lambda **kwargs: pytest.fail("trained"))
  with pytest.raises(ConfigError, match=rf"^model.vocab_size: no tokenizer of {smallest - 1} pieces can be "
                     rf"trained; the smallest is {smallest}: "):
    train_tokenizer(["\u2581"], smallest - 1, str(tmp_path), corpus_key="one-char", model_type=model_type,
                    byte_fallback=byte_fallback)


def data_config(cache_dir, **overrides):
  """``config.data`` with the defaults, the cache in ``cache_dir`` and ``overrides``."""
  c = config_lib.base_config().data
  fields = dict(val_fraction=0.1, cache_dir=str(cache_dir), global_batch_size=8)
  fields.update(overrides)
  c.update(**fields)
  return c


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("data_cache")


def test_make_data_splits_and_cache(data_cache, split, monkeypatch):
  first = make_data(data_config(data_cache), VOCAB, 64, seed=0)
  train_docs, val_docs = split
  assert first.tokenizer.vocab_size == VOCAB
  assert first.train.num_documents == len(train_docs)
  assert first.validation.num_documents == len(val_docs)
  assert not first.validation.shuffle and first.train.shuffle
  # The validation stream is the held-out documents in order, EOS between.
  eos = first.tokenizer.eos_id
  stream = first.validation.rows(np.arange(first.validation.rows_per_epoch)).ravel()
  ends = np.nonzero(stream == eos)[0]
  assert first.tokenizer.decode(stream[: ends[0]]) == val_docs[0][1]
  assert first.tokenizer.decode(stream[ends[0] + 1 : ends[1]]) == val_docs[1][1]

  cached = sorted(p.name for p in (data_cache / "stores").iterdir())
  assert len(cached) == 1  # one token store holds both splits

  def no_encoding(*args, **kwargs):
    raise AssertionError("tokenized again despite the cache")

  monkeypatch.setattr(Tokenizer, "encode_batch", no_encoding)
  monkeypatch.setattr(spm.SentencePieceTrainer, "train", no_encoding)
  start = time.perf_counter()
  second = make_data(data_config(data_cache), VOCAB, 64, seed=0)
  assert time.perf_counter() - start < 2.0
  assert sorted(p.name for p in (data_cache / "stores").iterdir()) == cached
  assert second.tokenizer.model_path == first.tokenizer.model_path
  for step in range(3):
    a, b = first.train.batch(step, 8), second.train.batch(step, 8)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_make_data_errors(data_cache, tokenizer, tmp_path):
  with pytest.raises(ConfigError, match="data.source: 'nope' is not a source.*builtin:pydocs"):
    make_data(data_config(data_cache, source="nope"), VOCAB, 64, seed=0)
  path = tokenizer.model_path
  with pytest.raises(ConfigError, match=r"model.vocab_size=1024.*data.tokenizer_path.*512"):
    make_data(data_config(data_cache, tokenizer_path=path), 1024, 64, seed=0)
  with pytest.raises(ConfigError, match="data.tokenizer_path: no such file"):
    make_data(data_config(data_cache, tokenizer_path=str(tmp_path / "none.model")), VOCAB, 64, seed=0)
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(ConfigError, match="data.tokenizer_path: .*junk.model.* not a SentencePiece"):
    make_data(data_config(data_cache, tokenizer_path=str(tmp_path / "junk.model")), VOCAB, 64, seed=0)
  # The train split makes a batch of 5000 rows, the validation split does not: the hold-out is named.
  with pytest.raises(ConfigError, match=r"^data.val_fraction: the validation split \(\d+ documents, \d+ tokens\) "
                     r"packs into \d+ rows of data.seq_len \+ 1 = 65 tokens, fewer than one global batch of 5000; "
                     r"raise data.val_fraction, or lower data.global_batch_size or data.seq_len$"):
    make_data(data_config(data_cache, global_batch_size=5000), VOCAB, 64, seed=0)
  with pytest.raises(ConfigError, match=r"^data.global_batch_size: the corpus packs into \d+ rows .* \(the train "
                     r"split\)$"):
    make_data(data_config(data_cache, global_batch_size=20000), VOCAB, 64, seed=0)
  given = make_data(data_config(data_cache, tokenizer_path=path), VOCAB, 64, seed=0)
  assert given.tokenizer.serialized_model() == tokenizer.serialized_model()


def test_cache_dir_resolution(monkeypatch):
  monkeypatch.setenv("MILE_JAX_CACHE", "/some/where")
  assert pipeline.resolve_cache_dir("") == "/some/where"
  assert pipeline.resolve_cache_dir("/explicit") == "/explicit"
  monkeypatch.delenv("MILE_JAX_CACHE")
  assert pipeline.resolve_cache_dir("") == os.path.expanduser("~/.cache/mile_jax")


def test_prefetcher_order_and_bound():
  calls = []

  def make_batch(step):
    calls.append(step)
    return {"x": np.full(2, step)}

  with Prefetcher(make_batch, start_step=5, buffer_size=2) as prefetcher:
    time.sleep(0.3)
    # Two batches queued and at most one more made, waiting for room.
    assert len(calls) <= 3
    for expected in range(5, 11):
      step, batch = prefetcher.next()
      assert step == expected
      np.testing.assert_array_equal(batch["x"], [expected, expected])
  assert not prefetcher._thread.is_alive()


def test_prefetcher_propagates_exceptions():
  def make_batch(step):
    if step == 2:
      raise KeyError("boom at step 2")
    return step

  prefetcher = Prefetcher(make_batch)
  assert [prefetcher.next() for _ in range(2)] == [(0, 0), (1, 1)]
  for _ in range(2):
    with pytest.raises(KeyError, match="boom at step 2"):
      prefetcher.next()
  prefetcher.close()
  assert not prefetcher._thread.is_alive()


def test_prefetcher_close_stops_a_blocked_thread():
  prefetcher = Prefetcher(lambda step: step, buffer_size=1)
  time.sleep(0.2)  # the thread is now blocked on a full queue
  prefetcher.close()
  assert not prefetcher._thread.is_alive()
  with pytest.raises(RuntimeError, match="closed"):
    prefetcher.next()


# One process of a 2-process run (gloo on 127.0.0.1, one CPU device each). Each process has its own
# copy of the corpus, and the copies differ, as they may on separate hosts.
_WORKER = """
import json, sys
import jax
pid, address, root, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=pid)
sys.path.insert(0, root)
from mile_jax import config_lib
from mile_jax.data import builtin, corpus, pipeline
from mile_jax.errors import ConfigError
words = ["".join(chr(97 + (k * m + pid * n) % 26) for m, n in ((1, 0), (7, 3), (11, 5))) for k in range(60)]
docs = [(f"doc{i:03d}", " ".join(words[(i * 7 + j * j) % 60] for j in range(120))) for i in range(80)]
builtin._pydocs_documents_cached = lambda: tuple(docs)
config = config_lib.base_config().data
config.update(cache_dir=f"{out}.cache", val_fraction=0.2, global_batch_size=4, byte_fallback=False)
result = {"shared": pipeline.make_data(config, 100, 16, 0).tokenizer.serialized_model().hex()}
own = pipeline._train(config, 100, corpus.load_corpus(config, config.cache_dir), config.cache_dir)
result["own"] = own.serialized_model().hex()
try:
  pipeline.make_data(config, 20, 16, 0)  # Fewer pieces than the corpus has characters.
except ConfigError as e:
  result["error"] = str(e)
with open(out, "w") as f:
  json.dump(result, f)
"""



def test_processes_share_the_tokenizer_process_0_trained(tmp_path):
  worker = tmp_path / "worker.py"
  worker.write_text(_WORKER)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  address = processes.coordinator_address()
  outs = [tmp_path / f"process{i}.json" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, str(worker), str(i), address, ROOT, str(outs[i])], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = processes.outputs_of(procs, timeout=120)
  first, second = (json.loads(out.read_text()) for out in outs)
  assert first["shared"] == first["own"]  # Process 0 uses the tokenizer it trains.
  assert second["own"] != first["own"]  # Alone, process 1 would have trained another one...
  assert second["shared"] == first["shared"]  # ...but it received process 0's.
  assert first["error"].startswith("model.vocab_size=20 is impossible for this corpus with model_type='bpe', "
                                   "byte_fallback=False: Vocabulary size is smaller than required_chars.")
  # Process 1 stops too, instead of waiting for a model that never comes.
  assert second["error"] == ("data.tokenizer_path: process 0 could not train the tokenizer (its own error says "
                             "why; this is process 1); a trained one set in data.tokenizer_path skips training")
