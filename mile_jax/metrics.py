"""Metric output: one line on stdout, `metrics.jsonl` and TensorBoard scalars."""

import json
import os
import time
from typing import Mapping

import jax

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

  def write(self, step: int, scalars: Mapping[str, float], prefix: str) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    record = {"step": step, "split": prefix, "time": time.time(), **values}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in values.items():
      self._tb.add_scalar(f"{prefix}/{k}", v, step)
    self._echo(f"[{prefix}] step {step}: " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items()))

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _fmt(value: float) -> str:
  if value == 0 or 1e-3 <= abs(value) < 1e5:
    return f"{value:.4g}"
  return f"{value:.3e}"
