"""train.profile_*: a jax.profiler trace of the chosen steps under the workdir,
each step annotated with its number and holding the jitted train step; the
profiler server."""

import glob
import gzip
import json
import os
import socket

import jax
import pytest

from conftest import make_tiny_config
from mile_jax import config_lib
from mile_jax import train_lib
from mile_jax.errors import ConfigError
from mile_jax.run import profiling


def test_trace_of_the_chosen_steps_names_the_train_step(tmp_path):
  workdir = str(tmp_path / "run")
  config = make_tiny_config(**{"train.steps": 3, "optim.warmup_steps": 1, "train.log_every": 3,
                               "checkpoint.every_steps": 3, "train.profile_start_step": 2, "train.profile_steps": 2})
  lines = []
  train_lib.Trainer(config, workdir, devices=jax.devices()[:1], echo=lines.append).run()
  runs = glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*"))
  assert len(runs) == 1, runs  # One trace, in the layout TensorBoard's profile plugin reads.
  xplane = glob.glob(os.path.join(runs[0], "*.xplane.pb"))
  assert len(xplane) == 1
  with open(xplane[0], "rb") as f:
    assert b"jit_train_step" in f.read()
  with gzip.open(os.path.join(runs[0], "perfetto_trace.json.gz"), "rt", encoding="utf-8") as f:
    events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
  steps = [e for e in events if e["name"] == "train"]
  assert [int(e["args"]["step_num"]) for e in steps] == [2, 3]
  calls = [e for e in events if e["name"] == "PjitFunction(train_step)"]
  # XLA:CPU's runs of a compiled program, each on its own thread, waited for on another.
  runs = [e for e in events if e["name"] == "ThunkExecutor::Execute (wait for completion)"]
  inside = lambda e, step: step["ts"] <= e["ts"] and e["ts"] + e["dur"] <= step["ts"] + step["dur"]  # noqa: E731
  for step in steps:  # Each step's annotation spans a call of the jitted train step and its run on the device.
    assert any(inside(c, step) for c in calls)
    started = [e for e in runs if step["ts"] <= e["ts"] <= step["ts"] + step["dur"]]
    assert started and all(inside(e, step) for e in started)
  assert any(line.startswith("Wrote a profile of steps 2-3 to ") for line in lines)


def test_profiler_server_listens_on_the_port_and_settings_are_checked():
  with socket.socket() as s:  # A free port.
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  config = make_tiny_config(**{"train.profile_server_port": port})
  profiler = profiling.StepProfiler(config.train, "unused")
  try:
    socket.create_connection(("localhost", port), timeout=5).close()
  finally:
    profiler.close(0)
  assert profiler.server is None
  for setting, value, message in (("train.profile_steps", -1, "must be an integer >= 0, got -1"),
                                  ("train.profile_start_step", 0, "must be a positive integer, got 0"),
                                  ("train.profile_server_port", 65536, "must be a port number (0 = none), got 65536")):
    with pytest.raises(ConfigError) as raised:
      config_lib.validate(make_tiny_config(**{setting: value}))
    assert str(raised.value) == f"{setting}: {message}"


def test_a_profile_window_no_step_reaches_is_refused_or_said():
  with pytest.raises(ConfigError) as raised:
    config_lib.validate(make_tiny_config(**{"train.steps": 30, "train.profile_steps": 2, "train.profile_start_step": 31}))
  assert str(raised.value).startswith("train.profile_start_step: 31 is beyond train.steps=30: no step would be traced")
  config_lib.validate(make_tiny_config(**{"train.steps": 30, "train.profile_steps": 0, "train.profile_start_step": 31}))
  # A run resumed after step 20 of a config whose window is steps 10-11: one line at its start, no trace.
  train = make_tiny_config(**{"train.profile_steps": 2, "train.profile_start_step": 10}).train
  lines = []
  profiler = profiling.StepProfiler(train, "unused", echo=lines.append, start=20)
  assert lines == ["Profile: no trace; the profile window (steps 10-11, train.profile_start_step and "
                   "train.profile_steps) is before step 21, where this resumed run starts"]
  assert profiler.step(21, lambda x: x + 1, 1) == 2 and profiler.tracing_since is None
  for start in (0, 10):  # The window, or part of it, is still ahead.
    profiling.StepProfiler(train, "unused", echo=lines.append, start=start)
  assert len(lines) == 1


def test_a_profiler_port_in_use_is_refused_before_the_run(tmp_path):
  with socket.socket() as taken:
    taken.bind(("", 0))
    taken.listen()
    port = taken.getsockname()[1]
    with pytest.raises(ConfigError) as raised:
      train_lib.Trainer(make_tiny_config(**{"train.profile_server_port": port}), str(tmp_path / "run"))
  assert str(raised.value) == (f"train.profile_server_port: port {port} is already in use; choose another port, "
                               f"or 0 for no profiler server")
