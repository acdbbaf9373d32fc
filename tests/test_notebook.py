"""notebooks/quickstart.ipynb: committed without outputs, with a parameters cell,
and (slow) executed top to bottom in a fresh kernel with small parameters.
In CI (`CI` set) a missing notebook package fails the tests rather than
skipping them."""

import base64
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
FIGURES = ("weights.png", "validation.png", "buckets.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

if os.environ.get("CI"):
  import nbclient  # A missing package must fail in CI, not skip: .ci/run installs the dev extra.
  import nbformat
else:
  nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' for the notebook tools")
  nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' for the notebook tools")


def _parameters_cell(nb) -> int:
  tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, f"exactly one cell tagged 'parameters', found {len(tagged)}"
  return tagged[0]


def with_parameters(nb, **values):
  """`nb` with a cell assigning `values` inserted after its parameters cell, as papermill does."""
  index = _parameters_cell(nb)
  lines = ["# Injected parameters"] + [f"{name} = {value!r}" for name, value in values.items()]
  injected = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(index + 1, injected)
  return nb


def test_notebook_is_committed_clean():
  """No outputs or execution counts in the file; every injected name is a parameter."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert not cell.outputs, f"cell {i} has outputs: strip them before committing"
      assert cell.execution_count is None, f"cell {i} has an execution count"
  source = nb.cells[_parameters_cell(nb)].source
  for name in ("STEPS", "D_MODEL", "N_LAYERS", "SEQ_LEN", "EVAL_BATCHES", "WORKDIR", "FIGURES", "TENSORBOARD",
               "REPO_URL", "COLAB_UPLOADS", "COLAB_DRIVE"):
    assert f"\n{name} = " in f"\n{source}", f"parameter {name} missing from the parameters cell"
  intro = nb.cells[0].source  # It says how Colab gets the package, before anything runs.
  for words in ("REPO_URL", "python -m pip wheel --no-deps -w dist .", "Google Drive", "/content"):
    assert words in intro, words
  assert "OWNER/REPO" not in intro


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
  """Every cell runs without error on CPU, with two simulated devices so the
  sharded cell runs too; the figures are saved and shown."""
  nb = with_parameters(nbformat.read(NOTEBOOK, as_version=4), STEPS=30, D_MODEL=64, N_LAYERS=2, SEQ_LEN=64,
                       EVAL_BATCHES=4, WORKDIR=str(tmp_path / "runs"), FIGURES=str(tmp_path / "figures"),
                       TENSORBOARD=False)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
             MPLBACKEND="module://matplotlib_inline.backend_inline")
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}})
  client.execute(env=env)  # Raises CellExecutionError, naming the cell, on the first error.

  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count for c in code_cells), "a code cell did not run"
  errors = [o for c in code_cells for o in c.outputs if o.output_type == "error"]
  assert not errors, errors
  for name in FIGURES:
    path = tmp_path / "figures" / name
    assert path.is_file(), f"{name} was not saved"
    assert path.read_bytes().startswith(PNG_MAGIC), f"{name} is not a PNG"
  shown = [base64.b64decode(o.data["image/png"]) for c in code_cells for o in c.outputs
           if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  assert len(shown) == len(FIGURES) and all(png.startswith(PNG_MAGIC) for png in shown), len(shown)

  text = "".join(o.get("text", "") for c in code_cells for o in c.outputs if o.output_type == "stream")
  assert "Runtime: CPU, 2 device(s)" in text, text[:2000]
  assert "loss after step 1:" in text and "on 2 devices" in text, "the sharded cell did not run"
  assert "temperature 0.0: " in text and "temperature 0.8: " in text and "Return the number of" in text, \
      "the continuation cell did not print both continuations"
  for loss in ("cross_entropy", "mile"):
    assert f"{loss}: validation cross-entropy" in text
    assert (tmp_path / "runs" / loss / "checkpoints" / "30").is_dir()


# --- the Colab install cell, headless -----------------------------------------------------------------------------
# A stand-in `google.colab` on the kernel's path makes the notebook take its Colab branch; the kernel runs in a
# fresh virtual environment that sees this one's packages (so mile_jax's dependencies are already there) but not
# mile_jax, and pip runs for real with the package index turned off, so nothing is downloaded.

STAND_IN = {
    "google/colab/__init__.py": '"""A stand-in for Colab\'s module: its presence is what the notebook checks."""\n',
    "google/colab/drive.py": (
        "import os\n\n\n"
        "def mount(mountpoint):\n"
        "  \"\"\"Links the test's fake Drive contents at <mountpoint>/MyDrive, as Colab's mount shows a Drive.\"\"\"\n"
        "  os.makedirs(mountpoint, exist_ok=True)\n"
        "  os.symlink(os.environ['FAKE_DRIVE'], os.path.join(mountpoint, 'MyDrive'))\n"
        "  print(f'Mounted at {mountpoint}')\n"),
}


