"""eval.py on a real (tiny) checkpoint: perplexity, log-likelihoods and generation
against direct float64 computations from the model's logits."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

import conftest
from mile_jax import train_lib
from mile_jax.evaluation import buckets as buckets_lib
from mile_jax.evaluation import harness
from mile_jax.evaluation import lm as lm_lib
from mile_jax.evaluation import perplexity
from mile_jax.evaluation import restore as restore_lib
from mile_jax.evaluation import runner
from mile_jax.evaluation.errors import EvalError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("run"))
  config = conftest.make_tiny_config(**{"train.steps": 10, "checkpoint.every_steps": 10})
  train_lib.Trainer(config, path, devices=jax.devices()[:1]).run()
  return path


@pytest.fixture(scope="module")
def restored(workdir):
  return restore_lib.restore(workdir, mesh_shape=(1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def lm(restored):
  return lm_lib.LanguageModel(restored, batch_size=4, progress=False)


def _log_softmax64(logits):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


_APPLY = {}


def _logits(restored, tokens):
  """(len(tokens), V) logits of one unpadded sequence; computed on a right-padded
  buffer of max_seq_len (causal: the padding cannot change them) to compile once."""
  if id(restored) not in _APPLY:
    _APPLY[id(restored)] = jax.jit(lambda p, t: restored.model.apply({"params": p}, t))
  buffer = np.zeros((1, restored.max_seq_len), np.int32)
  buffer[0, :len(tokens)] = tokens
  return np.asarray(_APPLY[id(restored)](restored.params, buffer))[0, :len(tokens)]


def test_perplexity_and_buckets_match_a_direct_computation(workdir, restored):
  opts = runner.EvalOptions(workdir=workdir, batch_size=8)
  dataset = runner._text_dataset(restored, opts)  # pylint: disable=protected-access
  bucket_of_id = buckets_lib.frequency_buckets(restored.token_counts())
  sums = perplexity.evaluate(restored, dataset, batch_size=8, max_batches=2, bucket_of_id=bucket_of_id,
                             num_buckets=3)
  ce, entropy, ids = [], [], []
  for step in range(2):
    batch = dataset.batch(step, 8)
    logp = _log_softmax64(restored.model.apply({"params": restored.params}, batch["inputs"]))
    ce.append(-np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0].ravel())
    entropy.append(-(np.exp(logp) * logp).sum(-1).ravel())
    ids.append(batch["targets"].ravel())
  ce, entropy, ids = map(np.concatenate, (ce, entropy, ids))
  overall = perplexity.summarize(sums)
  assert overall["tokens"] == 2 * 8 * 32
  np.testing.assert_allclose(overall["ce"], ce.mean(), rtol=1e-5)
  np.testing.assert_allclose(overall["perplexity"], np.exp(ce.mean()), rtol=1e-5)
  np.testing.assert_allclose(overall["ce_stderr"], ce.std(ddof=1) / np.sqrt(ce.size), rtol=1e-3)
  for k, name in enumerate(buckets_lib.BUCKET_NAMES):
    sel = bucket_of_id[ids] == k
    got = perplexity.per_bucket(sums, buckets_lib.BUCKET_NAMES)[name]
    assert got["tokens"] == sel.sum() > 0
    np.testing.assert_allclose(got["perplexity"], np.exp(ce[sel].mean()), rtol=1e-5)
    np.testing.assert_allclose(got["entropy"], entropy[sel].mean(), rtol=1e-5)
  # The same checkpoint restored onto all 8 devices (FSDP) gives the same sums.
  wide = restore_lib.restore(workdir, mesh_shape=(1, -1, 1))
  wide_sums = perplexity.evaluate(wide, dataset, batch_size=8, max_batches=2, bucket_of_id=bucket_of_id,
                                  num_buckets=3)
  np.testing.assert_allclose(wide_sums["ce_sum"], sums["ce_sum"], rtol=1e-5)


def test_loglikelihood_matches_a_direct_computation(restored, lm):
  requests = [("Return the value of", " x."), ("The module", " defines functions"), ("", "Hello world"),
              ("Question: what?\nAnswer: ", "yes")]
  results = lm.loglikelihood(requests)
  for (context, continuation), (logp, greedy) in zip(requests, results):
    context_ids, continuation_ids = lm.encode_pair(context, continuation)
    assert context_ids[0] == restored.tokenizer.eos_id and len(continuation_ids) > 0
    tokens = context_ids + continuation_ids
    logits = _logits(restored, tokens[:-1])
    rows = _log_softmax64(logits)[len(context_ids) - 1:]
    expected = sum(rows[i, t] for i, t in enumerate(continuation_ids))
    np.testing.assert_allclose(logp, expected, rtol=1e-4)
    assert greedy == all(np.argmax(logits[len(context_ids) - 1 + i]) == t for i, t in enumerate(continuation_ids))
  # Trailing context whitespace moves to the continuation, as in the harness.
  assert lm.encode_pair("Answer: ", "yes") == lm.encode_pair("Answer:", " yes")


def _reference_request(restored, context, continuation):
  """(log-likelihood, greedy) of one request from one unpadded forward pass and a
  float64 log-softmax: the sequence cut to max_seq_len + 1 tokens from the left,
  the continuation's tokens (all but the first token at most) scored."""
  seq = (list(context) + list(continuation))[-(restored.max_seq_len + 1):]
  scored = min(len(continuation), len(seq) - 1)
  logits = _logits(restored, seq[:-1])
  rows = _log_softmax64(logits)
  positions = range(len(seq) - 1 - scored, len(seq) - 1)
  return (sum(rows[t, seq[t + 1]] for t in positions), all(np.argmax(logits[t]) == seq[t + 1] for t in positions),
          np.abs(rows[list(positions)]).max(initial=0.0))


