"""Returning freed heap memory to the system, so that a process's peak reflects what it holds."""

import ctypes


def release_freed_memory() -> None:
  """Returns freed heap memory to the system where glibc is the allocator. glibc raises its
  threshold for serving allocations with mmap to the size of each mmapped block freed, after
  which arrays of that size come from the heaps of TensorStore's threads and stay resident
  once freed; a fixed threshold keeps each array in its own mapping, released when freed."""
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, and no longer adjusted.
    libc.malloc_trim(0)
  except (OSError, AttributeError):
    pass
