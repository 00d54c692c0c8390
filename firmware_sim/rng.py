"""Counter-based random numbers: the draw for counter ``c`` depends only on (key, c).

A running generator would make a sample depend on how many samples were drawn before
it, so reading a day in one call or in 24 calls would give different data. Here each
draw is a SplitMix64 hash of its key and counter (usually the sample time in epoch ms),
which keeps every simulated value a pure function of (seed, stream, time).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_TWO_POW_M53 = 2.0**-53


def _mix_int(x: int) -> int:
    """SplitMix64 finaliser on a Python int (for keys, computed once per call)."""
    x &= _MASK64
    x ^= x >> 30
    x = (x * _MUL1) & _MASK64
    x ^= x >> 27
    x = (x * _MUL2) & _MASK64
    return x ^ (x >> 31)


def stream_key(*parts: int) -> int:
    """Combine integers (seed, stream id, ...) into one 64-bit key."""
    h = 0
    for part in parts:
        h = _mix_int(h ^ ((part + _GOLDEN) & _MASK64))
    return h


def _mix_array(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    # Array arithmetic on uint64 wraps silently (only NumPy scalars warn on overflow).
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(_MUL1)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(_MUL2)
    return x ^ (x >> np.uint64(31))


def _counters(counters: ArrayLike) -> NDArray[np.uint64]:
    arr = np.ascontiguousarray(counters, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("counters must be a one-dimensional array")
    return arr.view(np.uint64)


def uniform(key: int, counters: ArrayLike) -> NDArray[np.float64]:
    """Uniform draws in the open interval (0, 1), one per counter."""
    x = _counters(counters) * np.uint64(_GOLDEN) + np.uint64(key & _MASK64)
    bits = _mix_array(x) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) * _TWO_POW_M53


def normal(key: int, counters: ArrayLike) -> NDArray[np.float64]:
    """Standard normal draws (Box-Muller), one per counter."""
    u1 = uniform(key, counters)
    u2 = uniform(_mix_int(key ^ 0x5DEECE66D), counters)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def scalar_uniform(key: int) -> float:
    """One uniform draw in (0, 1) for a key (device constants, city layout)."""
    return float(uniform(key, np.zeros(1, dtype=np.int64))[0])
