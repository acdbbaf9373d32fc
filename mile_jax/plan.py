"""Will it fit: compiles the train step for a target mesh ahead of time, allocating nothing.

  python -m mile_jax.plan --config configs/mile_7b.py --mesh 1,8,1 --device_memory_gib 80

The real jitted train step (Trainer's, with its shardings and donated state)
is lowered with abstract inputs (`jax.ShapeDtypeStruct`) and compiled by XLA
for as many fake CPU devices as the mesh has. The compiled program's
`memory_analysis()` gives per-device bytes; parameter, optimizer-state and
gradient bytes come from the shardings themselves. Several remat policies and
micro-batch counts, and attention kernels, can be compared in one call
(`--remat none,full --microbatches 1,4 --attention xla,splash`).

The numbers are XLA's CPU compiler's: the GPU and TPU compilers schedule,
fuse and lay out buffers differently, so treat temporaries as an estimate
(weights, optimizer state and gradients are exact). The CPU compiler's
default scheduler orders work for thread concurrency and runs every
rematerialised forward pass early, which keeps all layers' activations alive
and hides what remat saves; the tool switches it to the memory-minimising
scheduler (`CPU_MEMORY_SCHEDULER_FLAG`) so the temporaries reflect the
remat policy as the accelerator compilers apply it.

`--eval` compiles eval.py's scoring program instead (`eval_plan`): one batch
of `--eval_batch_size` rows of `--eval_width` slots in each packed layout, the
prefix tree (XLA's attention with its mask) and one segment per request
(each `--attention` kernel), and reports the per-device peak of each:

  python -m mile_jax.plan --config configs/mile_7b.py --mesh 1,8,1 --eval --eval_batch_size 32 --attention splash

Attention: `xla` is compiled as training runs it. `splash` is the TPU
kernel's own code run in Pallas interpret mode, so the compiled program holds
what the kernel holds in device memory (inputs, outputs and the per-row
logsumexp it saves for the backward pass; no [T, T] scores), which is what
the peak needs; the kernel's on-chip VMEM blocks, its speed and the TPU
compiler's fusions around it are not measured. `cudnn` cannot be compiled
for CPU devices and is refused; `auto` compiles as it resolves here, to xla.
"""

import dataclasses
import math
import os
import sys
import tempfile
import time
from typing import Any, Sequence

from mile_jax import requirements_check
requirements_check.require()  # Before the imports below: a missing package is one line, not a traceback.
import jax
import jax.numpy as jnp

from mile_jax import config_files
from mile_jax import config_lib
from mile_jax import eval_plan
from mile_jax import train_lib
from mile_jax.core import attention as attention_lib
from mile_jax.core import model as model_lib
from mile_jax.core import sharding

GIB = 1 << 30
CPU_MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device bytes and per-step work of one config on one mesh."""
  mesh_shape: tuple[int, int, int]  # (data, fsdp, tensor)
  remat: str
  attention: str  # The kernel compiled: model.attention as `attention.resolve` resolves it here.
  microbatches: int
  num_params: int
  params_bytes: int  # Parameter shard per device (float32).
  opt_state_bytes: int  # Optimizer state shard per device (Adam moments and counters).
  grads_bytes: int  # Gradient shard per device; lives inside the temporaries.
  batch_bytes: int  # This device's rows of the global batch.
  argument_bytes: int  # memory_analysis(): inputs (state and batch).
  output_bytes: int  # memory_analysis(): outputs (new state and metrics).
  alias_bytes: int  # memory_analysis(): outputs written into donated inputs.
  temp_bytes: int  # memory_analysis(): activations, gradients and workspace.
  tokens_per_step: int  # Global batch in tokens.
  compiled_flops_per_step: float  # cost_analysis() of the partitioned program x devices.
  model_flops_per_step: float  # model.flops_per_token x tokens: 6N plus causal attention.
  compile_seconds: float

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh_shape)

  @property
  def peak_bytes(self) -> int:
    """What one device holds while the step runs: inputs, outputs not written
    over donated inputs, and temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def fits(self, device_memory_bytes: float, usable_fraction: float = 1.0) -> bool:
    return self.peak_bytes <= device_memory_bytes * usable_fraction


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
  """Bytes of one device's shard of every leaf (shapes divide evenly or are padded)."""
  total = 0
  for leaf, leaf_sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    shard = leaf_sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
  return total


