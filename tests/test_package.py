"""The installable package: pyproject.toml agrees with requirements*.txt and
the source tree, `--config` finds the bundled configs, and (slow) the working
tree installed into a fresh virtual environment runs `mile-train` and
`mile-eval` from a directory outside the repository."""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from mile_jax import config_files

tomllib = pytest.importorskip("tomllib")  # Python 3.11+.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_CONFIGS = ["default", "mile_1b", "mile_468m", "mile_7b"]


def _pyproject() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _requirements(name: str) -> list[str]:
  """The requirement lines of `name`, comments and blanks dropped, spaces removed."""
  with open(os.path.join(ROOT, name), encoding="utf-8") as f:
    lines = (line.split("#", 1)[0].strip().replace(" ", "") for line in f)
    return [line for line in lines if line]


def _spaceless(specs) -> list[str]:
  return [s.replace(" ", "") for s in specs]


def test_dependencies_are_requirements_txt():
  """requirements.txt = the package's dependencies + the test runner (in the dev extra)."""
  project = _pyproject()["project"]
  required, dependencies = _requirements("requirements.txt"), _spaceless(project["dependencies"])
  dev = _spaceless(project["optional-dependencies"]["dev"])
  assert sorted(dependencies) == sorted(r for r in required if r not in dev)
  assert [r for r in required if r in dev] == ["pytest>=8.0"]


def test_eval_extra_is_requirements_eval_txt():
  extra = _spaceless(_pyproject()["project"]["optional-dependencies"]["eval"])
  assert sorted(extra) == sorted(_requirements("requirements-eval.txt"))


def test_tensorboard_extra_has_the_profile_plugin():
  """docs/training.md's `tensorboard --logdir` and its Profile tab need both packages."""
  extra = _spaceless(_pyproject()["project"]["optional-dependencies"]["tensorboard"])
  assert sorted(r.split(">=")[0] for r in extra) == ["tensorboard", "tensorboard-plugin-profile"]


def test_packages_are_the_source_tree():
  """Every directory of mile_jax/ with an __init__.py is a package, and configs/ is mile_jax.configs."""
  setuptools = _pyproject()["tool"]["setuptools"]
  found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for d, _, files in os.walk(os.path.join(ROOT, "mile_jax"))
           if "__init__.py" in files}
  assert set(setuptools["packages"]) == found | {"mile_jax.configs"}
  assert setuptools["package-dir"] == {"mile_jax.configs": "configs"}
  assert os.path.isfile(os.path.join(ROOT, "configs", "__init__.py"))


def test_entry_points_are_the_scripts_modules():
  assert _pyproject()["project"]["scripts"] == {"mile-train": "mile_jax.train_cli:run",
                                                "mile-eval": "mile_jax.eval_cli:run",
                                                "mile-generate": "mile_jax.generate:run",
                                                "mile-prepare": "mile_jax.prepare_cli:run"}


def test_bundled_configs_resolve_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  default = os.path.join(ROOT, "configs", "default.py")
  assert config_files.bundled() == TRAINING_CONFIGS
  assert os.path.samefile(config_files.bundled_dir(), os.path.join(ROOT, "configs"))
  for value in ("default", "default.py", "configs/default.py"):
    assert os.path.samefile(config_files.resolve(value), default), value
  resolved = config_files.resolve("configs/mile_468m.py:arg")
  assert resolved.endswith(":arg") and os.path.samefile(resolved[:-4], os.path.join(ROOT, "configs", "mile_468m.py"))
  for value in ("compare", "configs/compare.py", "other/default.py", "/nowhere/default.py", "missing", ""):
    assert config_files.resolve(value) == value, value
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "default.py").write_text("")
  assert config_files.resolve("configs/default.py") == "configs/default.py"  # An existing file wins.
  assert config_files.resolve_argv(["prog", "--config", "mile_1b", "--config=mile_7b", "--workdir", "default"]) == [
      "prog", "--config", os.path.join(config_files.bundled_dir(), "mile_1b.py"),
      f"--config={os.path.join(config_files.bundled_dir(), 'mile_7b.py')}", "--workdir", "default"]


def _copy_sources(target: str) -> str:
  """What the package is built from, copied, so that building writes nothing into the working tree."""
  os.makedirs(target)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), target)
  for name in ("mile_jax", "configs"):
    shutil.copytree(os.path.join(ROOT, name), os.path.join(target, name),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  return target


def _venv(path: str) -> str:
  """A new virtual environment that sees this one's packages (jax & co., not
  downloaded again) through a .pth line after its own site-packages; returns its bin/."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", path], check=True)
  python = os.path.join(path, "bin", "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                        capture_output=True, text=True).stdout.strip()
  outer = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
  with open(os.path.join(site, "outer_environment.pth"), "w", encoding="utf-8") as f:
    f.write("\n".join(outer) + "\n")
  return os.path.join(path, "bin")


@pytest.mark.slow
def test_installed_package_trains_and_evaluates_outside_the_checkout(tmp_path):
  """`pip install --no-deps [-e] <working tree>`, then, from an empty directory,
  `mile-train --config configs/default.py` (the bundled file) for 3 steps and
  `mile-eval` on its checkpoint; the package imported is the installed one."""
  src = _copy_sources(str(tmp_path / "src"))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  env.update(JAX_PLATFORMS="cpu", PYTHONNOUSERSITE="1")
  small = ["--config.train.steps=3", "--config.optim.warmup_steps=1", "--config.model.n_layers=2",
           "--config.model.d_model=64", "--config.model.n_heads=2", "--config.model.n_kv_heads=2",
           "--config.model.d_ff=128", "--config.data.seq_len=32", "--config.train.log_every=3",
           "--config.train.eval_every=0", "--config.checkpoint.async_save=False"]
  runs = {}
  for mode in ("wheel", "editable"):
    bin_dir = _venv(str(tmp_path / f"venv_{mode}"))
    editable = ["-e"] if mode == "editable" else []
    subprocess.run([sys.executable, "-m", "pip", "--python", os.path.join(bin_dir, "python"), "install", "--quiet",
                    "--no-deps", *editable, src], check=True, cwd=elsewhere, env=env)
    where = subprocess.run([os.path.join(bin_dir, "python"), "-c",
                            "import mile_jax, mile_jax.configs as c; print(mile_jax.__file__); print(c.__file__)"],
                           check=True, cwd=elsewhere, env=env, capture_output=True, text=True).stdout.split()
    expected = [os.path.join(src, "mile_jax"), os.path.join(src, "configs")] if mode == "editable" else \
        [str(tmp_path / f"venv_{mode}")] * 2
    assert all(w.startswith(e) for w, e in zip(where, expected)) and len(where) == 2, (mode, where)
    workdir = str(tmp_path / f"run_{mode}")
    runs[mode] = (bin_dir, workdir, subprocess.Popen(
        [os.path.join(bin_dir, "mile-train"), "--config", "configs/default.py", "--workdir", workdir, *small],
        cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  for mode, (bin_dir, workdir, proc) in runs.items():
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, (mode, output[-3000:])
    assert "Training finished at step 3 of 3" in output, (mode, output[-3000:])
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3")), mode
  bin_dir, workdir, _ = runs["wheel"]
  evaluated = subprocess.run([os.path.join(bin_dir, "mile-eval"), "--workdir", workdir, "--tasks", "ppl",
                              "--ppl_batches", "1", "--batch_size", "4"], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=600)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert "| ppl |" in evaluated.stdout and os.listdir(os.path.join(workdir, "eval")), evaluated.stdout
  assert sorted(os.listdir(elsewhere)) == [], "the commands wrote into the current directory"
