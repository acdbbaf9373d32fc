"""Metric output: one line on stdout, `metrics.jsonl` and TensorBoard scalars;
and the lines a training run prints about itself before and after its steps."""

import json
import os
import time
from typing import Mapping

import jax

from mile_jax.core import attention
from mile_jax.core import model as model_lib

# bfloat16 dense peak FLOP/s per device by `device_kind`, for MFU.
PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def peak_flops_per_device(configured: float = 0.0) -> float:
  """The configured peak, else the table's entry for this device kind, else 0."""
  if configured > 0:
    return configured
  return PEAK_FLOPS.get(jax.devices()[0].device_kind, 0.0)


class MetricWriter:
  """Writes scalars to stdout, `<workdir>/metrics.jsonl` and TensorBoard.

  Only the primary process writes; others make every call a no-op.
  """

  def __init__(self, workdir: str, enabled: bool = True, echo=print):
    self.enabled = enabled
    self._echo = echo
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float], prefix: str, note: str = "") -> None:
    """One record `{step, split: prefix, time, **scalars}`; `note` goes to stdout only."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    record = {"step": step, "split": prefix, "time": time.time(), **values}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(f"{prefix}/{k}", v, step)
    line = f"[{prefix}] step {step}: " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
    self._echo(f"{line} ({note})" if note else line)

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def loss_text(loss_config) -> str:
  """The loss and the parameters it uses: "cross_entropy", "focal (gamma 1.0)", "mile (gamma 1.0, sigma 1.0)"."""
  if loss_config.name == "cross_entropy":
    return "cross_entropy"
  if loss_config.name == "focal":
    return f"focal (gamma {loss_config.gamma})"
  return f"{loss_config.name} (gamma {loss_config.gamma}, sigma {loss_config.sigma})"


def layers_text(model_config) -> str:
  """"N layers, scanned" or "N layers, unrolled": how the blocks run (`model.scan_layers`,
  resolved by depth when unset)."""
  scanned = model_lib.DecoderConfig.from_config(model_config).scan_layers
  how = "scanned" if scanned else "unrolled"
  if model_config.get("scan_layers") is None:
    how += f" (model.scan_layers unset: scanned from {model_lib.SCAN_LAYERS_FROM} layers)"
  return f"{model_config.n_layers} layers, {how}"


def eval_schedule(eval_every: int, steps: int) -> str:
  """When a run of `steps` evaluates, given `train.eval_every` > 0 (multiples of it, and the last step)."""
  if eval_every > steps:
    return f"at the last step only ({steps}; train.eval_every={eval_every} is beyond train.steps)"
  if steps % eval_every:
    return f"every {eval_every} steps and at the last step ({steps})"
  return f"every {eval_every} steps"


def run_header(config, num_params: int, mesh, data, start: int, eval_batches: int) -> list[str]:
  """What a training run prints before its first step.

  Args:
    config: the run's config.
    num_params: parameter count.
    mesh: the `jax.sharding.Mesh` it trains on.
    data: its `DataSplits` (train and validation `PackedDataset`s, tokenizer).
    start: the step it starts from (> 0 when resumed).
    eval_batches: validation batches per in-training evaluation.
  """
  m, d, t = config.model, config.data, config.train
  device = mesh.devices.flat[0]
  tokens_per_step = d.global_batch_size * d.seq_len
  axes = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
  splits = ", ".join(f"{name} {split.num_tokens:,} tokens ({split.num_documents:,} documents)"
                     for name, split in (("train", data.train), ("validation", data.validation)))
  kernel, why = attention.resolve(m.attention, dtype=m.dtype, head_dim=m.d_model // m.n_heads, seq_len=d.seq_len,
                                  segmented=d.segment_documents)
  lines = [
      f"Model: {num_params:,} parameters ({layers_text(m)}, d_model {m.d_model}, vocabulary {m.vocab_size}, "
      f"{m.dtype}, {kernel} attention: {why}); loss {loss_text(config.loss)}",
      f"Devices: {mesh.size} x {device.device_kind} in {_plural(jax.process_count(), 'process')}; mesh {axes}",
      f"Batch: {d.global_batch_size} rows x {d.seq_len} tokens = {tokens_per_step:,} tokens per step in "
      f"{_plural(t.microbatches, 'micro-batch')}; {t.steps} steps = {t.steps * tokens_per_step:,} tokens",
      f"Data: {d.source}: {splits}; tokenizer of {data.tokenizer.vocab_size} pieces",
  ]
  if t.eval_every:
    rows = eval_batches * d.global_batch_size
    lines.append(
        f"Validation: {eval_schedule(t.eval_every, t.steps)}, [eval] lines score the first {eval_batches} batches "
        f"({rows} of the split's {data.validation.rows_per_epoch} rows, {rows * d.seq_len:,} tokens): an "
        f"estimate; eval.py --tasks ppl scores the whole validation split")
  lines.append(f"Start: resumed at step {start} of {t.steps}" if start else f"Start: a new run of {t.steps} steps")
  return lines


def closing_line(done: int, steps: int, trained: int, seconds: float, validation: Mapping[str, float] | None,
                 checkpoint: str | None) -> str:
  """What a training run prints after its last step.

  Args:
    done: the step it ended at; `steps`: train.steps.
    trained: steps taken by this run (fewer than `done` when resumed).
    seconds: wall time of this run.
    validation: the last in-training evaluation's metrics, if any.
    checkpoint: the newest checkpoint's path, if any.
  """
  status = "Training finished" if done >= steps else "Training stopped"
  parts = [f"{status} at step {done} of {steps} ({trained} steps in {seconds:.1f} s)"]
  if validation:
    parts.append(f"validation estimate ({int(validation['tokens']):,} tokens) loss {validation['loss']:.4f}, "
                 f"ce {validation['ce']:.4f}")
  parts.append(f"checkpoint {checkpoint}" if checkpoint else "no checkpoint saved")
  return "; ".join(parts)


def _plural(n: int, noun: str) -> str:
  return f"{n} {noun}" if n == 1 else f"{n} {noun}es"


def _fmt(value: float) -> str:
  if value.is_integer() and abs(value) < 1e9:  # Counts: tokens, skipped steps.
    return str(int(value))
  if 1e-3 <= abs(value) < 1e5:
    return f"{value:.4g}"
  return f"{value:.3e}"
