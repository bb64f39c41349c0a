"""The fastest plain read of memory dotattn has: each core sums its own part of a buffer.

The decode bench's yardstick for what every core together can read (``bench_decode``'s
all-core read and its bound on × SDPA).  NumPy's ``sum`` in one thread per core read 38–43 GB/s
on the two cores of an AMD EPYC Zen 5 machine; this loop — sixteen float32 accumulators, one
16-lane vector, filled in address order — 46–53 GB/s in the same processes (4 Dec 2026,
docs/decoding-log.md, "The all-core read").  A yardstick slower than the memory would call a
kernel "at the bound" that is not.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["sum_parts"]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def sum_parts(buf, parts):
    """``parts`` sums of ``buf`` (float32, 1-D), one per equal part (a tail of fewer than 16
    values per part is left out), the parts read at once on Numba's threads."""
    n = buf.size // parts // 16 * 16
    out = np.zeros(parts, np.float32)
    for p in prange(parts):
        seg = buf[p * n : (p + 1) * n]
        acc = np.zeros(16, np.float32)
        for i in range(0, n, 16):
            for j in range(16):
                acc[j] += seg[i + j]
        out[p] = acc.sum()
    return out
