"""Bad input gives one clear line naming what to fix, before anything compiles
(the cases of the README's "Errors you may see" table)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from mile_jax import config_lib
from mile_jax import train_lib
from mile_jax.data import tokenizer as tokenizer_lib

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
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_settings_are_named(tiny_config, tmp_path, case):
  overrides, message = INVALID[case]
  with pytest.raises(config_lib.ConfigError) as info:
    train_lib.Trainer(tiny_config(**overrides), str(tmp_path))
  assert str(info.value).startswith(message), str(info.value)
  assert not os.listdir(tmp_path)  # Refused before touching the workdir.


def test_batch_not_divisible_by_data_parallel_size(tiny_config, tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"^data.global_batch_size: 12 is not divisible by the "
                     r"data-parallel size 8 \(mesh data x fsdp\)"):
    train_lib.Trainer(tiny_config(**{"data.global_batch_size": 12, "mesh.num_devices": 0}), str(tmp_path))


def test_mesh_shape_not_matching_the_devices(tiny_config, tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"mesh.shape \(3, 1, 1\) needs 3 devices but 8 are available"):
    train_lib.Trainer(tiny_config(**{"mesh.shape": (3, 1, 1), "mesh.num_devices": 0}), str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match=r"mesh.num_devices=9 but only 8 devices"):
    train_lib.Trainer(tiny_config(**{"mesh.num_devices": 9}), str(tmp_path))
  with pytest.raises(config_lib.ConfigError, match=r"mesh.num_devices: must be an integer >= 0"):
    train_lib.Trainer(tiny_config(**{"mesh.num_devices": -1}), str(tmp_path))


def test_workdir_not_writable(tiny_config, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  workdir = str(blocker / "run")
  with pytest.raises(config_lib.ConfigError, match=rf"^workdir: cannot write to {workdir} \(Not a directory\); "
                     r"choose another --workdir"):
    train_lib.Trainer(tiny_config(), workdir)


def test_vocabulary_mismatch_between_tokenizer_and_model(tiny_config, tmp_path):
  texts = [f"document {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(60)) for i in range(50)]
  tok = tokenizer_lib.train_tokenizer(texts, 300, str(tmp_path / "tok"), corpus_key="mismatch")
  config = tiny_config(**{"data.tokenizer_path": tok.model_path})
  with pytest.raises(config_lib.ConfigError, match=r"^model.vocab_size=512 does not match the vocabulary of "
                     r"data.tokenizer_path=.*, which has 300 pieces"):
    train_lib.Trainer(config, str(tmp_path / "run")).run()


def test_empty_dataset(tiny_config, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  config = tiny_config(**{"data.source": f"files:{empty}", "data.cache_dir": str(tmp_path / "cache")})
  with pytest.raises(config_lib.ConfigError, match=r"^data.source: .*empty.txt.* no non-empty documents"):
    train_lib.Trainer(config, str(tmp_path / "run")).run()


@pytest.fixture(scope="module")
def command_line_errors(tmp_path_factory):
  """train.py's stderr and status for each bad command line, all run at once."""
  tmp = tmp_path_factory.mktemp("cli")
  raising = tmp / "raising.py"
  raising.write_text("def get_config():\n  raise RuntimeError('no corpus here')\n")
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
  }
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  procs = {name: subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for name, args in cases.items()}
  try:
    results = {}
    for name, proc in procs.items():
      _, stderr = proc.communicate(timeout=180)
      results[name] = (proc.returncode, stderr.strip().splitlines())
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
])
def test_train_py_prints_one_line(command_line_errors, case, status, line):
  results, tmp = command_line_errors
  returncode, stderr = results[case]
  assert returncode == status, stderr
  assert len(stderr) == 1, stderr  # One line, no traceback.
  assert stderr[0].startswith(line.format(tmp=tmp)), stderr[0]
