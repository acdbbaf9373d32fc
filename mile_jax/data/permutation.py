"""A keyed permutation of ``[0, n)`` evaluated one index at a time.

A balanced Feistel network on ``2h`` bits, the smallest even width with
``2 ** 2h >= n``: the index splits into halves ``(L, R)`` of ``h`` bits and
each round maps ``(L, R) -> (R, L ^ f_i(R))``, with
``f_i(R) = mix64(R ^ k_i) mod 2**h`` (``mix64`` is the SplitMix64 finaliser,
``k_i`` 64-bit round keys drawn from ``np.random.SeedSequence(key)``). Any
round function gives a bijection of ``[0, 2**2h)``, since each round is
undone by ``(L, R) = (R' ^ f_i(L'), L')``. Cycle-walking restricts it to
``[0, n)``: an image ``>= n`` is mapped again until it falls below ``n``.
The walk stays in the cycle of the start, which returns to ``[0, n)``, so
the result is a bijection of ``[0, n)``; as ``2**2h < 4n``, a walk takes
fewer than 4 steps on average.

Memory is O(1) and an index costs O(rounds) whatever ``n`` is, so an epoch
of billions of rows is permuted without materialising anything, unlike
``np.random.permutation(n)`` (8 bytes per element, and O(n) time before the
first index). The order is not ``np.random``'s: the same key gives the same
permutation on every platform and numpy version, as it is plain uint64
arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix64(z: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser on uint64 [n] (wraps modulo 2**64)."""
  z = (z ^ (z >> _S30)) * _M1
  z = (z ^ (z >> _S27)) * _M2
  return z ^ (z >> _S31)


class KeyedPermutation:
  """A bijection of ``[0, n)`` fixed by ``key`` (non-negative ints).

  Args:
    n: the domain size, >= 1.
    key: e.g. ``(seed, stream, epoch)``; different keys give independent
      permutations.
  """

  def __init__(self, n: int, key: Sequence[int]):
    if n < 1:
      raise ValueError(f"domain size must be >= 1, got {n}")
    self.n = int(n)
    half = max(1, ((self.n - 1).bit_length() + 1) // 2)
    self._half = np.uint64(half)
    self._mask = np.uint64((1 << half) - 1)
    self._keys = np.random.SeedSequence([int(k) for k in key]).generate_state(_ROUNDS, np.uint64)

  def _feistel(self, x: np.ndarray, inverse: bool) -> np.ndarray:
    left, right = x >> self._half, x & self._mask
    if not inverse:
      for k in self._keys:
        left, right = right, left ^ (_mix64(right ^ k) & self._mask)
    else:
      for k in self._keys[::-1]:
        left, right = right ^ (_mix64(left ^ k) & self._mask), left
    return (left << self._half) | right

  def _walk(self, indices, inverse: bool) -> np.ndarray:
    x = np.asarray(indices, dtype=np.int64)
    if x.size and (x.min() < 0 or x.max() >= self.n):
      raise ValueError(f"indices must be in [0, {self.n})")
    y = self._feistel(x.astype(np.uint64).reshape(-1), inverse)
    todo = np.nonzero(y >= self.n)[0]
    while todo.size:
      y[todo] = self._feistel(y[todo], inverse)
      todo = todo[y[todo] >= self.n]
    return y.astype(np.int64).reshape(x.shape)

  def __call__(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """The images of ``indices``: int64, same shape."""
    return self._walk(indices, inverse=False)

  def inverse(self, images: Sequence[int] | np.ndarray) -> np.ndarray:
    """The indices whose images are ``images``: int64, same shape."""
    return self._walk(images, inverse=True)