def test_packed_loglikelihood_matches_one_forward_per_request(restored):
  rng = np.random.default_rng(0)
  eos = restored.tokenizer.eos_id
  tokens = lambda n: rng.integers(4, 512, n).tolist()

  def greedy(context, n):
    out = []
    for _ in range(n):
      out.append(int(np.argmax(_logits(restored, context + out)[-1])))
    return out

  pairs = []
  # A shared context whose six continuations (7 slots each) need 72 slots: split between rows.
  context = [eos] + tokens(29)
  pairs += [(context, tokens(8)) for _ in range(6)]
  # Continuations sharing their first tokens (a prefix tree), a greedy one, a one-token greedy one,
  # a one-token other one, and a duplicate of the first (the very same number).
  context = [eos] + tokens(11)
  stem = tokens(3)
  pairs += [(context, stem + tokens(4)), (context, stem + tokens(2)), (context, stem[:2] + tokens(3)),
            (context, greedy(context, 5)), (context, greedy(context, 1)), (context, tokens(1))]
  pairs.append(pairs[-6])
  # Longer than max_seq_len (64): cut from the left; two of them cut to one shared context.
  long_context = [eos] + tokens(69)
  pairs += [(long_context, tokens(10)), (long_context[:60], tokens(6)), (long_context[:60], tokens(6)),
            (long_context[:60], tokens(3))]
  # Many short documents: several per row, across batches.
  for _ in range(14):
    context = [eos] + tokens(int(rng.integers(1, 14)))
    pairs += [(context, tokens(int(rng.integers(1, 7)))) for _ in range(int(rng.integers(1, 4)))]
  pairs += [([eos] + tokens(5), []), ([], tokens(4))]  # nothing to score; no context

  lm = lm_lib.LanguageModel(restored, batch_size=2, progress=False)
  results = lm.loglikelihood_tokens(pairs)
  assert lm.stats["batches"] > 1 and lm.stats["tokens"] < sum(len(c) + len(x) - 1 for c, x in pairs if x)
  flags = []
  for (context, continuation), (logp, is_greedy) in zip(pairs, results):
    expected, expected_greedy, largest = _reference_request(restored, context, continuation)
    # Two float32 forward passes of different shapes: a token's log-probability differs by the
    # rounding of dot products over d_model = 64 terms, about sqrt(64) * 2^-24 relative to the
    # largest |log-probability|, and the n scored tokens' errors add up (at most linearly).
    n = max(1, min(len(continuation), restored.max_seq_len))
    tol = 8 * n * 2.0 ** -24 * max(largest, 1.0)
    assert abs(logp - expected) <= tol, (context, continuation, logp, expected, tol)
    assert is_greedy == expected_greedy
    flags.append(is_greedy)
  assert results[-2] == (0.0, True)
  assert results[6 + 6] == results[6] and results[6] != results[7]  # the duplicate
  assert flags[6 + 3] and flags[6 + 4] and not all(flags)  # the greedy continuations, and some not


