"""Running the several processes of a multi-process CPU test (jax.distributed on 127.0.0.1)."""

import socket
import subprocess


def coordinator_address() -> str:
  """`127.0.0.1:<a free port>` for `jax.distributed.initialize`."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return f"127.0.0.1:{s.getsockname()[1]}"


def outputs_of(procs: list[subprocess.Popen], timeout: float) -> list[str]:
  """The stdout of each process once all have ended (each killed if it outlives `timeout`);
  asserts that all exited 0, showing every output if not."""
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=timeout)[0])
    finally:
      p.kill()
  assert [p.returncode for p in procs] == [0] * len(procs), outputs
  return outputs
