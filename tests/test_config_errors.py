"""Bad input gives one clear line naming what to fix, before anything compiles
(the cases of the "Errors you may see" table in docs/checkpoints.md)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

import conftest
from mile_jax import config_files
from mile_jax import train_lib
from mile_jax.data import tokenizer as tokenizer_lib
from mile_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Settings that validate() refuses: (overrides, the start of the message).
INVALID = {
    "negative gamma": ({"loss.gamma": -1.0}, "loss.gamma: must be a finite number >= 0.0, got -1.0"),
    "NaN gamma": ({"loss.gamma": float("nan")}, "loss.gamma: must be a finite number >= 0.0, got nan"),
    "negative sigma": ({"loss.sigma": -0.5}, "loss.sigma: must be a finite number >= 0.0, got -0.5"),
    "NaN sigma": ({"loss.sigma": float("nan")}, "loss.sigma: must be a finite number >= 0.0, got nan"),
    "unknown loss": ({"loss.name": "mle"}, "loss.name: must be one of ('cross_entropy', 'focal', 'mile'), got 'mle'"),
    "seq_len beyond the model": ({"data.seq_len": 128}, "data.seq_len: 128 is longer than model.max_seq_len=64"),
    "warm-up longer than training": ({"optim.warmup_steps": 40},
                                     "optim.warmup_steps: 40 is not shorter than train.steps=30"),
    "vocabulary below what a tokenizer can be trained with": (
        {"model.vocab_size": 260}, "model.vocab_size: no tokenizer of 260 pieces can be trained; the smallest is "
                                   "261: 4 special pieces, 256 byte pieces (data.byte_fallback=True) and one "
                                   "character"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_settings_are_named(tiny_config, tmp_path, case):
  overrides, message = INVALID[case]
  with pytest.raises(ConfigError) as info:
    train_lib.Trainer(tiny_config(**overrides), str(tmp_path))
  assert str(info.value).startswith(message), str(info.value)
  assert not os.listdir(tmp_path)  # Refused before touching the workdir.


def test_batch_not_divisible_by_data_parallel_size(tiny_config, tmp_path):
  with pytest.raises(ConfigError, match=r"^data.global_batch_size: 12 is not divisible by the "
                     r"data-parallel size 8 \(mesh data x fsdp\)"):
    train_lib.Trainer(tiny_config(**{"data.global_batch_size": 12, "mesh.num_devices": 0}), str(tmp_path))


def test_mesh_shape_not_matching_the_devices(tiny_config, tmp_path):
  with pytest.raises(ConfigError, match=r"mesh.shape \(3, 1, 1\) needs 3 devices but 8 are available"):
    train_lib.Trainer(tiny_config(**{"mesh.shape": (3, 1, 1), "mesh.num_devices": 0}), str(tmp_path))
  with pytest.raises(ConfigError, match=r"mesh.num_devices=9 but only 8 devices"):
    train_lib.Trainer(tiny_config(**{"mesh.num_devices": 9}), str(tmp_path))
  with pytest.raises(ConfigError, match=r"mesh.num_devices: must be an integer >= 0"):
    train_lib.Trainer(tiny_config(**{"mesh.num_devices": -1}), str(tmp_path))


def test_workdir_not_writable(tiny_config, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  workdir = str(blocker / "run")
  with pytest.raises(ConfigError, match=rf"^workdir: cannot write to {workdir} \(Not a directory\); "
                     r"choose another --workdir"):
    train_lib.Trainer(tiny_config(), workdir)


def test_vocabulary_mismatch_between_tokenizer_and_model(tiny_config, tmp_path):
  texts = [f"document {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(60)) for i in range(50)]
  tok = tokenizer_lib.train_tokenizer(texts, 300, str(tmp_path / "tok"), corpus_key="mismatch")
  config = tiny_config(**{"data.tokenizer_path": tok.model_path})
  with pytest.raises(ConfigError, match=r"^model.vocab_size=512 does not match the vocabulary of "
                     r"data.tokenizer_path=.*, which has 300 pieces"):
    train_lib.Trainer(config, str(tmp_path / "run")).run()


def test_empty_dataset(tiny_config, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  config = tiny_config(**{"data.source": f"files:{empty}", "data.cache_dir": str(tmp_path / "cache")})
  with pytest.raises(ConfigError, match=r"^data.source: .*empty.txt.* no non-empty documents"):
    train_lib.Trainer(config, str(tmp_path / "run")).run()


def test_vocabulary_sizes_a_tokenizer_can_be_trained_with_pass(tiny_config, tmp_path):
  # The smallest trainable size, and sizes with a tokenizer given, are not refused.
  train_lib.Trainer(tiny_config(**{"model.vocab_size": 261}), str(tmp_path / "a"))
  train_lib.Trainer(tiny_config(**{"model.vocab_size": 5, "data.byte_fallback": False}), str(tmp_path / "b"))
  with pytest.raises(ConfigError, match=r"^model.vocab_size: no tokenizer of 4 pieces .* smallest is 5: "):
    train_lib.Trainer(tiny_config(**{"model.vocab_size": 4, "data.byte_fallback": False}), str(tmp_path / "c"))
  train_lib.Trainer(tiny_config(**{"model.vocab_size": 3, "data.tokenizer_path": "/given.model"}), str(tmp_path / "d"))


def test_too_small_validation_split_names_val_fraction(tiny_config, tmp_path):
  config = tiny_config(**{"data.val_fraction": 0.0001})
  with pytest.raises(ConfigError, match=r"^data.val_fraction: 0.0001 holds out none of the \d+ documents of "
                     r"builtin:pydocs; raise data.val_fraction$"):
    train_lib.Trainer(config, str(tmp_path / "run")).run()


TRAINED_STEPS = 2


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """(workdir, config file) of a run trained to TRAINED_STEPS, whose config.json carries a marker."""
  tmp = tmp_path_factory.mktemp("trained")
  config = conftest.make_tiny_config(**{"train.steps": TRAINED_STEPS, "optim.warmup_steps": 1,
                                        "checkpoint.every_steps": TRAINED_STEPS, "train.log_every": 1})
  workdir = tmp / "run"
  train_lib.Trainer(config, str(workdir)).run()
  (tmp / "config.json").write_text(config.to_json())
  config_file = tmp / "tiny.py"
  config_file.write_text("import json\nimport ml_collections\n\n\ndef get_config():\n"
                         f"  with open({str(tmp / 'config.json')!r}) as f:\n"
                         "    return ml_collections.ConfigDict(json.load(f))\n")
  marked = json.loads((workdir / "config.json").read_text())
  marked["marker"] = "written by the first run"
  (workdir / "config.json").write_text(json.dumps(marked))
  return workdir, config_file


def _copy(workdir, target):
  shutil.copytree(workdir, target)
  return target


@pytest.fixture(scope="module")
def command_line_errors(tmp_path_factory, trained_run):
  """train.py's stderr and status for each bad command line, all run at once."""
  tmp = tmp_path_factory.mktemp("cli")
  raising = tmp / "raising.py"
  raising.write_text("def get_config():\n  raise RuntimeError('no corpus here')\n")
  typo = tmp / "typo.py"
  typo.write_text("from mile_jax import config_lib\n\n\ndef get_config():\n  return config_lib.base_confg()\n")
  (tmp / "cwd").mkdir()
  trained, tiny = trained_run
  resumed = ["--config", str(tiny), "--workdir"]
  busy = tmp / "busy"
  busy.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  (busy / "lock").write_text(f'{{"pid": {holder.pid}, "host": "{socket.gethostname()}", "since": {time.time()}}}')
  base = ["--config", "configs/default.py", "--workdir", str(tmp / "w")]
  cases = {
      "unknown key": base + ["--config.loss.gama=2"],
      "unknown section": base + ["--config.nonexistent=1"],
      "missing config": ["--config", "configs/missing.py", "--workdir", str(tmp / "w")],
      "raising config": ["--config", str(raising), "--workdir", str(tmp / "w")],
      "bad value": base + ["--config.loss.gamma=abc"],
      "mesh": base + ["--config.mesh.shape=(3,1,1)"],
      "busy": ["--config", "configs/default.py", "--workdir", str(busy)],
      "empty workdir": resumed + [""],
      "no get_config": ["--config", "mile_jax/core/losses.py", "--workdir", str(tmp / "w")],
      "config directory": ["--config", "configs", "--workdir", str(tmp / "w")],
      "config with a typo": ["--config", str(typo), "--workdir", str(tmp / "w")],
      "vocabulary too small": base + ["--config.model.vocab_size=3"],
      "steps below the checkpoint": resumed + [str(_copy(trained, tmp / "below")), "--config.train.steps=1",
                                               "--config.optim.warmup_steps=0"],
      "steps reached": resumed + [str(_copy(trained, tmp / "reached"))],
  }
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  procs = {name: subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args],
                                  cwd=tmp / "cwd" if name == "empty workdir" else ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for name, args in cases.items()}
  try:
    results = {}
    for name, proc in procs.items():
      stdout, stderr = proc.communicate(timeout=180)
      results[name] = (proc.returncode, stderr.strip().splitlines(), stdout)
  finally:
    holder.kill()
    holder.wait()
  return results, tmp


