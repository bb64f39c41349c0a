"""The fastest plain reads of memory dotattn has: each core sums its own part of a buffer.

The decode bench's yardstick for what every core together can read (``bench_decode``'s
all-core read and its bound on × SDPA).  A yardstick slower than the memory would call a
kernel "at the bound" that is not, and no one loop is the fastest on every CPU, so there are
two and the bench keeps the faster of them each time:

* :func:`sum_parts` — a plain loop over each part (an array's ``sum``), which LLVM vectorizes
  for the CPU it compiles for, with several vector accumulators (``fastmath`` lets it
  reassociate).  On the two vCPUs of an AMD EPYC Zen 3 (AVX2) it read 29–34 GB/s where the
  loop below read 20–22, and a C loop of one vector accumulator 27–28 (5 Dec 2026,
  docs/decoding-log.md, "The all-core read on AVX2").
* :func:`sum_parts_lanes` — sixteen float32 accumulators, one 16-lane vector, filled in
  address order: 46–53 GB/s on the two cores of an AMD EPYC Zen 5 (AVX-512), where NumPy's
  ``sum`` in one thread per core read 38–43 (4 Dec 2026, docs/decoding-log.md, "The all-core
  read"); on AVX2 its accumulators are no one register, and it reads a third less.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["sum_parts", "sum_parts_lanes", "READ_LOOPS"]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def sum_parts(buf, parts):
    """``parts`` sums of ``buf`` (float32, 1-D), one per equal part (a tail of fewer than 16
    values per part is left out), the parts read at once on Numba's threads, each by a loop the
    compiler vectorizes."""
    n = buf.size // parts // 16 * 16
    out = np.zeros(parts, np.float32)
    for p in prange(parts):
        out[p] = buf[p * n : (p + 1) * n].sum()
    return out


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def sum_parts_lanes(buf, parts):
    """:func:`sum_parts` with sixteen accumulators filled in address order (one 16-lane vector)."""
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


READ_LOOPS = (sum_parts, sum_parts_lanes)  # the all-core read: the faster of these, run by run
