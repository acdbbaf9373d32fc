"""The files: and tfds: sources on data the tests write: formats, splits, bad input, atomicity."""

import gzip
import hashlib
import json
import os

import numpy as np
import pytest

from mile_jax import config_lib
from mile_jax.config_lib import ConfigError
from mile_jax.data import builtin, pipeline, tfds_sources
from mile_jax.data import corpus as corpus_lib

VOCAB = 512


def unit_hash(doc_id):
  """Independent restatement of the documented split rule: sha256 of the id, first 8 bytes."""
  return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2.0**64


@pytest.fixture(scope="module")
def texts():
  """40 real prose documents (the first of the built-in corpus, no blank lines inside)."""
  docs = [t.replace("\n\n", "\n") for _, t in builtin.pydocs_documents()[:40]]
  assert all(not d.startswith(("\n", " ")) and d.strip() == d for d in docs)
  return docs


def write_corpus(root, texts):
  """Documents 0-19 as .txt files (two gzipped), 20-39 as JSON Lines (half gzipped).

  Returns {document id: text}, the ids as the reader must name them.
  """
  expected = {}
  os.makedirs(root / "txt", exist_ok=True)
  for i, text in enumerate(texts[:20]):
    name = f"txt/doc{i:02d}.txt" + (".gz" if i < 2 else "")
    data = text.encode()
    (root / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    expected[f"{name}:0"] = text
  for part, chunk in enumerate((texts[20:30], texts[30:40])):
    name = f"part{part}.jsonl" + (".gz" if part else "")
    data = "".join(json.dumps({"body": t, "n": 1}) + "\n" for t in chunk).encode()
    (root / name).write_bytes(gzip.compress(data) if part else data)
    expected.update({f"{name}:{line}": t for line, t in enumerate(chunk, start=1)})
  return expected


def data_config(cache_dir, **overrides):
  c = config_lib.base_config().data
  fields = dict(cache_dir=str(cache_dir), text_field="body", val_fraction=0.2, global_batch_size=4)
  fields.update(overrides)
  c.update(**fields)
  return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, texts):
  """The files corpus, prepared once: (root, expected documents, config, corpus)."""
  root = tmp_path_factory.mktemp("files")
  expected = write_corpus(root, texts)
  config = data_config(tmp_path_factory.mktemp("cache"), source=f"files:{root}/**/*")
  return root, expected, config, corpus_lib.load_corpus(config, config.cache_dir)


def test_files_source_reads_every_document_into_its_split(prepared):
  _, expected, _, corpus = prepared
  want_val = sorted(t for i, t in expected.items() if unit_hash(i) < 0.2)
  want_train = sorted(t for i, t in expected.items() if unit_hash(i) >= 0.2)
  assert 0 < len(want_val) < len(want_train)
  assert sorted(corpus.validation) == want_val
  assert sorted(corpus.train) == want_train
  assert list(corpus.train) == [corpus.train[i] for i in range(len(corpus.train))]


def test_make_data_on_files_decodes_back_with_bos_eos_and_counts(prepared):
  root, _, config, corpus = prepared
  config = config.copy_and_resolve_references()
  config.update(add_bos=True, segment_documents=True)
  data = pipeline.make_data(config, VOCAB, 32, seed=0)
  tok = data.tokenizer
  val = data.validation
  stream = val.rows(np.arange(val.rows_per_epoch)).ravel()
  # Documents in order, each as BOS text EOS; the last may be cut by the dropped tail.
  pieces = np.split(stream, np.nonzero(stream == tok.eos_id)[0] + 1)
  for piece, text in zip(pieces[:-1], corpus.validation):
    assert piece[0] == tok.bos_id and piece[-1] == tok.eos_id
    assert tok.decode(piece[1:-1]) == text
  assert len(pieces) - 1 >= len(corpus.validation) - 1
  # Token counts: recomputed from the texts with plain encode calls.
  expected = np.zeros(VOCAB, dtype=np.int64)
  for text in corpus.train:
    np.add.at(expected, tok.encode(text), 1)
  expected[tok.eos_id] += len(corpus.train)
  expected[tok.bos_id] += len(corpus.train)
  np.testing.assert_array_equal(data.train.token_counts(VOCAB), expected)
  stores = sorted(os.listdir(os.path.join(config.cache_dir, "stores")))
  assert len(stores) == 1 and ".tmp" not in stores[0]
  batch = data.train.batch(3, 4)
  assert batch["segment_ids"].shape == (4, 32) and (batch["mask"][batch["targets"] == tok.bos_id] == 0).all()