def _setup_cells(nb):
  """The parameters cell and the install cell: what runs before JAX is first imported."""
  index = _parameters_cell(nb)
  install = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code" and "ON_COLAB" in cell.source]
  assert len(install) == 1 and install[0] > index
  nb.cells = [nb.cells[index], nb.cells[install[0]]]
  return nb


@pytest.fixture(scope="module")
def colab_sources(tmp_path_factory):
  """(source tree, git repository of it, wheel built from it with README.md's command)."""
  import test_package  # pylint: disable=import-outside-toplevel  # its source copy
  root = tmp_path_factory.mktemp("colab_sources")
  src = test_package._copy_sources(str(root / "src"))  # pylint: disable=protected-access
  env = dict(os.environ, PIP_NO_INDEX="1")
  # README.md's `python -m pip wheel --no-deps -w dist .`, offline: the build backend from this environment.
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                  str(root / "dist"), src], check=True, env=env, cwd=root)
  wheels = os.listdir(root / "dist")
  assert len(wheels) == 1 and wheels[0].startswith("mile_jax-") and wheels[0].endswith(".whl"), wheels
  repo = shutil.copytree(src, str(root / "repo"))
  git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
  for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "sources"]):
    subprocess.run(git + args, cwd=repo, check=True)
  return src, repo, str(root / "dist" / wheels[0])


@pytest.mark.slow
@pytest.mark.parametrize("way", ["repo_url", "uploaded_wheel", "drive_checkout"])
def test_colab_install_cell(way, colab_sources, tmp_path, monkeypatch):
  """Each way in: REPO_URL set (a git clone URL of the sources), a wheel uploaded to COLAB_UPLOADS, a checkout
  in the Drive that the cell mounts; the message names the way taken and mile_jax imports from where it went."""
  import test_package  # pylint: disable=import-outside-toplevel  # its virtual environment
  src, repo, wheel = colab_sources
  uploads, drive, fake_drive = tmp_path / "content", tmp_path / "content" / "drive", tmp_path / "fake_drive"
  uploads.mkdir()
  fake_drive.mkdir()
  if way == "uploaded_wheel":
    shutil.copy(wheel, uploads)
  if way == "drive_checkout":
    shutil.copytree(src, fake_drive / "mile_jax_checkout")
  for name, text in STAND_IN.items():
    (tmp_path / "stand_in" / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "stand_in" / name).write_text(text)
  bin_dir = test_package._venv(str(tmp_path / "venv"))  # pylint: disable=protected-access
  kernel = tmp_path / "jupyter" / "kernels" / "colab_stand_in"
  kernel.mkdir(parents=True)
  (kernel / "kernel.json").write_text(json.dumps({
      "argv": [os.path.join(bin_dir, "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "Colab stand-in", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

  nb = _setup_cells(nbformat.read(NOTEBOOK, as_version=4))
  nb = with_parameters(nb, REPO_URL=f"file://{repo}" if way == "repo_url" else "", COLAB_UPLOADS=str(uploads),
                       COLAB_DRIVE=str(drive))
  nb.cells.append(nbformat.v4.new_code_cell("import mile_jax, mile_jax.configs\nprint('imported', mile_jax.__file__)"))
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "PIP_USER")}
  env.update(JAX_PLATFORMS="cpu", PYTHONNOUSERSITE="1", PYTHONPATH=str(tmp_path / "stand_in"), PIP_NO_INDEX="1",
             PIP_NO_BUILD_ISOLATION="0", FAKE_DRIVE=str(fake_drive))
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="colab_stand_in",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=env)
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                 if o.output_type == "stream")
  expected = {"repo_url": f"from the repository git+file://{repo}", "uploaded_wheel": f"from the wheel {uploads}",
              "drive_checkout": f"from the checkout {drive}/MyDrive/mile_jax_checkout"}[way]
  assert f"Installed mile_jax {expected}" in text, text
  assert ("Mounted at" in text) == (way == "drive_checkout"), text
  imported = text.split("imported ", 1)[1].strip()
  assert imported.startswith(str(tmp_path / "venv")), imported  # installed into the kernel's environment
