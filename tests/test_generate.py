"""mile-generate (`python -m mile_jax.generate`) and the sampling it adds to
mile_jax.evaluation.generation.

Greedy continuations are compared token for token with transformers' own
`generate` on the exported model and tokenizer (tests/test_hf.py's tiny
random-weight runs), which adds the run's start token itself; the sampling
filter with a float64 NumPy reference written from its definition; draws with
that reference's probabilities.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mile_jax import generate as generate_lib
from mile_jax.evaluation import generation
from mile_jax.evaluation import restore as restore_lib
from mile_jax.evaluation.errors import EvalError
from conftest import make_tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ("Return the number of", "def f(x):\n    return", "", "The")
NEW_TOKENS = 12


# --- the sampling distribution --------------------------------------------------------------------------------


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
  """float64 (V,): the distribution to sample from, by definition: ids ranked by logit (lower id first on
  ties), the first top_k kept, renormalised, then ids taken in rank order until their mass reaches top_p."""
  x = logits.astype(np.float64) / temperature
  ranked = sorted(range(len(x)), key=lambda i: (-x[i], i))
  kept = ranked[:top_k] if top_k else ranked
  p = np.exp(x[kept] - x[kept].max())
  p /= p.sum()
  nucleus, mass = [], 0.0
  for i, pi in zip(kept, p):
    nucleus.append(i)
    mass += pi
    if mass >= top_p:
      break
  out = np.zeros(len(x))
  out[nucleus] = np.exp(x[nucleus] - x[nucleus].max())
  return out / out.sum()


def _fixed_logits() -> np.ndarray:
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 40)) * np.array([[0.5], [1.0], [2.0], [4.0]])  # (4, 40): flat to peaked rows
  logits[1, 7] = logits[1, 3] = logits[1].max() + 0.5  # a tie at the top: the lower id ranks first
  return logits.astype(np.float32)


SETTINGS = [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (1.0, 10, 0.8), (0.5, 0, 0.3), (2.0, 3, 0.5), (1.0, 1, 1.0)]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filter_logits_is_the_reference_distribution(temperature, top_k, top_p):
  logits = _fixed_logits()
  ours = np.asarray(jax.nn.softmax(generation.filter_logits(logits, temperature, top_k, top_p), axis=-1))
  for row, got in zip(logits, ours):
    want = reference_distribution(row, temperature, top_k, top_p)
    # The set boundaries are far from float32 rounding: the mass before the last kept id is clear of top_p.
    assert np.array_equal(got > 0, want > 0), (np.flatnonzero(got), np.flatnonzero(want))
    # float32 softmax of <= 40 terms: a few ulps relative, so 1e-6 absolute on probabilities <= 1.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  if top_k == 1:
    assert np.array_equal(ours.argmax(-1), [3 if i == 1 else logits[i].argmax() for i in range(4)])


def _nucleus_margins(temperature, top_k, top_p):
  """How far each row's cumulative masses are from top_p (the test is only exact when far)."""
  out = []
  for row in _fixed_logits():
    full = reference_distribution(row, temperature, top_k, 1.0)
    mass = np.cumsum(np.sort(full)[::-1])
    out.append(np.abs(mass - top_p).min())
  return min(out)


def test_fixed_logits_keep_nucleus_boundaries_clear_of_rounding():
  for temperature, top_k, top_p in SETTINGS:
    if top_p < 1:
      assert _nucleus_margins(temperature, top_k, top_p) > 1e-4, (temperature, top_k, top_p)


def test_draws_follow_the_filtered_distribution():
  """20000 draws per row: each id's frequency within 5 binomial standard deviations of the reference
  probability, and never an id outside the kept set."""
  n, sampling = 20000, generation.Sampling(temperature=0.8, top_k=12, top_p=0.9, seed=5)
  logits = _fixed_logits()
  rows = np.repeat(logits, n, axis=0)  # (4n, V): each logit row n times, each its own stream
  ids = np.arange(len(rows), dtype=np.int32)
  tokens = np.asarray(jax.jit(generation.draw_tokens, static_argnums=4)(
      rows, np.full(len(rows), sampling.seed, np.int32), ids, np.zeros_like(ids), sampling)).reshape(4, n)
  for row, drawn in zip(logits, tokens):
    want = reference_distribution(row, sampling.temperature, sampling.top_k, sampling.top_p)
    freq = np.bincount(drawn, minlength=len(row)) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))
    assert np.all(np.abs(freq - want) <= 5 * np.sqrt(want * (1 - want) / n) + 1 / n), (freq, want)


