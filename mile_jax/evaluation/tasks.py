"""Benchmark task definitions and prompt construction, following lm-evaluation-harness 0.4.

Each task states what the harness's task configuration states: which split is
scored (the test split where the harness has one, else validation), which
split few-shot examples come from, how a document becomes a prompt, its
choices and its gold answer. Prompts are assembled as the harness assembles
them for a plain (non-chat) model:

    description + sum(shot_text + " " + shot_answer + "\n\n") + doc_text

and each choice is scored as the continuation " " + choice. WinoGrande is the
exception (a "multiple input" task): the blank is filled with each option to
make one context per option, and the shared text after the blank is scored.
Random few-shot examples are drawn with `random.Random(1234).sample`, one
generator per task used document after document, as the harness does (k + 1
drawn and the scored document dropped for the tasks without a test split; if
the pool holds the scored document twice and both copies are drawn, k are
drawn again from the pool without it);
MMLU takes the first k examples of the subject's dev split.
"""

import dataclasses
import random
import re
from typing import Any, Callable, Sequence

from mile_jax.evaluation.errors import EvalError

FEWSHOT_SEED = 1234
TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
HARNESS_VERSION = "lm-evaluation-harness 0.4.13"

Doc = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
  """One benchmark, in the terms of the harness's task configuration."""
  name: str  # the name on the command line
  harness_name: str
  version: str  # the harness's task version
  output: str  # "multiple_choice" or "generate_until"
  eval_split: str
  fewshot_split: str
  doc_to_text: Callable[[Doc], Any]
  doc_to_target: Callable[[Doc], Any]
  doc_to_choice: Callable[[Doc], list[str]] | None = None
  process_doc: Callable[[Doc], Doc] = lambda doc: doc
  metrics: tuple[str, ...] = ("acc", "acc_norm")
  multiple_input: bool = False  # the choices are contexts, the target is the continuation
  fewshot_sampler: str = "random"  # or "first_n"
  description: Callable[[Doc], str] | None = None
  default_num_fewshot: int = 0
  until: tuple[str, ...] = ()  # generate_until: stop sequences
  subtask_field: str | None = None  # MMLU: one sub-task per value of this field
  # The harness passes the scored document to its few-shot sampler, which then
  # draws k + 1 examples and drops that document, when the task's few-shot
  # split setting equals its test split setting; that includes tasks where
  # both are unset (no test split, few-shot examples from the training split).
  fewshot_draws_extra: bool = False


def _hellaswag_clean(text: str) -> str:
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def _hellaswag_doc(doc: Doc) -> Doc:
  context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
  return dict(doc, query=_hellaswag_clean(doc["activity_label"] + ": " + context),
              choices=[_hellaswag_clean(e) for e in doc["endings"]], gold=int(doc["label"]))


def _winogrande_choices(doc: Doc) -> list[str]:
  blank = doc["sentence"].index("_")
  return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def _arc_like(text_field: str, name: str, harness: str, version: str, strip_key: bool) -> Task:
  def target(doc):
    key = doc["answerKey"].lstrip() if strip_key else doc["answerKey"]
    return doc["choices"]["label"].index(key)
  text = ((lambda d: f"Question: {d['question']}\nAnswer:") if text_field == "question"
          else (lambda d: d[text_field]))
  return Task(name, harness, version, "multiple_choice", "test", "train", text, target,
              lambda d: list(d["choices"]["text"]))


def _mmlu_description(doc: Doc) -> str:
  subject = doc["subject"].replace("_", " ")
  return f"The following are multiple choice questions (with answers) about {subject}.\n\n"


def _mmlu_text(doc: Doc) -> str:
  c = doc["choices"]
  return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("hellaswag", "hellaswag", "1.0", "multiple_choice", "validation", "train",
         lambda d: d["query"], lambda d: d["gold"], lambda d: d["choices"], process_doc=_hellaswag_doc,
         fewshot_draws_extra=True),
    Task("piqa", "piqa", "1.0", "multiple_choice", "validation", "train",
         lambda d: f"Question: {d['goal']}\nAnswer:", lambda d: int(d["label"]),
         lambda d: [d["sol1"], d["sol2"]], fewshot_draws_extra=True),
    Task("winogrande", "winogrande", "1.0", "multiple_choice", "validation", "train",
         lambda d: {"1": 0, "2": 1}[d["answer"]],
         lambda d: d["sentence"][d["sentence"].index("_") + 1:].strip(),
         _winogrande_choices, metrics=("acc",), multiple_input=True, fewshot_draws_extra=True),
    _arc_like("question", "arc_easy", "arc_easy", "1.0", strip_key=False),
    _arc_like("question", "arc_challenge", "arc_challenge", "1.0", strip_key=False),
    _arc_like("question_stem", "openbookqa", "openbookqa", "1.0", strip_key=True),
    Task("siqa", "social_iqa", "0.0", "multiple_choice", "validation", "train",
         lambda d: f"Q: {d['context']} {d['question']}\nA:", lambda d: int(d["label"]) - 1,
         lambda d: [d["answerA"], d["answerB"], d["answerC"]], metrics=("acc",), fewshot_draws_extra=True),
    Task("boolq", "boolq", "2.0", "multiple_choice", "validation", "train",
         lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", lambda d: int(d["label"]),
         lambda d: ["no", "yes"], metrics=("acc",), fewshot_draws_extra=True),
    Task("mmlu", "mmlu", "2", "multiple_choice", "test", "dev", _mmlu_text, lambda d: int(d["answer"]),
         lambda d: ["A", "B", "C", "D"], metrics=("acc",), fewshot_sampler="first_n",
         description=_mmlu_description, default_num_fewshot=5, subtask_field="subject"),
    Task("triviaqa", "triviaqa", "3.0", "generate_until", "validation", "train",
         lambda d: f"Question: {d['question']}?\nAnswer:", lambda d: list(d["answer"]["aliases"]),
         metrics=("exact_match",), until=("\n", ".", ","), fewshot_draws_extra=True),
)}

