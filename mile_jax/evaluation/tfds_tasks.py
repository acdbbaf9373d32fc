"""Benchmark documents from the TFDS catalog, converted to the Hugging Face field layout.

Each TFDS record becomes the dict of the Hugging Face dataset that the harness
reads, so that `tasks.Task.process_doc` and the prompts stay the same for both
sources. Fields the harness does not read and TFDS does not store (ids) are
left out.

| task | TFDS dataset | harness split -> TFDS split | conversion |
|---|---|---|---|
| hellaswag | hellaswag | validation, train | see below: not exact |
| piqa | piqa | validation, train | `label` int; TFDS's `id` dropped |
| winogrande | winogrande | validation, train -> train_xl | `label` 0/1 -> `answer` "1"/"2" |
| arc_easy, arc_challenge | ai2_arc/ARC-Easy, ai2_arc/ARC-Challenge | test, train | class ids -> letters |
| openbookqa | openbookqa | test, train | `question.stem`, `choice_A..D` -> `question_stem`, `choices` |
| boolq | bool_q | validation, train | `answer` bool -> `label` 0/1 |
| triviaqa | trivia_qa/rc.nocontext | validation, train | `question`, `answer` as they are |

SIQA and MMLU are not in the catalog: they come from local files only.

Where the result can differ from the harness's:
- HellaSwag: TFDS keeps only `context` (the dataset's `ctx`, which is
  `ctx_a + " " + ctx_b`), not `ctx_a` and `ctx_b`. The harness builds
  `ctx_a + " " + ctx_b.capitalize()`, which upper-cases the first letter of
  `ctx_b` and lower-cases the rest of it. The split point cannot be recovered,
  so the conversion sets `ctx_a = context`, `ctx_b = ""`: prompts equal the
  harness's where `ctx_b` is empty or already capitalized that way, and
  otherwise differ in the letter case of the `ctx_b` part. A warning says so.
- ARC: where the source file labels choices "1".."5", TFDS stores letters; the
  gold index, the prompts and the choices are unchanged.
- OpenBookQA: TFDS reads the dataset's "Additional" files, the harness the
  "main" configuration; the converted fields are the question stem, the four
  choices and the answer key.
- BoolQ: the harness reads super_glue/boolq; TFDS's super_glue builder needs
  TensorFlow even to describe its features, so bool_q (the authors' release of
  the same questions and passages) is read instead.
- TriviaQA: preparing trivia_qa needs TensorFlow (its builder lists files with
  tf.io.gfile); reading an array_record copy prepared elsewhere does not.
- Order: TFDS stores a split shuffled by a hash of each record's key, so
  documents come in another order than the dataset's files. Zero-shot scores
  on a whole split are the same; `--limit` takes other documents, and few-shot
  examples (drawn by position in the pool with the harness's seed) differ.
"""

import dataclasses
import importlib
import logging
from collections.abc import Callable
from typing import Any

from mile_jax.config_lib import ConfigError
from mile_jax.data import tfds_sources
from mile_jax.evaluation import tasks as tasks_lib
from mile_jax.evaluation.errors import EvalError

Doc = dict[str, Any]
_log = logging.getLogger(__name__)

_LETTERS = "ABCDE"  # the ClassLabel names of ai2_arc and openbookqa, in order


@dataclasses.dataclass(frozen=True)
class CatalogTask:
  """Where one task's documents are in the TFDS catalog, and how to convert them."""
  dataset: str  # "<dataset>[/<config>]"
  splits: dict[str, str]  # the harness's split name -> the TFDS split
  convert: Callable[[dict], Doc]  # one decoded TFDS record -> the Hugging Face dataset's fields
  module: str = ""  # builder module that registers the dataset (text/ builders are not found otherwise)
  warning: str = ""  # logged when the task is read: where the conversion is not exact


def _str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _strs(values) -> list[str]:
  return [_str(v) for v in values]


def _hellaswag(r: dict) -> Doc:
  context, label = _str(r["context"]), int(r["label"])
  return {"activity_label": _str(r["activity_label"]), "ctx_a": context, "ctx_b": "", "ctx": context,
          "endings": _strs(r["endings"]), "source_id": _str(r["source_id"]),
          "split_type": _str(r["split_type"]), "label": "" if label < 0 else str(label)}


def _piqa(r: dict) -> Doc:
  return {"goal": _str(r["goal"]), "sol1": _str(r["sol1"]), "sol2": _str(r["sol2"]), "label": int(r["label"])}


def _winogrande(r: dict) -> Doc:
  label = int(r["label"])  # ClassLabel(names=["1", "2"]); -1 on the unlabelled test split
  return {"sentence": _str(r["sentence"]), "option1": _str(r["option1"]), "option2": _str(r["option2"]),
          "answer": "" if label < 0 else "12"[label]}


def _arc(r: dict) -> Doc:
  choices = r["choices"]
  return {"id": _str(r["id"]), "question": _str(r["question"]),
          "choices": {"text": _strs(choices["text"]), "label": [_LETTERS[int(i)] for i in choices["label"]]},
          "answerKey": _LETTERS[int(r["answerKey"])]}


def _openbookqa(r: dict) -> Doc:
  question = r["question"]
  return {"question_stem": _str(question["stem"]),
          "choices": {"text": [_str(question[f"choice_{c}"]) for c in "ABCD"], "label": list("ABCD")},
          "answerKey": _LETTERS[int(r["answerKey"])]}