def abstract_batch(config) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch a train step takes, as shapes: (B, T) per entry."""
  shape = (config.data.global_batch_size, config.data.seq_len)
  batch = {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32), "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
           "mask": jax.ShapeDtypeStruct(shape, jnp.float32)}
  if config.data.get("segment_documents", False):
    batch["segment_ids"] = jax.ShapeDtypeStruct(shape, jnp.int32)
    batch["positions"] = jax.ShapeDtypeStruct(shape, jnp.int32)
  return batch


def _compiled_flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def plan(config, devices: Sequence[Any], log=lambda message: None) -> Plan:
  """Compiles `config`'s train step on `devices` (no arrays are allocated).

  Raises ConfigError, before compiling, when the mesh or batch cannot work.
  """
  with tempfile.TemporaryDirectory(prefix="mile_plan_") as workdir:
    trainer = train_lib.Trainer(config, workdir, devices=devices, echo=lambda _: None)
    batch = abstract_batch(config)
    log(f"compiling attention={config.model.attention} remat={config.model.remat} "
        f"microbatches={config.train.microbatches} ...")
    start = time.perf_counter()
    compiled = trainer.lower_train_step(batch).compile()
    seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  state, shardings = trainer.abstract_state, trainer.state_shardings
  batch_sharding = sharding.batch_sharding(trainer.mesh)
  mesh_shape = tuple(int(trainer.mesh.shape[a]) for a in sharding.MESH_AXES)
  tokens = config.data.global_batch_size * config.data.seq_len
  params_bytes = per_device_bytes(state.params, shardings.params)
  cfg = trainer.model_config
  attention, _ = attention_lib.resolve(cfg.attention, dtype=cfg.compute_dtype, head_dim=cfg.head_dim,
                                       seq_len=config.data.seq_len, segmented=bool(config.data.segment_documents))
  return Plan(
      mesh_shape=mesh_shape, remat=config.model.remat, attention=attention, microbatches=config.train.microbatches,
      num_params=model_lib.count_params(state.params), params_bytes=params_bytes,
      opt_state_bytes=per_device_bytes(state.opt_state, shardings.opt_state), grads_bytes=params_bytes,
      batch_bytes=per_device_bytes(batch, jax.tree.map(lambda _: batch_sharding, batch)),
      argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
      tokens_per_step=tokens, compiled_flops_per_step=_compiled_flops(compiled) * len(devices),
      model_flops_per_step=model_lib.flops_per_token(trainer.model_config, config.data.seq_len) * tokens,
      compile_seconds=seconds)


def parse_mesh(text: str) -> tuple[int, int, int]:
  """"1,8,1" -> (1, 8, 1): data, fsdp, tensor; each a positive integer."""
  try:
    shape = tuple(int(x) for x in text.replace("x", ",").split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise config_lib.ConfigError(f"--mesh: must be three positive integers data,fsdp,tensor "
                                 f"such as 1,8,1, got {text!r}")
  return shape


def _size(n: float) -> str:
  for unit, scale in (("GiB", GIB), ("MiB", 1 << 20)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n / 1024:.2f} KiB"


def format_report(plans: Sequence[Plan], config, device_memory_gib: float, usable_fraction: float) -> str:
  """A table with one row per plan and a verdict for `device_memory_gib` per device."""
  first = plans[0]
  d, f, t = first.mesh_shape
  lines = [
      f"model: {first.num_params / 1e9:.3f}B parameters, "
      f"{'scanned' if model_lib.DecoderConfig.from_config(config.model).scan_layers else 'unrolled'} layers, "
      f"compute {config.model.dtype}, loss {config.loss.name} ({config.loss.get('impl', 'naive')})",
      f"mesh: data {d} x fsdp {f} x tensor {t} = {first.num_devices} devices",
      f"global batch: {config.data.global_batch_size} x {config.data.seq_len} = {first.tokens_per_step:,} tokens",
      f"model FLOPs per step (6N + attention): {first.model_flops_per_step:.3e}",
      f"bytes per device; verdict for {device_memory_gib:g} GiB x {usable_fraction:g} usable",
      "",
      "| remat | micro-batches | attention | params | optimizer | gradients | temporaries | peak "
      "| compiled FLOPs/step | compile s | verdict |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for p in plans:
    fits = p.fits(device_memory_gib * GIB, usable_fraction)
    verdict = "fits" if fits else "does not fit"
    lines.append(
        f"| {p.remat} | {p.microbatches} | {p.attention} | {_size(p.params_bytes)} | {_size(p.opt_state_bytes)} "
        f"| {_size(p.grads_bytes)} | {_size(p.temp_bytes)} | {_size(p.peak_bytes)} "
        f"| {p.compiled_flops_per_step:.3e} | {p.compile_seconds:.0f} | {verdict} |")
  lines += ["", "peak = arguments + outputs - donated + temporaries (memory_analysis); gradients are part of the "
                "temporaries. Temporaries and compiled FLOPs are the CPU compiler's: an estimate for GPU/TPU."]
  if any(p.microbatches > 1 for p in plans):
    lines.append("compiled FLOPs count a loop's body once (the micro-batch loop, and the layers when they are scanned).")
  if any(p.attention == "splash" for p in plans):
    lines.append("splash ran in Pallas interpret mode: its device-memory buffers are the kernel's, its FLOPs and "
                 "the TPU compiler's fusions are not (docs/attention.md).")
  return "\n".join(lines)


def _split(text: str) -> list[str]:
  return [x.strip() for x in text.split(",") if x.strip()]


def _positive_int(flag: str, text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise config_lib.ConfigError(f"{flag}: must be comma-separated positive integers such as 1,4, got {text!r}")
  return value


def main(argv):
  del argv
  # Flags are parsed here, so the backend is not yet initialised.
  from absl import flags  # pylint: disable=import-outside-toplevel
  from absl import logging  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # The Trainer's Orbax manager logs at INFO.
  try:
    mesh_shape = parse_mesh(f.mesh)
    remats = _split(f.remat) or [f.config.model.remat]
    micro = [_positive_int("--microbatches", x) for x in _split(f.microbatches)] or [f.config.train.microbatches]
    attentions = _split(f.attention) or [f.config.model.attention]
    if f.device_memory_gib <= 0:
      raise config_lib.ConfigError(f"--device_memory_gib: must be > 0, got {f.device_memory_gib}")
    if not 0 < f.usable_fraction <= 1:
      raise config_lib.ConfigError(f"--usable_fraction: must be in (0, 1], got {f.usable_fraction}")
    # Read when the CPU backend starts, which has not happened yet.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_MEMORY_SCHEDULER_FLAG}".strip()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", math.prod(mesh_shape))
    devices = jax.devices()
    plans, config = [], None
    configs = []
    for attention in attentions:
      for remat in remats:
        for count in micro:
          config = f.config.copy_and_resolve_references()
          config.mesh.shape = mesh_shape
          config.model.update(attention=attention, remat=remat)
          config.train.microbatches = count
          config_lib.validate(config)
          configs.append(config)
    if f.eval:
      _main_eval(f, configs[0], attentions, devices)
      return
    for config in configs:
      plans.append(plan(config, devices, log=lambda m: print(m, file=sys.stderr, flush=True)))
  except (config_lib.ConfigError, ValueError) as e:
    message = str(e)
    if message.startswith("mesh.shape"):  # Set from --mesh here.
      message = "--mesh" + message[len("mesh.shape"):]
    print(f"Config error: {message}", file=sys.stderr)
    sys.exit(2)
  print(format_report(plans, config, f.device_memory_gib, f.usable_fraction))
  if not any(p.fits(f.device_memory_gib * GIB, f.usable_fraction) for p in plans):
    sys.exit(1)


def _main_eval(f, config, attentions, devices) -> None:
  """--eval: the scoring program's peak per layout (the tree once, segments per kernel); exit 1 if none fits."""
  width = f.eval_width or config.model.max_seq_len
  if f.eval_batch_size < 1 or width < 1 or f.eval_scored < 0:
    raise config_lib.ConfigError(f"--eval_batch_size, --eval_width, --eval_scored: must be positive, got "
                                 f"{f.eval_batch_size}, {width}, {f.eval_scored}")
  log = lambda m: print(m, file=sys.stderr, flush=True)
  common = dict(batch_size=f.eval_batch_size, width=width, scored=f.eval_scored or width, log=log)
  plans = [eval_plan.plan_eval(config, devices, segments=False, **common)]
  for attention in attentions:
    segmented = config.copy_and_resolve_references()
    segmented.model.attention = attention
    plans.append(eval_plan.plan_eval(segmented, devices, segments=True, **common))
  print(eval_plan.format_report(plans, config, _size))
  budget = f.device_memory_gib * GIB * f.usable_fraction
  for p in plans:
    print(f"{p.layout} ({p.attention}): {'fits' if p.peak_bytes <= budget else 'does not fit'} "
          f"{f.device_memory_gib:g} GiB x {f.usable_fraction:g}")
  if not any(p.peak_bytes <= budget for p in plans):
    sys.exit(1)


