"""Benchmark documents from the TFDS catalog: real catalog builders prepared offline from
small files in their download layout, converted documents against hand-written Hugging Face
dicts, prompts and tiny-model scores against hand-written local JSON Lines files."""

import json
import os
import shutil
import sys

import jax
import pytest

import conftest
from mile_jax import train_lib
from mile_jax.data import tfds_sources
from mile_jax.evaluation import runner
from mile_jax.evaluation import task_data
from mile_jax.evaluation import tasks as tasks_lib
from mile_jax.evaluation import tfds_tasks
from mile_jax.evaluation.errors import EvalError

TASKS = tasks_lib.TASKS


def _write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


# ---- raw files, in the layout each builder's _split_generators reads from its downloads ----

PIQA_DEV = [({"id": "d0", "goal": "Open a jar", "sol1": "Twist the lid", "sol2": "Eat the lid"}, 0),
            ({"id": "d1", "goal": "Dry hair", "sol1": "Use water", "sol2": "Use a towel"}, 1),
            ({"id": "d2", "goal": "Cut paper", "sol1": "Use scissors", "sol2": "Use a spoon to tear it slowly"}, 0)]
PIQA_TRAIN = [({"id": f"t{i}", "goal": f"goal {i}", "sol1": f"yes {i}", "sol2": f"no {i}"}, i % 2) for i in range(4)]


def _arc_row(qid, stem, texts, labels, key):
  return {"id": qid, "question": {"stem": stem, "choices": [{"text": t, "label": l} for t, l in zip(texts, labels)]},
          "answerKey": key}


ARC_TEST = [_arc_row("Mercury_1", "Sky colour?", ["red", "blue", "green", "black"], "ABCD", "B"),
            _arc_row("NYSEDREGENTS_2", "2+2?", ["4", "5", "6"], "123", "1"),  # digit labels
            _arc_row("Mercury_3", "Pick e", ["a", "b", "c", "d", "e"], "ABCDE", "E")]
ARC_TRAIN = [_arc_row(f"Tr_{i}", f"train q{i}", ["x", "y"], "AB", "AB"[i % 2]) for i in range(3)]
ARC_DEV = [_arc_row("Dev_0", "dev q", ["x", "y"], "AB", "A")]


def _hellaswag_rows(prefix):
  # Every (source, split_type) pair, so that each of the builder's sub-splits is non-empty.
  return [{"ind": 0, "activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
           "ctx": "A man mixes flour. he", "endings": [f"{prefix} bakes bread.", "eats it [title] raw.", "sings.",
                                                       "naps."],
           "label": 0, "split_type": "indomain", "source_id": "activitynet~v_a"},
          {"ind": 1, "activity_label": "Running", "ctx_a": "[header] How to run [title] Stretch first.", "ctx_b": "",
           "ctx": "[header] How to run [title] Stretch first.", "endings": ["Go.", "Stop.", "Sit.", "Fly."],
           "label": 3, "split_type": "zeroshot", "source_id": "wikihow~1"},
          {"ind": 2, "activity_label": "Rowing", "ctx_a": "Boats float.", "ctx_b": "The USA team rows",
           "ctx": "Boats float. The USA team rows", "endings": ["fast.", "slow.", "up.", "down."],
           "label": 2, "split_type": "zeroshot", "source_id": "activitynet~v_b"},
          {"ind": 3, "activity_label": "Cooking", "ctx_a": "Boil water.", "ctx_b": "",
           "ctx": "Boil water.", "endings": ["Add pasta.", "Add sand.", "Drink.", "Wait."],
           "label": 0, "split_type": "indomain", "source_id": "wikihow~2"}]


WINOGRANDE_SIZES = ("xs", "s", "m", "l", "xl")


