"""Writes a transformers LLaMA directory's weights as a new run's first checkpoint, a group of arrays at a time.

The checkpoint is the train state a run starting from those weights would
save: the parameters, a fresh optimizer state (AdamW's zero moments and
counts) and the step. None of it is made whole: the state's arrays are
written in groups (`checkpoint_stream`) of at most the largest array's
size; a parameter is read from the safetensors
files only when its group is written, each device copying its own slice
(`layout.place`), and an optimizer array is computed alone
(`optim.fresh_state_arrays`). So memory holds one group and what Orbax
copies of it to write, near the largest array, not the three copies of the
model that the whole state is. A workdir on an object store, where partial
saves cannot be written, gets the whole state saved as training saves it
(on an accelerator, device memory holds it; the host, Orbax's copy).
"""

from typing import Any

import jax
import numpy as np

from mile_jax.core import optim
from mile_jax.hf import layout as hf_layout
from mile_jax.run import checkpoint_stream
from mile_jax.run import workdir as workdir_lib


def _leaf_at(tree: Any, path: tuple) -> Any:
  for entry in path:
    tree = tree[getattr(entry, "key", getattr(entry, "name", None))]
  return tree


def write_checkpoint(trainer, hf_dir: str, step: int, meta: dict, echo=print) -> str:
  """Writes checkpoint `step` of `trainer`'s run from `hf_dir` (checked by `convert.import_config`).
  Returns its path.

  Raises:
    HFError: naming the tensor that is missing or of another shape, before anything is written.
  """
  if workdir_lib.is_remote(trainer.checkpointer.directory):  # See `checkpoint_stream`: the whole state.
    state = trainer.initial_state()
    state = state.replace(step=jax.device_put(np.int32(step), trainer.state_shardings.step))
    trainer.checkpointer.save(step, state, trainer.config_json, meta)
    trainer.checkpointer.wait()
    return trainer.checkpointer.step_path(step)
  model = trainer.model_config
  abstract = trainer.abstract_state
  views = hf_layout.load_params(hf_dir, abstract.params, model.n_layers, model.head_dim, echo=echo)
  shardings = {path: s for path, s in jax.tree_util.tree_leaves_with_path(trainer.state_shardings)}
  optimizer_arrays = optim.fresh_state_arrays(trainer.tx, abstract.params)
  optimizer_index = {path: i for i, (path, _) in
                     enumerate(jax.tree_util.tree_leaves_with_path(abstract.opt_state))}

  def make_arrays(group):
    out, fresh = {}, []
    for path, leaf in group:
      field = path[0].name
      if field == "params":
        view = _leaf_at(views, path[1:])
        out[path] = jax.make_array_from_callback(
            leaf.shape, shardings[path], lambda index, view=view: hf_layout.owned_float32(view[index]))
      elif field == "opt_state":
        fresh.append(path)
      else:
        out[path] = jax.device_put(np.asarray(step, leaf.dtype), shardings[path])
    if fresh:
      made = optimizer_arrays([optimizer_index[p[1:]] for p in fresh], [shardings[p] for p in fresh])
      out.update(zip(fresh, made))
    return [out[path] for path, _ in group]

  largest = max(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(abstract))
  return checkpoint_stream.write_step(trainer.checkpointer.directory, step, abstract, make_arrays,
                                      trainer.config_json, meta, max_group_bytes=largest)