def test_tfds_source_on_a_dataset_prepared_by_the_project_builder(prepared, tmp_path):
  root, expected, config, corpus = prepared
  data_dir = str(tmp_path / "tfds")
  builder = tfds_sources.prepare_files(f"{root}/**/*", data_dir, txt_documents="file", text_field="body",
                                       decode_errors="replace", val_fraction=0.2)
  name = f"{tfds_sources.BUILDER_NAME}/{builder.builder_config.name}"
  tfds_config = data_config(tmp_path, source=f"tfds:{name}", data_dir=data_dir, text_field="text")
  got = corpus_lib.load_corpus(tfds_config, tfds_config.cache_dir)
  # TFDS stores the documents in its own order; the files source reads them in file order.
  assert sorted(got.validation) == sorted(corpus.validation)  # "validation" picked as it exists
  assert sorted(got.train) == sorted(corpus.train)
  tfds_config.update(train_split="train[:50%]", val_split="train[50%:]")
  halves = corpus_lib.load_corpus(tfds_config, tfds_config.cache_dir)
  assert list(halves.train) + list(halves.validation) == list(got.train)
  data = pipeline.make_data(tfds_config, VOCAB, 32, seed=0)
  assert data.train.num_documents == len(halves.train)


def test_tfds_errors(prepared, tmp_path, monkeypatch):
  root, _, _, _ = prepared
  data_dir = str(tmp_path / "tfds")
  builder = tfds_sources.prepare_files(f"{root}/**/*", data_dir, txt_documents="file", text_field="body",
                                       decode_errors="replace", val_fraction=0.2)
  name = f"{tfds_sources.BUILDER_NAME}/{builder.builder_config.name}"
  load = lambda **kw: corpus_lib.load_corpus(data_config(tmp_path, data_dir=data_dir, **kw), "")  # noqa: E731
  with pytest.raises(ConfigError, match="data.source: unknown TFDS dataset 'no_such_dataset_xyz'"):
    load(source="tfds:no_such_dataset_xyz")
  with pytest.raises(ConfigError, match="data.source: TFDS dataset 'lm1b' is not prepared.*tfds_download"):
    load(source="tfds:lm1b")
  with pytest.raises(ConfigError, match=r"data.text_field: 'body' is not a feature.*\['id', 'text'\]"):
    load(source=f"tfds:{name}")
  with pytest.raises(ConfigError, match=r"data.val_split: split 'dev' not in .*\['train', 'validation'\]"):
    load(source=f"tfds:{name}", text_field="text", val_split="dev")
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(tfds.core.file_adapters.FileFormat, "with_random_access", classmethod(lambda cls: set()))
  monkeypatch.setattr(tfds_sources.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ConfigError, match="only TensorFlow reads: pip install tensorflow"):
    load(source=f"tfds:{name}", text_field="text")


def test_holdout_matches_splitmix64_reference():
  def splitmix(i):
    mask = 2**64 - 1
    x = (i + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return (x ^ (x >> 31)) >> 11

  train, val = tfds_sources.holdout(1000, 0.1)
  assert val.tolist() == [i for i in range(1000) if splitmix(i) / 2.0**53 < 0.1]
  assert sorted(train.tolist() + val.tolist()) == list(range(1000))
  assert 60 < len(val) < 140


# Prepares a tiny files: source under absl's logging at INFO (the CLIs' --verbosity=0), then
# opens a catalog dataset in a folder that does not exist, as eval.py --task_source tfds does.
PREPARE_UNDER_ABSL = """
import sys
from absl import app, logging as absl_logging
from mile_jax.data import tfds_sources
def main(_):
  absl_logging.set_verbosity(absl_logging.INFO)
  tfds_sources.prepare_files(sys.argv[1] + "/*.txt", sys.argv[2], txt_documents="file", text_field="text",
                             decode_errors="replace", val_fraction=0.3)
  try:
    tfds_sources.prepared_builder("lm1b", sys.argv[2] + "/missing", setting="--task_source=tfds")
  except tfds_sources.ConfigError as e:
    print("refused:", e)
app.run(main, argv=sys.argv[:1])
"""


def test_preparing_files_prints_only_the_projects_lines(tmp_path, texts):
  """Nothing of TFDS's, not even at INFO: only the project's line of what was prepared, at INFO (so
  hidden at the CLIs' default WARNING)."""
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  src = tmp_path / "src"
  src.mkdir()
  for i, text in enumerate(texts[:10]):
    (src / f"d{i}.txt").write_text(text)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", PREPARE_UNDER_ABSL, str(src), str(tmp_path / "cache")],
                          cwd=root, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = (result.stdout + result.stderr).splitlines()
  refused = [line for line in lines if line.startswith("refused: --task_source=tfds: TFDS dataset 'lm1b' is not "
                                                        f"prepared in {tmp_path / 'cache' / 'missing'}")]
  assert len(refused) == 1, lines
  rest = [line for line in lines if line not in refused]
  assert len(rest) == 1 and rest[0].startswith("I") and "tfds_sources.py" in rest[0], rest
  assert "] Prepared 10 documents (" in rest[0] and "from 10 files matching" in rest[0], rest