@pytest.mark.parametrize("case, status, line", [
    ("unknown key", 2, 'Config error: --config.loss.gama: no such setting in configs/default.py '
                       '(Did you mean "gamma" instead of "gama"?)'),
    ("unknown section", 2, "Config error: --config.nonexistent: no such setting in configs/default.py"),
    ("missing config", 2, "Config error: --config: no such file 'configs/missing.py'"),
    ("raising config", 2, "Config error: --config: {tmp}/raising.py line 2 raised RuntimeError: no corpus here"),
    ("bad value", 2, "Config error: flag --config.loss.gamma=abc: could not convert string to float: 'abc'"),
    ("mesh", 2, "Config error: mesh.shape (3, 1, 1) needs 3 devices but 8 are available; set mesh.shape so "
                "that its product is 8 (one -1 is allowed)"),
    ("busy", 2, "Workdir locked: workdir {tmp}/busy is in use by process"),
    ("empty workdir", 2, "Config error: workdir: must name a directory, got ''; pass --workdir DIR"),
    ("no get_config", 2, "Config error: --config: mile_jax/core/losses.py has no get_config() function; a config "
                         "file defines get_config() returning the config (see configs/default.py)"),
    ("config directory", 2, "Config error: --config: 'configs' is a directory; name a config file, e.g. "
                            "configs/default.py"),
    ("config with a typo", 2, "Config error: --config: {tmp}/typo.py line 5 raised AttributeError: module "
                              "'mile_jax.config_lib' has no attribute 'base_confg'"),
    ("vocabulary too small", 2, "Config error: model.vocab_size: no tokenizer of 3 pieces can be trained; the "
                                "smallest is 261: "),
    ("steps below the checkpoint", 2, f"Config error: train.steps: 1 is below step {TRAINED_STEPS} of the "
                                      f"workdir's newest checkpoint {{tmp}}/below/checkpoints/{TRAINED_STEPS}; "
                                      "nothing was trained and config.json is unchanged. Set train.steps to "
                                      f"{TRAINED_STEPS} or more to resume that run, or use a new --workdir"),
])
def test_train_py_prints_one_line(command_line_errors, case, status, line):
  results, tmp = command_line_errors
  returncode, stderr, _ = results[case]
  assert returncode == status, stderr
  assert len(stderr) == 1, stderr  # One line, no traceback.
  assert stderr[0].startswith(line.format(tmp=tmp)), stderr[0]