def _define_flags():
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=False)
  flags.DEFINE_string("mesh", None, "Target mesh data,fsdp,tensor, e.g. 1,8,1 (8 devices).")
  flags.DEFINE_float("device_memory_gib", 80.0, "Memory per device, GiB (16 for TPU v4/v5e, 80 for H100).")
  flags.DEFINE_float("usable_fraction", 1.0, "Fraction of it the program may use (0.75 = JAX's GPU default).")
  flags.DEFINE_string("remat", "", "Comma-separated remat policies to compare; '' = the config's.")
  flags.DEFINE_string("microbatches", "", "Comma-separated micro-batch counts to compare; '' = the config's.")
  flags.DEFINE_string("attention", "", "Comma-separated attention kernels to compare (xla, splash); '' = the config's.")
  flags.DEFINE_bool("eval", False, "Compile eval.py's scoring program (each packed layout) instead of the train step.")
  flags.DEFINE_integer("eval_batch_size", 32, "--eval: rows per forward pass (eval.py's --batch_size).")
  flags.DEFINE_integer("eval_width", 0, "--eval: slots per row; 0 = model.max_seq_len.")
  flags.DEFINE_integer("eval_scored", 0, "--eval: unembedded positions per data-parallel shard; 0 = the width.")
  flags.mark_flags_as_required(["config", "mesh"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel
  _define_flags()
  app.run(main, flags_parser=config_files.exiting_parser())
