"""Which steps of a checkpoint directory can be read: finished, and not marked unreadable.

A step is finished when Orbax says so (`is_path_finalized`): on a filesystem
Orbax writes `<step>.orbax-checkpoint-tmp-*` and renames it, so a numbered
directory is complete; on an object store there is no rename, a step is
written in place and is complete once its `commit_success.txt` exists, so a
save that was killed leaves a numbered directory that is not a checkpoint.

A finished step that turned out to be damaged when read is marked with a
small object beside it, `<step>.unreadable` (JSON: why, when), and skipped by
everything that lists steps: resuming, eval.py, the export and the compare
tool. Nothing is copied or moved (a move on an object store is a copy of the
whole step); the step itself is deleted only when a resumed run saves that
step or a later one.
"""

import json
import time

from orbax.checkpoint import utils as ocp_utils

from mile_jax.run import workdir as workdir_lib

UNREADABLE_SUFFIX = ".unreadable"


def mark_path(directory: str, step: int) -> str:
  return workdir_lib.join(directory, f"{step}{UNREADABLE_SUFFIX}")


def numbered_steps(directory: str) -> list[int]:
  """The steps with a directory in `directory`, finished or not, ascending."""
  workdir_lib.forget_listings(directory)
  root = workdir_lib.path(directory)
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def unreadable_steps(directory: str) -> set[int]:
  """The steps marked unreadable in `directory`."""
  workdir_lib.forget_listings(directory)
  root = workdir_lib.path(directory)
  if not root.is_dir():
    return set()
  names = (p.name[:-len(UNREADABLE_SUFFIX)] for p in root.iterdir() if p.name.endswith(UNREADABLE_SUFFIX))
  return {int(name) for name in names if name.isdigit() and workdir_lib.path(directory, f"{name}{UNREADABLE_SUFFIX}").is_file()}


def is_finished(directory: str, step: int) -> bool:
  """Orbax's own test of a complete step (a finished rename, or `commit_success.txt`)."""
  return bool(ocp_utils.is_checkpoint_finalized(workdir_lib.path(directory, str(step))))


def readable_steps(directory: str) -> list[int]:
  """The finished steps in `directory` that are not marked unreadable, ascending."""
  marked = unreadable_steps(directory)
  return [s for s in numbered_steps(directory) if s not in marked and is_finished(directory, s)]


def mark_unreadable(directory: str, step: int, why: str) -> None:
  """Writes `<step>.unreadable` beside the step; the step itself is left as it is."""
  workdir_lib.path(mark_path(directory, step)).write_text(
      json.dumps({"step": step, "why": why, "marked": time.strftime("%Y-%m-%d %H:%M:%S")}))


def remove_step(directory: str, step: int) -> None:
  """Deletes a step marked unreadable, then its mark (an interrupted delete leaves it marked)."""
  step_dir = workdir_lib.path(directory, str(step))
  if step_dir.exists():
    step_dir.rmtree()
  workdir_lib.path(mark_path(directory, step)).unlink(missing_ok=True)
