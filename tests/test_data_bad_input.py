"""Bad input: one clear ConfigError naming the setting or file; nothing half-written left behind."""

import gzip
import logging
import os

import numpy as np
import pytest

from mile_jax.data import text_files, tfds_sources
from mile_jax.data.tokenizer import train_tokenizer
from mile_jax.errors import ConfigError


def read(paths, root, **options):
  stats = text_files.ReadStats()
  docs = list(text_files.read_documents([str(p) for p in paths], str(root), stats=stats, **options))
  return docs, stats


def test_blank_line_blocks_whitespace_and_utf8(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"first block\nstill first\n\nsecond\n \t\nthird \xff end\n\n\n")
  (tmp_path / "b.txt").write_bytes(b"  \n\t\n")
  docs, stats = read([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path, txt_documents="blank_line")
  assert docs == [("a.txt:0", "first block\nstill first"), ("a.txt:1", "second"),
                  ("a.txt:2", "third \ufffd end")]
  # b.txt is all whitespace: one empty document, dropped and counted.
  assert (stats.documents, stats.empty_skipped, stats.utf8_replaced, stats.utf8_skipped) == (3, 1, 1, 0)
  docs, stats = read([tmp_path / "a.txt"], tmp_path, txt_documents="blank_line", decode_errors="skip")
  assert [d for _, d in docs] == ["first block\nstill first", "second"]
  assert (stats.utf8_replaced, stats.utf8_skipped) == (0, 1)
  docs, _ = read([tmp_path / "a.txt"], tmp_path)  # one document per file
  assert docs == [("a.txt:0", "first block\nstill first\n\nsecond\n \t\nthird \ufffd end\n\n\n")]


def test_jsonl_errors_name_the_file_and_line(tmp_path):
  path = tmp_path / "c.jsonl"
  path.write_text('{"text": "ok"}\n\n{"body": "no text field"}\n')
  with pytest.raises(ConfigError, match=r"data.text_field: .*c.jsonl' line 3 has no field 'text'"):
    read([path], tmp_path)
  path.write_text('{"text": "ok"}\n{"text": 7}\n')
  with pytest.raises(ConfigError, match=r"data.text_field: .*line 2 field 'text' is int"):
    read([path], tmp_path)
  path.write_text('{"text": "ok"}\n{"text": "unclosed\n')
  with pytest.raises(ConfigError, match=r"data.source: .*c.jsonl' line 2 is not valid JSON"):
    read([path], tmp_path)
  (tmp_path / "d.jsonl.gz").write_bytes(b"not gzip at all")
  with pytest.raises(ConfigError, match=r"data.source: cannot read .*d.jsonl.gz"):
    read([tmp_path / "d.jsonl.gz"], tmp_path)


def test_glob_errors(tmp_path):
  with pytest.raises(ConfigError, match=r"data.source: no files match '.*nothing/\*.txt'"):
    text_files.list_files(str(tmp_path / "nothing/*.txt"))
  (tmp_path / "x.csv").write_text("a,b")
  with pytest.raises(ConfigError, match=r"data.source: cannot tell the format of .*x.csv"):
    text_files.list_files(str(tmp_path / "*"))


def test_a_symlink_loop_lists_each_file_once_by_its_shortest_path(tmp_path):
  (tmp_path / "data" / "sub").mkdir(parents=True)
  (tmp_path / "data" / "a.txt").write_text("first")
  (tmp_path / "data" / "sub" / "b.txt").write_text("second")
  os.symlink(tmp_path / "data", tmp_path / "data" / "sub" / "up")  # **/ goes round this loop.
  os.symlink(tmp_path / "data" / "a.txt", tmp_path / "data" / "sub" / "same.txt")
  paths = text_files.list_files(str(tmp_path / "data" / "**" / "*.txt"))
  assert paths == [str(tmp_path / "data" / "a.txt"), str(tmp_path / "data" / "sub" / "b.txt")]
  docs, _ = read(paths, tmp_path / "data")
  assert docs == [("a.txt:0", "first"), ("sub/b.txt:0", "second")]


def test_a_file_that_is_not_text_is_named(tmp_path):
  (tmp_path / "good.txt").write_text("a few words of text " * 50)
  (tmp_path / "mostly.txt").write_bytes(b"caf\xe9 au lait, na\xefve r\xe9sum\xe9 " * 20)  # Latin-1: 4 of 27 characters bad.
  (tmp_path / "noise.txt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  docs, stats = read([tmp_path / "good.txt", tmp_path / "mostly.txt"], tmp_path)
  assert len(docs) == 2 and stats.utf8_replaced == 1
  for options in ({}, {"decode_errors": "skip"}, {"txt_documents": "blank_line"}):
    with pytest.raises(ConfigError, match=r"^data.source: '.*noise.txt' is not UTF-8 text \(\d+% of its characters"):
      read([tmp_path / "good.txt", tmp_path / "noise.txt"], tmp_path, **options)
  (tmp_path / "zeros.txt").write_bytes(b"\0" * 100 + b"valid UTF-8, but a binary's bytes")
  with pytest.raises(ConfigError, match=r"'.*zeros.txt' is not UTF-8 text"):
    read([tmp_path / "zeros.txt"], tmp_path)


def prepare(pattern, data_dir, **options):
  kwargs = dict(txt_documents="file", text_field="text", decode_errors="replace", val_fraction=0.3)
  kwargs.update(options)
  return tfds_sources.prepare_files(pattern, str(data_dir), **kwargs)


def finished_datasets(data_dir):
  return [d for d, _, files in os.walk(data_dir) if "dataset_info.json" in files]


def test_empty_corpus_leaves_nothing_prepared(tmp_path):
  for i in range(5):
    (tmp_path / f"e{i}.txt").write_text(" \n\t " if i % 2 else "")
  with pytest.raises(ConfigError, match=r"data.source: the files matching .* hold no non-empty documents \(5 empty"):
    prepare(str(tmp_path / "*.txt"), tmp_path / "prepared")
  assert not finished_datasets(tmp_path / "prepared")


def test_interrupted_preparation_is_redone_and_counts_are_logged(tmp_path, monkeypatch, caplog):
  files = tmp_path / "files"
  files.mkdir()
  for i in range(30):
    (files / f"d{i}.txt").write_bytes(f"document {i} ".encode() * 20 + (b"\xfe" if i == 7 else b""))
  gzip_path = files / "z.txt.gz"
  gzip_path.write_bytes(gzip.compress(b"zipped document"))
  calls = {"n": 0}
  real = text_files._decode

  def interrupted(*args):
    calls["n"] += 1
    if calls["n"] == 25:
      raise KeyboardInterrupt
    return real(*args)

  monkeypatch.setattr(text_files, "_decode", interrupted)
  with pytest.raises(KeyboardInterrupt):
    prepare(str(files / "*"), tmp_path / "prepared")
  assert not finished_datasets(tmp_path / "prepared")
  monkeypatch.setattr(text_files, "_decode", real)
  with caplog.at_level(logging.INFO):
    builder = prepare(str(files / "*"), tmp_path / "prepared")
  assert "skipped 0 empty documents; invalid UTF-8: 1 documents replaced, 0 skipped" in caplog.text
  splits = builder.as_data_source()
  texts = sorted(r["text"].decode() for source in splits.values() for r in source)
  want = sorted([f"document {i} " * 20 + ("\ufffd" if i == 7 else "") for i in range(30)] + ["zipped document"])
  assert texts == want
  assert len(finished_datasets(tmp_path / "prepared")) == 1