def _winogrande_rows(tag):
  return [{"qID": f"{tag}0", "sentence": f"{tag}: the cup fell because _ was wobbly.", "option1": "the cup",
           "option2": "the table", "answer": "2"},
          {"qID": f"{tag}1", "sentence": f"{tag}: Sam thanked Kim since _ helped.", "option1": "Sam",
           "option2": "Kim", "answer": "2"}]


def _write_downloads(root):
  """Returns {url fragment: local path} for the builders' download_and_extract calls."""
  piqa = os.path.join(root, "piqa", "physicaliqa-train-dev")
  for split, rows in (("train", PIQA_TRAIN), ("dev", PIQA_DEV)):
    _write_jsonl(os.path.join(piqa, f"{split}.jsonl"), [r for r, _ in rows])
    with open(os.path.join(piqa, f"{split}-labels.lst"), "w", encoding="utf-8") as f:
      f.writelines(f"{label}\n" for _, label in rows)
  arc = os.path.join(root, "arc", "ARC-V1-Feb2018-2", "ARC-Easy")
  for split, rows in (("Train", ARC_TRAIN), ("Dev", ARC_DEV), ("Test", ARC_TEST)):
    _write_jsonl(os.path.join(arc, f"ARC-Easy-{split}.jsonl"), rows)
  for split in ("train", "val", "test"):
    _write_jsonl(os.path.join(root, "hellaswag", f"hellaswag_{split}.jsonl"), _hellaswag_rows(split))
  wino = os.path.join(root, "winogrande", "winogrande_1.1")
  for name in [f"train_{s}" for s in WINOGRANDE_SIZES] + ["dev", "test"]:
    _write_jsonl(os.path.join(wino, f"{name}.jsonl"), _winogrande_rows(name))
  return {"physicaliqa": os.path.join(root, "piqa"), "ARC-V1": os.path.join(root, "arc"),
          "hellaswag_": os.path.join(root, "hellaswag"), "winogrande_1.1": os.path.join(root, "winogrande")}


