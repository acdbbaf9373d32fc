"""Loads a trained run (config, tokenizer, parameters) onto this process's devices.

A run's workdir holds `config.json`, `tokenizer.model`, `token_counts.npy` and
`checkpoints/<step>/`. The train state is restored through the same model
code and sharding rules as training, onto a mesh built from whatever devices
this process has (`mesh_shape`, default all of them in FSDP), so a checkpoint
written on a pod restores on one CPU, or on each host of a pod alone. Only the parameters are read
(`Checkpointer.restore_params`): the optimizer state, twice the parameters'
size under AdamW, stays on disk.
"""

import dataclasses
import hashlib
import io
import json
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from mile_jax.core import model as model_lib
from mile_jax.core import optim
from mile_jax.core import sharding
from mile_jax.core import step as step_lib
from mile_jax.data import tokenizer as tokenizer_lib
from mile_jax.errors import ConfigError
from mile_jax.evaluation.errors import EvalError
from mile_jax.evaluation.model_on_mesh import ModelOnMesh
from mile_jax.run import checkpoint as checkpoint_lib
from mile_jax.run import checkpoint_steps
from mile_jax.run import workdir as workdir_lib

DEFAULT_MESH_SHAPE = (1, -1, 1)


@dataclasses.dataclass
class Restored(ModelOnMesh):
  """A checkpoint's model ready to evaluate, and where it came from."""
  step: int
  workdir: str
  config_hash: str

  def token_counts(self) -> np.ndarray:
    """int64 [vocab]: training-split occurrences of each token id (`load_token_counts`)."""
    return load_token_counts(self.workdir, self.config.model.vocab_size)


def load_token_counts(workdir: str, vocab_size: int) -> np.ndarray:
  """int64 [vocab_size]: the training-split occurrences of each token id that
  train.py saved in `<workdir>/token_counts.npy`.

  Raises:
    EvalError: naming token_counts.npy when it is missing, cannot be read as a
      NumPy array, or is not `vocab_size` non-negative integer counts with a
      positive sum.
  """
  path = workdir_lib.join(workdir, "token_counts.npy")
  fix = "copy the run's token_counts.npy back (train.py writes it into the workdir when it starts)"
  if not workdir_lib.path(path).is_file():
    raise EvalError(f"{path} is missing: the bucket analysis needs the training token counts "
                    f"that train.py writes into the workdir")
  raw = workdir_lib.path(path).read_bytes()
  try:
    if not raw.startswith(b"\x93NUMPY"):
      raise ValueError("it does not start with the .npy header")
    counts = np.load(io.BytesIO(raw), allow_pickle=False)
  except (ValueError, EOFError) as e:  # No or a damaged header, a cut-short body, a pickled object.
    why = str(e).splitlines()[0][:200] if str(e) else "it is cut short"
    raise EvalError(f"{path} is not a readable NumPy array of token counts ({why}); {fix}") from None
  if not isinstance(counts, np.ndarray) or counts.shape != (vocab_size,):
    raise EvalError(f"{path}: expected {vocab_size} token counts (model.vocab_size), found shape "
                    f"{getattr(counts, 'shape', None)}; {fix}")
  if not np.issubdtype(counts.dtype, np.integer):
    raise EvalError(f"{path}: expected integer token counts, found dtype {counts.dtype}; {fix}")
  if counts.min() < 0 or counts.sum() == 0:
    raise EvalError(f"{path}: expected non-negative token counts with a positive sum, found smallest "
                    f"{counts.min()}, sum {counts.sum()}; {fix}")
  return counts.astype(np.int64)


