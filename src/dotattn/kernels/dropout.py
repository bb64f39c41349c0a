"""Counter-based dropout masks: the same ``seed`` gives the same mask on every backend.

The keep decision for element ``(b, h, i, j)`` is a pure function of
``(seed, ((b·Hq + h)·Lq + i)·Lk + j)``: a SplitMix64 hash of the counter mixed with a hash of
the seed, its top 53 bits read as a uniform number ``u ∈ [0, 1)``; the element is kept when
``u ≥ p``.  No generator state is carried, so tiled kernels draw any block independently and
the backward pass re-draws exactly the forward's mask.  The functions work on NumPy
``uint64`` arrays and compile unchanged under Numba.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x):
    """SplitMix64 finalizer (Steele, Lea & Flood 2014) on uint64 values (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def seed_key(seed: int) -> np.uint64:
    """The per-call key mixed into every counter."""
    return splitmix64(np.array([seed], dtype=np.uint64))[0]


def keep_block(seed: int, p: float, b: int, h: int, rows: np.ndarray, cols: np.ndarray, Hq: int, Lq: int, Lk: int) -> np.ndarray:
    """Boolean keep mask ``(len(rows), len(cols))`` for a block of head ``h`` of sequence ``b``."""
    key = seed_key(seed)
    base = (np.uint64(b) * np.uint64(Hq) + np.uint64(h)) * np.uint64(Lq)
    counter = (base + rows.astype(np.uint64)[:, None]) * np.uint64(Lk) + cols.astype(np.uint64)[None, :]
    u = (splitmix64(counter ^ key) >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # 2**-53
    return u >= p


def keep_block_of(call, b: int, h: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """:func:`keep_block` for rows/cols/head ``h`` of an ``AttentionCall``, honouring its
    internal block geometry (a block of a larger problem draws the full problem's counters)."""
    h0, row0, col0, Hq, Lq, Lk = call.dropout_geometry
    return keep_block(call.seed, call.dropout_p, b, h + h0, rows + row0, cols + col0, Hq, Lq, Lk)