def test_packed_loglikelihood_on_a_sharded_mesh(workdir, restored):
  # 4 data x 2 tensor devices: each data shard gathers its own rows' scored positions.
  rng = np.random.default_rng(1)
  eos = restored.tokenizer.eos_id
  pairs = []
  for _ in range(10):
    context = [eos] + rng.integers(4, 512, int(rng.integers(1, 30))).tolist()
    pairs += [(context, rng.integers(4, 512, int(rng.integers(1, 8))).tolist()) for _ in range(3)]
  one = lm_lib.LanguageModel(restored, batch_size=4, progress=False).loglikelihood_tokens(pairs)
  mesh = restore_lib.restore(workdir, mesh_shape=(4, 1, 2))
  sharded = lm_lib.LanguageModel(mesh, batch_size=8, progress=False)  # 2 rows per data shard
  assert sharded._row_groups == 4  # pylint: disable=protected-access
  many = sharded.loglikelihood_tokens(pairs)
  # Float32 differences only: the bound of the test above with n <= 7 tokens and per-token
  # log-probabilities of this barely trained model below 4 * ln(512) = 25.
  np.testing.assert_allclose([x for x, _ in many], [x for x, _ in one], rtol=0, atol=8 * 7 * 2.0 ** -24 * 25)
  assert [g for _, g in many] == [g for _, g in one]


def test_rolling_loglikelihood_and_the_harness_adapter(restored, lm):
  adapter = harness.HarnessLM(lm=lm)
  request = lambda *args: types.SimpleNamespace(args=args)
  text = "Return a new list of the items."
  (rolling,) = adapter.loglikelihood_rolling([request(text)])
  tokens = [restored.tokenizer.eos_id] + restored.tokenizer.encode(text)
  rows = _log_softmax64(_logits(restored, tokens[:-1]))
  np.testing.assert_allclose(rolling, sum(rows[i, t] for i, t in enumerate(tokens[1:])), rtol=1e-4)
  pairs = [("The value", " of x"), ("A", " b")]
  assert adapter.loglikelihood([request(*p) for p in pairs]) == lm.loglikelihood(pairs)
  gen = adapter.generate_until([request("The value of", {"until": ["\n"], "max_gen_toks": 5})])
  assert gen == lm.generate_until(["The value of"], ["\n"], 5)


def test_generation_with_and_without_the_cache_gives_the_same_tokens(restored, lm):
  prompts = [[3, 45, 67, 89, 12], [3, 7], [3, 100, 200, 300, 400, 500, 17, 18], [3, 9, 9]]
  with restored.context():
    cached = lm._generator.generate(restored.params, prompts, 8, prompt_len=16)  # pylint: disable=protected-access
    plain = lm._generator.generate(restored.params, prompts, 8, prompt_len=16, use_cache=False)  # pylint: disable=protected-access
  assert cached == plain and all(len(c) == 8 for c in cached)
  for prompt, out in zip(prompts, cached):  # reference: one unpadded prompt at a time
    tokens = list(prompt)
    for _ in range(8):
      tokens.append(int(np.argmax(_logits(restored, tokens)[-1])))
    assert out == tokens[len(prompt):]