def _boolq(r: dict) -> Doc:
  return {"question": _str(r["question"]), "passage": _str(r["passage"]), "label": int(bool(r["answer"]))}


_ANSWER_FIELDS = ("matched_wiki_entity_name", "normalized_matched_wiki_entity_name", "normalized_value",
                  "type", "value")


def _triviaqa(r: dict) -> Doc:
  answer = r["answer"]
  return {"question": _str(r["question"]), "question_id": _str(r["question_id"]),
          "question_source": _str(r["question_source"]),
          "answer": dict({"aliases": _strs(answer["aliases"]),
                          "normalized_aliases": _strs(answer["normalized_aliases"])},
                         **{k: _str(answer[k]) for k in _ANSWER_FIELDS})}


_HELLASWAG_WARNING = (
    "hellaswag from TFDS: TFDS stores ctx, not ctx_a and ctx_b, so prompts keep the letter case of ctx_b "
    "where the harness capitalizes it (ctx_b.capitalize()); scores can differ slightly from the harness's")
_TEST_TRAIN = {"test": "test", "train": "train"}
_VALIDATION_TRAIN = {"validation": "validation", "train": "train"}

CATALOG: dict[str, CatalogTask] = {
    "hellaswag": CatalogTask("hellaswag", _VALIDATION_TRAIN, _hellaswag, "tensorflow_datasets.text.hellaswag",
                             _HELLASWAG_WARNING),
    "piqa": CatalogTask("piqa", _VALIDATION_TRAIN, _piqa),
    "winogrande": CatalogTask("winogrande", {"validation": "validation", "train": "train_xl"}, _winogrande,
                              "tensorflow_datasets.text.winogrande"),
    "arc_easy": CatalogTask("ai2_arc/ARC-Easy", _TEST_TRAIN, _arc),
    "arc_challenge": CatalogTask("ai2_arc/ARC-Challenge", _TEST_TRAIN, _arc),
    "openbookqa": CatalogTask("openbookqa", _TEST_TRAIN, _openbookqa),
    "boolq": CatalogTask("bool_q", _VALIDATION_TRAIN, _boolq),
    "triviaqa": CatalogTask("trivia_qa/rc.nocontext", _VALIDATION_TRAIN, _triviaqa),
}


def _entry(task: tasks_lib.Task) -> CatalogTask:
  if task.name not in CATALOG:
    raise EvalError(
        f"--task_source: task {task.name!r} is not in the TFDS catalog (TFDS has {', '.join(CATALOG)}); "
        f"write its {task.eval_split!r} split as <task_data_dir>/{task.name}/{task.eval_split}.jsonl and use "
        "--task_source=local or auto with --task_data_dir")
  return CATALOG[task.name]


def _builder(entry: CatalogTask, data_dir: str):
  if entry.module:
    importlib.import_module(entry.module)
  try:
    return tfds_sources.prepared_builder(
        entry.dataset, data_dir, setting="--tfds_data_dir",
        prepare_hint=", or point --tfds_data_dir at the directory that holds it")
  except ConfigError as e:
    raise EvalError(str(e)) from None


def _reader(entry: CatalogTask, builder):
  try:
    return tfds_sources.split_reader(entry.dataset, builder, setting="--task_source=tfds")
  except ConfigError as e:
    raise EvalError(str(e)) from None


def _splits(task: tasks_lib.Task, num_fewshot: int) -> list[str]:
  return [task.eval_split] + ([task.fewshot_split] if num_fewshot > 0 else [])


def check(task: tasks_lib.Task, data_dir: str, num_fewshot: int) -> None:
  """Raises EvalError, naming the flag to change, unless the task's splits can be read from TFDS."""
  entry = _entry(task)
  builder = _builder(entry, data_dir)
  for split in _splits(task, num_fewshot):
    if entry.splits[split] not in builder.info.splits:
      raise EvalError(f"--tfds_data_dir: TFDS dataset {builder.info.full_name} in {builder.data_dir} has no "
                      f"{entry.splits[split]!r} split (it has {sorted(builder.info.splits.keys())})")
  _reader(entry, builder)
  if entry.warning:
    _log.warning(entry.warning)


def describe(task: tasks_lib.Task, data_dir: str, split: str) -> str:
  """'tfds:<dataset>/<config>/<version>:<split>', for the result file."""
  entry = _entry(task)
  return f"tfds:{_builder(entry, data_dir).info.full_name}:{entry.splits[split]}"


def load_split(task: tasks_lib.Task, data_dir: str, split: str, limit: int = 0) -> list[Doc]:
  """Processed documents of the harness's split `split`, in TFDS's order; the first `limit` when > 0."""
  entry = _entry(task)
  builder = _builder(entry, data_dir)
  tfds_split = entry.splits[split]
  records = _reader(entry, builder)(tfds_split)
  n = min(limit, len(records)) if limit > 0 else len(records)
  if not n:
    raise EvalError(f"--tfds_data_dir: split {tfds_split!r} of TFDS dataset {builder.info.full_name} "
                    f"in {builder.data_dir} holds no documents")
  rows = records.__getitems__(list(range(n))) if hasattr(records, "__getitems__") else records[:n]
  docs = []
  for i, record in enumerate(rows):
    try:
      docs.append(task.process_doc(entry.convert(record)))
    except (KeyError, TypeError, ValueError, IndexError) as e:
      raise EvalError(f"TFDS dataset {builder.info.full_name}, split {tfds_split!r}, record {i}: not a "
                      f"{task.harness_name} document ({type(e).__name__}: {e})") from None
  return docs