def test_empty_workdir_writes_nothing(command_line_errors):
  _, tmp = command_line_errors
  assert not os.listdir(tmp / "cwd")


@pytest.mark.parametrize("case", ["steps below the checkpoint", "steps reached"])
def test_resuming_a_finished_run_leaves_the_workdir_as_it_was(command_line_errors, trained_run, case):
  results, tmp = command_line_errors
  trained, _ = trained_run
  copy = tmp / {"steps below the checkpoint": "below", "steps reached": "reached"}[case]
  for name in ("config.json", "metrics.jsonl", "token_counts.npy", "tokenizer.model"):
    assert (copy / name).read_bytes() == (trained / name).read_bytes(), name
  assert sorted(os.listdir(copy / "checkpoints")) == [str(TRAINED_STEPS)]
  assert "lock" not in os.listdir(copy)


def test_a_finished_run_says_so_and_exits_0(command_line_errors):
  results, tmp = command_line_errors
  returncode, stderr, stdout = results["steps reached"]
  assert returncode == 0, stderr
  assert f"Nothing to train: checkpoint {tmp}/reached/checkpoints/{TRAINED_STEPS} is at step {TRAINED_STEPS} " \
         f"and the run ends at step {TRAINED_STEPS} (train.steps={TRAINED_STEPS}); the workdir is unchanged" \
         in stdout.splitlines(), stdout


@pytest.mark.parametrize("args, line", [
    (["--config=no_such.py"], "--config: no such file 'no_such.py'"),
    (["--config=configs/compare.py:bogus"],
     "configs/compare.py: unknown setting 'bogus'; use one of ('tiny', 'zipf', 'pydocs', '468m', '1b', '7b')"),
])
def test_config_flags_that_cannot_be_read_are_one_line(args, line, monkeypatch):
  """What plan and compare parse their --config with (train.py too, through the same description); a
  misspelt override is tested through plan's command line (test_plan.py)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  monkeypatch.chdir(ROOT)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
  with pytest.raises(ConfigError) as info:
    config_files.parse_config_flags(["prog", *args], values)
  assert str(info.value) == line


def test_compare_command_line_errors_are_one_line(tmp_path):
  result = subprocess.run([sys.executable, "-m", "mile_jax.experiments.compare", "--config=configs/compare.py",
                           f"--workdir={tmp_path / 'w'}", "--config.run.train.steps=0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert (result.returncode, result.stderr) == (2, "Config error: run.train.steps: must be a positive integer, "
                                                    "got 0\n")
  assert not os.path.exists(tmp_path / "w")