# Tasks that are not benchmarks but measurements on the validation text.
TEXT_METRICS = ("ppl", "buckets")


def parse_task_names(spec: str) -> list[str]:
  """'ppl,piqa' -> ['ppl', 'piqa']; raises EvalError naming any unknown task."""
  names = [n.strip() for n in spec.split(",") if n.strip()]
  if not names:
    raise EvalError("--tasks: no task given")
  known = TEXT_METRICS + tuple(TASKS)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise EvalError(f"--tasks: unknown task {', '.join(map(repr, unknown))}; known tasks: {', '.join(known)}")
  return list(dict.fromkeys(names))


@dataclasses.dataclass
class Example:
  """One scored document: its loglikelihood requests or its generation prompt."""
  doc: Doc
  requests: list[tuple[str, str]]  # multiple_choice: (context, continuation) per choice
  choices: list[str]
  gold: Any  # choice index, or the list of reference answers
  prompt: str = ""  # generate_until


def _answer_text(task: Task, doc: Doc) -> str:
  target = task.doc_to_target(doc)
  if isinstance(target, list):
    return target[0]
  if isinstance(target, int) and task.doc_to_choice is not None:
    return task.doc_to_choice(doc)[target]
  return str(target)


def _shot_text(task: Task, doc: Doc) -> str:
  text = task.doc_to_text(doc)
  if task.multiple_input:
    text = task.doc_to_choice(doc)[text]
  return text + TARGET_DELIMITER + _answer_text(task, doc) + FEWSHOT_DELIMITER


def context(task: Task, doc: Doc, shots: Sequence[Doc]) -> str | list[str]:
  """The prompt of `doc` after its few-shot examples; one per choice for WinoGrande."""
  prefix = (task.description(doc) if task.description else "") + "".join(_shot_text(task, s) for s in shots)
  if task.multiple_input:
    return [prefix + c for c in task.doc_to_choice(doc)]
  return prefix + task.doc_to_text(doc)


def build_examples(task: Task, docs: Sequence[Doc], fewshot_pool: Sequence[Doc], num_fewshot: int) -> list[Example]:
  """Examples for `docs` (already processed and limited) with few-shot examples from `fewshot_pool`."""
  rnd = random.Random(FEWSHOT_SEED)
  extra = task.fewshot_draws_extra
  if num_fewshot and num_fewshot > len(fewshot_pool) - int(extra):
    raise EvalError(f"--num_fewshot={num_fewshot}: task {task.name!r} has only {len(fewshot_pool)} "
                    f"few-shot examples in its {task.fewshot_split!r} split")
  out = []
  for doc in docs:
    shots: list[Doc] = []
    if num_fewshot and task.fewshot_sampler == "first_n":
      shots = [d for d in fewshot_pool if not (extra and d == doc)][:num_fewshot]
    elif num_fewshot:
      if extra:
        shots = [d for d in rnd.sample(list(fewshot_pool), num_fewshot + 1) if d != doc][:num_fewshot]
        if len(shots) < num_fewshot:  # more than one copy of `doc` was drawn: draw again without it
          others = [d for d in fewshot_pool if d != doc]
          if len(others) < num_fewshot:
            raise EvalError(f"--num_fewshot={num_fewshot}: task {task.name!r} has only {len(others)} few-shot "
                            f"examples in its {task.fewshot_split!r} split that differ from a scored document")
          shots = rnd.sample(others, num_fewshot)
      else:
        shots = rnd.sample(list(fewshot_pool), num_fewshot)
    ctx = context(task, doc, shots)
    if task.output == "generate_until":
      out.append(Example(doc, [], [], task.doc_to_target(doc), prompt=ctx))
    elif task.multiple_input:
      continuation = TARGET_DELIMITER + task.doc_to_target(doc)
      out.append(Example(doc, [(c, continuation) for c in ctx], task.doc_to_choice(doc), task.doc_to_text(doc)))
    else:
      choices = task.doc_to_choice(doc)
      out.append(Example(doc, [(ctx, TARGET_DELIMITER + c) for c in choices], choices, task.doc_to_target(doc)))
  return out


def split_subtasks(task: Task, docs: Sequence[Doc], pool: Sequence[Doc]) -> list[tuple[str, list[Doc], list[Doc]]]:
  """(sub-task name, eval docs, few-shot pool) per value of `task.subtask_field`, sorted by name."""
  if task.subtask_field is None:
    return [(task.name, list(docs), list(pool))]
  field = task.subtask_field
  names = sorted({d[field] for d in docs})
  return [(f"{task.name}_{n}", [d for d in docs if d[field] == n], [d for d in pool if d[field] == n])
          for n in names]

