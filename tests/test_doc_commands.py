"""Every `python train.py`, `python eval.py`, `python -m mile_jax...`,
`mile-train` and `mile-eval` command in README.md and docs/*.md parses: its
flags exist, its config overrides name real settings with valid values, and
the config validates (tests/doc_commands.py, a dry run of each entry point).
Blocks marked `<!-- not checked: why -->` are exempt."""

import glob
import json
import os
import subprocess
import sys

import pytest

import doc_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))

# Commands the dry check must reject, with the status each exits with.
BAD = {
    "unknown flag": (["python", "train.py", "--config", "configs/default.py", "--workdir", "w", "--wrokdir", "x"], 2),
    "unknown setting": (["python", "train.py", "--config", "configs/default.py", "--workdir", "w",
                         "--config.loss.gama=2"], 2),
    "value of the wrong type": (["mile-train", "--config", "default", "--workdir", "w", "--config.train.steps=x"], 2),
    "invalid value": (["python", "train.py", "--config", "configs/default.py", "--workdir", "w",
                       "--config.loss.gamma=-1"], 1),
    "missing config": (["mile-train", "--config", "configs/nothere.py", "--workdir", "w"], 2),
    "unknown eval task": (["python", "eval.py", "--workdir", "w", "--tasks", "ppl,pica"], 1),
    "unknown eval flag": (["mile-eval", "--workdir", "w", "--task", "ppl"], 1),
    "bad plan mesh": (["python", "-m", "mile_jax.plan", "--config", "configs/mile_7b.py", "--mesh", "1,8"], 1),
    "extra argument": (["python", "train.py", "--config", "configs/default.py", "--workdir", "w", "..."], 1),
    "unknown module flag": (["python", "-m", "mile_jax.experiments.compare", "--config", "configs/compare.py",
                             "--workdir", "w", "--config.run.loss.gama=1"], 2),
}


def documented_commands() -> list[dict]:
  out = []
  for path in DOCS:
    with open(path, encoding="utf-8") as f:
      for command in doc_commands.extract(f.read()):
        out.append(dict(command, file=os.path.relpath(path, ROOT)))
  return out


def check(argvs: list[list[str]]) -> list[dict]:
  """doc_commands.py's verdict on each argv, run from the repository root as the docs' commands are."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "doc_commands.py")], input=json.dumps(argvs),
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
  assert len(results) == len(argvs), done.stdout[-3000:]
  return results


@pytest.fixture(scope="module")
def verdicts():
  commands = [c for c in documented_commands() if not c["exempt"]]
  argvs = [c["argv"] for c in commands] + [argv for argv, _ in BAD.values()]
  results = check(argvs)
  return list(zip(commands, results[:len(commands)])), dict(zip(BAD, results[len(commands):]))


def test_extract_reads_shell_blocks_and_markers():
  text = "\n".join([
      "Intro `python train.py --inline` is not a block.",
      "```bash",
      "pip install -r requirements.txt",
      "python train.py --config configs/default.py \\",
      "  --workdir /tmp/a   # a comment",
      "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python eval.py --workdir /tmp/a",
      "srun python -m mile_jax.plan --config configs/mile_7b.py --mesh 1,8,1",
      "python benchmarks/loss_bench.py",
      "mile-train --config default --workdir '/tmp/with space'",
      "```",
      "<!-- not checked: needs a TPU -->",
      "```bash",
      "python train.py --config configs/mile_468m.py --workdir gs://b/r",
      "```",
      "<!-- not checked: a marker followed by prose applies to nothing -->",
      "Some prose.",
      "```sh",
      "mile-eval --workdir /tmp/a",
      "```",
      "```python",
      "python train.py --not-shell",
      "```",
  ])
  found = [(c["line"], c["argv"], c["exempt"]) for c in doc_commands.extract(text)]
  assert found == [
      (4, ["python", "train.py", "--config", "configs/default.py", "--workdir", "/tmp/a"], None),
      (6, ["python", "eval.py", "--workdir", "/tmp/a"], None),
      (7, ["python", "-m", "mile_jax.plan", "--config", "configs/mile_7b.py", "--mesh", "1,8,1"], None),
      (9, ["mile-train", "--config", "default", "--workdir", "/tmp/with space"], None),
      (13, ["python", "train.py", "--config", "configs/mile_468m.py", "--workdir", "gs://b/r"], "needs a TPU"),
      (18, ["mile-eval", "--workdir", "/tmp/a"], None),
  ]


@pytest.mark.parametrize("case", sorted(BAD))
def test_dry_check_rejects(verdicts, case):
  """The check can fail: each broken command exits with its entry point's status and says why."""
  _, bad = verdicts
  assert bad[case]["status"] == BAD[case][1], (case, bad[case]["output"][-2000:])


def test_every_documented_command_parses(verdicts):
  checked, _ = verdicts
  failures = [f"{c['file']}:{c['line']}: {' '.join(c['argv'])}\n  status {r['status']}: "
              f"{r['output'].strip().splitlines()[-1:] if r['output'].strip() else ''}"
              for c, r in checked if r["status"] != 0]
  assert not failures, "\n".join(failures)
  files = {c["file"] for c, _ in checked}
  assert "README.md" in files and len(checked) >= 10, (files, len(checked))
  quick_start = ["python", "train.py", "--config", "configs/default.py", "--workdir", "/tmp/mile_run"]
  assert any(c["argv"] == quick_start and c["file"] == "README.md" for c, _ in checked)


def test_exemptions_give_a_reason():
  for command in documented_commands():
    if command["exempt"] is not None:
      assert len(command["exempt"]) >= 10, command
