"""The shell commands of README.md and docs/*.md, and a dry check of each.

`extract(text)` finds, in the fenced shell blocks of a Markdown text, every
command that starts with `python train.py`, `python eval.py`,
`python -m mile_jax...`, `mile-train` or `mile-eval` (after `VAR=value`
assignments and `srun`). A block preceded by a line

    <!-- not checked: <why> -->

is exempt (a command that needs an accelerator, cloud storage or files that
only a real run makes); the reason must be given.

Run as a script, it reads a JSON list of argv lists on stdin and checks each
in a forked child of one process that has imported the heavy modules once:
the command's own entry point runs with `absl.app.run` replaced by a dry run
that parses the flags with the entry point's own parser (so unknown flags,
bad values, unknown config keys and bad override types fail), validates the
resulting config with `config_lib.validate`, checks eval task names and the
plan tool's mesh, and exits without touching data, checkpoints or devices.
It prints one JSON object per command: {"status": int, "output": str}.
"""

import json
import re
import shlex

MARKER = re.compile(r"<!--\s*not checked:\s*(\S.*?)\s*-->")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
SHELL = ("", "bash", "sh", "shell", "console")
ENTRY = re.compile(r"^(python3? (train\.py|eval\.py|-m mile_jax(\.\w+)*)|mile-train|mile-eval)( |$)")


def _command_lines(block: list[str]) -> list[tuple[int, str]]:
  """(offset in block, line) with backslash continuations joined."""
  out, current, start = [], "", 0
  for i, line in enumerate(block):
    if not current:
      start = i
    stripped = line.rstrip()
    if stripped.endswith("\\"):
      current += stripped[:-1] + " "
      continue
    out.append((start, current + stripped))
    current = ""
  if current:
    out.append((start, current))
  return out


def _argv(line: str) -> list[str] | None:
  """The command's argv from `python ...`/`mile-...` on, or None if it is not one of the checked commands."""
  try:
    words = shlex.split(line, comments=True)
  except ValueError:
    return None
  while words and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] == "srun"):
    words = words[1:]
  if not words or not ENTRY.match(" ".join(words[:3])):
    return None
  return words


def extract(text: str) -> list[dict]:
  """Every checked command of a Markdown text: {"line", "argv", "exempt"} (the
  exemption's reason or None), in order."""
  lines = text.splitlines()
  commands, i, pending = [], 0, None
  while i < len(lines):
    marker = MARKER.search(lines[i])
    if marker:
      pending = marker.group(1)
      i += 1
      continue
    fence = FENCE.match(lines[i])
    if not fence:
      if lines[i].strip():
        pending = None  # A marker applies to the block right after it.
      i += 1
      continue
    end = i + 1
    while end < len(lines) and not lines[end].strip().startswith(fence.group(2)):
      end += 1
    if fence.group(3).lower() in SHELL:
      for offset, line in _command_lines(lines[i + 1:end]):
        argv = _argv(line)
        if argv:
          commands.append({"line": i + 2 + offset, "argv": argv, "exempt": pending})
    pending, i = None, end + 1
  return commands


_entry = ""  # The command being checked: "train", "eval" or a module name.


def _positional_allowed(values) -> int:
  """How many positional arguments the entry point takes: `python -m mile_jax.hf export|import`,
  and `eval.py --compare A B ...`; the others take none."""
  if _entry == "mile_jax.hf":
    return 1
  if _entry == "eval" and values["compare"].value:
    return 1 << 30
  return 0


def _dry_app_run(main, argv=None, flags_parser=None, **unused):
  """absl.app.run without calling `main`: parse, validate, exit 0 (or the parser's own status)."""
  import sys  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from mile_jax import config_lib  # pylint: disable=import-outside-toplevel
  del main
  argv = sys.argv if argv is None else argv
  parse = flags_parser or flags.FLAGS
  try:
    remaining = parse(argv)
  except flags.Error as e:
    print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
    sys.exit(1)
  if len(remaining) - 1 > _positional_allowed(flags.FLAGS):
    print(f"unexpected arguments {remaining[1:]}", file=sys.stderr)
    sys.exit(1)
  values = flags.FLAGS
  if "config" in values and values["config"].value is not None:
    config = values["config"].value
    config_lib.validate(config.run if "run" in config else config)  # compare.py's config holds a run config.
  if "tasks" in values:
    from mile_jax.evaluation import tasks  # pylint: disable=import-outside-toplevel
    tasks.parse_task_names(values["tasks"].value)
  if "mesh" in values and values["mesh"].value:
    from mile_jax import plan  # pylint: disable=import-outside-toplevel
    plan.parse_mesh(values["mesh"].value)
  sys.exit(0)


def _check_in_child(argv: list[str], connection) -> None:
  """Runs one command's entry point with the dry app.run; sends (status, output)."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  import runpy  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import traceback  # pylint: disable=import-outside-toplevel
  from absl import app  # pylint: disable=import-outside-toplevel
  global _entry  # pylint: disable=global-statement
  app.run = _dry_app_run
  script = argv[1] if argv[0].startswith("python") else argv[0]  # train.py, eval.py, mile-train, mile-eval
  _entry = argv[2] if argv[1:2] == ["-m"] else re.sub(r"^mile-|\.py$", "", script)
  output, status = io.StringIO(), 0
  with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
    try:
      if argv[0] in ("mile-train", "mile-eval"):
        sys.argv = list(argv)
        runpy.run_module(f"mile_jax.{argv[0][5:]}_cli", run_name="__main__", alter_sys=True)
      elif argv[1] == "-m":
        sys.argv = [argv[2]] + argv[3:]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
      else:
        sys.argv = argv[1:]
        runpy.run_path(argv[1], run_name="__main__")
    except SystemExit as e:
      status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      if not isinstance(e.code, int) and e.code is not None:
        print(e.code)
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
      status = 1
  connection.send((status, output.getvalue()))


def main() -> None:
  import importlib  # pylint: disable=import-outside-toplevel
  import multiprocessing  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  # Imported once here (none defines flags on import); each child then defines its entry point's.
  for module in ("mile_jax.train_lib", "mile_jax.evaluation.runner", "mile_jax.plan", "mile_jax.experiments.compare"):
    importlib.import_module(module)
  context = multiprocessing.get_context("fork")
  for argv in json.load(sys.stdin):
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_check_in_child, args=(argv, send))
    child.start()
    send.close()
    status, output = receive.recv() if receive.poll(300) else (None, "no answer within 300 s")
    child.join()
    print(json.dumps({"status": status, "output": output}), flush=True)


if __name__ == "__main__":
  main()
