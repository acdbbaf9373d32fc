"""Benchmark prompts, few-shot sampling, scoring and bucket thresholds against hand-written values."""

import json
import math
import os
import random

import numpy as np
import pytest

from mile_jax.evaluation import buckets
from mile_jax.evaluation import report
from mile_jax.evaluation import runner
from mile_jax.evaluation import scoring
from mile_jax.evaluation import tasks as tasks_lib
from mile_jax.evaluation.errors import EvalError

H, M, L = buckets.HIGH, buckets.MEDIUM, buckets.LOW


def test_frequency_buckets_on_a_hand_made_table():
  # Ranked: id0 50, id2 30, id3 10, id4 5, id5 5, id1 0 -> shares before: 0, .5, .8, .9, .95, 1.
  counts = np.array([50, 0, 30, 10, 5, 5])
  np.testing.assert_array_equal(buckets.frequency_buckets(counts), [H, L, H, M, M, L])
  # The id that crosses the high line belongs to high; ties are ranked by id (id4 before id5).
  np.testing.assert_array_equal(buckets.frequency_buckets(counts, 0.81, 0.05), [H, L, H, H, M, L])
  np.testing.assert_array_equal(buckets.frequency_buckets(counts, 0.8, 0.1), [H, L, H, M, L, L])
  with pytest.raises(EvalError, match="--bucket_low"):
    buckets.frequency_buckets(counts, 0.8, 0.3)


def test_scoring_by_hand():
  # acc takes the larger log-likelihood, acc_norm divides by the choice's characters.
  assert scoring.multiple_choice([-5.0, -6.0], ["a", "bbbbb"], gold=1) == {"acc": 0.0, "acc_norm": 1.0}
  assert scoring.multiple_choice([-5.0, -6.0], ["a", "bbbbb"], gold=0) == {"acc": 1.0, "acc_norm": 0.0}
  assert scoring.exact_match("  william shakespeare.", ["Shakespeare", "William Shakespeare"]) == 1.0
  assert scoring.exact_match("the Bard", ["Shakespeare"]) == 0.0
  assert scoring.truncate_at_stop(" Paris, France\nQ", ["\n", ".", ","]) == " Paris"
  mean, se = scoring.mean_stderr([1, 0, 1, 1])
  assert mean == 0.75 and se == pytest.approx(math.sqrt(0.25 / 4))  # sample var 0.25, n 4
  # Pooled standard error of two sub-tasks: sizes 4 and 2, stderrs 0.25 and 0.5.
  mean, se = scoring.pooled_mean_stderr([0.75, 0.5], [0.25, 0.5], [4, 2])
  assert mean == pytest.approx(4 / 6) and se == pytest.approx(math.sqrt((3 * 0.0625 * 4 + 1 * 0.25 * 2) / 4 / 6))


