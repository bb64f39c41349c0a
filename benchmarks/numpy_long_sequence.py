"""Peak extra memory and time of the tiled NumPy backend at a long sequence.

    .venv/bin/python benchmarks/numpy_long_sequence.py [--length 65536] [--backward]

Naive attention would materialize Lq·Lk float32 scores: 16 GiB at 65,536 tokens.  The tiled
backend keeps O(L·D) plus one block per worker.  Two measures of "extra": NumPy's own
allocations traced by tracemalloc (exact, excludes the inputs), and the growth of the
process's peak RSS (includes BLAS buffers and the interpreter's own noise).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import tracemalloc

import numpy as np

from dotattn import semantics
from dotattn.kernels import numpy_tiled


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=65536)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--backward", action="store_true", help="also measure the backward pass")
    args = parser.parse_args()
    L, D = args.length, args.head_dim
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, L, D), dtype=np.float32) for _ in range(3))
    call = semantics.normalize(q, k, v)
    numpy_tiled.forward(semantics.normalize(q[..., :1024, :], k[..., :1024, :], v[..., :1024, :]))  # warm BLAS/pool
    rss_before = peak_rss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    out, lse = numpy_tiled.forward(call)
    seconds = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    result = {
        "length": L,
        "head_dim": D,
        "naive_scores_mib": L * L * 4 / 2**20,
        "forward_traced_peak_mib": round(traced_peak / 2**20, 1),
        "forward_peak_rss_growth_mib": round(peak_rss_mib() - rss_before, 1),
        "forward_seconds": round(seconds, 2),
        "forward_gflops": round(4 * L * L * D / seconds / 1e9, 1),
    }
    if args.backward:
        dout = rng.standard_normal(out.shape, dtype=np.float32)
        tracemalloc.reset_peak()
        t0 = time.perf_counter()
        numpy_tiled.backward(call, out, lse, dout)
        seconds = time.perf_counter() - t0
        result["backward_traced_peak_mib"] = round(tracemalloc.get_traced_memory()[1] / 2**20, 1)
        result["backward_seconds"] = round(seconds, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