class _HideTensorFlow:
  """Wraps an import finder so that it does not find tensorflow, as when it is not installed."""

  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      return None
    find = getattr(self._finder, "find_spec", None)
    return find(name, path, target) if find else None

  def invalidate_caches(self):
    if hasattr(self._finder, "invalidate_caches"):
      self._finder.invalidate_caches()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
  """A TFDS data directory with piqa, ai2_arc/ARC-Easy, hellaswag and winogrande prepared as
  array_record by their catalog builders, with TensorFlow made unimportable."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  root = str(tmp_path_factory.mktemp("tfds"))
  data_dir = os.path.join(root, "data")
  places = _write_downloads(os.path.join(root, "downloads"))

  def local(url):
    (path,) = [p for fragment, p in places.items() if fragment in url]
    return os.path.join(path, os.path.basename(url)) if url.endswith(".jsonl") else path

  def download_and_extract(self, urls):
    del self
    return {k: local(u) for k, u in urls.items()} if isinstance(urls, dict) else local(urls)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
    mp.setattr(sys, "meta_path", [_HideTensorFlow(f) for f in sys.meta_path])
    assert "tensorflow" not in sys.modules
    for task in ("piqa", "arc_easy", "hellaswag", "winogrande"):
      entry = tfds_tasks.CATALOG[task]
      if entry.module:
        __import__(entry.module)
      tfds.builder(entry.dataset, data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def _sorted(docs, key):
  return sorted(docs, key=lambda d: json.dumps(d[key]))


def test_catalog_documents_are_the_hugging_face_fields(catalog):
  piqa = tfds_tasks.load_split(TASKS["piqa"], catalog, "validation")
  assert _sorted(piqa, "goal") == [
      {"goal": "Cut paper", "sol1": "Use scissors", "sol2": "Use a spoon to tear it slowly", "label": 0},
      {"goal": "Dry hair", "sol1": "Use water", "sol2": "Use a towel", "label": 1},
      {"goal": "Open a jar", "sol1": "Twist the lid", "sol2": "Eat the lid", "label": 0}]
  arc = tfds_tasks.load_split(TASKS["arc_easy"], catalog, "test")
  assert _sorted(arc, "id") == [
      {"id": "Mercury_1", "question": "Sky colour?",
       "choices": {"text": ["red", "blue", "green", "black"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
      {"id": "Mercury_3", "question": "Pick e",
       "choices": {"text": ["a", "b", "c", "d", "e"], "label": ["A", "B", "C", "D", "E"]}, "answerKey": "E"},
      # The dataset (and Hugging Face) label this one "1".."3"; TFDS stores letters.
      {"id": "NYSEDREGENTS_2", "question": "2+2?",
       "choices": {"text": ["4", "5", "6"], "label": ["A", "B", "C"]}, "answerKey": "A"}]
  # WinoGrande's few-shot split is the harness's winogrande_xl "train": TFDS's train_xl.
  wino_train = tfds_tasks.load_split(TASKS["winogrande"], catalog, "train")
  assert _sorted(wino_train, "sentence") == [
      {"sentence": "train_xl: Sam thanked Kim since _ helped.", "option1": "Sam", "option2": "Kim", "answer": "2"},
      {"sentence": "train_xl: the cup fell because _ was wobbly.", "option1": "the cup", "option2": "the table",
       "answer": "2"}]
  # HellaSwag: TFDS keeps only ctx, so ctx_b is empty and the whole context is ctx_a.
  (baking,) = [d for d in tfds_tasks.load_split(TASKS["hellaswag"], catalog, "validation")
               if d["activity_label"] == "Baking"]
  assert {k: baking[k] for k in ("ctx_a", "ctx_b", "ctx", "label", "split_type", "source_id")} == {
      "ctx_a": "A man mixes flour. he", "ctx_b": "", "ctx": "A man mixes flour. he", "label": "0",
      "split_type": "indomain", "source_id": "activitynet~v_a"}
  assert baking["query"] == "Baking: A man mixes flour. he" and baking["gold"] == 0
  assert len(tfds_tasks.load_split(TASKS["piqa"], catalog, "validation", limit=2)) == 2


# ---- the same documents as local files in the Hugging Face layout, written by hand ----

LOCAL = {
    ("piqa", "validation"): [
        {"goal": "Open a jar", "sol1": "Twist the lid", "sol2": "Eat the lid", "label": 0},
        {"goal": "Dry hair", "sol1": "Use water", "sol2": "Use a towel", "label": 1},
        {"goal": "Cut paper", "sol1": "Use scissors", "sol2": "Use a spoon to tear it slowly", "label": 0}],
    ("arc_easy", "test"): [
        {"id": "Mercury_1", "question": "Sky colour?",
         "choices": {"text": ["red", "blue", "green", "black"], "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "NYSEDREGENTS_2", "question": "2+2?", "choices": {"text": ["4", "5", "6"], "label": ["1", "2", "3"]},
         "answerKey": "1"},
        {"id": "Mercury_3", "question": "Pick e",
         "choices": {"text": ["a", "b", "c", "d", "e"], "label": ["A", "B", "C", "D", "E"]}, "answerKey": "E"}],
    ("hellaswag", "validation"): [
        {"ind": 0, "activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
         "ctx": "A man mixes flour. he", "endings": ["val bakes bread.", "eats it [title] raw.", "sings.", "naps."],
         "split": "val", "split_type": "indomain", "label": "0", "source_id": "activitynet~v_a"},
        {"ind": 1, "activity_label": "Running", "ctx_a": "[header] How to run [title] Stretch first.",
         "ctx_b": "", "ctx": "[header] How to run [title] Stretch first.", "endings": ["Go.", "Stop.", "Sit.", "Fly."],
         "split": "val", "split_type": "zeroshot", "label": "3", "source_id": "wikihow~1"},
        {"ind": 2, "activity_label": "Rowing", "ctx_a": "Boats float.", "ctx_b": "The USA team rows",
         "ctx": "Boats float. The USA team rows", "endings": ["fast.", "slow.", "up.", "down."],
         "split": "val", "split_type": "zeroshot", "label": "2", "source_id": "activitynet~v_b"},
        {"ind": 3, "activity_label": "Cooking", "ctx_a": "Boil water.", "ctx_b": "", "ctx": "Boil water.",
         "endings": ["Add pasta.", "Add sand.", "Drink.", "Wait."], "split": "val", "split_type": "indomain",
         "label": "0", "source_id": "wikihow~2"}],
}


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("local")
  for (task, split), rows in LOCAL.items():
    _write_jsonl(str(root / task / f"{split}.jsonl"), rows)
  return str(root)


def _requests(task, docs):
  return sorted((json.dumps(e.requests), json.dumps(e.gold)) for e in tasks_lib.build_examples(task, docs, [], 0))


def test_prompts_from_tfds_equal_prompts_from_local_files(catalog, local_dir):
  for name, split in (("piqa", "validation"), ("arc_easy", "test")):
    task = TASKS[name]
    from_tfds = task_data.load("tfds", "", catalog, task, split, 0)[0]
    from_local = task_data.load("local", local_dir, "", task, split, 0)[0]
    assert len(from_tfds) == 3 and _requests(task, from_tfds) == _requests(task, from_local)
  # HellaSwag: equal where ctx_b is empty (wikihow rows) or needs no change by capitalize(); the
  # harness's "he" -> "He" and "The USA team rows" -> "The usa team rows" cannot be reproduced.
  task = TASKS["hellaswag"]
  tfds_docs = {d["activity_label"]: d for d in tfds_tasks.load_split(task, catalog, "validation")}
  local_docs = {d["activity_label"]: task.process_doc(d) for d in LOCAL[("hellaswag", "validation")]}
  for label in ("Running", "Cooking"):
    assert _requests(task, [tfds_docs[label]]) == _requests(task, [local_docs[label]])
  assert local_docs["Baking"]["query"] == "Baking: A man mixes flour. He"
  assert tfds_docs["Baking"]["query"] == "Baking: A man mixes flour. he"
  assert local_docs["Rowing"]["query"] == "Rowing: Boats float. The usa team rows"
  assert tfds_docs["Rowing"]["query"] == "Rowing: Boats float. The USA team rows"


class _LengthLM:
  """Log-likelihood = -(characters of " " + choice): acc picks the shorter choice; acc_norm
  divides by the choice's n characters, -(n + 1) / n, and picks the longer."""

  def loglikelihood(self, requests, desc=""):
    del desc
    return [(-float(len(c)), False) for _, c in requests]