def test_workdir_without_checkpoints_gives_one_clear_message(tmp_path):
  with pytest.raises(EvalError, match=r"--workdir: no checkpoints in .*checkpoints; train first"):
    runner.evaluate(runner.EvalOptions(workdir=str(tmp_path), tasks="ppl"))


@pytest.mark.slow
def test_eval_py_writes_results_and_rejects_bad_input(workdir, lm, tmp_path):
  task_dir = tmp_path / "tasks" / "boolq"
  task_dir.mkdir(parents=True)
  docs = [{"passage": "Cats purr.", "question": "do cats purr", "label": 1},
          {"passage": "Fish swim.", "question": "do fish fly", "label": 0}]
  (task_dir / "validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
  output = tmp_path / "result.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "eval.py", "--workdir", workdir, "--tasks", "ppl,boolq", "--ppl_batches", "1",
         "--batch_size", "8", "--task_data_dir", str(tmp_path / "tasks"), "--log_samples", "--output", str(output),
         "--compilation_cache_dir", str(tmp_path / "cache")]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=env)
  assert done.returncode == 0, done.stderr[-2000:]
  result = json.loads(output.read_text())
  # The persistent compilation cache holds the scoring program; a second run loads it and scores the same.
  assert any(p.name.startswith("jit__score_packed-") for p in (tmp_path / "cache").iterdir())
  again = subprocess.run(cmd[:-4] + ["--output", str(tmp_path / "again.json")] + cmd[-2:], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False, env=env)
  assert again.returncode == 0, again.stderr[-2000:]
  second = json.loads((tmp_path / "again.json").read_text())["tasks"]
  assert {n: t["metrics"] for n, t in second.items()} == {n: t["metrics"] for n, t in result["tasks"].items()}
  assert result["step"] == 10 and result["tasks"]["boolq"]["num_examples"] == 2
  assert result["tasks"]["ppl"]["num_examples"] == 8 * 32
  assert "| boolq | acc |" in done.stdout
  # --log_samples: each document's requests and log-likelihoods beside the result, as the model scores them.
  samples = [json.loads(line) for line in (tmp_path / "result_samples_boolq.jsonl").read_text().splitlines()]
  assert [(s["doc_id"], s["doc"], s["target"]) for s in samples] == [(i, d, d["label"]) for i, d in enumerate(docs)]
  for s in samples:
    expected = [logp for logp, _ in lm.loglikelihood([tuple(a) for a in s["arguments"]])]
    # Two packings of the same requests: float32 rounding of about 8 * 2^-24 relative per scored token
    # (see test_packed_loglikelihood_matches_one_forward_per_request); " no" / " yes" are a token or two.
    np.testing.assert_allclose(s["loglikelihoods"], expected, rtol=2 * 8 * 2.0 ** -24)
    assert s["acc"] == float(int(np.argmax(s["loglikelihoods"])) == s["target"])
  assert np.mean([s["acc"] for s in samples]) == result["tasks"]["boolq"]["metrics"]["acc"]["value"]
  bad = subprocess.run(cmd[:4] + ["--tasks", "ppl,nope"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False, env=env)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines() == [
      "Eval error: --tasks: unknown task 'nope'; known tasks: ppl, buckets, hellaswag, piqa, winogrande, "
      "arc_easy, arc_challenge, openbookqa, siqa, boolq, mmlu, triviaqa"]
  compared = subprocess.run([sys.executable, "eval.py", "--compare", str(output), str(output)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False, env=env)
  assert compared.returncode == 0 and "| boolq | acc |" in compared.stdout and "+0.0000" in compared.stdout
