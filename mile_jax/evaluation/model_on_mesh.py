"""What every scorer reads: a model, its parameters on a mesh, and the run's tokenizer.

eval.py builds one from a checkpoint (`restore.Restored`, which adds the step
and workdir); training builds one over its live parameters
(`in_training.InTrainingEval`), so that both score through the same functions.
"""

import dataclasses
from typing import Any

import jax
import ml_collections

from mile_jax.core import model as model_lib
from mile_jax.core import sharding
from mile_jax.data import tokenizer as tokenizer_lib


@dataclasses.dataclass
class ModelOnMesh:
  """A model ready to evaluate."""
  config: ml_collections.ConfigDict  # the run's config
  model: model_lib.Decoder
  params: Any  # unboxed parameter tree placed with its NamedShardings
  mesh: jax.sharding.Mesh
  rules: tuple
  tokenizer: tokenizer_lib.Tokenizer

  def context(self):
    """The mesh and logical-axis rules, entered around every traced call."""
    return sharding.mesh_context(self.mesh, self.rules)

  @property
  def max_seq_len(self) -> int:
    return int(self.config.model.max_seq_len)