def test_hand_checked_scores_on_tfds_documents(catalog):
  # Open a jar: 13 vs 11 characters, gold 0 -> acc 0, acc_norm 1.
  # Dry hair: 9 vs 11, gold 1 -> acc 0, acc_norm 1.
  # Cut paper: 12 vs 29, gold 0 -> acc 1, acc_norm 0.
  opts = runner.EvalOptions(workdir="", tasks="piqa", task_source="tfds", tfds_data_dir=catalog)
  entry = runner.score_tasks(_LengthLM(), ["piqa"], opts)["piqa"]
  assert entry["num_examples"] == 3 and entry["source"] == "tfds:piqa/1.0.0:validation"
  assert entry["metrics"]["acc"]["value"] == pytest.approx(1 / 3)
  assert entry["metrics"]["acc_norm"]["value"] == pytest.approx(2 / 3)


@pytest.mark.slow
def test_tiny_model_scores_the_same_from_tfds_and_local_files(catalog, local_dir, tmp_path):
  workdir = str(tmp_path / "run")
  config = conftest.make_tiny_config(**{"train.steps": 2, "checkpoint.every_steps": 2, "optim.warmup_steps": 1})
  train_lib.Trainer(config, workdir, devices=jax.devices()[:1]).run()
  common = {"workdir": workdir, "tasks": "piqa,arc_easy", "batch_size": 8, "mesh_shape": (1, 1, 1),
            "devices": jax.devices()[:1]}
  from_tfds = runner.evaluate(runner.EvalOptions(task_source="tfds", tfds_data_dir=catalog, **common))
  # auto: the local files are there, so they are read.
  from_local = runner.evaluate(runner.EvalOptions(task_source="auto", task_data_dir=local_dir,
                                                  tfds_data_dir=catalog, **common))
  for name in ("piqa", "arc_easy"):
    a, b = from_tfds["tasks"][name], from_local["tasks"][name]
    assert a["source"].startswith("tfds:") and b["source"].endswith(".jsonl")
    assert a["num_examples"] == b["num_examples"] == 3
    for metric, m in a["metrics"].items():
      assert m["value"] == pytest.approx(b["metrics"][metric]["value"], abs=1e-12), (name, metric)
      assert m["stderr"] == pytest.approx(b["metrics"][metric]["stderr"], abs=1e-12), (name, metric)


