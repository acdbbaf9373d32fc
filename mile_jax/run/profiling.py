"""A `jax.profiler` trace of chosen train steps, and an optional profiler server.

With `train.profile_steps` > 0, steps `train.profile_start_step` onwards (step
N is the N-th update, as the logs count) are traced into
`<workdir>/tensorboard/plugins/profile/<time>/`: `<host>.xplane.pb`, which
TensorBoard's profile plugin reads (`tensorboard --logdir <workdir>/tensorboard`,
Profile tab), and `perfetto_trace.json.gz`, which ui.perfetto.dev opens.

Each traced step runs under `jax.profiler.StepTraceAnnotation("train",
step_num=N)`, so the tools split the timeline by step. Inside the traced
window every step also waits for its device work before the next is
dispatched: a step's annotation then spans its whole time, host and device,
and per-step time reads directly off the trace (outside the window the loop
dispatches ahead as usual).

`train.profile_server_port` starts `jax.profiler.start_server` for the run,
so that TensorBoard's "Capture profile" can trace any moment on demand. A port
already in use is refused before the run starts (`check_port`): the server
would fail to bind, say so only in the C++ log, and the run would go on
without it.

A run resumed past its profile window traces nothing and says so in one line
at its start (the window is part of the config, shared by the run's every
resumption, so it is not an error).
"""

import errno
import socket
from typing import Any, Callable

import jax

from mile_jax.errors import ConfigError


def check_port(port: int) -> None:
  """Raises ConfigError naming train.profile_server_port when `port` (> 0) cannot be listened on here."""
  if not port:
    return
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind(("", port))  # No SO_REUSEADDR: a port another process listens on fails here.
    except OSError as e:
      why = "already in use" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
      raise ConfigError(f"train.profile_server_port: port {port} is {why}; choose another port, or 0 for no "
                        f"profiler server") from None


class StepProfiler:
  """Traces the steps of `train_config`'s profile window into `log_dir`.

  Args:
    train_config: `config.train` (profile_steps, profile_start_step, profile_server_port).
    log_dir: the TensorBoard log directory (a local path).
    echo: prints one line when a trace is written, or when the window lies before `start`.
    start: the step the run starts after (its checkpoint's; 0 for a new run).
  """

  def __init__(self, train_config: Any, log_dir: str, echo: Callable[[str], None] = print, start: int = 0):
    self.first = int(train_config.profile_start_step)
    self.last = self.first + int(train_config.profile_steps) - 1
    self.log_dir = log_dir
    self.echo = echo
    self.tracing_since = None  # The first step of the trace being written.
    if train_config.profile_steps and self.last <= start:
      echo(f"Profile: no trace; the profile window (steps {self.first}-{self.last}, train.profile_start_step and "
           f"train.profile_steps) is before step {start + 1}, where this resumed run starts")
    port = int(train_config.profile_server_port)
    self.server = jax.profiler.start_server(port) if port else None

  def step(self, number: int, fn: Callable, *args):
    """`fn(*args)` as step `number`: traced, annotated and waited for when in the window."""
    if not self.first <= number <= self.last:
      return fn(*args)
    if self.tracing_since is None:
      jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
      self.tracing_since = number
    with jax.profiler.StepTraceAnnotation("train", step_num=number):
      out = jax.block_until_ready(fn(*args))
    if number == self.last:
      self._stop(number)
    return out

  def _stop(self, number: int) -> None:
    jax.profiler.stop_trace()
    self.echo(f"Wrote a profile of steps {self.tracing_since}-{number} to {self.log_dir}/plugins/profile "
              f"(TensorBoard's Profile tab; perfetto_trace.json.gz opens in ui.perfetto.dev)")
    self.tracing_since = None

  def close(self, number: int) -> None:
    """Ends a trace the run stopped inside (after step `number`), and the server."""
    if self.tracing_since is not None:
      self._stop(number)
    if self.server is not None:
      jax.profiler.stop_server()
      self.server = None
