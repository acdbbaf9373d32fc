"""The token store and the prepare step: batches against a per-token reference, the same bytes
however the store is made, resume after a kill, and one-line errors before anything compiles."""

import json
import os
import shutil

import numpy as np
import pytest

from mile_jax import config_lib
from mile_jax.data import builtin, pipeline, prepare, shards, store
from mile_jax.data.packing import PackedDataset
from mile_jax.data.permutation import KeyedPermutation
from mile_jax.data.tokenizer import train_tokenizer
from mile_jax.errors import ConfigError

VOCAB, SEQ, BATCH, SEED = 512, 15, 4, 7


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Three .jsonl files of the built-in corpus's texts and a tokenizer: (glob, tokenizer)."""
  root = tmp_path_factory.mktemp("files")
  texts = [t[:30 + 13 * i % 250] for i, (_, t) in enumerate(builtin.pydocs_documents()[:90])]
  for f in range(3):
    with open(root / f"part{f}.jsonl", "w", encoding="utf-8") as fh:
      fh.writelines(json.dumps({"text": t}) + "\n" for t in texts[f * 30:(f + 1) * 30])
  tok = train_tokenizer(texts, VOCAB, str(tmp_path_factory.mktemp("tok")), corpus_key="t", model_type="unigram")
  return f"files:{root}/*.jsonl", tok


def make_store(corpus, out, *, bos=False, eos=True, workers=1, shard_tokens=store.SHARD_TOKENS):
  source, tok = corpus
  job = prepare.make_job(shards.Inputs(source=source, val_fraction=0.2), tok, add_bos=bos, add_eos=eos,
                         output=str(out), shard_tokens=shard_tokens)
  return prepare.run_local(job, workers)


def split_texts(source):
  """Each split's texts in file order, routed by the hash of their ids (read without the code under test)."""
  out = {"train": [], "validation": []}
  root = os.path.dirname(source[len("files:"):])
  for name in sorted(os.listdir(root)):
    with open(os.path.join(root, name), encoding="utf-8") as fh:
      for line_no, line in enumerate(fh, start=1):
        split = "validation" if builtin._unit_hash(f"{name}:{line_no}") < 0.2 else "train"
        out[split].append(json.loads(line)["text"])
  return out


def reference_stream(docs, bos, eos):
  """The documents as [BOS] ids [EOS] end to end, and the document of each token."""
  stream, owner = [], []
  for i, d in enumerate(docs):
    piece = [bos] * (bos is not None) + list(d) + [eos] * (eos is not None)
    stream += piece
    owner += [i] * len(piece)
  return np.array(stream), np.array(owner)


def reference_batch(stream, owner, bos, step, shuffle):
  """The batch at `step` walked token by token: rows of SEQ + 1 cut from the stream and read in the
  keyed permutation's order; segments by document, positions from the document's start or the row's."""
  width = SEQ + 1
  rows = len(stream) // width
  epoch, within = np.divmod(np.arange(step * BATCH, (step + 1) * BATCH), rows)
  order = np.array([KeyedPermutation(rows, (SEED, 0, int(e)))(np.array([w]))[0] if shuffle else w
                    for e, w in zip(epoch, within)])
  pos = order[:, None] * width + np.arange(width)
  tokens, own = stream[pos], owner[pos]
  positions = np.zeros_like(pos)
  for t in range(1, width):
    positions[:, t] = np.where(own[:, t] == own[:, t - 1], positions[:, t - 1] + 1, 0)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "mask": (tokens[:, 1:] != bos).astype(np.float32) if bos is not None else np.ones((BATCH, SEQ)),
          "segment_ids": (own - own[:, :1] + 1)[:, :-1], "positions": positions[:, :-1]}