# --- a run, its export, and transformers --------------------------------------------------------------------------


_RUNS = {}


def _run(add_bos: bool, tmp_path_factory):
  """(workdir, restored on one device, export directory) of a tiny random-weight run; data.add_bos decides
  the start token (BOS, else EOS). Made once per session and setting."""
  if add_bos not in _RUNS:
    if not os.environ.get("CI"):
      pytest.importorskip("torch")
      pytest.importorskip("transformers")
    import test_hf  # pylint: disable=import-outside-toplevel  # its random weights and workdir writer
    from mile_jax.hf import convert  # pylint: disable=import-outside-toplevel
    config = make_tiny_config(**{"data.add_bos": add_bos, "model.vocab_size": 512})
    root = tmp_path_factory.mktemp(f"generate_{'bos' if add_bos else 'eos'}")
    test_hf._write_run(str(root / "run"), config, test_hf._random_params(config, seed=4))  # pylint: disable=protected-access
    convert.export(str(root / "run"), str(root / "hf"))
    restored = restore_lib.restore(str(root / "run"), mesh_shape=(1, 1, 1), devices=jax.devices()[:1])
    _RUNS[add_bos] = (str(root / "run"), restored, str(root / "hf"))
  return _RUNS[add_bos]


@pytest.fixture(params=[True, False], ids=["bos_start", "eos_start"])
def each_run(request, tmp_path_factory):
  return _run(request.param, tmp_path_factory)


@pytest.fixture
def run(tmp_path_factory):
  return _run(True, tmp_path_factory)