def config_hash(config_json: dict) -> str:
  """A short digest of the resolved config (key order does not matter)."""
  blob = json.dumps(config_json, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def locate(path: str, step: int | None) -> tuple[str, str, int]:
  """(workdir, checkpoint directory, step) for a workdir, its `checkpoints/`
  or one `checkpoints/<step>` directory; the latest step when `step` is None.

  Only finished steps not marked unreadable count (`checkpoint_steps`): on an
  object store a save in progress, or one a crash cut short, leaves a
  numbered directory that is not a checkpoint.
  """
  path = workdir_lib.resolve(path)
  if not workdir_lib.path(path).is_dir():
    raise EvalError(f"--workdir: no such directory {path}")
  name, parent = path.rsplit("/", 1)[1], path.rsplit("/", 1)[0]
  if name.isdigit() and parent.rsplit("/", 1)[-1] == "checkpoints":
    checkpoint_dir, step = parent, int(name) if step is None else step
  elif name == "checkpoints":
    checkpoint_dir = path
  else:
    checkpoint_dir = workdir_lib.join(path, "checkpoints")
  workdir = checkpoint_dir.rsplit("/", 1)[0]
  steps = checkpoint_steps.readable_steps(checkpoint_dir)
  if step is not None and step not in steps and step in checkpoint_steps.numbered_steps(checkpoint_dir):
    why = ("is marked unreadable" if step in checkpoint_steps.unreadable_steps(checkpoint_dir)
           else "is not finished (a save in progress, or one cut short)")
    raise EvalError(f"--step: checkpoint {workdir_lib.join(checkpoint_dir, str(step))} {why}; "
                    f"readable steps: {steps}")
  if not steps:
    raise EvalError(f"--workdir: no checkpoints in {checkpoint_dir}; train first "
                    f"(python train.py --workdir {workdir}) or point --workdir at a trained run")
  if step is None:
    step = steps[-1]
  if step not in steps:
    raise EvalError(f"--step: no checkpoint {step} in {checkpoint_dir}; available steps: {steps}")
  return workdir, checkpoint_dir, step


def load_config(workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The run's config (and its JSON) from `config.json`."""
  path = workdir_lib.join(workdir, "config.json")
  if not workdir_lib.path(path).is_file():
    raise EvalError(f"{path} is missing: eval.py needs the config.json that train.py writes into the workdir")
  fix = ("copy back the config.json that train.py wrote for this run (each checkpoint saves it too: "
         "mile_jax.run.checkpoint.Checkpointer.restore_config)")
  try:
    config_json = json.loads(workdir_lib.path(path).read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    where = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
    raise EvalError(f"{path} is not valid JSON ({where}); {fix}") from None
  if not isinstance(config_json, dict) or not isinstance(config_json.get("model"), dict):
    raise EvalError(f"{path} is not a run's config (a JSON object with a 'model' section); {fix}")
  return ml_collections.ConfigDict(config_json), config_json


def restore(path: str, step: int | None = None, mesh_shape: Sequence[int] = DEFAULT_MESH_SHAPE,
            devices: Sequence[Any] | None = None) -> Restored:
  """Restores the parameters at `step` (default: latest) of the run at `path`.

  Args:
    path: a workdir, its `checkpoints/` directory or one `checkpoints/<step>/`.
    mesh_shape: (data, fsdp, tensor) over `devices`; one -1 allowed.
    devices: default this process's devices (`jax.local_devices()`). In a
      multi-process run every process calls this (Orbax's read ends at a
      barrier of all processes) and gets the whole model on its own devices; eval.py's
      scorers then share out their batches among the processes (`processes`).
  Raises:
    EvalError: naming the directory, file or flag to fix, before any compile.
  """
  workdir, checkpoint_dir, step = locate(path, step)
  config, config_json = load_config(workdir)
  tokenizer_path = workdir_lib.join(workdir, "tokenizer.model")
  if not workdir_lib.path(tokenizer_path).is_file():
    raise EvalError(f"{tokenizer_path} is missing: eval.py needs the tokenizer that train.py writes into the workdir")
  tokenizer = load_run_tokenizer(tokenizer_path, config.model.vocab_size)
  try:
    mesh = sharding.make_mesh(mesh_shape, jax.local_devices() if devices is None else devices)
  except ValueError as e:
    raise EvalError(f"--mesh_shape: {e}") from None
  rules = sharding.rules_tuple(config.mesh.rules)
  # The attention kernel does not change the scores: pick the one for this machine, not the training run's
  # (a run trained with splash on TPU would otherwise be scored by the kernel's slow interpreter here).
  model_config = dataclasses.replace(model_lib.DecoderConfig.from_config(config.model), attention="auto")
  model = model_lib.Decoder(model_config)
  params = restore_params(checkpoint_dir, step, model, mesh, rules, config, config_json)
  return Restored(config=config, model=model, params=params, mesh=mesh, rules=rules, tokenizer=tokenizer,
                  step=step, workdir=workdir, config_hash=config_hash(config_json))


def load_run_tokenizer(path: str, vocab_size: int) -> tokenizer_lib.Tokenizer:
  """The run's `tokenizer.model` at `path`; EvalError naming the file unless it
  is a SentencePiece model of the run's `vocab_size` pieces."""
  fix = ("copy the run's tokenizer back: every checkpoint's meta holds it (mile_jax.run.checkpoint.tokenizer_bytes)")
  try:
    tokenizer = tokenizer_lib.load_tokenizer(path)
  except (RuntimeError, OSError) as e:  # SentencePiece raises RuntimeError for bytes it cannot parse.
    why = "it cannot be parsed" if isinstance(e, RuntimeError) else f"{type(e).__name__}: {e}"
    raise EvalError(f"{path} is not a readable SentencePiece model ({why}); {fix}") from None
  if tokenizer.vocab_size != vocab_size:
    raise EvalError(f"{path} has {tokenizer.vocab_size} pieces, the run's model.vocab_size is {vocab_size}; {fix}")
  return tokenizer


def restore_params(checkpoint_dir: str, step: int, model: model_lib.Decoder, mesh: jax.sharding.Mesh,
                   rules: tuple, config: ml_collections.ConfigDict, config_json: dict) -> Any:
  """The parameters of `checkpoint_dir/<step>`, placed with the shardings that
  `config.mesh.rules` give them on `mesh`; the optimizer state is not read.

  Raises:
    EvalError: the checkpoint holds other parameters than `config` makes
      (naming the model settings that differ from the ones it was saved with),
      or it cannot be read.
  """
  # The optimizer only shapes the abstract state (nothing is allocated); its params part is kept.
  tx, _ = optim.make_optimizer(config.optim, config.train.steps)
  abstract, shardings = step_lib.state_shardings(model, tx, mesh, rules, config.data.seq_len)
  checkpointer = checkpoint_lib.Checkpointer(checkpoint_dir, every_steps=1, max_to_keep=1 << 30,
                                             async_save=False)
  where = checkpointer.step_path(step)
  try:
    return checkpointer.restore_params(
        step, checkpoint_lib.abstract_with_shardings(abstract.params, shardings.params))
  except ConfigError as e:
    try:
      diffs = checkpoint_lib.config_differences(checkpointer.restore_config(step), config_json, ("model",))
    except Exception:  # pylint: disable=broad-except
      diffs = []  # No readable config item: the array difference alone is reported.
    config_path = workdir_lib.join(checkpoint_dir.rsplit("/", 1)[0], "config.json")
    if diffs:
      settings = "; ".join(f"{k}={theirs!r} there, {ours!r} in config.json" for k, theirs, ours in diffs)
      raise EvalError(f"{config_path}: checkpoint {where} was saved by a different model ({settings}); "
                      f"use the config.json of the run that wrote it") from None
    raise EvalError(f"{config_path}: {e}") from None
  except Exception as e:  # pylint: disable=broad-except
    # Orbax and TensorStore raise ValueError, KeyError, FileNotFoundError... for damaged files.
    raise EvalError(f"checkpoint {where} cannot be read ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:300] if str(e) else ''}); pass another --step") from None
