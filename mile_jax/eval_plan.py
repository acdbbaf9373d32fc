"""Will scoring fit: the log-likelihood program compiled for a target mesh, per packed layout.

`python -m mile_jax.plan --eval ...` (see plan.py) lowers eval.py's scoring
program (`lm.scoring_program`, the one LanguageModel runs) with abstract
parameters and one abstract batch of each layout (`packed_requests`): the
prefix tree with its `visible_until` mask on XLA's attention, and one
segment per request on the configured kernel. Batches are `batch_size` rows
of `width` slots and `scored` unembedded positions per data-parallel shard.
The compiled program's `memory_analysis()` gives the per-device peak; it is
set beside `layouts.working_bytes`, the estimate by which a call chooses its
layout. The numbers are the CPU compiler's (plan.py's caveats apply).
"""

import dataclasses
import math
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mile_jax.core import attention as attention_lib
from mile_jax.core import model as model_lib
from mile_jax.core import sharding
from mile_jax.evaluation import layouts
from mile_jax.evaluation import lm as lm_lib


@dataclasses.dataclass(frozen=True)
class EvalPlan:
  """Per-device bytes of one scoring batch of one layout."""
  layout: str  # "tree" or "segments"
  attention: str  # the kernel compiled
  batch_size: int  # rows per forward pass (global)
  width: int  # W
  scored: int  # S per data-parallel shard
  params_bytes: int  # parameter shard per device
  argument_bytes: int  # memory_analysis(): parameters and the batch
  output_bytes: int
  temp_bytes: int
  estimate_bytes: float  # layouts.working_bytes + params_bytes
  compile_seconds: float

  @property
  def peak_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes + self.temp_bytes


def abstract_batch(batch_size: int, width: int, scored: int, row_groups: int, mesh,
                   segments: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """One batch of `packed_requests.layout`'s arrays as sharded shapes (int32)."""
  spec = sharding.batch_sharding(mesh)
  rows = jax.ShapeDtypeStruct((batch_size, width), jnp.int32, sharding=spec)
  picked = jax.ShapeDtypeStruct((row_groups, scored), jnp.int32, sharding=spec)
  mask = "segment_ids" if segments else "visible_until"
  return {"inputs": rows, "positions": rows, mask: rows, "sources": picked, "targets": picked}


def plan_eval(config, devices: Sequence, *, batch_size: int, width: int, scored: int, segments: bool,
              log=lambda message: None) -> EvalPlan:
  """Compiles the scoring program of `config`'s model for one layout on `devices`
  (the mesh `config.mesh.shape`); nothing is allocated."""
  mesh = sharding.make_mesh(config.mesh.shape, devices)
  rules = sharding.rules_tuple(config.mesh.rules)
  cfg = model_lib.DecoderConfig.from_config(config.model)
  model = model_lib.Decoder(cfg)
  dp = sharding.data_parallel_size(mesh)
  if batch_size % dp:
    raise ValueError(f"--eval_batch_size: {batch_size} rows do not split over the {dp} data-parallel devices")
  boxed = jax.eval_shape(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32)), jax.random.key(0))["params"]
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings)
  params_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
  attention = "xla"
  if segments:
    attention, _ = attention_lib.resolve(
        cfg.attention, dtype=cfg.compute_dtype, head_dim=cfg.head_dim, seq_len=width, segmented=True)
  name = "segments" if segments else "tree"
  log(f"compiling the scoring program, layout {name}, attention {attention}, {batch_size} x {width} ...")
  start = time.perf_counter()
  with sharding.mesh_context(mesh, rules):
    program = lm_lib.scoring_program(model, mesh)
    compiled = program.lower(params, abstract_batch(batch_size, width, scored, dp, mesh, segments)).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  working = layouts.working_bytes(cfg, attention=attention, rows=batch_size // dp, width=width, scored=scored,
                                  heads_shards=int(mesh.shape["tensor"]))
  return EvalPlan(layout=name, attention=attention, batch_size=batch_size, width=width, scored=scored,
                  params_bytes=params_bytes, argument_bytes=int(memory.argument_size_in_bytes),
                  output_bytes=int(memory.output_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
                  estimate_bytes=working + params_bytes, compile_seconds=seconds)


def format_report(plans: Sequence[EvalPlan], config, size) -> str:
  """A table with one row per plan; `size` formats bytes."""
  d, f, t = config.mesh.shape
  lines = [f"scoring program, mesh data {d} x fsdp {f} x tensor {t}, compute {config.model.dtype}", "",
           "| layout | attention | batch x width | scored per shard | params | temporaries | peak | estimate "
           "| compile s |", "|---|---|---|---|---|---|---|---|---|"]
  for p in plans:
    lines.append(f"| {p.layout} | {p.attention} | {p.batch_size} x {p.width} | {p.scored} | {size(p.params_bytes)} "
                 f"| {size(p.temp_bytes)} | {size(p.peak_bytes)} | {size(p.estimate_bytes)} "
                 f"| {p.compile_seconds:.0f} |")
  lines += ["", "peak = arguments (parameters, batch) + outputs + temporaries (memory_analysis, per device); "
                "estimate = layouts.working_bytes + parameters, what eval.py chooses its layout by."]
  return "\n".join(lines)
