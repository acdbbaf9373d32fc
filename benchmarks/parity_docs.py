"""Invented benchmark documents in the Hugging Face field layout, for harness_parity.py.

Every task gets a few scored documents and a few-shot pool, built from small
word lists with a fixed seed. They carry the cases where a reimplementation
can drift: HellaSwag's bracketed artefacts and doubled spaces, ARC answer
keys that are digits, OpenBookQA keys with a leading space, SIQA labels as
strings, a scored document that also sits in the few-shot pool (once or
twice: the harness must not show a document its own answer), questions with
surrounding whitespace, answers with punctuation and mixed case.
"""

import copy
import json
import os
import random

NAMES = ["Ada", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kit", "Lou"]
THINGS = ["kettle", "ladder", "lantern", "garden hose", "paint brush", "bicycle", "rope", "pillow",
          "compass", "teapot", "shovel", "violin"]
VERBS = ["cleans", "lifts", "paints", "ties", "folds", "opens", "carries", "fixes"]
PLACES = ["the shed", "a barn", "the harbour", "a kitchen", "the attic", "a meadow"]
ADJ = ["heavy", "bright", "narrow", "warm", "quiet", "sturdy", "tiny", "rusty"]
MMLU_SUBJECTS = ("abstract_algebra", "high_school_geography")


def _rng(name: str) -> random.Random:
  return random.Random(f"parity-{name}")


def hellaswag(split: str, n: int) -> list[dict]:
  r = _rng("hellaswag" + split)
  out = []
  for i in range(n):
    who, thing = r.choice(NAMES), r.choice(THINGS)
    endings = [f"{r.choice(VERBS)} the {r.choice(THINGS)} in {r.choice(PLACES)}." for _ in range(4)]
    if i % 3 == 0:  # WikiHow-style artefacts the harness cleans away
      endings[1] = f"[title] Put the {thing} down.  [step] Wait  a moment."
    ctx_b = r.choice(["then", "she", "the person", "[header] next", ""])
    out.append({"ind": i, "activity_label": r.choice(["Cooking", "Gardening", "Home repair"]),
                "ctx_a": f"{who} {r.choice(VERBS)} a {r.choice(ADJ)} {thing}.", "ctx_b": ctx_b,
                "ctx": "", "endings": endings, "source_id": f"src{i}", "split": split,
                "split_type": "indomain", "label": str(r.randrange(4))})
  return out


def piqa(split: str, n: int) -> list[dict]:
  r = _rng("piqa" + split)
  return [{"goal": f"How do you keep a {r.choice(THINGS)} {r.choice(ADJ)}?",
           "sol1": f"Store it in {r.choice(PLACES)}.", "sol2": f"Wrap it in a {r.choice(THINGS)} and wait.",
           "label": r.randrange(2)} for _ in range(n)]


def winogrande(split: str, n: int) -> list[dict]:
  r = _rng("winogrande" + split)
  out = []
  for _ in range(n):
    a, b = r.sample(NAMES, 2)
    thing = r.choice(THINGS)
    out.append({"sentence": f"{a} lent {b} the {thing} because _ had no {r.choice(THINGS)} of their own.",
                "option1": a, "option2": b, "answer": r.choice(["1", "2"])})
  return out


def arc(split: str, n: int, hard: bool) -> list[dict]:
  r = _rng(("arc_c" if hard else "arc_e") + split)
  out = []
  for i in range(n):
    k = 3 + i % 3
    labels = [str(j + 1) for j in range(k)] if i % 4 == 1 else list("ABCDE"[:k])
    out.append({"id": f"q{i}", "question": f"Which tool {r.choice(VERBS)} a {r.choice(ADJ)} {r.choice(THINGS)}?",
                "choices": {"text": [f"a {r.choice(THINGS)}" for _ in range(k)], "label": labels},
                "answerKey": r.choice(labels)})
  return out


def openbookqa(split: str, n: int) -> list[dict]:
  r = _rng("openbookqa" + split)
  out = []
  for i in range(n):
    key = r.choice("ABCD")
    out.append({"id": f"o{i}", "question_stem": f"A {r.choice(ADJ)} {r.choice(THINGS)} is best kept in",
                "choices": {"text": [r.choice(PLACES) for _ in range(4)], "label": list("ABCD")},
                "answerKey": (" " + key) if i % 3 == 0 else key})
  return out


def siqa(split: str, n: int) -> list[dict]:
  r = _rng("siqa" + split)
  return [{"context": f"{r.choice(NAMES)} {r.choice(VERBS)} the {r.choice(THINGS)} for a friend.",
           "question": r.choice(["How would the friend feel?", "What will happen next?", "Why did they do it?"]),
           "answerA": r.choice(["grateful", "surprised"]), "answerB": f"go to {r.choice(PLACES)}",
           "answerC": r.choice(["bored", "to help out"]), "label": str(1 + r.randrange(3))} for _ in range(n)]


def boolq(split: str, n: int) -> list[dict]:
  r = _rng("boolq" + split)
  return [{"question": f"is the {r.choice(THINGS)} {r.choice(ADJ)}",
           "passage": f"The {r.choice(THINGS)} in {r.choice(PLACES)} is {r.choice(ADJ)} and {r.choice(ADJ)}.",
           "idx": i, "label": r.randrange(2)} for i in range(n)]


def mmlu(subject: str, split: str, n: int) -> list[dict]:
  r = _rng("mmlu" + subject + split)
  return [{"question": (" " if i % 2 else "") + f"Which {r.choice(ADJ)} item belongs in {r.choice(PLACES)}?\n",
           "subject": subject, "choices": [r.choice(THINGS) for _ in range(4)], "answer": r.randrange(4)}
          for i in range(n)]


def triviaqa(split: str, n: int) -> list[dict]:
  r = _rng("triviaqa" + split)
  out = []
  for i in range(n):
    thing = r.choice(THINGS)
    aliases = [thing.title(), f"the {thing}", f"{thing}.", f"{r.choice(NAMES)}'s \"{thing}\" café"]
    out.append({"question": f"Which object did {r.choice(NAMES)} leave in {r.choice(PLACES)}",
                "question_id": f"t{split}{i}", "question_source": "invented",
                "answer": {"aliases": aliases, "normalized_aliases": [a.lower().strip(".") for a in aliases],
                           "value": aliases[0], "type": "WikipediaEntity"}})
  return out


def documents(n_eval: int = 6, n_pool: int = 8) -> dict[str, dict[str, list[dict]]]:
  """{task: {split: docs}} in mile_jax's layout (MMLU: all subjects in one file)."""
  out = {
      "hellaswag": {"validation": hellaswag("validation", n_eval), "train": hellaswag("train", n_pool)},
      "piqa": {"validation": piqa("validation", n_eval), "train": piqa("train", n_pool)},
      "winogrande": {"validation": winogrande("validation", n_eval), "train": winogrande("train", n_pool)},
      "arc_easy": {"test": arc("test", n_eval, False), "train": arc("train", n_pool, False)},
      "arc_challenge": {"test": arc("test", n_eval, True), "train": arc("train", n_pool, True)},
      "openbookqa": {"test": openbookqa("test", n_eval), "train": openbookqa("train", n_pool)},
      "siqa": {"validation": siqa("validation", n_eval), "train": siqa("train", n_pool)},
      "boolq": {"validation": boolq("validation", n_eval), "train": boolq("train", n_pool)},
      "mmlu": {"test": [d for s in MMLU_SUBJECTS for d in mmlu(s, "test", n_eval - s.count("_"))],
               "dev": [d for s in MMLU_SUBJECTS for d in mmlu(s, "dev", 5)]},
      "triviaqa": {"validation": triviaqa("validation", n_eval), "train": triviaqa("train", n_pool)},
  }
  # The first scored document also sits in the few-shot pool of the tasks
  # whose examples come from the training split with no test split, where the
  # harness's Random(1234) draws it first; BoolQ holds two copies, both drawn
  # for any number of shots, so the harness draws again.
  first, second = random.Random(1234).sample(range(n_pool), 2)
  for name in ("hellaswag", "piqa", "winogrande", "siqa", "boolq", "triviaqa"):
    out[name]["train"][first] = copy.deepcopy(out[name]["validation"][0])
  out["boolq"]["train"][second] = copy.deepcopy(out["boolq"]["validation"][0])
  return out


def write_jsonl(path: str, docs: list[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps(doc) + "\n")


def write(root: str, docs: dict[str, dict[str, list[dict]]]) -> None:
  """`<root>/<task>/<split>.jsonl`, plus `<root>/mmlu_<subject>/<split>.jsonl` per MMLU subject."""
  for name, splits in docs.items():
    for split, rows in splits.items():
      write_jsonl(os.path.join(root, name, f"{split}.jsonl"), rows)
  for subject in MMLU_SUBJECTS:
    for split, rows in docs["mmlu"].items():
      write_jsonl(os.path.join(root, f"mmlu_{subject}", f"{split}.jsonl"), [d for d in rows if d["subject"] == subject])