def test_errors_name_the_flag_to_fix_before_any_checkpoint_is_read(catalog, tmp_path, monkeypatch, caplog):
  no_run = str(tmp_path)  # no checkpoints: every error below must come first

  def evaluate(**kw):
    runner.evaluate(runner.EvalOptions(workdir=no_run, **kw))

  with pytest.raises(EvalError, match=r"--task_source: must be one of local, tfds, auto, got 'hub'"):
    evaluate(tasks="piqa", task_source="hub")
  with pytest.raises(EvalError, match=r"--task_data_dir: needed for piqa .*--task_source=tfds"):
    evaluate(tasks="piqa")
  with pytest.raises(EvalError, match=r"--task_source: task 'siqa' is not in the TFDS catalog .*"
                                      r"<task_data_dir>/siqa/validation.jsonl"):
    evaluate(tasks="siqa", task_source="tfds", tfds_data_dir=catalog)
  with pytest.raises(EvalError, match=r"task 'mmlu' is not in the TFDS catalog"):
    evaluate(tasks="mmlu", task_source="auto", task_data_dir=str(tmp_path), tfds_data_dir=catalog)
  with pytest.raises(EvalError, match=r"--tfds_data_dir: TFDS dataset 'bool_q' is not prepared in .*"
                                      r"tfds build bool_q --file_format=array_record"):
    evaluate(tasks="boolq", task_source="tfds", tfds_data_dir=catalog)
  # A copy of piqa recorded as tfrecord, which only TensorFlow reads.
  tfrecord_dir = str(tmp_path / "tfrecord")
  shutil.copytree(os.path.join(catalog, "piqa"), os.path.join(tfrecord_dir, "piqa"))
  info_path = os.path.join(tfrecord_dir, "piqa", "1.0.0", "dataset_info.json")
  with open(info_path, encoding="utf-8") as f:
    info = json.load(f)
  with open(info_path, "w", encoding="utf-8") as f:
    json.dump(dict(info, fileFormat="tfrecord"), f)
  monkeypatch.setattr(tfds_sources.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(EvalError, match=r"--task_source=tfds: TFDS dataset 'piqa' in .* is stored as tfrecord, "
                                      r"which only TensorFlow reads: pip install tensorflow, or prepare it as "
                                      r"array_record \(tfds build piqa --file_format=array_record"):
    evaluate(tasks="piqa", task_source="tfds", tfds_data_dir=tfrecord_dir)
  with pytest.raises(EvalError, match=r"--workdir: "):  # the same tasks from array_record pass
    evaluate(tasks="piqa,arc_easy,hellaswag", task_source="tfds", tfds_data_dir=catalog, num_fewshot=1)
  assert [r.message for r in caplog.records if r.name == tfds_tasks.__name__] == [
      tfds_tasks.CATALOG["hellaswag"].warning]
