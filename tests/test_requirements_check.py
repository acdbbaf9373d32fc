"""A missing package ends every command with one line naming what to install, and exit status 2.

Each command runs in a subprocess whose `sys.path` starts with a directory
holding a package that raises ModuleNotFoundError on import, as an
uninstalled one does."""

import ast
import os
import subprocess
import sys

import pytest

from mile_jax import requirements_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
BASE_LINE = "mile_jax needs {}: pip install -r requirements.txt (or pip install -e .)"
# Every command, as a user types it; none gets past its imports, so the arguments need not exist.
COMMANDS = {
    "train.py": [sys.executable, "train.py", "--config", "default", "--workdir", "w"],
    "eval.py": [sys.executable, "eval.py", "--workdir", "w"],
    "mile-train": [os.path.join(BIN, "mile-train"), "--config", "default", "--workdir", "w"],
    "mile-eval": [os.path.join(BIN, "mile-eval"), "--workdir", "w"],
    "hf": [sys.executable, "-m", "mile_jax.hf", "export", "--workdir", "w", "--out", "o"],
    "plan": [sys.executable, "-m", "mile_jax.plan", "--config", "configs/default.py", "--mesh", "1,1,1"],
    "compare": [sys.executable, "-m", "mile_jax.experiments.compare", "--config", "configs/compare.py",
                "--workdir", "w"],
    "generate": [sys.executable, "-m", "mile_jax.generate", "--workdir", "w", "--prompt", "p"],
    "mile-generate": [os.path.join(BIN, "mile-generate"), "--workdir", "w", "--prompt", "p"],
    "mile-prepare": [os.path.join(BIN, "mile-prepare"), "--source", "builtin:pydocs", "--out", "o"],
}
# The modules that run `requirements_check.require` for the commands above.
ENTRY_MODULES = ("mile_jax.train_cli", "mile_jax.eval_cli", "mile_jax.hf.convert", "mile_jax.plan",
                 "mile_jax.experiments.compare", "mile_jax.generate", "mile_jax.prepare_cli")


def _without(tmp_path, package: str) -> dict:
  """An environment in which `import <package>` raises ModuleNotFoundError as for an uninstalled package."""
  fake = tmp_path / "fake" / package
  fake.mkdir(parents=True)
  (fake / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{package}'\", name='{package}')\n")
  return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), ROOT]), "JAX_PLATFORMS": "cpu"}


def _run(argv, env):
  return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_names_a_missing_package_in_one_line(command, tmp_path):
  argv = COMMANDS[command]
  if not os.path.exists(argv[0]):
    pytest.skip(f"{argv[0]}: the package is not installed (pip install -e .)")
  done = _run(argv, _without(tmp_path, "jax"))
  assert (done.returncode, done.stderr) == (2, BASE_LINE.format("jax") + "\n"), done.stderr[-2000:]
  assert done.stdout == ""


def test_a_module_set_to_none_and_a_dependency_of_a_package(tmp_path):
  """`sys.modules['jax'] = None` (import halted), and a package whose own dependency is missing."""
  code = "import sys; sys.modules['jax'] = None; from mile_jax.train_cli import run; run()"
  done = _run([sys.executable, "-c", code], {**os.environ, "PYTHONPATH": ROOT})
  assert (done.returncode, done.stderr) == (2, BASE_LINE.format("jax") + "\n"), done.stderr[-2000:]
  done = _run(COMMANDS["eval.py"], _without(tmp_path, "absl"))
  assert (done.returncode, done.stderr) == (2, BASE_LINE.format("absl-py") + "\n"), done.stderr[-2000:]


def test_a_missing_package_of_the_eval_extra(tmp_path):
  done = _run(COMMANDS["hf"], _without(tmp_path, "tokenizers"))
  assert (done.returncode, done.stderr) == (2, 'HF error: export needs tokenizers: pip install -e ".[eval]"\n'), \
      done.stderr[-2000:]


def test_the_message():
  # jax raises a ModuleNotFoundError without a name when jaxlib is missing: the module being imported is named.
  assert requirements_check.message(ModuleNotFoundError("jax requires jaxlib"), "jax") == BASE_LINE.format("jax")
  assert requirements_check.message(ModuleNotFoundError("x", name="orbax.checkpoint"), "orbax.checkpoint") == \
      BASE_LINE.format("orbax-checkpoint")
  assert requirements_check.message(ModuleNotFoundError("x", name="lm_eval.api"), "lm_eval") == \
      'mile_jax needs lm-eval: pip install -e ".[eval]"'
  # A module of mile_jax itself that fails to import is a bug, not an installation: its traceback stays.
  assert requirements_check.message(ModuleNotFoundError("x", name="mile_jax.nothere"), "numpy") is None
  with pytest.raises(ModuleNotFoundError):
    requirements_check.exit_missing(ModuleNotFoundError("x", name="mile_jax.nothere"), "numpy")


def _module_file(module: str) -> str:
  return os.path.join(ROOT, *module.split(".")) + ".py"


def _require_call(module: str) -> tuple[tuple[str, ...], int, int]:
  """(extra packages it requires, line of the `require` call, line of the first import of a package
  other than the standard library's and mile_jax's)."""
  with open(_module_file(module), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  call, first = None, None
  for node in tree.body:
    if (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
        and ast.unparse(node.value.func) == "requirements_check.require"):
      call = node
    names = ([a.name for a in node.names] if isinstance(node, ast.Import)
             else [node.module] if isinstance(node, ast.ImportFrom) else [])
    top = {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"mile_jax"}
    if top and first is None:
      first = node.lineno
  assert call is not None, f"{module} does not call requirements_check.require"
  return tuple(a.value for a in call.value.args), call.lineno, first


@pytest.mark.slow
def test_require_covers_what_each_command_imports_when_it_loads():
  """Every dependency (pyproject.toml) a command module imports when it loads is imported by its
  `require` call first, which comes before the module's own imports of packages."""
  tomllib = pytest.importorskip("tomllib")  # Python 3.11+.
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    pyproject = tomllib.load(f)
  pip_to_import = {"absl-py": "absl", "orbax-checkpoint": "orbax", "tensorflow-datasets": "tensorflow_datasets"}
  dependencies = {pip_to_import.get(d, d.replace("-", "_")) for d in
                  (r.split(">")[0].split("=")[0].split("<")[0].strip() for r in pyproject["project"]["dependencies"])}
  assert {"jax", "absl", "orbax", "numpy", "scipy"} <= dependencies
  probe = ("import sys\nfrom mile_jax import requirements_check\nrequirements_check.require(*{extra!r})\n"
           "before = {{n.split('.')[0] for n in sys.modules}}\nimport {module}\n"
           "print(' '.join(sorted({{n.split('.')[0] for n in sys.modules}} - before)))\n")
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  running = {}
  for module in ENTRY_MODULES:
    extra, call_line, first_import = _require_call(module)
    assert first_import is None or call_line < first_import, module
    running[module] = subprocess.Popen([sys.executable, "-c", probe.format(extra=extra, module=module)], cwd=ROOT,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for module, process in running.items():
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert set(out.split()) & dependencies == set(), module