def _transformers_greedy(hf_dir: str, prompts, max_new_tokens: int) -> list[list[int]]:
  """transformers' greedy tokens after each prompt, one prompt at a time (no padding), up to and including EOS."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                            dtype=torch.float32)
  model.eval()
  out = []
  for prompt in prompts:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
      row = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           do_sample=False)[0, ids.shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    out.append(row[:row.index(eos) + 1] if eos in row else row)
  return out


def test_greedy_continuations_equal_transformers(each_run):
  workdir, restored, hf_dir = each_run
  ours = generate_lib.generate(restored, PROMPTS, generate_lib.Options(workdir, max_new_tokens=NEW_TOKENS))
  theirs = _transformers_greedy(hf_dir, PROMPTS, NEW_TOKENS)
  assert [c.tokens for c in ours] == theirs
  assert sum(len(t) for t in theirs) > 2 * NEW_TOKENS  # not all ended at once
  eos = restored.tokenizer.eos_id
  for c in ours:
    assert c.finish == ("eos" if c.tokens[-1] == eos else "length")
    new = c.tokens[:-1] if c.finish == "eos" else c.tokens
    assert c.text == restored.tokenizer.decode(restored.tokenizer.encode(c.prompt) + new)[len(c.prompt):]


def test_stop_strings_cut_the_continuation(run):
  workdir, restored, _ = run
  options = generate_lib.Options(workdir, max_new_tokens=NEW_TOKENS)
  full = [c for c in generate_lib.generate(restored, PROMPTS, options) if len(c.text) >= 6][0]
  stop = full.text[3:5]
  cut = generate_lib.generate(restored, [full.prompt], generate_lib.Options(workdir, max_new_tokens=NEW_TOKENS,
                                                                            stop=("\u2603never", stop)))[0]
  assert cut.finish == "stop" and cut.text == full.text[:full.text.index(stop)]
  assert cut.tokens == full.tokens[:len(cut.tokens)] and len(cut.tokens) < len(full.tokens)


def test_sampling_is_seeded_and_top_k_1_is_greedy(run):
  workdir, restored, _ = run

  def tokens(**settings):
    options = generate_lib.Options(workdir, max_new_tokens=NEW_TOKENS, **settings)
    return [c.tokens for c in generate_lib.generate(restored, PROMPTS, options)]

  greedy = tokens()
  first = tokens(temperature=1.0, seed=1)
  assert tokens(temperature=1.0, seed=1) == first
  assert tokens(temperature=1.0, seed=2) != first
  assert first != greedy
  assert tokens(temperature=0.7, top_k=1, seed=3) == greedy
  # A prompt's sample depends on its row id, not on its place in the batch or its neighbours.
  sampler = generate_lib._sampler(restored.model.cfg, restored.mesh, 1.0, 0, 1.0)  # pylint: disable=protected-access
  rows = [[generate_lib.start_token(restored)] + restored.tokenizer.encode(p) for p in PROMPTS]
  eos = restored.tokenizer.eos_id
  with restored.context():
    reversed_rows = sampler.generate(restored.params, rows[::-1], NEW_TOKENS, row_ids=range(len(rows))[::-1],
                                     seed=1, done=lambda t: t[-1] == eos)
  assert reversed_rows[::-1] == first


@pytest.mark.slow
def test_command_prints_each_completion(run, tmp_path):
  """The command itself, on this machine's 8 simulated devices (the 5 prompts padded to the mesh), as JSON
  lines equal to the library's greedy continuations on one device."""
  workdir, restored, _ = run
  (tmp_path / "prompts.txt").write_text(f"{PROMPTS[0]}\n\n  indented \r\n{PROMPTS[3]}", encoding="utf-8")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  done = subprocess.run([sys.executable, "-m", "mile_jax.generate", "--workdir", workdir, "--prompt", "A",
                         "--prompts_file", str(tmp_path / "prompts.txt"), "--prompt", "B",
                         f"--max_new_tokens={NEW_TOKENS}", "--output_format=jsonl", "--batch_size=3"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  printed = [json.loads(line) for line in done.stdout.splitlines()]
  prompts = ["A", "B", PROMPTS[0], "  indented ", PROMPTS[3]]  # --prompt values, then the file's non-empty lines
  want = generate_lib.generate(restored, prompts, generate_lib.Options(workdir, max_new_tokens=NEW_TOKENS))
  assert [(p["prompt"], p["tokens"], p["completion"], p["finish"]) for p in printed] == [
      (c.prompt, c.tokens, c.text, c.finish) for c in want]


# --- bad input ------------------------------------------------------------------------------------------------------


BAD = {
    "no prompt": ({}, "--prompt or --prompts_file"),
    "negative max tokens": ({"prompts": ("x",), "max_new_tokens": -1}, "--max_new_tokens"),
    "zero max tokens": ({"prompts": ("x",), "max_new_tokens": 0}, "--max_new_tokens"),
    "negative temperature": ({"prompts": ("x",), "temperature": -0.5}, "--temperature"),
    "nan temperature": ({"prompts": ("x",), "temperature": float("nan")}, "--temperature"),
    "top_p zero": ({"prompts": ("x",), "top_p": 0.0}, "--top_p"),
    "top_p above one": ({"prompts": ("x",), "top_p": 1.5}, "--top_p"),
    "negative top_k": ({"prompts": ("x",), "top_k": -1}, "--top_k"),
    "no batch": ({"prompts": ("x",), "batch_size": 0}, "--batch_size"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_options_are_named(name):
  settings, flag = BAD[name]
  with pytest.raises(EvalError, match=f"^{flag}"):
    generate_lib.check(generate_lib.Options("w", **settings))


def test_empty_or_missing_prompts_file_is_named(tmp_path):
  (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
  for name in ("empty.txt", "missing.txt"):
    options = generate_lib.Options("w", prompts_file=str(tmp_path / name))
    generate_lib.check(options)
    with pytest.raises(EvalError, match=f"^--prompts_file: .*{name}"):
      generate_lib.read_prompts(options)


def _command(args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  return subprocess.run([sys.executable, "-m", "mile_jax.generate", *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("args,flag", [
    ([], "--prompt or --prompts_file"),
    (["--prompt", "x", "--max_new_tokens=-3"], "--max_new_tokens"),
    (["--prompt", "x", "--top_p=0"], "--top_p"),
    (["--prompts_file", "empty.txt"], "--prompts_file"),
])
def test_command_bad_input_is_one_line_and_status_2(tmp_path, args, flag):
  (tmp_path / "empty.txt").write_text("", encoding="utf-8")
  done = _command(["--workdir", str(tmp_path / "nowhere"), *args], tmp_path)
  assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
  assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith(f"Generate error: {flag}")
  assert done.stdout == ""


def test_too_many_new_tokens_for_the_model_is_named(run):
  workdir, restored, _ = run
  with pytest.raises(EvalError, match="^--max_new_tokens: .*max_seq_len"):
    generate_lib.run_command(generate_lib.Options(workdir, prompts=("x",),
                                                  max_new_tokens=restored.config.model.max_seq_len))
