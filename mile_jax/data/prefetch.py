"""A background thread that makes batches ahead of the train step."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class Prefetcher:
  """Makes batches ahead of time on a daemon thread, handing them out in order.

  Args:
    make_batch: ``step -> batch`` (any pytree of numpy arrays); called with
      ``start_step, start_step + 1, ...`` from the background thread.
    start_step: the first step.
    buffer_size: batches made ahead at most.

  ``next()`` returns ``(step, batch)``. An exception raised by ``make_batch``
  is raised again by the ``next()`` that would have returned that step, and
  by every later call.
  """

  def __init__(
      self, make_batch: Callable[[int], Any], start_step: int = 0, buffer_size: int = 2
  ):
    if buffer_size < 1:
      raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    self._make_batch = make_batch
    self._queue: queue.Queue = queue.Queue(maxsize=buffer_size)
    self._stop = threading.Event()
    self._error: BaseException | None = None
    self._thread = threading.Thread(
        target=self._fill, args=(start_step,), name="mile_jax-prefetch", daemon=True
    )
    self._thread.start()

  def _put(self, item) -> bool:
    # A timeout rather than a blocking put, so close() is noticed promptly.
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self, step: int) -> None:
    while not self._stop.is_set():
      try:
        item = (step, self._make_batch(step), None)
      except BaseException as e:  # handed to the consumer, which decides
        self._put((step, None, e))
        return
      if not self._put(item):
        return
      step += 1

  def next(self) -> tuple[int, Any]:
    """The next ``(step, batch)``, waiting for it if needed."""
    if self._error is not None:
      raise self._error
    if self._stop.is_set():
      raise RuntimeError("Prefetcher is closed")
    step, batch, error = self._get()
    if error is not None:
      self._error = error
      raise error
    return step, batch

  def _get(self):
    # Polls rather than blocking forever, so a thread that died without
    # reporting (it never should) cannot hang the consumer.
    while True:
      try:
        return self._queue.get(timeout=0.1)
      except queue.Empty:
        if not self._thread.is_alive():
          try:
            return self._queue.get_nowait()
          except queue.Empty:
            raise RuntimeError("the prefetch thread stopped unexpectedly") from None

  __next__ = next

  def __iter__(self):
    return self

  def close(self) -> None:
    """Stop the thread and drop the batches it made ahead."""
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join(timeout=5.0)

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
