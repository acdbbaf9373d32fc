"""`eval.py --log_samples`: the record of every scored document, checked field by field against
records written out by hand for a tiny task and a stand-in model."""

import json

import pytest

from mile_jax.evaluation import report
from mile_jax.evaluation import runner

BOOLQ = [{"passage": "Cats purr.", "question": "do cats purr", "label": 1},
         {"passage": "Fish swim.", "question": "do fish fly", "label": 0}]
TRIVIAQA = [{"question": "Capital of Turkey", "answer": {"aliases": ["Ankara", "İstanbul"]}},
            {"question": "Capital of France", "answer": {"aliases": ["Paris"]}}]
WINOGRANDE = [{"sentence": "The cup fell because _ was wobbly.", "option1": "the cup", "option2": "the table",
               "answer": "2"}]


class _TableLM:
  """Log-likelihoods and greedy flags looked up by continuation (WinoGrande: by context),
  generations by prompt."""
  LOGLIK = {" no": (-1.5, False), " yes": (-0.25, True),
            "The cup fell because the cup": (-3.0, False), "The cup fell because the table": (-2.0, True)}
  GENERATIONS = {"Question: Capital of Turkey?\nAnswer:": " İstanbul ",
                 "Question: Capital of France?\nAnswer:": " Lyon"}

  def loglikelihood(self, requests, desc=""):
    return [self.LOGLIK[c] if c in self.LOGLIK else self.LOGLIK[x] for x, c in requests]

  def generate_until(self, prompts, until, max_gen_toks, desc=""):
    assert until == ("\n", ".", ",")
    return [self.GENERATIONS[p] for p in prompts]


def _expected():
  boolq = [{"task": "boolq", "doc_id": i, "doc": doc, "target": doc["label"],
            "arguments": [[f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", " no"],
                          [f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", " yes"]],
            "choices": ["no", "yes"], "loglikelihoods": [-1.5, -0.25], "is_greedy": [False, True],
            "acc": [1.0, 0.0][i]}  # " yes" is likelier: right for the first document only
           for i, doc in enumerate(BOOLQ)]
  triviaqa = [
      # "İstanbul" and the aliases' array are both 8 wide: both lower-case to "i̇stanbu", a match.
      {"task": "triviaqa", "doc_id": 0, "doc": TRIVIAQA[0], "target": ["Ankara", "İstanbul"],
       "prompt": "Question: Capital of Turkey?\nAnswer:", "generation": " İstanbul ", "answer": "İstanbul",
       "exact_match": 1.0},
      {"task": "triviaqa", "doc_id": 1, "doc": TRIVIAQA[1], "target": ["Paris"],
       "prompt": "Question: Capital of France?\nAnswer:", "generation": " Lyon", "answer": "Lyon",
       "exact_match": 0.0}]
  winogrande = [{"task": "winogrande", "doc_id": 0, "doc": WINOGRANDE[0], "target": 1,
                 "arguments": [["The cup fell because the cup", " was wobbly."],
                               ["The cup fell because the table", " was wobbly."]],
                 "choices": ["The cup fell because the cup", "The cup fell because the table"],
                 "loglikelihoods": [-3.0, -2.0], "is_greedy": [False, True], "acc": 1.0}]
  return {"boolq": boolq, "triviaqa": triviaqa, "winogrande": winogrande}


@pytest.fixture
def task_dir(tmp_path):
  for name, docs in (("boolq", BOOLQ), ("triviaqa", TRIVIAQA), ("winogrande", WINOGRANDE)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  return tmp_path


def test_samples_hold_each_documents_requests_answers_and_scores(task_dir, tmp_path):
  names = ["boolq", "triviaqa", "winogrande"]
  samples = {}
  entries = runner.score_tasks(_TableLM(), names, runner.EvalOptions(workdir="", task_data_dir=str(task_dir)),
                               samples)
  expected = _expected()
  assert samples == expected
  # The records add up to the scores of the result.
  assert entries["boolq"]["metrics"]["acc"]["value"] == 0.5
  assert entries["triviaqa"]["metrics"]["exact_match"]["value"] == 0.5
  # Written beside the result file, one JSON Lines file per task, non-ASCII text as it is.
  paths = report.write_samples(samples, str(tmp_path / "out" / "step4_x.json"))
  assert paths == [str(tmp_path / "out" / f"step4_x_samples_{n}.jsonl") for n in names]
  for name, path in zip(names, paths):
    text = open(path, encoding="utf-8").read()
    assert [json.loads(line) for line in text.splitlines()] == expected[name]
  assert "İstanbul" in open(paths[1], encoding="utf-8").read()
  # Without `samples` nothing is collected and the entries are the same.
  assert runner.score_tasks(_TableLM(), names, runner.EvalOptions(workdir="", task_data_dir=str(task_dir))) == entries


def test_mmlu_samples_name_the_subject_and_count_within_it(tmp_path):
  rows = [{"question": f"q{i}", "subject": s, "choices": ["a", "b", "c", "d"], "answer": i % 4}
          for i, s in enumerate(["virology", "astronomy", "virology"])]
  (tmp_path / "mmlu").mkdir()
  (tmp_path / "mmlu" / "test.jsonl").write_text("".join(json.dumps(d) + "\n" for d in rows))

  class Letters:
    def loglikelihood(self, requests, desc=""):  # " C" is likeliest: right for q2 (answer 2)
      return [({" A": -4.0, " B": -3.0, " C": -1.0, " D": -2.0}[c], c == " C") for _, c in requests]

  samples = {}
  runner.score_tasks(Letters(), ["mmlu"], runner.EvalOptions(workdir="", num_fewshot=0, task_data_dir=str(tmp_path)),
                     samples)
  assert [(r["task"], r["doc_id"], r["doc"]["question"], r["target"], r["acc"]) for r in samples["mmlu"]] == [
      ("mmlu_astronomy", 0, "q1", 1, 0.0), ("mmlu_virology", 0, "q0", 0, 0.0), ("mmlu_virology", 1, "q2", 2, 1.0)]
  assert samples["mmlu"][2]["loglikelihoods"] == [-4.0, -3.0, -1.0, -2.0]