@pytest.mark.parametrize("bos,eos", [(False, False), (False, True), (True, False), (True, True)])
def test_store_batches_and_counts_match_a_per_token_reference(corpus, tmp_path, bos, eos):
  source, tok = corpus
  make_store(corpus, tmp_path / "store", bos=bos, eos=eos)
  _, streams = store.open_store(str(tmp_path / "store"), vocab_size=VOCAB, add_bos=bos, add_eos=eos,
                                tokenizer_fingerprint=tok.fingerprint())
  bos_id, eos_id = (tok.bos_id if bos else None), (tok.eos_id if eos else None)
  for split, texts in split_texts(source).items():
    docs = [tok.encode(t) for t in texts]
    counts = np.bincount([i for d in docs for i in d], minlength=VOCAB)
    for special in (bos_id, eos_id):
      if special is not None:
        counts[special] += len(docs)
    np.testing.assert_array_equal(streams[split].counts, counts)
    stream, owner = reference_stream(docs, bos_id, eos_id)
    for segment in (False, True):
      ds = PackedDataset.from_stream(streams[split], SEQ, eos_id, SEED, shuffle=split == "train", bos_id=bos_id,
                                     segment_documents=segment)
      for step in range(ds.rows_per_epoch // BATCH + 2):  # every row of epoch 0, and into epoch 1
        got, want = ds.batch(step, BATCH), reference_batch(stream, owner, bos_id, step, split == "train")
        assert sorted(got) == sorted(want) if segment else sorted(got) == ["inputs", "mask", "targets"]
        for key in got:
          np.testing.assert_array_equal(got[key], want[key], err_msg=f"{split} {key} step {step}")


def tree_bytes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_same_bytes_with_1_2_3_workers_and_after_a_kill(corpus, tmp_path, monkeypatch):
  small = 1 << 10  # several zarr shards, so that assembly has units to share
  make_store(corpus, tmp_path / "w1", workers=1, shard_tokens=small)
  want = tree_bytes(tmp_path / "w1")
  assert len([k for k in want if k.startswith("train/tokens/c/")]) > 3
  for workers in (2, 3):
    make_store(corpus, tmp_path / f"w{workers}", workers=workers, shard_tokens=small)
    assert tree_bytes(tmp_path / f"w{workers}") == want, workers
  # Killed in the middle of encoding, then in the middle of assembly; each rerun resumes.
  real_encode, real_assemble = prepare.encode_shard, prepare.assemble_unit
  calls = {"n": 0}

  def dies_on_third(real):
    def call(job, item):
      calls["n"] += 1
      if calls["n"] == 3:
        raise KeyboardInterrupt
      return real(job, item)
    return call

  for name, real in (("encode_shard", real_encode), ("assemble_unit", real_assemble)):
    calls["n"] = 0
    monkeypatch.setattr(prepare, name, dies_on_third(real))
    with pytest.raises(KeyboardInterrupt):
      make_store(corpus, tmp_path / "killed", shard_tokens=small)
    assert not (tmp_path / "killed" / "manifest.json").exists()
    monkeypatch.setattr(prepare, name, real)
  make_store(corpus, tmp_path / "killed", shard_tokens=small)
  assert tree_bytes(tmp_path / "killed") == want


def test_a_finished_store_keeps_no_parts_is_reused_and_is_not_overwritten(corpus, tmp_path, monkeypatch):
  """The working parts are gone once the manifest is written; a rerun returns the finished store without
  encoding anything (and deletes parts a run killed after its manifest left); other settings are refused."""
  out = tmp_path / "s"
  make_store(corpus, out)
  files = tree_bytes(out)
  assert not [k for k in files if k.startswith(".parts")]
  manifest = json.loads(files["manifest.json"])
  (out / ".parts" / "0000000").mkdir(parents=True)
  (out / ".parts" / "0000000" / "done.json").write_text("{}")

  def no_work(job, item):
    raise AssertionError("a finished store was prepared again")
  monkeypatch.setattr(prepare, "encode_shard", no_work)
  assert make_store(corpus, out).splits == manifest["splits"]
  assert tree_bytes(out) == files
  with pytest.raises(ConfigError, match=rf"--output: '{out}' holds a finished token store of other settings "
                     r"\(add_bos differ\); choose another --output"):
    make_store(corpus, out, bos=True)
  assert tree_bytes(out) == files


def data_config(tmp_path, **overrides):
  c = config_lib.base_config().data
  c.update(cache_dir=str(tmp_path / "cache"), val_fraction=0.2, global_batch_size=BATCH, **overrides)
  return c


def test_train_on_a_store_reads_no_document_and_equals_the_cached_files_path(corpus, tmp_path, monkeypatch):
  source, tok = corpus
  tok_path = tok.model_path
  via_files = pipeline.make_data(data_config(tmp_path, source=source, tokenizer_path=tok_path,
                                             segment_documents=True), VOCAB, SEQ, SEED)
  assert len(os.listdir(tmp_path / "cache" / "stores")) == 1
  make_store(corpus, tmp_path / "store")

  def no_reading(*args, **kwargs):
    raise AssertionError("a document was read")

  monkeypatch.setattr(shards, "documents", no_reading)
  monkeypatch.setattr(shards, "plan", no_reading)
  via_store = pipeline.make_data(data_config(tmp_path / "other", source=f"store:{tmp_path / 'store'}",
                                             segment_documents=True), VOCAB, SEQ, SEED)
  assert not (tmp_path / "other").exists()  # nothing written before step 1
  assert via_store.tokenizer.fingerprint() == tok.fingerprint()
  np.testing.assert_array_equal(via_store.train.token_counts(VOCAB), via_files.train.token_counts(VOCAB))
  for step in (0, 5):
    for p in range(2):  # each process's share
      a, b = via_files.train.batch(step, BATCH, p, 2), via_store.train.batch(step, BATCH, p, 2)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_bad_stores_fail_in_one_line_naming_the_store(corpus, tmp_path):
  _, tok = corpus
  url = str(tmp_path / "store")
  make = lambda **kw: pipeline.make_data(data_config(tmp_path, source=f"store:{url}", **kw), VOCAB, SEQ, SEED)  # noqa: E731
  with pytest.raises(ConfigError, match=r"data.source: '.*store' has no manifest.json.*mile_jax.data.prepare"):
    make()
  make_store(corpus, url)
  with pytest.raises(ConfigError, match=r"model.vocab_size=600 does not match the token store .*model.vocab_size=512"):
    pipeline.make_data(data_config(tmp_path, source=f"store:{url}"), 600, SEQ, SEED)
  with pytest.raises(ConfigError, match=r"data.add_bos=True, but the token store .* was prepared with False"):
    make(add_bos=True)
  other = train_tokenizer([t for _, t in builtin.pydocs_documents()[100:160]], VOCAB, str(tmp_path / "tok2"),
                          corpus_key="o", model_type="unigram")
  with pytest.raises(ConfigError, match=r"data.tokenizer_path: the token store .* was made with another tokenizer"):
    make(tokenizer_path=other.model_path)
  shard = tmp_path / "store" / "train" / "tokens" / "c" / "0"
  whole = shard.read_bytes()
  shard.write_bytes(whole[:100])  # A copy cut short: found when the store is opened, before any compile.
  with pytest.raises(ConfigError, match=rf"data.source: the token store '{url}' is damaged: train/tokens/c/0 holds "
                     rf"100 bytes where {len(whole):,} were written; copy the store again"):
    make()
  os.remove(shard)
  with pytest.raises(ConfigError, match=r"is damaged: train/tokens/c/0 is missing"):
    make()
  shard.write_bytes(whole[:-8] + bytes(8))  # Same size, a damaged shard index: found when a batch reads it.
  data = make()
  with pytest.raises(ConfigError, match=r"data.source: cannot read .*train/tokens .*prepare the store again"):
    data.train.batch(0, BATCH)
  os.remove(tmp_path / "store" / "manifest.json")
  with pytest.raises(ConfigError, match="has no manifest.json"):
    make()


def test_store_on_gs_reads_the_same_batches(corpus, tmp_path, gcs_bucket):
  _, tok = corpus
  make_store(corpus, tmp_path / "local")
  make_store(corpus, f"{gcs_bucket}/stores/web")
  keys = store.list_keys(f"{gcs_bucket}/stores/web")
  assert "manifest.json" in keys and not [k for k in keys if k.startswith(".parts")]
  local_shards = (tmp_path / "local" / "validation" / "shards.json").read_bytes()
  assert store.read_bytes(f"{gcs_bucket}/stores/web/validation/shards.json") == local_shards
  streams = [store.open_store(url, vocab_size=VOCAB, add_bos=False, add_eos=True,
                              tokenizer_fingerprint=tok.fingerprint())[1]["train"]
             for url in (str(tmp_path / "local"), f"{gcs_bucket}/stores/web")]
  a, b = (PackedDataset.from_stream(s, SEQ, tok.eos_id, SEED) for s in streams)
  for step in (0, 2):
    np.testing.assert_array_equal(a.batch(step, BATCH)["inputs"], b.batch(step, BATCH)["inputs"])
  shard = f"{gcs_bucket}/stores/web/validation/ends/c/0"
  store.write_bytes(shard, store.read_bytes(shard)[:-1])
  with pytest.raises(ConfigError, match=r"gs://.*/stores/web' is damaged: validation/ends/c/0 holds"):
    store.open_store(f"{gcs_bucket}/stores/web", vocab_size=VOCAB, add_bos=False, add_eos=True,
                     tokenizer_fingerprint=None)
  with pytest.raises(ConfigError, match=r"data.source: 'gs://no-such-bucket-x/s' has no manifest|cannot read"):
    store.read_manifest("gs://no-such-bucket-x/s")
  shutil.rmtree(tmp_path / "local")


def store_files(root):
  """The store proper: every file but prepare's working parts."""
  return {k: v for k, v in tree_bytes(root).items() if not k.startswith(".parts")}


def test_files_cut_into_byte_ranges_give_the_one_shard_per_file_store(corpus, tmp_path):
  _, tok = corpus
  lines = [json.dumps({"text": f"{t[:40]} é€𝄞 {i}"}, ensure_ascii=False)
           for i, (_, t) in enumerate(builtin.pydocs_documents()[:16])]
  lines[3:3] = ["", "  ", json.dumps({"text": " "})]  # blank, whitespace-only, and an empty document
  data = "\n".join(lines).encode("utf-8")  # the last line has no newline
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "a.jsonl").write_bytes(data)
  (tmp_path / "in" / "b.jsonl").write_bytes("\n".join(lines[:5] + [""]).encode("utf-8"))
  (tmp_path / "in" / "c.txt").write_text("one block\n\n\nanother é block\n", encoding="utf-8")
  # Hand-counted: 16 documents in a.jsonl, 3 in b.jsonl, routed by the hash of their line numbers, and the
  # txt file's two blocks.
  want = {"train": 0, "validation": 0}
  for name, text in (("a.jsonl", data), ("b.jsonl", "\n".join(lines[:5]).encode("utf-8"))):
    for line_no, line in enumerate(text.split(b"\n"), start=1):
      if line.strip() and json.loads(line)["text"].strip():
        want["validation" if builtin._unit_hash(f"{name}:{line_no}") < 0.3 else "train"] += 1
  for block in ("0", "1"):
    want["validation" if builtin._unit_hash(f"c.txt:{block}") < 0.3 else "train"] += 1
  assert sum(want.values()) == 16 + 3 + 2 and min(want.values()) > 0

  def prepare_with(out, bytes_per_shard):
    inputs = shards.Inputs(source=f"files:{tmp_path}/in/*", val_fraction=0.3, txt_documents="blank_line")
    job = prepare.make_job(inputs, tok, add_bos=True, add_eos=True, output=str(tmp_path / out),
                           bytes_per_shard=bytes_per_shard, shard_tokens=1 << 10)
    manifest = prepare.run_local(job, workers=1)
    return job, manifest

  whole, manifest = prepare_with("whole", 1 << 20)
  assert len(whole.shards) == 3
  assert {s: manifest.splits[s]["num_documents"] for s in want} == want
  reference = store_files(tmp_path / "whole")
  cuts = {"at a line start": len(lines[0].encode()) + 1, "inside é": data.index("é".encode()) + 1,
          "mid-line": 64}
  assert data[cuts["at a line start"] - 1:][:1] == b"\n" and data[cuts["inside é"] - 1:][:2] == "é".encode()
  for what, size in cuts.items():
    job, _ = prepare_with(f"cut{size}", size)
    ranges = [s for s in job.shards if s.path.endswith("a.jsonl")]
    assert len(ranges) == -(-len(data) // size) and all(s.stop for s in ranges)
    assert [s.stop for s in job.shards if s.path.endswith(".txt")] == [0]  # a .txt file is read whole
    assert store_files(tmp_path / f"cut{size}") == reference, what
  # A prepare resumed into the same output with other byte ranges re-encodes the parts that differ.
  prepare_with("cut64", 97)
  assert store_files(tmp_path / "cut64") == reference