HELLASWAG = [
    {"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he", "label": "1",
     "endings": ["eats it [title] raw.", "bakes bread."]},
    {"activity_label": "Running", "ctx_a": "People run.", "ctx_b": "they", "label": "0",
     "endings": ["stop.", "fly  away."]},
]
CASES = {
    "hellaswag": (HELLASWAG, [
        ("Baking: A man mixes flour. He", [" eats it. raw.", " bakes bread."], 1),
        ("Running: People run. They", [" stop.", " fly away."], 0)]),
    "piqa": ([{"goal": "Open a jar", "sol1": "Twist", "sol2": "Eat", "label": 0},
              {"goal": "Dry hair", "sol1": "Water", "sol2": "Towel", "label": 1}], [
        ("Question: Open a jar\nAnswer:", [" Twist", " Eat"], 0),
        ("Question: Dry hair\nAnswer:", [" Water", " Towel"], 1)]),
    "arc_easy": ([{"question": "Sky colour?", "choices": {"text": ["red", "blue"], "label": ["A", "B"]},
                   "answerKey": "B"},
                  {"question": "2+2?", "choices": {"text": ["4", "5", "6"], "label": ["1", "2", "3"]},
                   "answerKey": "1"}], [
        ("Question: Sky colour?\nAnswer:", [" red", " blue"], 1),
        ("Question: 2+2?\nAnswer:", [" 4", " 5", " 6"], 0)]),
    "openbookqa": ([{"question_stem": "Plants need", "choices": {"text": ["sun", "salt"], "label": ["A", "B"]},
                     "answerKey": " A"},
                    {"question_stem": "Ice is", "choices": {"text": ["hot", "cold"], "label": ["A", "B"]},
                     "answerKey": "B"}], [
        ("Plants need", [" sun", " salt"], 0), ("Ice is", [" hot", " cold"], 1)]),
    "siqa": ([{"context": "Ann fell.", "question": "How is Ann?", "answerA": "hurt", "answerB": "glad",
               "answerC": "rich", "label": "1"},
              {"context": "Bo won.", "question": "Why?", "answerA": "luck", "answerB": "skill",
               "answerC": "rain", "label": "2"}], [
        ("Q: Ann fell. How is Ann?\nA:", [" hurt", " glad", " rich"], 0),
        ("Q: Bo won. Why?\nA:", [" luck", " skill", " rain"], 1)]),
    "boolq": ([{"passage": "Cats purr.", "question": "do cats purr", "label": 1},
               {"passage": "Fish swim.", "question": "do fish fly", "label": 0}], [
        ("Cats purr.\nQuestion: do cats purr?\nAnswer:", [" no", " yes"], 1),
        ("Fish swim.\nQuestion: do fish fly?\nAnswer:", [" no", " yes"], 0)]),
    "mmlu": ([{"question": " What is 1+1? ", "subject": "elementary_mathematics", "choices": ["1", "2", "3", "4"],
               "answer": 1},
              {"question": "Sky?", "subject": "astronomy", "choices": ["blue", "red", "x", "y"], "answer": 0}], [
        ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
         "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:", [" A", " B", " C", " D"], 1),
        ("The following are multiple choice questions (with answers) about astronomy.\n\n"
         "Sky?\nA. blue\nB. red\nC. x\nD. y\nAnswer:", [" A", " B", " C", " D"], 0)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_zero_shot_prompts(name):
  task = tasks_lib.TASKS[name]
  docs, expected = CASES[name]
  examples = tasks_lib.build_examples(task, [task.process_doc(d) for d in docs], [], 0)
  for example, (context, continuations, gold) in zip(examples, expected):
    assert example.requests == [(context, c) for c in continuations]
    assert example.gold == gold


def test_winogrande_scores_the_text_after_the_blank():
  task = tasks_lib.TASKS["winogrande"]
  docs = [{"sentence": "The cup fell because _ was wobbly.", "option1": "the cup", "option2": "the table",
           "answer": "2"},
          {"sentence": "Sam thanked Kim since _ helped.", "option1": "Sam", "option2": "Kim", "answer": "2"}]
  one, two = tasks_lib.build_examples(task, docs, [], 0)
  assert one.requests == [("The cup fell because the cup", " was wobbly."),
                          ("The cup fell because the table", " was wobbly.")] and one.gold == 1
  assert two.requests == [("Sam thanked Kim since Sam", " helped."), ("Sam thanked Kim since Kim", " helped.")]
  # A WinoGrande shot is the sentence with the right option filled in; Random(1234) draws
  # 2 of the pool of 2 as [1, 0] and the first one is kept.
  assert random.Random(1234).sample(range(2), 2) == [1, 0]
  (shot,) = tasks_lib.build_examples(task, docs[:1], [docs[0], docs[1]], 1)
  assert shot.requests[0][0] == "Sam thanked Kim since Kim helped.\n\nThe cup fell because the cup"


def test_triviaqa_prompt_and_few_shot_answer_is_the_first_alias():
  task = tasks_lib.TASKS["triviaqa"]
  # No test split: the harness draws 2 for 1 shot, [1, 0] under Random(1234), and keeps pool[1].
  pool = [{"question": "Capital of Peru", "answer": {"aliases": ["Lima"]}},
          {"question": "Capital of France", "answer": {"aliases": ["Paris", "Paree"]}}]
  docs = [{"question": "Who wrote Hamlet", "answer": {"aliases": ["Shakespeare"]}}]
  (example,) = tasks_lib.build_examples(task, docs, pool, 1)
  assert example.prompt == "Question: Capital of France?\nAnswer: Paris\n\nQuestion: Who wrote Hamlet?\nAnswer:"
  assert example.gold == ["Shakespeare"] and task.until == ("\n", ".", ",")


def test_few_shot_examples_follow_the_harness_seed_and_are_deterministic():
  task = tasks_lib.TASKS["piqa"]
  pool = [{"goal": f"g{i}", "sol1": f"a{i}", "sol2": f"b{i}", "label": i % 2} for i in range(10)]
  docs = [{"goal": "x", "sol1": "p", "sol2": "q", "label": 0}, {"goal": "y", "sol1": "r", "sol2": "s", "label": 1}]
  first = tasks_lib.build_examples(task, docs, pool, 2)
  assert [e.requests for e in first] == [e.requests for e in tasks_lib.build_examples(task, docs, pool, 2)]
  # One Random(1234) for the task, used document after document; PIQA has no test split,
  # so the harness draws k + 1 and drops the scored document (absent here): the first k.
  rnd = random.Random(1234)
  for example in first:
    shots = rnd.sample(pool, 3)[:2]
    text = "".join(f"Question: {s['goal']}\nAnswer: {[s['sol1'], s['sol2']][s['label']]}\n\n" for s in shots)
    assert example.requests[0][0] == text + f"Question: {example.doc['goal']}\nAnswer:"


def test_a_scored_document_drawn_twice_is_dropped_and_k_are_drawn_again():
  task = tasks_lib.TASKS["piqa"]
  doc = {"goal": "x", "sol1": "p", "sol2": "q", "label": 0}
  a = {"goal": "a", "sol1": "a1", "sol2": "a2", "label": 1}
  b = {"goal": "b", "sol1": "b1", "sol2": "b2", "label": 0}
  # For 2 shots Random(1234) draws k + 1 = 3 of 4: pool[3], pool[0], pool[2], two copies of the
  # scored document and b. One example is left, so the harness draws 2 from [a, b] with the
  # same generator, which gives [0, 1].
  rnd = random.Random(1234)
  assert rnd.sample(range(4), 3) == [3, 0, 2] and rnd.sample(range(2), 2) == [0, 1]
  (example,) = tasks_lib.build_examples(task, [doc], [doc, a, b, dict(doc)], 2)
  assert example.requests[0][0] == "Question: a\nAnswer: a2\n\nQuestion: b\nAnswer: b1\n\nQuestion: x\nAnswer:"
  with pytest.raises(EvalError, match=r"--num_fewshot=2: task 'piqa' has only 1 few-shot examples .* differ"):
    tasks_lib.build_examples(task, [doc], [doc, a, dict(doc)], 2)


def test_tasks_with_a_test_split_draw_exactly_k_examples():
  task = tasks_lib.TASKS["arc_easy"]
  pool = [{"question": f"q{i}", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "A"}
          for i in range(8)]
  (example,) = tasks_lib.build_examples(task, pool[:1], pool, 2)
  i, j = random.Random(1234).sample(range(8), 2)
  assert example.requests[0][0] == f"Question: q{i}\nAnswer: x\n\nQuestion: q{j}\nAnswer: x\n\nQuestion: q0\nAnswer:"


def test_mmlu_takes_the_first_dev_examples_of_its_subject():
  task = tasks_lib.TASKS["mmlu"]
  dev = [{"question": f"q{i}", "subject": s, "choices": ["a", "b", "c", "d"], "answer": i % 4}
         for s in ("astronomy", "virology") for i in range(3)]
  test = [{"question": "Q?", "subject": "virology", "choices": ["w", "x", "y", "z"], "answer": 2}]
  ((name, docs, pool),) = tasks_lib.split_subtasks(task, test, dev)
  (example,) = tasks_lib.build_examples(task, docs, pool, 2)
  assert name == "mmlu_virology"
  assert example.requests[0][0] == (
      "The following are multiple choice questions (with answers) about virology.\n\n"
      "q0\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\nq1\nA. a\nB. b\nC. c\nD. d\nAnswer: B\n\n"
      "Q?\nA. w\nB. x\nC. y\nD. z\nAnswer:")


class _LengthLM:
  """Log-likelihood = -(characters of " " + choice): acc picks the shortest choice;
  acc_norm divides by the choice's n characters, -(n + 1) / n, and picks the longest."""

  def loglikelihood(self, requests, desc=""):
    return [(-float(len(c)), False) for _, c in requests]


def test_acc_and_acc_norm_on_a_tiny_task(tmp_path):
  rows = [{"goal": "g1", "sol1": "short", "sol2": "much longer", "label": 0},   # acc 1, acc_norm 0
          {"goal": "g2", "sol1": "a long answer", "sol2": "tiny", "label": 1},  # acc 1, acc_norm 0
          {"goal": "g3", "sol1": "xx", "sol2": "y", "label": 0}]                 # acc 0, acc_norm 1
  (tmp_path / "piqa").mkdir()
  (tmp_path / "piqa" / "validation.jsonl").write_text("\n".join(map(__import__("json").dumps, rows)))
  opts = runner.EvalOptions(workdir="", tasks="piqa", task_data_dir=str(tmp_path))
  entry = runner.score_tasks(_LengthLM(), ["piqa"], opts)["piqa"]
  assert entry["num_examples"] == 3
  assert entry["metrics"]["acc"]["value"] == pytest.approx(2 / 3)
  assert entry["metrics"]["acc_norm"]["value"] == pytest.approx(1 / 3)
  assert entry["metrics"]["acc"]["stderr"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))


class _CountingLM(_LengthLM):
  def __init__(self):
    self.calls = []

  def loglikelihood(self, requests, desc=""):
    self.calls.append(len(requests))
    return super().loglikelihood(requests, desc)


def test_tasks_scored_together_in_one_call_keep_their_own_scores(tmp_path):
  piqa = [{"goal": "g1", "sol1": "short", "sol2": "much longer", "label": 0},   # acc 1, acc_norm 0
          {"goal": "g2", "sol1": "a long answer", "sol2": "tiny", "label": 1}]  # acc 1, acc_norm 0
  arc = [{"question": "q1", "choices": {"text": ["bb", "a", "cccc"], "label": ["A", "B", "C"]},
          "answerKey": "C"},  # acc 0 (picks "a"), acc_norm 1 (picks "cccc")
         {"question": "q2", "choices": {"text": ["xyz", "xy"], "label": ["A", "B"]}, "answerKey": "B"}]  # 1, 0
  for name, rows, split in (("piqa", piqa, "validation"), ("arc_easy", arc, "test")):
    (tmp_path / name).mkdir()
    (tmp_path / name / f"{split}.jsonl").write_text("\n".join(map(__import__("json").dumps, rows)))
  lm = _CountingLM()
  entries = runner.score_tasks(lm, ["piqa", "arc_easy"], runner.EvalOptions(workdir="", task_data_dir=str(tmp_path)))
  assert lm.calls == [4 + 5]  # every request of both tasks in one call
  assert entries["piqa"]["metrics"]["acc"]["value"] == 1.0
  assert entries["piqa"]["metrics"]["acc_norm"]["value"] == 0.0
  assert entries["arc_easy"]["num_examples"] == 2
  assert entries["arc_easy"]["metrics"]["acc"]["value"] == pytest.approx(1 / 2)
  assert entries["arc_easy"]["metrics"]["acc_norm"]["value"] == pytest.approx(1 / 2)


def test_bad_task_name_and_missing_task_file_give_one_clear_message(tmp_path):
  with pytest.raises(EvalError, match=r"--tasks: unknown task 'hellaswagg'; known tasks: ppl, buckets, hellaswag"):
    runner.evaluate(runner.EvalOptions(workdir=str(tmp_path), tasks="ppl,hellaswagg"))
  with pytest.raises(EvalError, match=r"task 'boolq': no file .*boolq/validation.jsonl"):
    runner.evaluate(runner.EvalOptions(workdir=str(tmp_path), tasks="boolq", task_data_dir=str(tmp_path)))


def test_compare_shows_differences_with_combined_stderr():
  def run(name, acc, se):
    return {"workdir": f"/runs/{name}", "step": 10, "config_hash": "x", "tasks": {
        "piqa": {"num_examples": 100, "metrics": {"acc": {"value": acc, "stderr": se}}}}}
  table = report.compare([run("ce", 0.60, 0.03), run("mile", 0.64, 0.04)])
  assert "| piqa | acc | 0.6000 ± 0.0300 | 0.6400 ± 0.0400 | +0.0400 ± 0.0500 |" in table


# "İ" (U+0130) lower-cases to two characters, "i" + U+0307 ("i̇"), and a NumPy string array keeps
# its width: the lower-cased text is cut to it. The prediction is repeated in an array of its own
# width, the aliases share one of the longest alias's width.
DOTTED = [
    # (prediction, aliases, the harness's score, Python's str.lower comparison)
    ("İstanbul", ["İstanbul", "Constantinople"], 0.0, 1.0),  # "i̇stanbu" (width 8) vs "i̇stanbul" (width 14)
    ("İstanbul", ["İstanbul"], 1.0, 1.0),  # both cut alike to "i̇stanbu"
    ("İstanbul", ["Constantinople", "İstanbul"], 0.0, 1.0),  # the order of the aliases does not matter
    ("İ", ["i"], 1.0, 0.0),  # "i̇" cut to "i" (width 1) equals "i"
    ("İ", ["ii", "i"], 1.0, 0.0),  # the alias "i" in a width-2 array is not cut: still "i"
    ("İİ", ["i\u0307"], 1.0, 0.0),  # "i̇i̇" (4 characters) cut to width 2: "i̇", the alias
    ("  William Shakespeare.", ["Shakespeare", "william shakespeare"], 1.0, 1.0),  # stripped, no punctuation
    ("the Bard", ["Shakespeare"], 0.0, 0.0),
]


@pytest.mark.parametrize("prediction, aliases, harness, python", DOTTED)
def test_exact_match_cuts_lower_case_to_the_array_width_as_the_harness_does(prediction, aliases, harness, python):
  assert scoring.exact_match(prediction, aliases) == harness
  plain = lambda t: t.lower().translate(str.maketrans("", "", "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"))
  assert float(any(plain(prediction.strip()) == plain(a) for a in aliases)) == python
  try:
    from lm_eval.api import metrics as harness_metrics  # pylint: disable=import-outside-toplevel
  except ImportError:
    if os.environ.get("CI"):
      raise  # A missing package must fail in CI (it installs requirements-eval.txt), not skip.
    pytest.skip("lm_eval is not installed (CI unset): compared against the hand-derived scores only")
  # The harness's TriviaQA scoring: its remove_whitespace filter strips the generation, then
  # exact_match gets the aliases and the prediction once per alias; any match scores 1.
  theirs = harness_metrics.exact_match_hf_evaluate(
      predictions=[prediction.strip()] * len(aliases), references=aliases, ignore_case=True,
      ignore_punctuation=True)["exact_match"]
  assert float(theirs > 0.0) == harness


def test_compare_of_a_workdir_without_results_says_to_run_eval_py_first(tmp_path):
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  (run / "config.json").write_text(json.dumps({"model": {"vocab_size": 512}}))  # a JSON file, not a result
  with pytest.raises(EvalError) as raised:
    report.load_run(str(run))
  assert str(raised.value) == (f"--compare: {run} has no eval.py results yet (none in {run}/eval); "
                               f"run eval.py --workdir {run} first")
  # Once eval.py has written one, it is found (config.json, newer, is passed over).
  (run / "eval").mkdir()
  result = {"workdir": str(run), "step": 4, "config_hash": "x", "tasks": {}}
  (run / "eval" / "step4_1.json").write_text(json.dumps(result))
  os.utime(run / "config.json")
  assert report.load_run(str(run)) == dict(result, source=f"{run}/eval/step4_1.json")
  with pytest.raises(EvalError, match=rf"^--compare: {run}/config.json is not an eval.py result \("):
    report.load_run(str(run / "config.json"))  # named by the user: said so
  (tmp_path / "cut.json").write_text('{"tasks": {')
  with pytest.raises(EvalError, match=rf"^--compare: {tmp_path}/cut.json is not an eval.py result"):
    report.load_run(str(tmp_path / "cut.json"))


def test_an_output_that_cannot_be_written_is_named_before_anything_loads(tmp_path):
  (tmp_path / "file").write_text("x")
  cases = {
      str(tmp_path): f"--output: {tmp_path} is a directory; give the path of a JSON file to write",
      str(tmp_path / "file" / "r.json"): f"--output: cannot write {tmp_path}/file/r.json: {tmp_path}/file is a "
                                         "file, not a directory",
  }
  if os.path.isdir("/proc/self"):  # Takes no new file, even from root.
    cases["/proc/nope/r.json"] = "--output: cannot write /proc/nope/r.json: /proc does not take new files ("
  for output, message in cases.items():
    with pytest.raises(EvalError) as raised:
      report.check_output(output)
    assert str(raised.value).startswith(message), str(raised.value)
  report.check_output(str(tmp_path / "new" / "dirs" / "r.json"))  # Made when written: fine, and nothing made yet.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("setting, message", [
    ({"ppl_batches": -1}, "--ppl_batches: must be >= 0 (0 = the whole validation split), got -1"),
    ({"max_gen_toks": -1}, "--max_gen_toks: must be >= 1, got -1"),
    ({"max_gen_toks": 0}, "--max_gen_toks: must be >= 1, got 0"),
    ({"mesh_shape": (1, 2)}, "--mesh_shape: expected three sizes (data, fsdp, tensor), positive or one -1, got 1,2"),
    ({"mesh_shape": (-1, -1, 1)}, "--mesh_shape: expected three sizes (data, fsdp, tensor), positive or one -1, "
                                  "got -1,-1,1"),
    ({"log_samples": True}, "--log_samples: writes benchmark documents, but --tasks=ppl has no benchmark"),
])
def test_numeric_flags_out_of_range_are_refused(tmp_path, setting, message):
  with pytest.raises(EvalError) as raised:  # Before the workdir (which has no checkpoint) is even looked at.
    runner.evaluate(runner.EvalOptions(workdir=str(tmp_path), tasks="ppl", **setting))
  assert str(raised.value) == message
